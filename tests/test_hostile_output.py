"""What a sender chose never reaches the operator's terminal raw: the human-readable outputs (``inspect``'s
table, ``status``, ``ledger list``) escape control characters and undecodable bytes in file names and file
cells, as the JSON outputs do, and never read them as rich markup.

A CSV's ESIID cells hold an ESC sequence, a NUL, a newline (a quoted field) and rich markup; the file's
name holds a byte that is not UTF-8 and an ESC. ``inspect`` runs as a real process and its stdout is read as
bytes (what the terminal would get); ``status`` and ``ledger list`` read a real SQLite ledger.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import struct
import subprocess
import termios
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from conftest import SMT_WATCH, UPLOAD_TOKEN, cli_env, write_csv
from smt_watch.clock import utc_stamp
from smt_watch.ledger.verdicts import VerdictRow
from smt_watch.logs import setup_logging
from smt_watch.reference.sample import interval_csv
from smt_watch.statedir import open_ledger
from smt_watch.status import SYNC_KEY

ESIIDS = ["\x1b[31m", "10\x0044", "10\n44", "[bold]x[/]"]  # a colour, a NUL, a newline, rich markup
SHOWN_ESIIDS = ["\\x1b[31m", "10\\x0044", "10\\n44", "[bold]x[/]"]
NAME = os.fsdecode(b"bad\xff\x1b[2Jname.csv")  # not UTF-8, and an ESC that clears the screen
SHOWN_NAME = "bad\\xff\\x1b[2Jname.csv"
RAW = (b"\x1b", b"\x00", b"\xff")
EMOJI = ":smile:"  # rich's shortcode for U+1F604: a str cell or a markup bar description would show the emoji
LEDGER_NAME = "\x1b[2J\n\x00.csv"  # a name in the ledger is valid UTF-8 (names.stored), but may hold these
SHOWN_LEDGER_NAME = "\\x1b[2J\\n\\x00.csv"


def hostile_csv() -> bytes:
    """A day of real interval rows, the ESIID cells taking the hostile values in turn."""
    header, *rows = interval_csv(1, start=date(2026, 6, 5)).decode().splitlines()
    out = [header]
    for i, line in enumerate(rows):
        esiid = ESIIDS[i % len(ESIIDS)]
        out.append(f'"{esiid}",{line.split(",", 1)[1]}')  # a quoted field: it holds the newline
    return ("\n".join(out) + "\n").encode()


def test_inspect_table_escapes_cells_and_the_file_name(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = tmp_path / NAME
    path.write_bytes(hostile_csv())
    env = cli_env(base_env, tmp_path)
    done = subprocess.run([*SMT_WATCH, "inspect", str(path)], env=env, capture_output=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    out = done.stdout.decode("utf-8")  # valid UTF-8: the name's \xff byte is escaped too
    assert not any(b in done.stdout for b in RAW), out
    # the table wraps a long cell over lines (the key column empty beside it): without the borders and the
    # blanks, its text reads on
    text = "".join(out.replace("\u2502", "").split())
    for cell in SHOWN_ESIIDS:
        assert "".join(cell.split()) in text, (cell, out)
    assert SHOWN_NAME in out  # the title and the column header
    as_json = subprocess.run([*SMT_WATCH, "inspect", str(path), "--json"], env=env, capture_output=True,
                             timeout=60, cwd=tmp_path)
    assert as_json.returncode == 0 and sorted(json.loads(as_json.stdout)["esiids"]) == sorted(ESIIDS)


def _files_row(sha: str, state: str, filename: str, error: str | None) -> tuple[str, dict[str, Any]]:
    now = utc_stamp(1_800_000_000.0, digits=6)
    return ("files", {"sha256": sha, "filename": filename, "path": f"/in/{sha[:4]}.csv", "size": 100, "state": state,
                      "attempts": 1, "http_status": 200 if state == "sent" else 400, "last_error": error,
                      "first_seen": now, "updated_at": now, "sent_at": now if state == "sent" else None,
                      "destination": "http://x/upload", "mode": "raw-upload", "next_attempt_at": None,
                      "claimed_by": None, "claimed_at": None, "origin": "smt-watch", "parent": None})


def test_status_and_ledger_list_escape_names_errors_and_alerts(
        run_cli: Callable[..., subprocess.CompletedProcess[str]], make_settings: Callable[..., Any]) -> None:
    """A sent file the app holds only in part (its name in an alert), a failed one (its name and error in the
    failures table) and a sync pass stopped by an error quoting a server's text. Rows as ``ledger copy``
    writes them: another version's ledger may hold control characters (valid UTF-8) in any text column."""
    with open_ledger(make_settings()) as ledger:
        ledger.import_rows([_files_row("a" * 64, "sent", f"sent{LEDGER_NAME}", None),
                            _files_row("b" * 64, "failed", f"failed{LEDGER_NAME}", "HTTP 400: \x1b]0;owned\x07"),
                            _files_row("c" * 64, "sent", f"{EMOJI}.csv", None),
                            _files_row("d" * 64, "failed", f"{EMOJI}.csv", f"HTTP 400: {EMOJI}")])
        ledger.save_verdict(VerdictRow(sha256="a" * 64, verdict="partial"))
        ledger.save_verdict(VerdictRow(sha256="c" * 64, verdict="\x1b[2J"))  # another version's verdict text
        ledger.set_meta("watch.unreadable.n\x1b[1m", json.dumps([{
            "node": "n\x1b[1m", "path": "/in/x.csv", "owner": "o\x1b[2J", "mode": "0600", "user": "u\x00",
            "since": "s\x07"}]))
        ledger.set_meta(SYNC_KEY, json.dumps({
            "node": "n1", "started_at": utc_stamp(1_800_000_000.0), "finished_at": utc_stamp(1_800_000_001.0),
            "listed": 1, "new": 0, "bytes": 0, "already": 0, "failed": [], "error": "server said \x1b[2J\nfake"}))
    status = run_cli("status")
    assert status.returncode == 1, status.stderr  # the failed row and the partial file need a person
    for line in (f"sent{SHOWN_LEDGER_NAME}", "server said \\x1b[2J\\nfake",  # an alert each, on one line
                 "cannot read: /in/x.csv (owner o\\x1b[2J, mode 0600; watch on n\\x1b[1m runs as u\\x00) since s\\x07"):
        assert any(line in row for row in status.stdout.splitlines()), (line, status.stdout)
    assert "\\x1b]0;owned\\x07" in "".join(status.stdout.replace("\u2502", "").split())
    listed = run_cli("ledger", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"failed{SHOWN_LEDGER_NAME}" in listed.stdout and "\\x1b]0;owned\\x07" in listed.stdout
    assert "sent/\\x1b[2J" in listed.stdout
    for out in (status.stdout, listed.stdout):
        assert not any(c in out for c in ("\x1b", "\x00", "\x07", "\udcff", "\\udcff", "\U0001f604")), out
    flat = "".join(status.stdout.replace("\u2502", "").split())  # table cells may wrap
    assert flat.count(EMOJI) >= 3, status.stdout  # the recent and failed rows' names, the failure's reason


def test_inspect_plot_takes_any_esiid_as_text(run_cli: Callable[..., subprocess.CompletedProcess[str]],
                                              tmp_path: Path) -> None:
    """The heatmap's title holds the name and the ESIID: a "$" there was read as mathtext (matplotlib raised,
    an internal error) and an ESC made an SVG no XML reader opens."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.csv"
    esiid = "$\\foo{x$\x1b[31m"
    header, *rows = interval_csv(1, start=date(2026, 6, 5)).decode().splitlines()
    path.write_text("\n".join([header, *(f'"{esiid}",{r.split(",", 1)[1]}' for r in rows)]) + "\n")
    out = tmp_path / "m.svg"
    done = run_cli("inspect", str(path), "--plot", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "plotted 1 day(s) of ESIID $\\foo{x$\\x1b[31m to" in done.stdout
    assert "\x1b" not in done.stdout + done.stderr
    ElementTree.parse(out)  # well-formed XML
    assert "$\\foo{x$\\x1b[31m, kWh per 15 minutes" in out.read_text()


def test_posts_progress_bar_escapes_the_name(receiver: Any, base_env: dict[str, str], tmp_path: Path) -> None:
    """``post``'s progress bar (only on a terminal: stderr is a pseudo-terminal here) names the file."""
    name = f"big\x1b[2J[bold]x[red]{EMOJI}.csv"
    path = tmp_path / "inbox" / name
    write_csv(path, rows=80_000)  # past the bar's 4 MiB
    env = cli_env(base_env, tmp_path, {"SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN,
                                       "SMT_PATTERNS": "*.csv"})
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # rows, columns: room for it
    try:
        proc = subprocess.Popen([*SMT_WATCH, "post", str(path)], env=env, stdout=subprocess.PIPE,
                                stderr=follower, cwd=tmp_path)
        os.close(follower)
        follower = -1
        tty = bytearray()
        while True:  # until the child's end closes the terminal (EIO on Linux)
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            tty += chunk
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0, (out, bytes(tty))
    assert path.stat().st_size >= 4 * 1024 * 1024
    assert b"big\\x1b[2J[bold]x[red]:smile:.csv" in tty, bytes(tty)  # the bar drew it, escaped, no markup
    assert b"\x1b[2J" not in tty and b"\x1b[2J" not in out


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_traceback_is_logged_escaped_line_by_line(fmt: str) -> None:
    """``log.exception`` (jobs, watch, serve) prints the exception's traceback, whose text quotes a file name
    or a server's answer: an ESC there reached the journal or the terminal raw (only the message was
    escaped). Each of its lines is escaped now, and the lines stay lines."""
    out = io.StringIO()
    setup_logging("info", fmt, stream=out)
    try:
        raise OSError(f"cannot open {LEDGER_NAME}\rforged line")
    except OSError:
        logging.getLogger("smt_watch.watch").exception("Job failed for %s", LEDGER_NAME)
    text = out.getvalue()
    assert "\x1b" not in text and "\x00" not in text and "\r" not in text, text
    lines = text.splitlines() if fmt == "text" else json.loads(text)["msg"].split("\n")
    assert lines[0].endswith(f"Job failed for {SHOWN_LEDGER_NAME}"), lines
    assert lines[1] == "Traceback (most recent call last):", lines
    assert lines[-1] == f"OSError: cannot open {SHOWN_LEDGER_NAME}\\rforged line", lines
