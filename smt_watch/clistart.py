"""What makes the command line start fast: each a measured cost of every ``smt-watch`` start (issue 27), kept
out of cli.py so that it stays parse, call, print. Only :func:`smt_watch.cli.main` applies them: a process
that embeds smt-watch (the tests' in-process runner) keeps its imports and typer as they are."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import typer

# Optional modules a dependency imports only because they happen to be installed, that no smt-watch command
# uses: httpx's own command line (click, rich, pygments; httpx
# falls back to a stub), and trio, which httpcore imports, if present, to pick its async locks (our HTTP
# client is synchronous; ``serve`` runs on asyncio). ~0.25 s of CPU at every ``post``/``watch`` start where
# both are installed (a venv with the test extras has trio, through selenium).
UNUSED_OPTIONAL_IMPORTS = (("httpx", "httpx._main"), ("httpcore", "trio"))  # (importer's package, module)


class SkipUnusedOptional:
    """Answers "not installed" for :data:`UNUSED_OPTIONAL_IMPORTS`, to that importer only: anyone else (a
    library checking ``"trio" in sys.modules``, code that really uses trio) sees the module as it is.

    A plain class with ``find_spec`` (all ``sys.meta_path`` asks for): subclassing ``importlib.abc``'s
    MetaPathFinder would import ``importlib.resources`` at every start (~20 ms)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        for importer, module in UNUSED_OPTIONAL_IMPORTS:
            if name == module and (_importer() + ".").startswith(importer + "."):
                raise ModuleNotFoundError(f"No module named {name!r} (skipped by smt-watch)", name=name)
        return None


def _importer() -> str:
    """The module whose ``import`` statement is being served (the first frame outside importlib)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return "" if frame is None else str(frame.f_globals.get("__name__", ""))


def skip_unused_optional_imports() -> None:
    """Only :func:`main` installs the finder: a process that embeds smt-watch (tests) keeps its imports."""
    if not any(isinstance(f, SkipUnusedOptional) for f in sys.meta_path):
        sys.meta_path.insert(0, SkipUnusedOptional())


class PlainCoercion:
    """typer ≥ 0.2x turns each command-line value into its annotated type through a pydantic TypeAdapter,
    built for every parameter of the command at each start: importing pydantic and building them cost
    ~0.1–0.2 s of every ``post`` (issue 27). The values our commands take are mostly strings, paths, lists of
    paths and flags; for those this gives the same result without pydantic (a path goes through typer's own
    checks, ``coerce_cli_path``, exactly as typer's adapter would hand it). Anything else (a number, a value
    of an unexpected shape) is handed to typer's own coercion, built on first use, so its answers and error
    messages are typer's."""

    def __init__(self, descriptor: Any, build: Callable[[Any], Any], coerce_path: Callable[..., Any]) -> None:
        self._descriptor = descriptor
        self._build = build
        self._coerce_path = coerce_path
        self._typer: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        annotation = self._descriptor.annotation
        if value is None and not (param.multiple or param.nargs == -1):
            return None  # as typer's RuntimeParam.coerce: an absent option stays None
        if annotation is str and isinstance(value, str):
            return value
        if annotation is bool and isinstance(value, bool):
            return value
        if annotation is Path and isinstance(value, str):
            return self._path(value, param, ctx)
        if annotation == list[Path] and isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return [self._path(v, param, ctx) for v in value]
        if self._typer is None:
            self._typer = self._build(self._descriptor)
        return self._typer.coerce(value, param=param, ctx=ctx)

    def _path(self, value: str, param: Any, ctx: Any) -> Any:
        return self._coerce_path(Path(value), self._descriptor.parameter_info, path_type=Path, param=param, ctx=ctx)


def plain_coercion() -> None:
    """Make typer build a :class:`PlainCoercion` for each parameter it parses (its help option included),
    where this typer coerces through pydantic (feature-detected: another typer version is left as it is).
    Only :func:`main` does this: a process that embeds smt-watch (tests) keeps typer as it is."""
    try:
        import typer.core
        from typer._param_types import coerce_cli_path
    except ImportError:
        return
    build = getattr(typer.core, "build_runtime_param", None)
    if build is None or getattr(build, "smt_watch_plain", False):
        return

    def plain(descriptor: Any) -> Any:
        if getattr(descriptor, "file_annotation", None) is not None or getattr(
                getattr(descriptor, "parameter_info", None), "parser", None) is not None:
            return build(descriptor)
        return PlainCoercion(descriptor, build, coerce_cli_path)

    plain.smt_watch_plain = True  # type: ignore[attr-defined]
    typer.core.build_runtime_param = plain  # type: ignore[attr-defined]


