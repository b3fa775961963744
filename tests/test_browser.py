"""`smt-watch serve` driven by a real headless Chromium: IntelliWatt's upload forms and the built-in page.

``tests/browser/forms.html`` is IntelliWatt's customer form (SmtUploadForm.tsx) and admin droplet form
(RawClient.tsx) as plain JS: the same FormData field order, the same ``fetch`` call and the same code
building the shown messages. It is served by a small static HTTP server on another loopback port, so every
upload is a real cross-origin request from the browser (Origin header, CORS). ``serve`` is the real CLI in
a subprocess on loopback, as in test_server_process.py. Tests assert on the text the page shows, check the
inbox on disk, and save one screenshot per case under the test's ``tmp_path`` (also when it fails).

Every wait is a condition with a deadline (WebDriverWait or conftest's ``wait_for``); nothing sleeps.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from ports import free_port

from conftest import LOOPBACK, SMT_WATCH, UPLOAD_TOKEN, chromium_missing, fresh_chromium, wait_for, watching, write_csv

if why := chromium_missing():
    pytest.skip(f"{why} (Debian: apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.browser

PAGES = Path(__file__).parent / "browser"
TOKEN = UPLOAD_TOKEN
ADMIN_LIMIT = 50
CUSTOMER_LIMIT = 5
SHORT = 30.0  # deadline for a small upload's reply, generous for a loaded 2-core machine
MEDIUM = 60.0  # deadline for the built-in page's 8 MB upload
BIG = 120.0  # deadline for a 50 MB upload's reply
BIG_BYTES = 50 * 1024 * 1024
MAX_BYTES = 1_000_000  # SMT_UPLOAD_MAX_BYTES in the oversize cases
UNAUTHORIZED = "Invalid or missing SMT upload token"
ISO = "%Y-%m-%dT%H:%M:%SZ"
FORMS = ["customer", "admin"]

CUSTOMER_OK = re.compile(
    r"Upload accepted and queued\.(?: You are #\d+ in line\.| Your file is now processing\.)"
    r"(?: Estimated time: ~\d+s\.)? Remaining uploads this window: (\d+)\. You can close this page; we'll notify"
    r" you when processing completes if notifications are enabled on your account\."
)
CUSTOMER_QUEUE = re.compile(r"Queue position: (\d+)\.(?: Estimated time remaining: ~\d+ seconds\.)?")
CUSTOMER_429 = re.compile(r"Upload limit reached \((\d+) per window\)\. Window resets at (\S+)\.")
ADMIN_429 = re.compile(r"❌ Rate limit hit \((\d+) uploads per window\)\. Remaining: 0\. window resets at (\S+)\.")
FAILED_PREFIX = {"customer": "Upload failed: ", "admin": "❌ Upload failed: "}
ACCEPTED_PREFIX = {"customer": "Upload accepted and queued.", "admin": "✅ Uploaded "}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the forms' origin: a static HTTP server on another loopback port ----------------------------------


class _Quiet(SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def forms_origin() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` serving tests/browser/ (another origin than any ``serve``)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(PAGES)))
    thread = threading.Thread(target=httpd.serve_forever, name="forms-origin", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


# --- one headless Chromium per module -------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(chromium_session: WebDriver) -> WebDriver:
    """conftest's one Chromium, fresh for this module."""
    return fresh_chromium(chromium_session, width=1100, height=900, page_load=SHORT)


