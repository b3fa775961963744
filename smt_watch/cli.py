"""The ``smt-watch`` command line: parse, build settings, call one library function, print.

Our own errors become one line on stderr and an exit code (2 for configuration/usage); anything else is
reported in one line too, with the traceback only at ``--log-level debug``. Heavy imports (httpx,
starlette, paramiko) happen inside the commands that need them, so ``--version`` starts fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from smt_watch.clistart import early_hash_for, first_pass, start_early_hash

start_early_hash()  # `post`: its first file's hash pass starts now, before typer and the rest of this module load

import typer  # noqa: E402

from smt_watch.clistart import app_for, plain_coercion, skip_unused_optional_imports  # noqa: E402
from smt_watch.delivery.registry import choices_text as delivery_choices_text  # noqa: E402
from smt_watch.errors import ConfigError, ContentError, SmtWatchError  # noqa: E402
from smt_watch.logs import FORMATS, LEVELS, add_secrets, setup_logging  # noqa: E402
from smt_watch.names import shown  # noqa: E402

if TYPE_CHECKING:
    from rich.progress import Progress as TransferBar

    from smt_watch.config import Settings
    from smt_watch.delivery import Progress
    from smt_watch.pipeline import Outcome
    from smt_watch.sync import SyncReport

log = logging.getLogger("smt_watch.cli")

app = typer.Typer(
    name="smt-watch",
    help="Deliver Smart Meter Texas interval files from an inbox to IntelliWatt, each exactly once.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
ledger_app = typer.Typer(
    help="Show and edit the delivery ledger (SMT_STATE_DIR/ledger.sqlite3).", no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(ledger_app, name="ledger")

EnvFile = Annotated[
    Path | None,
    typer.Option(
        "--env-file",
        metavar="PATH",
        help="systemd-style KEY=VALUE file (e.g. /etc/default/intelliwatt-smt), read before the environment.",
    ),
]
StateDir = Annotated[
    Path | None, typer.Option("--state-dir", metavar="DIR", help="Ledger and state directory [SMT_STATE_DIR].")
]
Delivery = Annotated[  # every mode in the registry, so the help cannot drift from what SMT_DELIVERY takes
    str | None, typer.Option("--delivery", metavar="MODE", help=f"{delivery_choices_text()} [SMT_DELIVERY].")
]
PROGRESS_MIN_BYTES = 4 * 1024 * 1024
SERVE_LEDGER_WAIT = 3.0  # serve answers 503 after this long without its shared ledger, not after 15 s


def _settings(env_file: Path | None, **overrides: object) -> Settings:
    from smt_watch.config import load_settings

    settings = load_settings(
        os.environ,
        env_file=env_file,
        overrides={k: None if v is None else str(v) for k, v in overrides.items()},
    )
    add_secrets(settings.secrets())
    for warning in settings.warnings:
        log.warning("%s", warning)
    return settings


def _version(value: bool) -> None:
    if value:
        from smt_watch.build import describe

        typer.echo(describe())
        raise typer.Exit()


@app.callback()
def root(
    log_level: Annotated[
        str, typer.Option("--log-level", metavar="LEVEL", help="debug, info, warning or error.")
    ] = "info",
    log_format: Annotated[
        str, typer.Option("--log-format", metavar="FORMAT", help="text (colour on a TTY) or json (one object a line).")
    ] = "text",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and build and exit.")
    ] = False,
) -> None:
    """Deliver Smart Meter Texas interval files from an inbox to IntelliWatt, each exactly once.

    Settings come from environment variables (docs/settings.md); --env-file loads a systemd env file first.
    """
    if log_level.lower() not in LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LEVELS)}")
    if log_format not in FORMATS:
        raise ConfigError(f"--log-format must be one of {', '.join(FORMATS)}")
    setup_logging(log_level, log_format)


# --- post -------------------------------------------------------------------------------------------


@app.command()
def post(
    files: Annotated[list[Path], typer.Argument(metavar="FILE", help="Files to deliver now.")],
    force: Annotated[bool, typer.Option("--force", help="Send again even if the ledger says sent.")] = False,
    delivery: Delivery = None,
    upload_url: Annotated[
        str | None, typer.Option("--upload-url", metavar="URL", help="Multipart target [SMT_UPLOAD_URL].")
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option("--base-url", metavar="URL", help="Web app base URL for inline [INTELLIWATT_BASE_URL]."),
    ] = None,
    inline_encoding: Annotated[
        str | None,
        typer.Option("--inline-encoding", metavar="ENC", help="base64 or base64+gzip [SMT_INLINE_ENCODING]."),
    ] = None,
    esiid: Annotated[
        str | None, typer.Option("--esiid", metavar="ESIID", help="ESIID sent with the file [ESIID_DEFAULT].")
    ] = None,
    meter: Annotated[
        str | None,
        typer.Option("--meter", metavar="METER", help="Meter when the name has no M<digits> [METER_DEFAULT]."),
    ] = None,
    source: Annotated[str | None, typer.Option("--source", metavar="TAG", help="Source tag [SOURCE_TAG].")] = None,
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """Deliver files now; content already sent is reported as duplicate (exit 0) unless --force.

    Exit 0 when every file was sent or is a duplicate, 1 when any failed or will be retried, 2 on a
    configuration error. Tokens are read only from the environment, never from flags.
    """
    first = early_hash_for(first_pass, files[0]) if files else None  # overlaps the imports and set-up below

    from smt_watch.pipeline import post_files

    settings = _settings(
        env_file, SMT_DELIVERY=delivery, SMT_UPLOAD_URL=upload_url, INTELLIWATT_BASE_URL=base_url,
        SMT_INLINE_ENCODING=inline_encoding, ESIID_DEFAULT=esiid, METER_DEFAULT=meter, SOURCE_TAG=source,
        SMT_STATE_DIR=state_dir,
    )
    outcomes = post_files(
        settings, files, force=force, progress_for=_progress_bar if sys.stderr.isatty() else None,
        on_outcome=_print_outcome, first_hashed=first,
    )
    bad = [o for o in outcomes if not o.ok]
    if bad:
        raise typer.Exit(1)


def _print_outcome(o: Outcome) -> None:
    """One line per file; an .asc/.zip says how many CSVs it held, then one indented line per CSV (the
    container itself made no request: its HTTP status and attempts are its CSVs')."""
    sha = (o.sha256 or "-")[:12]
    if o.children:
        done = sum(c.ok for c in o.children)
        detail = f"{len(o.children)} CSV file(s), {done} sent or duplicate, {o.seconds:.2f}s"
        if not o.ok and o.error:
            detail += f"; {shown(o.error)}"
        typer.echo(f"{o.result:<9} {shown(str(o.path))}  sha256:{sha}  {detail}")
        for child in o.children:
            typer.echo("  " + _outcome_line(child, shown(child.name or str(child.path))))
        return
    typer.echo(_outcome_line(o, shown(str(o.path))))


def _outcome_line(o: Outcome, name: str) -> str:
    sha = (o.sha256 or "-")[:12]
    if o.result == "sent":
        detail = f"HTTP {o.status}, {o.attempts} attempt(s), {o.seconds:.2f}s"
    elif o.result == "duplicate":
        detail = ""
    else:
        detail = shown(o.error or "")
    return f"{o.result:<9} {name}  sha256:{sha}  {detail}".rstrip()


def _progress_bar(path: Path) -> AbstractContextManager[Progress | None]:
    try:
        size = path.stat().st_size
    except OSError:
        return nullcontext()
    return _bar(path.name, size) if size >= PROGRESS_MIN_BYTES else nullcontext()


def _transfer_bar() -> TransferBar:
    """A byte progress bar on stderr; its description is shown as text (no markup, no emoji shortcode)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), console=Console(stderr=True), transient=True)


@contextmanager
def _bar(name: str, size: int) -> Iterator[Progress]:
    with _transfer_bar() as bar:
        # a name is the sender's text: no ESC (shown), read as no markup and no emoji shortcode (markup=False)
        task = bar.add_task(shown(name), total=size)
        yield lambda n: bar.advance(task, n)


# --- watch ------------------------------------------------------------------------------------------


@app.command()
def watch(
    polling: Annotated[
        bool, typer.Option("--polling", help="Poll the inbox instead of using inotify (network filesystems).")
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", metavar="PORT", help="Serve Prometheus metrics on 127.0.0.1:PORT."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", metavar="N", help="Concurrent deliveries [SMT_WORKERS].")
    ] = None,
    settle: Annotated[
        float | None,
        typer.Option("--settle", metavar="SECONDS", help="Quiet time before a file is ready [SMT_SETTLE_SECONDS]."),
    ] = None,
    delivery: Delivery = None,
    inbox: Annotated[
        Path | None, typer.Option("--inbox", metavar="DIR", help="Directory to watch [SMT_LOCAL_DIR].")
    ] = None,
    create_inbox: Annotated[
        bool | None, typer.Option("--create-inbox", help="Create the inbox if it does not exist; without it a "
                                  "missing inbox exits 2 [SMT_CREATE_INBOX].")
    ] = None,
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """Watch the inbox and deliver every ready file until SIGTERM or Ctrl-C.

    A file is ready when it matches SMT_PATTERNS, is not hidden or temporary, no process has it open for
    writing, and it has not changed for SMT_SETTLE_SECONDS. Files present at start, and anything inotify
    missed, are found by a full rescan: at start, a second after an inotify queue overflow, and every
    SMT_RESCAN_SECONDS. On SIGTERM, in-flight deliveries get
    SMT_STOP_GRACE_SECONDS to finish (said at the first Ctrl-C; a second one quits at once); the exit
    status is 0. One watch per inbox: a second is refused, naming the pid of the first. Under systemd
    (Type=notify) it reports READY=1, STATUS= and WATCHDOG=1.
    """
    import signal

    from smt_watch.watch import WatchService

    settings = _settings(
        env_file, SMT_METRICS_PORT=metrics_port, SMT_WORKERS=workers, SMT_SETTLE_SECONDS=settle,
        SMT_DELIVERY=delivery, SMT_LOCAL_DIR=inbox, SMT_STATE_DIR=state_dir,
        SMT_CREATE_INBOX="1" if create_inbox else None,
    )
    service = WatchService(settings, polling=polling, own_process=True)
    signal.signal(signal.SIGTERM, lambda *_: service.request_stop())
    signal.signal(signal.SIGINT, lambda *_: service.request_stop())
    # The readiness probe takes a read lease for an instant; a lease break would send SIGIO.
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    raise typer.Exit(service.run())


# --- sync -------------------------------------------------------------------------------------------


@app.command()
def sync(
    workers: Annotated[int, typer.Option("--workers", metavar="N", min=1, max=16, help="Parallel transfers.")] = 4,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be fetched; fetch nothing.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="If another sync is running, wait for it instead of exiting 0.")
    ] = False,
    accept_new_host_key: Annotated[
        bool,
        typer.Option("--accept-new-host-key", help="Trust and record an unknown host key (never a changed one)."),
    ] = False,
    inbox: Annotated[
        Path | None, typer.Option("--inbox", metavar="DIR", help="Where files go [SMT_LOCAL_DIR].")
    ] = None,
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """Fetch files new on the SMT SFTP server into the inbox (one pass).

    Each remote file lands at its remote path under the inbox, written to a hidden .part file and renamed
    into place when complete. A file fetched once is never fetched again unless its size or mtime on the
    server changed. Remote files are never modified. Host keys come from SMT_KNOWN_HOSTS; an unknown or
    changed key exits 2 without fetching. Exit 0 when all went well, 1 when a file failed.
    """
    from smt_watch.sizes import human_bytes
    from smt_watch.sshfast import keep_freed_memory
    from smt_watch.sync import run_sync

    keep_freed_memory()  # for this process and the workers it forks: they download (serve keeps glibc defaults)
    settings = _settings(env_file, SMT_LOCAL_DIR=inbox, SMT_STATE_DIR=state_dir)
    with _sync_progress() as (on_plan, on_bytes):
        report = run_sync(settings, workers=workers, dry_run=dry_run, wait=wait,
                          accept_new_host_key=accept_new_host_key, on_plan=on_plan, on_bytes=on_bytes)
    if report is None:
        typer.echo("sync: another sync is running; not starting a second (use --wait to wait for it)")
        return
    if dry_run:
        for f in report.todo:
            typer.echo(f"would fetch {shown(f.path)}  ({human_bytes(f.size)})")  # the SFTP server's names
    typer.echo(report.summary())
    if settings.sync_verify and not dry_run:  # the timer pass can verify the day's deliveries (issue 26)
        _verify_after_sync(settings)
    if report.failed:
        raise typer.Exit(1)


def _verify_after_sync(settings: Settings) -> None:
    """One pass of the due checks and re-sends (``SMT_SYNC_VERIFY``); trouble is logged, never sync's exit."""
    import time

    from smt_watch.autoverify import verify_after_sync
    from smt_watch.statedir import open_ledger

    try:
        with open_ledger(settings) as ledger:
            verify_after_sync(settings, ledger, time.time())
    except SmtWatchError as exc:
        log.warning("Sync verify skipped: %s", exc)


@contextmanager
def _sync_progress() -> Iterator[tuple[Callable[[SyncReport], None] | None, Progress | None]]:
    """A byte progress bar on a TTY; nothing under systemd (plain log lines say what was fetched)."""
    if not sys.stderr.isatty():
        yield None, None
        return
    with _transfer_bar() as bar:
        task = bar.add_task("sync", total=None)

        def on_plan(report: SyncReport) -> None:
            bar.update(task, total=sum(f.size for f in report.todo),
                       description=f"sync: {len(report.todo)} file(s)")

        yield on_plan, lambda n: bar.advance(task, n)


# --- serve ------------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option("--host", metavar="ADDR", help="Address to listen on [SMT_UPLOAD_HOST].")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", metavar="PORT", help="Upload port [SMT_UPLOAD_PORT].")
    ] = None,
    webhook_port: Annotated[
        int | None,
        typer.Option("--webhook-port", metavar="PORT",
                     help="Trigger and health port on SMT_WEBHOOK_HOST (0: none) [SMT_WEBHOOK_PORT, 8787]."),
    ] = None,
    inbox: Annotated[
        Path | None, typer.Option("--inbox", metavar="DIR", help="Where uploads land [SMT_LOCAL_DIR].")
    ] = None,
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """Run the upload server (POST /upload) and trigger webhook (POST /trigger/smt-now) until SIGTERM.

    Uploads stream into the inbox (hidden temp file, renamed when complete) for `watch` to deliver;
    x-smt-upload-token is required when SMT_UPLOAD_TOKEN is set; per-account limits persist in the ledger.
    The trigger needs INTELLIWATT_WEBHOOK_SECRET or DROPLET_WEBHOOK_SECRET and runs one sync pass in the
    background; it also listens on SMT_WEBHOOK_HOST:SMT_WEBHOOK_PORT (0.0.0.0:8787). GET /health and /healthz
    report ledger counts.
    """
    from smt_watch.http_server import run
    from smt_watch.statedir import open_ledger

    settings = _settings(env_file, SMT_UPLOAD_HOST=host, SMT_UPLOAD_PORT=port, SMT_WEBHOOK_PORT=webhook_port,
                         SMT_LOCAL_DIR=inbox, SMT_STATE_DIR=state_dir)
    with open_ledger(settings, reconnect_seconds=SERVE_LEDGER_WAIT) as ledger:
        run(settings, ledger)