ROOT_OPTIONS_WITH_VALUE = ("--log-level", "--log-format")


def app_for(app: typer.Typer, args: list[str]) -> typer.Typer:
    """:data:`app` with only the command ``args`` invoke, when that is clear from ``args``; else all of it.

    typer builds the click command of every registered command at each start (reading 18 signatures and
    their annotations: ~30–50 ms of every ``post``); one command's ``--help``, options and errors are the same
    either way. ``smt-watch --help``, a bare ``smt-watch`` or an unknown command get the whole app, so its
    command list and "No such command" answers do not change."""
    name = next((a for i, a in enumerate(args) if not a.startswith("-")
                 and (i == 0 or args[i - 1] not in ROOT_OPTIONS_WITH_VALUE)), None)
    if name is None or any(a.startswith("-") and a.split("=", 1)[0] not in ROOT_OPTIONS_WITH_VALUE
                           for a in args[:args.index(name)]):
        return app  # --help, --version or an option we do not know comes first: typer answers as always
    import copy

    from typer.main import get_command_name

    commands = [c for c in app.registered_commands
                if (c.name or get_command_name(c.callback.__name__ if c.callback else "")) == name]
    groups = [g for g in app.registered_groups if g.name == name]
    if len(commands) + len(groups) != 1:
        return app
    trimmed = copy.copy(app)
    trimmed.registered_commands, trimmed.registered_groups = commands, groups
    return trimmed


