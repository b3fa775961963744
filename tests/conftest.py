"""Shared fixtures: real temp dirs, a real receiver on loopback, the real CLI (in this process, or in a
subprocess where the process itself is what a test proves)."""

from __future__ import annotations

import io
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import pytest
from pgcluster import pg_cluster, pg_url  # noqa: F401 (fixtures: a throwaway PostgreSQL on loopback)
from ports import free_port
from sftp_server import SftpTestServer, running_sftp_server

from smt_watch.config import Settings, load_settings
from smt_watch.cpus import bind_threads
from smt_watch.reference.receiver import running_receiver
from smt_watch.watch import WatchService

# Loggers the CLI's setup_logging configures. A CLI run in this process (typer's CliRunner) leaves them
# writing to its closed capture stream with propagate off: later tests would print "--- Logging error ---"
# and caplog would see nothing. Each test gets them back as they were.
_CONFIGURED_LOGGERS = ("smt_watch", "paramiko", "psycopg", "psycopg.pool", "httpx", "httpcore", "gnupg", "uvicorn",
                      "uvicorn.error", "uvicorn.access")  # the last three: serve run in this process (http_server.run)


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger to open with ``test_ledger.open_at``: a SQLite file, or a fresh PostgreSQL database
    (tests/pgcluster.py). A test taking it runs on both: every ledger query is proven on both databases."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "l.sqlite3")


@contextmanager
def _loggers_kept() -> Iterator[None]:
    """Put back the handlers, propagation and level of the loggers ``setup_logging`` configures."""
    saved = [(lg, list(lg.handlers), lg.propagate, lg.level)
             for lg in map(logging.getLogger, _CONFIGURED_LOGGERS)]
    try:
        yield
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers = handlers  # a list of its own again (not edited in place: a list shared by two loggers
            # would carry one test's capture handler into the other logger, and every record would be seen twice)
            lg.propagate = propagate
            lg.setLevel(level)


@pytest.fixture(autouse=True)
def _restore_loggers() -> Iterator[None]:
    with _loggers_kept():
        yield

ADMIN_TOKEN = "admin-token-0123456789abcdef-SECRET"
UPLOAD_TOKEN = "upload-token-fedcba9876543210-SECRET"
SMT_WATCH = [sys.executable, "-m", "smt_watch"]
SUBPROCESS_PYTHONPATH = str(Path(__file__).resolve().parent / "startup")
"""``PYTHONPATH`` of the processes the tests start (base_env carries it): its sitecustomize.py keeps them from
importing selenium's trio, as a product install would (~0.1 s of CPU a process start; see that file)."""

POLL_SECONDS = 0.02  # how often wait_for re-checks its condition

# Every ``httpx.Client()``, and so every ``httpx.get``/``httpx.post``, builds an SSL context and loads the CA
# bundle into it: ~25 ms of CPU, although the tests' own servers speak plain HTTP on loopback. A poll for a
# starting server makes dozens of such requests while the server it waits for needs the CPU.
TLS_CONTEXT = ssl.create_default_context()  # for a test's own httpx.Client: ``verify=TLS_CONTEXT``, made once
LOOPBACK = httpx.Client(trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))
"""Requests to the tests' own servers in place of ``httpx.get``/``httpx.post``: one client for the test process,
no proxy from the environment, and no connection kept between requests (each opens and closes its own, as
``httpx.get`` does, so no idle connection holds a server's graceful stop or answers for a stopped one)."""


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``condition`` until truthy or fail after ``timeout``: the only way tests synchronise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_SECONDS)  # the poll interval of this deadline loop, not a synchronisation pause


# --- what this session collected --------------------------------------------------------------------------

COLLECTED: set[str] = set()  # every node id this session collected, before -m/-k/--deselect leave any out


