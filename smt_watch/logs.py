"""Logging set-up: plain ``[LEVEL] message`` lines for journald and pipes, rich colour on a TTY.

A redaction filter replaces every configured secret with ``***`` in every record, as a last line of
defence: no code path is supposed to log a token, and this makes sure none does. It replaces whole values
and tokens, never a piece of an ordinary word: with a short secret ``ds``, ``Serving uploads`` must not
become ``Serving uplo***ds`` (which would give the secret away and make every line unreadable).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterable

from smt_watch.clock import utc_stamp
from smt_watch.names import shown

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per line with stable keys: ``ts``, ``level``, ``logger``, ``msg`` (+ ``exc``, for a record
    that did not pass :class:`RedactFilter`: it puts the traceback in ``msg``, escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": utc_stamp(record.created, digits=6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


ANYWHERE_LENGTH = 16  # a secret this long cannot be a piece of an ordinary word: redacted wherever it occurs


def redaction_pattern(secrets: Iterable[str]) -> re.Pattern[str] | None:
    """One regular expression for every secret, longest first. A secret shorter than ANYWHERE_LENGTH matches
    only as a token: not glued to a letter or digit on either side, so it is still found in a URL
    (``//u:ds@h``), a header (``Bearer ds``), after ``=`` or ``:`` and in quotes, but not inside ``uploads``."""
    alternatives = []
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        escaped = re.escape(secret)
        alternatives.append(escaped if len(secret) >= ANYWHERE_LENGTH else rf"(?<![^\W_]){escaped}(?![^\W_])")
    return re.compile("|".join(alternatives)) if alternatives else None


def redact_text(text: str, pattern: re.Pattern[str] | None) -> str:
    return text if pattern is None else pattern.sub("***", text)


class RedactFilter(logging.Filter):
    """The last line of defence on every record: secrets become ``***``, and the message is one printable
    line (names are bytes: a newline or ESC in a file name must not forge or split a log line, and an
    undecodable byte must not break the stream). A traceback, when there is one, follows on its own lines,
    each as printable as the message."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, secrets: Iterable[str]) -> None:
        self.secrets.update(s for s in secrets if s)
        self._pattern = redaction_pattern(self.secrets)

    def _redact(self, text: str) -> str:
        return redact_text(text, self._pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = shown(self._redact(message))
        if record.exc_info and record.exc_info[1] is not None:
            # A traceback quotes exception text (a file name, a server's answer): rendered here, redacted and
            # made printable line by line as the message is (an ESC in it must not reach the journal or the
            # terminal), an exception's own text one line (its newline must not forge a log line).
            clean += "".join("\n" + shown(self._redact(line)) for line in traceback_lines(record.exc_info[1]))
            record.exc_info = None
            record.exc_text = None
        if clean != message or record.args:
            record.msg, record.args = clean, ()
        return True


def traceback_lines(exc: BaseException) -> list[str]:
    """``exc``'s traceback (its chain too) as lines: a frame's text (file, line, source: the program's own)
    split on its line ends, any other part (an exception's type and text, a note: what the sender or a
    server chose) kept whole, its inner line ends left for :func:`shown` to escape."""
    out: list[str] = []
    for part in traceback.TracebackException.from_exception(exc).format():
        body = part.removesuffix("\n")
        if part.startswith(("  File ", "\n", "Traceback (most recent call last):", "  [Previous line repeated")):
            out.extend(body.split("\n"))
        else:
            out.append(body)
    return out


_redactor = RedactFilter()


def setup_logging(level: str = "info", fmt: str = "text", stream: object = None) -> None:
    """Configure the ``smt_watch`` logger once per process (the CLI calls this; libraries never do).

    ``text`` is colour on a TTY and plain ``[LEVEL] message`` otherwise (journald adds its own time stamp
    and unit name); ``json`` is one object per line for log shippers.
    """
    out = stream if stream is not None else sys.stderr
    logger = logging.getLogger("smt_watch")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(out)  # type: ignore[arg-type]
        handler.setFormatter(JsonFormatter())
    elif getattr(out, "isatty", lambda: False)():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(file=out), show_path=False, markup=False)  # type: ignore[arg-type]
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(out)  # type: ignore[arg-type]
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    handler.addFilter(_redactor)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # python-gnupg (only `sample --encrypt-to` uses it; decryption runs gpg itself, smt_watch/gpg.py) logs
    # its own warnings and tracebacks; smt-watch reports every gpg outcome itself, in one line.
    logging.getLogger("gnupg").setLevel(logging.CRITICAL)
    # paramiko logs connection resets itself; without a handler Python would print them raw on stderr.
    ssh = logging.getLogger("paramiko")
    ssh.handlers = [handler]
    ssh.setLevel(logging.WARNING)
    ssh.propagate = False
    # psycopg_pool warns at every failed reconnection attempt while the shared ledger is down, raw on stderr;
    # the ledger says "unreachable" once and "reachable again" itself, so only errors get through, formatted.
    pg = logging.getLogger("psycopg")
    pg.handlers = [handler]
    pg.setLevel(logging.ERROR)
    pg.propagate = False


def add_secrets(secrets: Iterable[str]) -> None:
    _redactor.add(secrets)