class EarlyHash:
    """The first file's hash pass, run in a helper thread from the start of ``post``.

    The hash must be complete before a byte is sent (it is the Idempotency-Key), and start-up (importing
    the command line, the delivery stack, settings, the ledger, the target's /health) used to come before
    it: here they run meanwhile, on the other core (hashlib and file reads release the GIL). Calling it
    waits for the pass and returns what :func:`~smt_watch.content.hash_pass` returned, or raises what it
    raised, in the caller's thread. A daemon thread: a configuration error exits at once without waiting
    for a big file.

    While the pass runs, the interpreter's switch interval is :data:`EARLY_SWITCH_INTERVAL`: start-up is
    pure Python and holds the GIL, and the pass needs it back for a moment after every block it reads or
    hashes; at the default 5 ms each of those moments could wait 5 ms, so the pass crawled until start-up
    was done. The default comes back when it ends."""

    def __init__(self, hash_pass: Callable[[Path], Any], path: Path) -> None:
        import threading

        self.path = path
        self._result: Any = None
        self._error: BaseException | None = None
        self._unused = False  # a guess typer did not confirm: its read lease is given up, not held till exit
        self._done = False  # the pass has ended (under the lock: is_alive() is still True while _run returns)
        self._lock = threading.Lock()
        sys.setswitchinterval(min(_SWITCH_INTERVAL, EARLY_SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._run, args=(hash_pass, path), name="smt-watch-hash-first",
                                        daemon=True)
        self._thread.start()

    def _run(self, hash_pass: Callable[[Path], Any], path: Path) -> None:
        try:
            self._result = hash_pass(path)
        except BaseException as exc:  # handed to the caller, which raises it where the pass used to run
            self._error = exc
        finally:  # a second pass still running (a guess typer did not confirm) then only runs slower
            sys.setswitchinterval(_SWITCH_INTERVAL)
            with self._lock:
                self._done = True
                if self._unused:
                    self._close()

    def discard(self) -> None:
        """The pass will not be used: give up its read lease now, or when it ends (never under its reads)."""
        with self._lock:
            self._unused = True
            if self._done:  # else _run closes it as it ends: exactly one of the two sees the other's flag
                self._close()

    def _close(self) -> None:
        ident = self._result[0] if isinstance(self._result, tuple) and self._result else None
        if ident is not None and hasattr(ident, "close"):
            ident.close()

    def __call__(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


EARLY_SWITCH_INTERVAL = 0.0002  # seconds; Python's default is 0.005
EARLY_BLOCK = 2 * 1024 * 1024  # the first pass's reads of a big file: half the waits for the GIL of 1 MiB
_SWITCH_INTERVAL = sys.getswitchinterval()  # as the process started, restored when a pass ends
POST_FLAGS = ("--force",)  # post's options that take no value (tests/test_perf27.py checks this against post)
_early: EarlyHash | None = None


def early_post_file(argv: Sequence[str]) -> Path | None:
    """The first FILE of ``smt-watch [root options] post [options] FILE ...``, read from ``argv`` before
    typer is imported; None when ``argv`` is not that or is not plain enough to be sure (help, a value
    option given as two words before the file, ...). Only a guess: :func:`early_hash_for` uses the pass
    only for the path typer then parses as the first FILE."""
    args = list(argv)
    try:
        at = next(i for i, a in enumerate(args) if not a.startswith("-")
                  and (i == 0 or args[i - 1] not in ROOT_OPTIONS_WITH_VALUE))
    except StopIteration:
        return None
    if args[at] != "post" or any(a in ("-h", "--help", "--version") for a in args):
        return None
    rest = args[at + 1:]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            return Path(rest[i + 1]) if i + 1 < len(rest) else None
        if a.startswith("-") and a != "-":
            if "=" not in a and a not in POST_FLAGS:
                i += 1  # its value
            i += 1
            continue
        return Path(a)
    return None


def first_pass(path: Path) -> Any:
    """:func:`~smt_watch.passrules.hash_pass` of ``post``'s first file, in :data:`EARLY_BLOCK` reads.

    The pass runs beside start-up, whose Python holds the GIL; the pass needs it back after each block, so
    fewer, bigger blocks keep it nearer full speed. Beside 0.3 s of pure Python (tools in the hpost report,
    one run, boosted; noisy): 1 MiB blocks at a 5 ms switch interval 42-59 MiB hashed, at 0.5 ms ~250, at
    0.2 ms 195-245; 2 MiB at 0.2 ms 181-263; 4 MiB at 0.5 ms 189-400; ~450 alone. 4 MiB blocks raised
    post's peak RSS by up to 8 MiB (glibc keeps freed blocks of that size), 2 MiB by at most ~4 MiB.

    It needs only hashing and passrules (with readlease and smtcsv), imported by :func:`start_early_hash` in
    the main thread before the pass starts (never in the pass's thread: two threads importing at once can meet
    in an import cycle), not smt_watch.content with its settings, gpg and zip modules; passrules holds the
    rules both passes apply (:func:`~smt_watch.passrules.pass_parts`: an ``.asc``/``.zip`` is not sniffed, a
    file sent as it is gets a read lease before the pass, on the descriptor it hashes, so the send can read
    it under the lease instead of hashing again)."""
    from smt_watch.passrules import hash_pass

    return hash_pass(path, EARLY_BLOCK)


def start_early_hash(argv: Sequence[str] | None = None) -> None:
    """Start the first file's hash pass now, when this process is the ``smt-watch post`` command line
    (the console script or ``python -m smt_watch``): cli.py calls this before importing typer and the rest
    of itself (~0.15 s of every ``post``), so the pass overlaps that too. A process that only imports the
    CLI (tests, a watch worker) starts nothing."""
    global _early
    argv = sys.argv if argv is None else argv
    main = Path(argv[0]) if argv else Path()
    if _early is not None or not (main.name == "smt-watch" or main.parts[-2:] == ("smt_watch", "__main__.py")):
        return
    path = early_post_file(argv[1:])
    if path is None:
        return
    import smt_watch.hashing
    import smt_watch.passrules  # noqa: F401  (what first_pass imports, loaded here, in the main thread)

    _early = EarlyHash(first_pass, path)


def early_hash_for(hash_pass: Callable[[Path], Any], path: Path) -> EarlyHash:
    """The hash pass of ``path`` (post's first FILE): the one :func:`start_early_hash` started, when it was
    started for this very path; else one started now. A pass started for another path (a guess typer's
    parse did not confirm) runs on unused in its daemon thread and gives up its read lease."""
    global _early
    early, _early = _early, None
    if early is not None and early.path == path:
        return early
    if early is not None:
        early.discard()
    return EarlyHash(hash_pass, path)