@pytest.hookimpl(tryfirst=True)  # before the mark plugin's deselection (slow tests are named by mutants too)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Kept for tests/test_mutants_index.py: the ids the mutants name are checked against the collection
    this run made itself, instead of a second ``pytest --collect-only`` of the whole suite."""
    COLLECTED.update(item.nodeid for item in items)


# --- one headless Chromium per test process ----------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    return f"browser tests need Chromium and its driver; missing {' and '.join(missing)}" if missing else None


@pytest.fixture(scope="session")
def chromium_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the whole run (of this xdist worker): starting one costs seconds. Each
    module takes it through ``fresh_chromium``, which gives it back without cookies, at that module's size."""
    if why := chromium_missing():
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--lang=en-US", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def fresh_chromium(driver: Any, *, width: int, height: int, page_load: float, script: float = 30.0) -> Any:
    """The shared Chromium as a module starting on its own would have it: blank, no cookies (every serve is
    127.0.0.1, and cookies ignore the port), this window size and these time-outs."""
    driver.get("about:blank")
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    driver.set_window_size(width, height)
    driver.set_page_load_timeout(page_load)
    driver.set_script_timeout(script)
    return driver


@pytest.fixture
def sftp(tmp_path: Path) -> Iterator[SftpTestServer]:
    """A real SFTP server (asyncssh) on loopback with its own keys and remote tree, one per test: tests stall
    it, fault it and count its reads. A stalled one is released before it stops."""
    with running_sftp_server(tmp_path / "remote", tmp_path / "keys") as s:
        try:
            yield s
        finally:
            s.release()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[object]:
    with running_receiver(tmp_path / "received", admin_token=ADMIN_TOKEN, upload_token=UPLOAD_TOKEN) as r:
        yield r


# --- the ledger backend: SQLite by default; both for tests marked ``both_ledgers`` ------------------------

LEDGER_BACKENDS = ("sqlite", "postgres")
TEST_NODE = "test-node"  # SMT_NODE_NAME of the one node a both_ledgers test runs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("both_ledgers") and "ledger_backend" in metafunc.fixturenames:
        metafunc.parametrize("ledger_backend", LEDGER_BACKENDS, indirect=True)


@pytest.fixture
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """Which ledger ``base_env`` points at: ``sqlite`` (in SMT_STATE_DIR), or ``postgres`` (a fresh database
    of the session's cluster) for tests marked ``both_ledgers``, which run once with each."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def base_env(tmp_path: Path, ledger_backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """A clean environment: only what the test sets, plus what a subprocess needs to run."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    env = {
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_STATE_DIR": str(tmp_path / "state"),
        "SMT_RETRY_BACKOFF_SECONDS": "0.05",
        "SMT_HTTP_TIMEOUT": "10",
        # the outbound limit (on by default) is tests/test_limits.py's subject; elsewhere it would only slow
        # the drains of backlogs that other tests are about
        "SMT_MAX_REQUESTS_PER_SECOND": "0",
        "SMT_MAX_IN_FLIGHT": "0",
        "PYTHONPATH": SUBPROCESS_PYTHONPATH,  # for the processes a test starts; read by nothing in this one
    }
    if ledger_backend == "postgres":
        env.update(SMT_LEDGER_URL=str(request.getfixturevalue("pg_url")), SMT_NODE_NAME=TEST_NODE)
    return env


@pytest.fixture
def make_settings(base_env: dict[str, str]) -> Callable[..., Settings]:
    def make(**env: str) -> Settings:
        return load_settings({**base_env, **env})

    return make