# --- status -----------------------------------------------------------------------------------------


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    follow: Annotated[bool, typer.Option("--follow", help="Redraw in place until Ctrl-C, like `vector top`.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", metavar="SECONDS", min=0.5, help="Redraw period for --follow.")
    ] = 2.0,
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """One screen: is watch running and since when, queue, ledger counts, the last deliveries, every failure
    with the command that retries it, the last sync pass and upload quota use.

    Read from the ledger (so it covers every node sharing one), never changing it. Exit 0; 1 when something
    needs a person, each said under "needs attention": a watcher that wrote a heartbeat is not running, a
    failed row, a file watch cannot read, or sync stopped (a changed host key), failed its last pass, or has
    not run for SMT_SYNC_STALE_SECONDS; and when there is no ledger yet.
    """
    from smt_watch.statedir import open_reader
    from smt_watch.status import console_view, gather, retry_lines

    settings = _settings(env_file, SMT_STATE_DIR=state_dir)
    with open_reader(settings) as ledger:
        if follow and not as_json:
            import time

            from rich.live import Live

            with Live(console_view(gather(settings, ledger)), auto_refresh=False, screen=False) as live:
                try:
                    while True:
                        time.sleep(interval)  # a redraw period, not a synchronisation
                        live.update(console_view(gather(settings, ledger)), refresh=True)
                except KeyboardInterrupt:
                    return
        state = gather(settings, ledger)
    if as_json:
        typer.echo(json.dumps(state.to_json(), indent=2))
    else:
        from rich.console import Console

        Console(width=max(120, Console().width)).print(console_view(state))
        # Plain lines, never wrapped or cut with an ellipsis, whatever the terminal's width: pasted, they work.
        for line in retry_lines(state):
            typer.echo(line)
    if state.alerts:
        raise typer.Exit(1)