@pytest.fixture
def page(browser: WebDriver, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    """The shared browser, starting blank; its final state is saved as ``<test name>.png`` in tmp_path."""
    browser.get("about:blank")
    yield browser
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    browser.save_screenshot(str(tmp_path / f"{name}.png"))


# --- `serve` as a real process on loopback --------------------------------------------------------------


class Serve:
    """A ``smt-watch serve`` subprocess; its output goes to a file the failure messages quote."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upload_url = f"{self.url}/upload"
        self.inbox = Path(env["SMT_LOCAL_DIR"])
        self.log = log
        self._fh = log.open("ab")
        argv = [*SMT_WATCH, "serve", "--port", str(self.port), "--webhook-port", "0"]  # never 0.0.0.0:8787 in a test
        self.proc = subprocess.Popen(argv, env=env, stdout=self._fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=log.parent)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> dict[str, Any] | None:
        try:
            r = LOOPBACK.get(f"{self.url}/health", timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def wait_ready(self) -> None:
        wait_for(lambda: self.health() is not None or self.proc.poll() is not None, 30, "serve to answer /health")
        assert self.proc.poll() is None, self.text()

    def stop(self) -> None:
        """Killed, not stopped gracefully: no case here is about stopping, and a graceful stop waited ~0.4 s
        per case for the browser's kept-alive connections to close."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()

    def stored(self) -> list[Path]:
        """Visible files in the inbox (what ``watch`` would pick up)."""
        return sorted(p for p in self.inbox.iterdir() if not p.name.startswith("."))

    def temps(self) -> list[Path]:
        return sorted(self.inbox.glob(".upload-*"))

    def everything(self) -> list[str]:
        return sorted(p.name for p in self.inbox.rglob("*"))


@pytest.fixture
def serve_env(base_env: dict[str, str], tmp_path: Path, forms_origin: str) -> dict[str, str]:
    """What every case's ``serve`` gets: only what the test sets (no token), the forms' origin allowed."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env,
            "SMT_UPLOAD_CORS_ORIGINS": forms_origin, "SMT_UPLOAD_ADMIN_LIMIT": str(ADMIN_LIMIT),
            "SMT_UPLOAD_CUSTOMER_LIMIT": str(CUSTOMER_LIMIT)}


@pytest.fixture
def serving(serve_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """``serving(**env)`` starts ``serve`` with these variables on top of ``serve_env``; killed at teardown."""
    started: list[Serve] = []

    def start(**env: str) -> Serve:
        s = Serve({**serve_env, **env}, tmp_path / "serve.log")
        started.append(s)
        s.wait_ready()
        return s

    yield start
    for s in started:
        s.stop()


# --- the forms page -------------------------------------------------------------------------------------


def open_forms(driver: WebDriver, forms_origin: str, serve: Serve) -> None:
    driver.get(f"{forms_origin}/forms.html?upload={quote(serve.upload_url, safe='')}")
    assert driver.find_element(By.ID, "admin-form") and driver.find_element(By.ID, "customer-form")


_STATE = """
const form = arguments[0];
const button = document.getElementById(form + "-submit");
if (form === "customer") {
  const box = document.getElementById("customer-status");
  const message = document.getElementById("customer-message");
  const queue = document.getElementById("customer-queue");
  return {busy: button.disabled, hidden: box.hidden, message: message ? message.textContent : "",
          queue: queue ? queue.textContent.trim() : null, body: document.body.innerText};
}
const box = document.getElementById("admin-status");
return {busy: button.disabled, hidden: box.hidden, message: box.textContent, queue: null,
        body: document.body.innerText};
"""
_PENDING = {"Uploading…", "Uploading to droplet…", ""}


def submit(driver: WebDriver, form: str, path: Path, serve: Serve, *, account: str = "HOME-12345",
           timeout: float = SHORT) -> dict[str, Any]:
    """Choose ``path`` in ``form``, press its button, wait for the finished status; returns what is shown."""
    driver.find_element(By.ID, f"{form}-file").send_keys(str(path))
    if form == "customer":
        field = driver.find_element(By.ID, "customer-account")
        field.clear()
        field.send_keys(account)
    driver.find_element(By.ID, f"{form}-submit").click()

    def finished(d: WebDriver) -> dict[str, Any] | None:
        state: dict[str, Any] = d.execute_script(_STATE, form)
        return state if not state["busy"] and not state["hidden"] and state["message"] not in _PENDING else None

    try:
        shown: dict[str, Any] = WebDriverWait(driver, timeout, poll_frequency=0.05).until(finished)
    except TimeoutException:
        state = driver.execute_script(_STATE, form)
        raise AssertionError(f"the {form} form showed no result within {timeout}s: {state!r}\n"
                             f"serve log:\n{serve.text()[-3000:]}") from None
    return shown


def last_reply(driver: WebDriver) -> dict[str, Any] | None:
    """The last response the forms page read (its test hook): ``{form, status, rawText}``."""
    reply: dict[str, Any] | None = driver.execute_script("return window.lastReply")
    return reply


def assert_no_raw_json(shown: dict[str, Any]) -> None:
    assert "{" not in shown["message"] and '"ok"' not in shown["message"], shown["message"]
    assert '"error"' not in shown["body"], shown["body"]


def stored_one(serve: Serve, name: str) -> Path:
    """Exactly one visible file in the inbox, named ``<stamp>_<name>``, and no temp left behind."""
    files = serve.stored()
    assert [p.name.split("_", 1)[-1] for p in files] == [name], serve.everything()
    assert serve.temps() == [], serve.everything()
    return files[0]


def assert_nothing_stored(serve: Serve) -> None:
    assert serve.stored() == [] and serve.temps() == [], serve.everything()


def parse_reset(text: str) -> datetime:
    return datetime.strptime(text, ISO).replace(tzinfo=UTC)


def small_csv(tmp_path: Path, name: str, seed: int, rows: int = 50) -> Path:
    return write_csv(tmp_path / "src" / str(seed) / name, rows=rows, seed=seed)


# --- accepted uploads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_small_upload_is_accepted_and_stored_byte_for_byte(page: WebDriver, forms_origin: str, serving: Any,
                                                           tmp_path: Path, form: str) -> None:
    serve = serving()
    src = small_csv(tmp_path, "IntervalData.csv", seed=1)
    open_forms(page, forms_origin, serve)
    shown = submit(page, form, src, serve)
    if form == "customer":
        m = CUSTOMER_OK.fullmatch(shown["message"])
        assert m, shown["message"]
        assert int(m.group(1)) == CUSTOMER_LIMIT - 1, shown["message"]
        assert shown["queue"] is not None, f"no queue position shown (the reply has no queue): {last_reply(page)}"
        assert CUSTOMER_QUEUE.fullmatch(shown["queue"]), shown["queue"]
    else:
        size = src.stat().st_size
        assert shown["message"] == (f"✅ Uploaded IntervalData.csv ({size:,} bytes). Ingest queued. "
                                    f"(remaining uploads this window: {ADMIN_LIMIT - 1})")
    assert stored_one(serve, "IntervalData.csv").read_bytes() == src.read_bytes()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("form", FORMS)
def test_50_mb_upload_is_accepted_and_stored_byte_for_byte(page: WebDriver, forms_origin: str, serving: Any,
                                                           tmp_path: Path, form: str) -> None:
    serve = serving()
    src = tmp_path / "src" / "big.csv"
    src.parent.mkdir(parents=True)
    src.write_bytes(os.urandom(BIG_BYTES))
    try:
        open_forms(page, forms_origin, serve)
        shown = submit(page, form, src, serve, timeout=BIG)
        if form == "customer":
            assert shown["message"].startswith("Upload accepted and queued."), shown["message"]
        else:
            assert shown["message"].startswith(f"✅ Uploaded big.csv ({BIG_BYTES:,} bytes). Ingest queued."), (
                shown["message"])
        stored = stored_one(serve, "big.csv")
        assert stored.stat().st_size == BIG_BYTES
        assert file_sha(stored) == file_sha(src)
    finally:  # pytest keeps the last runs' tmp dirs: keep the screenshot, not 100 MB per case
        for big in [src, *serve.inbox.iterdir()]:
            big.unlink(missing_ok=True)


# --- refusals shown as sentences ------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_oversize_upload_shows_the_413_as_a_sentence_naming_the_limit(page: WebDriver, forms_origin: str,
                                                                      serving: Any, tmp_path: Path,
                                                                      form: str) -> None:
    serve = serving(SMT_UPLOAD_MAX_BYTES=str(MAX_BYTES))
    src = tmp_path / "src" / "huge.csv"
    src.parent.mkdir(parents=True)
    src.write_bytes(os.urandom(2 * MAX_BYTES + 12345))
    open_forms(page, forms_origin, serve)
    shown = submit(page, form, src, serve)
    reply = last_reply(page)
    # the browser read the server's early answer (not a reset connection while it was still sending)
    assert reply is not None and reply["status"] == 413, (shown["message"], reply)
    message = shown["message"]
    assert message.startswith(FAILED_PREFIX[form]), message
    assert_no_raw_json(shown)
    limit = message.removeprefix(FAILED_PREFIX[form])
    assert re.search(r"\b1[,.\s]?000[,.\s]?000\b|\b1(?:\.0+)? ?MB\b", limit), f"the limit is not named: {message!r}"
    assert_nothing_stored(serve)


@pytest.mark.parametrize("form", FORMS)
def test_upload_over_the_limit_shows_the_429_with_the_limit_and_reset_time(page: WebDriver, forms_origin: str,
                                                                           serving: Any, tmp_path: Path,
                                                                           form: str) -> None:
    env, window = ({"SMT_UPLOAD_CUSTOMER_LIMIT": "1"}, timedelta(days=30)) if form == "customer" else (
        {"SMT_UPLOAD_ADMIN_LIMIT": "1"}, timedelta(hours=24))
    serve = serving(**env)
    open_forms(page, forms_origin, serve)
    before = datetime.now(UTC).replace(microsecond=0)
    first = submit(page, form, small_csv(tmp_path, "first.csv", seed=1), serve, account="HOME-429")
    assert first["message"].startswith(ACCEPTED_PREFIX[form]), first["message"]
    after = datetime.now(UTC)

    open_forms(page, forms_origin, serve)
    shown = submit(page, form, small_csv(tmp_path, "second.csv", seed=2), serve, account="HOME-429")
    m = (CUSTOMER_429 if form == "customer" else ADMIN_429).fullmatch(shown["message"])
    assert m, shown["message"]
    assert int(m.group(1)) == 1
    reset = parse_reset(m.group(2))  # the window of the first upload ends then
    assert before + window - timedelta(seconds=2) <= reset <= after + window + timedelta(seconds=2), reset
    stored_one(serve, "first.csv")


@pytest.mark.parametrize("form", FORMS)
def test_missing_token_shows_a_401_sentence(page: WebDriver, forms_origin: str, serving: Any, tmp_path: Path,
                                            form: str) -> None:
    """SMT_UPLOAD_TOKEN is set; IntelliWatt's forms send no token."""
    serve = serving(SMT_UPLOAD_TOKEN=TOKEN)
    open_forms(page, forms_origin, serve)
    shown = submit(page, form, small_csv(tmp_path, "a.csv", seed=1), serve)
    assert shown["message"] == FAILED_PREFIX[form] + UNAUTHORIZED
    assert_nothing_stored(serve)


@pytest.mark.parametrize("form", FORMS)
def test_foreign_origin_is_refused_and_nothing_is_stored(page: WebDriver, forms_origin: str, serving: Any,
                                                         tmp_path: Path, form: str) -> None:
    """The forms' origin is not in SMT_UPLOAD_CORS_ORIGINS: 403 before the body, no CORS header, so the
    browser's fetch fails (the page shows it) and the inbox stays empty."""
    serve = serving(SMT_UPLOAD_CORS_ORIGINS="https://intelliwatt.com")
    open_forms(page, forms_origin, serve)
    shown = submit(page, form, small_csv(tmp_path, "a.csv", seed=1, rows=2000), serve)
    assert shown["message"] == FAILED_PREFIX[form] + "Failed to fetch"  # Chromium's TypeError: no readable reply
    assert last_reply(page) is None
    assert_nothing_stored(serve)


# --- identity, duplicates -------------------------------------------------------------------------------


def test_admin_page_upload_is_accepted_after_a_no_role_upload_from_the_same_address(
        page: WebDriver, forms_origin: str, serving: Any, tmp_path: Path) -> None:
    """A `curl -F file=@x.csv` (only the `file` part) from 127.0.0.1, then the admin page, which sends `file`
    before `role`: its identity is judged from the whole request, so the first upload's count (by the client
    address) does not refuse it even with SMT_UPLOAD_CUSTOMER_LIMIT=1."""
    serve = serving(SMT_UPLOAD_CUSTOMER_LIMIT="1")
    curl_data = small_csv(tmp_path, "x.csv", seed=1).read_bytes()
    r = LOOPBACK.post(serve.upload_url, files={"file": ("x.csv", curl_data, "text/csv")}, timeout=SHORT)
    assert r.status_code == 202, r.text

    src = small_csv(tmp_path, "admin.csv", seed=2)
    open_forms(page, forms_origin, serve)
    shown = submit(page, "admin", src, serve)
    assert shown["message"].startswith(f"✅ Uploaded admin.csv ({src.stat().st_size:,} bytes). Ingest queued."), (
        shown["message"])
    contents = {p.name.split("_", 1)[-1]: p.read_bytes() for p in serve.stored()}
    assert contents == {"x.csv": curl_data, "admin.csv": src.read_bytes()}, serve.everything()
    assert serve.temps() == []


def test_same_bytes_again_after_delivery_are_a_duplicate_and_stored_once(
        page: WebDriver, forms_origin: str, serving: Any, tmp_path: Path, make_settings: Any, receiver: Any) -> None:
    """The admin page uploads a file, a real ``watch`` delivers it to the reference receiver (the ledger row is
    ``sent``), then the customer page sends the same bytes: accepted, ``duplicate: true``, not stored again."""
    serve = serving()
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=TOKEN,
                             SMT_SETTLE_SECONDS="0.2")
    src = small_csv(tmp_path, "usage.csv", seed=3, rows=200)
    data = src.read_bytes()
    with watching(settings):
        open_forms(page, forms_origin, serve)
        first = submit(page, "admin", src, serve)
        assert first["message"].startswith(f"✅ Uploaded usage.csv ({len(data):,} bytes). Ingest queued."), (
            first["message"])
        stored = stored_one(serve, "usage.csv")
        wait_for(lambda: [row["sha256"] for row in receiver.stored()] == [sha(data)], 30, "watch to deliver it")
        wait_for(lambda: (serve.health() or {}).get("ledger", {}).get("sent") == 1, 30, "the ledger row sent")

        open_forms(page, forms_origin, serve)
        again = submit(page, "customer", src, serve, account="HOME-DUP")
        assert again["message"].startswith("Upload accepted and queued."), again["message"]
        reply = last_reply(page)
        assert reply is not None and reply["status"] == 202, reply
        body = httpx.Response(202, content=reply["rawText"]).json()
        assert body["ok"] is True and body["duplicate"] is True, body
        assert body["file"]["sha256"] == sha(data) and body["file"]["size"] == len(data), body
        assert serve.stored() == [stored] and serve.temps() == [], serve.everything()  # stored once
    assert stored.read_bytes() == data
    assert len(receiver.stored()) == 1