def cli_env(base_env: dict[str, str], tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment a CLI run sees: the test's settings, PATH, and a HOME of its own."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env, **(env or {})}


@contextmanager
def _process_state_saved() -> Iterator[None]:
    """Put back what a CLI run changes in the process it runs in: os.environ, the working directory, argv,
    the signal handlers it may install, the CPUs its threads may use, the loggers setup_logging configures
    and the secrets it redacts."""
    from smt_watch import logs

    environ, cwd, argv = dict(os.environ), os.getcwd(), sys.argv
    cpus = os.sched_getaffinity(0)  # watch binds its process's threads to one CPU (SMT_ONE_CPU)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGIO)}
    redactor = logs._redactor
    secrets, pattern = set(redactor.secrets), redactor._pattern
    try:
        with _loggers_kept():
            yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        sys.argv = argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        redactor.secrets, redactor._pattern = secrets, pattern
        bind_threads(cpus)


def cli_in_process(
    args: tuple[str, ...] | list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``smt-watch ARGS`` run through the console script's own ``main()`` in this process, with exactly
    ``env`` as its environment (config reads only os.environ), stdin at end of file, stdout and stderr
    captured as a pipe would: what a subprocess would print and its exit status, without its ~0.5 s of
    interpreter start and imports. Warnings are shown on stderr as a plain interpreter shows them."""
    from smt_watch.cli import main

    def stream() -> io.TextIOWrapper:
        return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)

    out, err = stream(), stream()
    code: int = 0
    with _process_state_saved(), warnings.catch_warnings():
        warnings.resetwarnings()  # the interpreter's defaults, not pytest's
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        os.environ.clear()
        os.environ.update({"COLUMNS": "80", **env})  # 80: the width a subprocess writing to a pipe gets
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["smt-watch", *args]
        stdin, sys.stdin = sys.stdin, io.StringIO("")
        try:
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    main()
                except SystemExit as exc:
                    if exc.code is None or isinstance(exc.code, int):
                        code = exc.code or 0
                    else:  # sys.exit("message"): printed, status 1, as the interpreter does
                        print(exc.code, file=sys.stderr)
                        code = 1
        finally:
            sys.stdin = stdin
    texts = []
    for s in (out, err):
        s.flush()
        texts.append(s.buffer.getvalue().decode("utf-8", "replace"))  # type: ignore[attr-defined]
    return subprocess.CompletedProcess(["smt-watch", *args], code, texts[0], texts[1])


@pytest.fixture
def run_cli(base_env: dict[str, str], tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real CLI (its ``main()``) in this process with a controlled environment: for tests of what
    it prints and exits with. ``timeout`` is accepted for the subprocess signature; pytest-timeout bounds a
    hang here. Tests where the process is the point (signals, kill -9, a second process, start-up, module
    imports) use ``run_cli_process``."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return cli_in_process(args, cli_env(base_env, tmp_path, env), tmp_path)

    return run


@pytest.fixture
def run_cli_process(base_env: dict[str, str], tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real CLI in a subprocess with a controlled environment."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SMT_WATCH, *args], env=cli_env(base_env, tmp_path, env), capture_output=True, text=True,
            timeout=timeout, cwd=tmp_path,
        )

    return run


def write_csv(path: Path, rows: int = 10, seed: int = 0) -> Path:
    """A small SMT-shaped interval CSV; ``seed`` makes distinct content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
        "CONSUMPTION_SURPLUSGENERATION"
    ]
    for i in range(rows):
        h, m = divmod(i * 15, 60)
        h2, m2 = divmod(i * 15 + 15, 60)
        lines.append(
            f"'10443720000000001,01/01/2026,01/02/2026,{h % 24:02d}:{m:02d},{h2 % 24:02d}:{m2:02d},"
            f"{(i * 7 + seed) % 100 / 100:.3f},A,Consumption"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def unused_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    return free_port()


class IoCalls:
    """``os.fsync`` (with the path of the fd), ``os.link``, ``os.replace`` and sync's ``renameat2`` (as a
    "replace") calls in order, recorded on their way to the real functions: durability is asserted from the
    order of real calls, not from a crash."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, ...]] = []
        self._lock = threading.Lock()
        real_fsync, real_link, real_replace = os.fsync, os.link, os.replace

        def fsync(fd: int) -> None:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = "?"
            self._add("fsync", target)
            real_fsync(fd)

        def link(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            self._add("link", os.fspath(src), os.fspath(dst))
            real_link(src, dst, *a, **kw)

        def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            self._add("replace", os.fspath(src), os.fspath(dst))
            real_replace(src, dst, *a, **kw)

        from smt_watch import sync

        real_noreplace = sync._rename_noreplace

        def noreplace(src: Path, dst: Path) -> bool | None:  # sync places a part by renameat2 (ctypes)
            moved = real_noreplace(src, dst)
            if moved:
                self._add("replace", os.fspath(src), os.fspath(dst))
            return moved

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(sync, "_rename_noreplace", noreplace)

    def _add(self, *event: str) -> None:
        with self._lock:
            self.events.append(event)


@pytest.fixture
def io_calls(monkeypatch: pytest.MonkeyPatch) -> IoCalls:
    return IoCalls(monkeypatch)


@contextmanager
def watching(settings: Settings, **kw: Any) -> Iterator[WatchService]:
    """A WatchService in a thread, ready before the block runs; errors in it fail the test."""
    service = WatchService(settings, **kw)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            service.run()
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: service.ready.is_set() or errors, 30, "watch to be ready")
    if errors:
        raise errors[0]
    try:
        yield service
    finally:
        service.request_stop()
        thread.join(40)
        assert not thread.is_alive(), "watch did not stop"
    if errors:
        raise errors[0]