# --- doctor -----------------------------------------------------------------------------------------


@app.command()
def doctor(
    offline: Annotated[bool, typer.Option("--offline", help="Skip the network checks (endpoint, SFTP).")] = False,
    env_file: EnvFile = None,
) -> None:
    """Check configuration, directories, permissions, keys and reachability; one line per check.

    Each line is ok, warn or FAIL, with a hint. Exit 0 when nothing failed, 1 otherwise. Secrets are never
    printed (only whether they are set).
    """
    from smt_watch.config import load_settings
    from smt_watch.doctor import FAIL, Check, run_checks

    try:
        settings = load_settings(os.environ, env_file=env_file)
    except ConfigError as exc:
        typer.echo(Check(FAIL, "config", str(exc)).line())
        raise typer.Exit(1) from exc
    add_secrets(settings.secrets())
    checks = [Check("ok", "config", "settings parse"), *run_checks(settings, env_file=env_file, offline=offline)]
    for check in checks:
        typer.echo(check.line())
    if any(c.status == FAIL for c in checks):
        raise typer.Exit(1)


# --- inspect / sample -------------------------------------------------------------------------------


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A .csv, .zip or .asc file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (an array for a .zip or .asc).")] = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", metavar="OUT", help="Also draw a heatmap of kWh (days x 15-minute slots, estimated "
                     "and blank reads marked, daily totals beside it) to OUT (.png or .svg); needs "
                     "smt-watch[plot]."),
    ] = None,
    env_file: EnvFile = None,
) -> None:
    """Show what smt-watch sees in a file: kind, ESIIDs, dates, intervals, gaps, kWh, UTC span.

    A .zip is opened and an .asc decrypted (GNUPGHOME) into a private temporary directory. Exit 1 when the
    file cannot be read or decrypted.
    """
    from smt_watch.content import inspect_path

    settings = _settings(env_file)
    if plot is not None:
        from smt_watch.plot import plot_file

        try:
            drawn = plot_file(settings, file, plot)
        except ContentError as exc:
            typer.echo(f"smt-watch: {shown(str(exc))}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(f"plotted {drawn} to {shown(str(plot))}", err=as_json)
    try:
        summaries = inspect_path(settings, file)
    except ContentError as exc:
        typer.echo(f"smt-watch: {shown(str(exc))}", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        objects = [s.to_json() for s in summaries]
        single = not file.name.lower().endswith((".zip", ".asc"))
        typer.echo(json.dumps(objects[0] if single else objects, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from smt_watch.status import plain as _cell

    table = Table("", title=_cell(str(file)), title_justify="left")
    for s in summaries:
        table.add_column(_cell(s.file))  # a Text header, not Table's str one: a name is no markup
    for key in ("kind", "esiids", "meter", "first_date", "last_date", "rows", "intervals", "blanks", "estimated",
                "gaps", "kwh_consumption", "kwh_generation", "first_start_utc", "last_end_utc"):
        table.add_row(key, *[_cell(s.to_json()[key]) for s in summaries])
    Console(width=max(100, 30 + 40 * len(summaries))).print(table)


@app.command()
def sample(
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", help="Where to write it.")],
    days: Annotated[int, typer.Option("--days", min=1, max=3660, help="Days of 15-minute reads.")] = 365,
    esiid: Annotated[str, typer.Option("--esiid", metavar="ESIID", help="The meter's ESIID.")] = "10443720000000001",
    start: Annotated[
        str | None, typer.Option("--start", metavar="DATE", help="First day, YYYY-MM-DD [2025-01-01].")
    ] = None,
    encrypt_to: Annotated[
        str | None,
        typer.Option("--encrypt-to", metavar="KEYID", help="Write an SMT-style .asc: a ZIP (interval + daily "
                     "CSV) PGP-encrypted to KEYID (GNUPGHOME)."),
    ] = None,
    env_file: EnvFile = None,
) -> None:
    """Write a realistic SMT interval CSV (or .zip / .asc) for demos and tests.

    96 reads a day in America/Chicago time with the DST days as SMT sends them (100 rows in the fall, 96 with
    blank readings in the spring). Same arguments, same bytes. A FILE ending in .zip gets a ZIP.
    """
    from datetime import date

    from smt_watch.reference.sample import write_sample

    try:
        first = date.fromisoformat(start) if start else date(2025, 1, 1)
    except ValueError as exc:
        raise ConfigError(f"--start must be YYYY-MM-DD: {start!r}") from exc
    size = write_sample(output, days=days, esiid=esiid, start=first, encrypt_to=encrypt_to,
                        settings=_settings(env_file) if encrypt_to else None)
    typer.echo(f"wrote {output} ({size:,} bytes, {days} day(s) from {first})")


@app.command()
def ticket(
    role: Annotated[str, typer.Option("--role", metavar="ROLE", help="admin or customer.")],
    account: Annotated[str, typer.Option("--account", metavar="KEY", help="The account the upload counts for.")],
    ttl: Annotated[str, typer.Option("--ttl", metavar="DURATION", help="How long it is valid: 90, 30s, 10m, 2h, "
                                     "1d.")] = "10m",
    env_file: EnvFile = None,
) -> None:
    """Print one signed upload ticket (needs SMT_UPLOAD_TICKET_SECRET; never prints the secret).

    serve, with SMT_UPLOAD_TICKET_SECRET set, takes an upload's role and account only from a valid ticket in
    the x-smt-upload-ticket header. The ticket is the last line of stdout. This is the reference
    implementation of the format in docs/how-it-works.md (the web app mints the same ticket server-side).
    """
    from smt_watch.tickets import mint, parse_ttl

    settings = _settings(env_file)
    if settings.upload_ticket_secret is None:
        raise ConfigError("ticket: SMT_UPLOAD_TICKET_SECRET is not set")
    try:
        typer.echo(mint(settings.upload_ticket_secret.reveal(), role.strip().lower(), account, parse_ttl(ttl)))
    except ValueError as exc:
        raise ConfigError(f"ticket: {exc}") from exc


# --- ledger -----------------------------------------------------------------------------------------


Since = Annotated[
    str | None, typer.Option("--since", metavar="WHEN", help="Only rows changed since WHEN: an ISO date or time "
                             "(2026-12-01, 2026-12-01T08:00, UTC unless it has an offset) or an age (30m, 2h, 3d).")
]


def _since(when: str | None) -> float | None:
    from smt_watch.clock import parse_when

    if when is None:
        return None
    try:
        return parse_when(when)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from exc


@ledger_app.command("list")
def ledger_list(
    state: Annotated[
        str | None,
        typer.Option("--state", metavar="STATE", help="pending, sending, sent, retrying or failed."),
    ] = None,
    since: Since = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array of row objects.")] = False,
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """List ledger rows, oldest first. Reads the ledger without changing it; exit 1 when there is none."""
    from smt_watch.ledger import STATES
    from smt_watch.statedir import open_reader
    from smt_watch.status import verdicts_by_sha

    if state is not None and state not in STATES:
        raise ConfigError(f"--state must be one of {', '.join(STATES)}")
    cutoff = _since(since)
    with open_reader(_settings(env_file, SMT_STATE_DIR=state_dir)) as ledger:
        rows = ledger.rows(state, since=cutoff)
        verdicts = verdicts_by_sha(ledger)
    if as_json:  # verify's verdict beside each row: null until a file was checked
        typer.echo(json.dumps([{**r.to_json(), "verdict": verdicts.get(r.sha256)} for r in rows], indent=2))
        return
    if not rows:
        typer.echo("(no rows)")
        return
    # a state and a verdict are ledger text (another version's ledger may hold anything): shown() as the name
    states = [shown(f"{r.state}/{verdicts[r.sha256]}" if r.sha256 in verdicts else r.state) for r in rows]
    width = max(9, *map(len, states))  # "sent/outside window" is wider than a bare state
    typer.echo(f"{'STATE':<{width}} {'SHA256':<12} {'SIZE':>12} {'ATT':>3} {'HTTP':>4}  {'WHEN':<20} "
               "FILE / LAST ERROR")
    for r, state_shown in zip(rows, states, strict=True):
        when = (r.sent_at or r.updated_at)[:19]
        line = f"{state_shown:<{width}} {r.sha256[:12]} {r.size if r.size is not None else '-':>12} {r.attempts:>3} "
        line += f"{r.http_status or '-':>4}  {when:<20} {shown(r.filename)}"
        if r.last_error and r.state != "sent":
            line += f"  ({shown(r.last_error[:100])})"
        typer.echo(line)


@ledger_app.command("forget")
def ledger_forget(
    target: Annotated[str, typer.Argument(metavar="SHA256|PATH", help="A hash, unique hash prefix, or file.")],
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """Drop a row so its file is delivered again. Exit 1 when nothing matched."""
    from smt_watch.pipeline import forget_target
    from smt_watch.statedir import open_ledger

    with open_ledger(_settings(env_file, SMT_STATE_DIR=state_dir)) as ledger:
        removed = forget_target(ledger, target)
    if not removed:
        typer.echo(f"smt-watch: no ledger row for {shown(target)}", err=True)
        raise typer.Exit(1)
    for sha in removed:
        typer.echo(f"forgot {sha}")


@ledger_app.command("retry")
def ledger_retry(
    target: Annotated[
        str | None, typer.Argument(metavar="[SHA256|PATH]", help="A hash, unique hash prefix, or file.")
    ] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Every failed row (narrow with --status, --since).")] = False,
    status_code: Annotated[
        int | None, typer.Option("--status", metavar="CODE", help="With --failed: only rows the app answered CODE.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", metavar="WHEN", help="With --failed: only rows that failed since WHEN "
                                 "(ISO date or time, or an age: 30m, 2h, 3d).")
    ] = None,
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """Put a failed (or retrying) row back to pending: watch delivers it again within a second or two.

    Like `ledger forget`, but the row keeps its history and watch does not wait for its next rescan; what
    serve's /status retry button does. A CSV from an .asc/.zip takes its parent with it. --failed takes
    every failed row at once (after fixing a token, say), narrowed by --status and --since. Exit 1 when no
    failed or retrying row matched.
    """
    from smt_watch.pipeline import retry_failed, retry_target
    from smt_watch.statedir import open_ledger

    if (target is None) == (not failed):
        raise ConfigError("ledger retry: give SHA256|PATH or --failed (not both)")
    if target is not None and (status_code is not None or since is not None):
        raise ConfigError("ledger retry: --status and --since go with --failed")
    cutoff = _since(since)
    with open_ledger(_settings(env_file, SMT_STATE_DIR=state_dir)) as ledger:
        moved = (retry_target(ledger, target) if target is not None
                 else retry_failed(ledger, http_status=status_code, since=cutoff))
    if not moved:
        what = shown(target) if target is not None else "--failed" + (
            f" --status {status_code}" if status_code is not None else "") + (f" --since {since}" if since else "")
        typer.echo(f"smt-watch: no failed or retrying ledger row for {what}", err=True)
        raise typer.Exit(1)
    for sha in moved:
        typer.echo(f"pending {sha}")
    if failed:
        typer.echo(f"{len(moved)} row(s) back to pending", err=True)


@ledger_app.command("import")
def ledger_import(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="The old script's .posted_sha256 file.")],
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """Import hashes (bare, or `sha256sum` lines) as sent, so those files are never posted again.

    Idempotent: hashes already in the ledger are left as they are.
    """
    from smt_watch.legacy import import_file
    from smt_watch.statedir import open_ledger

    with open_ledger(_settings(env_file, SMT_STATE_DIR=state_dir)) as ledger:
        report = import_file(ledger, path)
    typer.echo(
        f"imported {report.added} new of {report.read} hashes from {path}"
        + (f"; skipped {report.skipped_lines} line(s) that are not hashes" if report.skipped_lines else "")
    )


@ledger_app.command("copy")
def ledger_copy(
    to: Annotated[str, typer.Option("--to", metavar="URL|PATH",
                                    help="A postgresql:// URL, or the path of an SQLite ledger file.")],
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """Copy the whole ledger (rows, chunks, sync's remote files, upload counts, this node's stat cache)
    into another one: SQLite to PostgreSQL when a second droplet joins, or back. Idempotent: a row already
    there is replaced by this ledger's, so running it twice changes nothing more. Put the password in
    ~/.pgpass or PGPASSWORD rather than the URL: a command line is visible to other users.
    """
    from smt_watch.config import url_secrets
    from smt_watch.statedir import copy_ledger

    add_secrets(url_secrets(to))
    shown_target, counts = copy_ledger(_settings(env_file, SMT_STATE_DIR=state_dir), to)
    summary = ", ".join(f"{table} {n}" for table, n in counts.items()) or "nothing"
    typer.echo(f"copied to {shown(shown_target)}: {summary}")


# --- receive ----------------------------------------------------------------------------------------


@app.command()
def verify(
    target: Annotated[
        str | None, typer.Argument(metavar="[FILE|SHA]", help="One file (path or SHA-256 / unique prefix).")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", metavar="WHEN", help="Files sent since WHEN (ISO time, or 12h, 2d).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array of verdict objects.")] = False,
    base_url: Annotated[
        str | None, typer.Option("--base-url", metavar="URL", help="The web app [INTELLIWATT_BASE_URL].")
    ] = None,
    state_dir: StateDir = None,
    env_file: EnvFile = None,
) -> None:
    """Ask the app (read-only admin routes, x-admin-token) whether what was sent is stored.

    Per file: stored, partial, outside window, missing or unverifiable, kept in the ledger. Exit 0 when
    every file is stored, 1 otherwise, 2 on a configuration error.
    """
    from datetime import UTC, datetime

    from smt_watch.errors import InputError
    from smt_watch.pipeline import resolve_target
    from smt_watch.statedir import open_ledger
    from smt_watch.verify import Report, parse_since, select, verify_rows

    if target is not None and since is not None:
        raise ConfigError("give FILE|SHA or --since, not both")
    settings = _settings(env_file, INTELLIWATT_BASE_URL=base_url, SMT_STATE_DIR=state_dir)
    if not settings.base_url or settings.admin_token is None:
        raise ConfigError("verify needs INTELLIWATT_BASE_URL and ADMIN_TOKEN (the app's admin read routes)")
    when = parse_since(since, datetime.now(UTC)) if since is not None else None

    def show(r: Report) -> None:
        if not as_json:
            typer.echo(f"{r.verdict.value:<14} {r.sha256[:12]} {shown(r.filename)}  ({shown(r.reason)})")

    with open_ledger(settings) as ledger:
        shas = resolve_target(ledger, target) if target is not None else None
        rows = select(ledger, shas, when)
        if shas is not None and not rows:
            raise InputError(f"{target}: not in the ledger (never delivered)")
        reports = verify_rows(settings, ledger, rows, on_report=show)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in reports], indent=2))
    elif not reports:
        typer.echo("(nothing to verify)")
    if any(r.verdict.value != "stored" for r in reports):
        raise typer.Exit(1)


@app.command()
def receive(
    port: Annotated[int, typer.Option("--port", metavar="PORT", help="TCP port (0 picks a free one).")] = 8081,
    data: Annotated[Path, typer.Option("--data", metavar="DIR", help="Where received files are stored.")] = Path(
        "receiver-data"
    ),
    host: Annotated[str, typer.Option("--host", metavar="ADDR", help="Address to listen on.")] = "127.0.0.1",
    dev_inline: Annotated[
        bool, typer.Option("--dev-inline", help="Store inline posts, as the app in development does.")
    ] = False,
    env_file: EnvFile = None,
) -> None:
    """Run the reference receiver: a local stand-in for the web app and upload server.

    Serves POST /api/admin/smt/pull (inline: refused with 400 INLINE_DISABLED as production does, unless
    --dev-inline), POST /api/admin/smt/raw-upload (chunks, validated as the web app's route does: filename,
    sizeBytes or size_bytes, sha256) and POST /upload (multipart), storing each distinct file once under
    DIR. Bodies over 4.5 MB to the app routes get 413, as Vercel answers. It checks x-admin-token /
    x-smt-upload-token against ADMIN_TOKEN / SMT_UPLOAD_TOKEN when those are set. For demos and tests.
    """
    from smt_watch.reference.receiver import serve

    settings = _settings(env_file)
    serve(
        data,
        host=host,
        port=port,
        admin_token=settings.admin_token.reveal() if settings.admin_token else None,
        upload_token=settings.upload_token.reveal() if settings.upload_token else None,
        inline=dev_inline,
    )


def main() -> None:
    """Console-script entry point: run the app and turn our errors into one line and an exit code."""
    skip_unused_optional_imports()
    plain_coercion()
    try:
        # not standalone: click would print usage errors on three lines; main() makes them one
        code = app_for(app, sys.argv[1:])(standalone_mode=False, prog_name="smt-watch")
    except typer.Abort:  # end of input at a prompt (typer turns Ctrl-C into exit 130 itself)
        typer.echo("smt-watch: aborted", err=True)
        sys.exit(1)
    except SmtWatchError as exc:
        typer.echo(f"smt-watch: {shown(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: still one line, traceback only when asked for
        if _is_click_error(exc):
            _show_click_error(exc)
        log.debug("unexpected error", exc_info=True)
        typer.echo(f"smt-watch: internal error: {type(exc).__name__}: {shown(str(exc))}", err=True)
        sys.exit(1)
    # typer.Exit(n) comes back as n; commands themselves return None (a returned int would be taken as n)
    sys.exit(code if isinstance(code, int) else 0)


def _is_click_error(exc: Exception) -> bool:
    """A click usage/parameter error. Recent typer vendors click (``typer._click``), so these are matched
    by what they have rather than by a class imported from either place."""
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "format_message", None))


def _show_click_error(exc: Any) -> None:
    """One line (``smt-watch watch: No such option: --bogus (see 'smt-watch watch --help')``), exit 2;
    a bare ``smt-watch`` or ``smt-watch ledger`` still prints its help (and exits 2, as click does)."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()
        sys.exit(exc.exit_code)
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "smt-watch"
    hint = f" (see '{where} --help')" if ctx is not None else ""
    typer.echo(f"{where}: {exc.format_message()}{hint}", err=True)
    sys.exit(exc.exit_code)