# --- the built-in page at GET / -------------------------------------------------------------------------


def open_builtin(driver: WebDriver, serve: Serve) -> None:
    driver.get(f"{serve.url}/")
    for id_ in ("file", "token", "send", "progress", "reply"):
        assert driver.find_elements(By.ID, id_), f"the built-in page has no #{id_}:\n{driver.page_source[:2000]}"
    assert driver.find_element(By.ID, "file").get_attribute("type") == "file"
    assert driver.find_element(By.ID, "progress").tag_name == "progress"
    assert driver.find_element(By.ID, "reply").tag_name == "pre"


def builtin_reply(driver: WebDriver, serve: Serve, timeout: float = SHORT) -> str:
    def shown(d: WebDriver) -> str | None:
        text: str = d.execute_script("return document.getElementById('reply').textContent.trim()")
        return text or None

    try:
        text: str = WebDriverWait(driver, timeout, poll_frequency=0.05).until(shown)
    except TimeoutException:
        raise AssertionError(f"the built-in page showed no reply within {timeout}s\n"
                             f"serve log:\n{serve.text()[-3000:]}") from None
    return text


@pytest.mark.timeout(300)
def test_builtin_page_uploads_with_its_progress_bar_and_shows_the_reply(page: WebDriver, serving: Any,
                                                                        tmp_path: Path) -> None:
    serve = serving(SMT_UPLOAD_TOKEN=TOKEN)
    src = tmp_path / "src" / "page.csv"
    src.parent.mkdir(parents=True)
    src.write_bytes(os.urandom(8 * 1024 * 1024))
    open_builtin(page, serve)
    resources = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(serve.url) for url in resources), f"external assets: {resources}"

    page.find_element(By.ID, "token").send_keys(TOKEN)
    page.find_element(By.ID, "file").send_keys(str(src))
    page.find_element(By.ID, "send").click()

    def full(d: WebDriver) -> dict[str, float] | None:
        bar: dict[str, float] = d.execute_script(
            "const p = document.getElementById('progress'); return {value: p.value, max: p.max}")
        return bar if bar["max"] > 0 and bar["value"] >= bar["max"] else None

    try:
        WebDriverWait(page, MEDIUM, poll_frequency=0.05).until(full)
    except TimeoutException:
        bar = page.execute_script("const p = document.getElementById('progress'); return [p.value, p.max]")
        raise AssertionError(f"the progress bar did not reach its max: {bar}") from None
    reply = builtin_reply(page, serve)
    assert not reply.startswith("{") and '"ok"' not in reply, f"the reply is shown as raw JSON: {reply!r}"
    stored = stored_one(serve, "page.csv")
    assert file_sha(stored) == file_sha(src)


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
def test_builtin_page_with_a_missing_or_wrong_token_shows_the_401_sentence(page: WebDriver, serving: Any,
                                                                           tmp_path: Path, token: str | None) -> None:
    serve = serving(SMT_UPLOAD_TOKEN=TOKEN)
    open_builtin(page, serve)
    if token is not None:
        page.find_element(By.ID, "token").send_keys(token)
    page.find_element(By.ID, "file").send_keys(str(small_csv(tmp_path, "a.csv", seed=1)))
    page.find_element(By.ID, "send").click()
    reply = builtin_reply(page, serve)
    assert UNAUTHORIZED in reply, reply
    assert "{" not in reply, f"the reply is shown as raw JSON: {reply!r}"
    assert_nothing_stored(serve)


_COUNT_UPLOADS = """
window.__uploads = 0;
const send = XMLHttpRequest.prototype.send;
XMLHttpRequest.prototype.send = function (...a) { window.__uploads += 1; return send.apply(this, a); };
const realFetch = window.fetch;
window.fetch = function (...a) { window.__uploads += 1; return realFetch.apply(this, a); };
"""

_DROP = """
const [b64, name] = arguments;
const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], name, {type: "text/csv"}));
const target = document.elementFromPoint(innerWidth / 2, innerHeight / 2) || document.body;
for (const type of ["dragenter", "dragover", "drop"]) {
  target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
}
"""


def test_builtin_page_accepts_a_dropped_file(page: WebDriver, serving: Any, tmp_path: Path) -> None:
    """A file dropped in the middle of the page (a DataTransfer with a real File, as a drag from the desktop)
    is uploaded: at once, or after pressing Send when the drop only chooses the file."""
    serve = serving()
    data = small_csv(tmp_path, "dropped.csv", seed=5).read_bytes()
    open_builtin(page, serve)
    page.execute_script(_COUNT_UPLOADS)
    page.execute_script(_DROP, base64.b64encode(data).decode(), "dropped.csv")
    chosen = "const f = document.getElementById('file').files; return f.length === 1 && f[0].name === 'dropped.csv'"
    WebDriverWait(page, SHORT, poll_frequency=0.05).until(
        lambda d: d.execute_script("return window.__uploads") > 0 or d.execute_script(chosen),
        "the drop neither started an upload nor chose the file")
    if page.execute_script("return window.__uploads") == 0:
        page.find_element(By.ID, "send").click()
    reply = builtin_reply(page, serve)
    assert not reply.startswith("{"), reply
    assert stored_one(serve, "dropped.csv").read_bytes() == data
    assert page.execute_script("return window.__uploads") == 1

