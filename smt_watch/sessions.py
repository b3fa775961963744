"""``serve``'s status page sessions: cookies that sign-out really ends, and a sign-in throttle.

A session cookie is ``<issued>.<generation>.<HMAC(SMT_STATUS_TOKEN, issued.generation)>``: an HMAC under the
token, never the token. It is valid for :data:`SESSION_SECONDS` while its generation is the ledger's
current one (meta key :data:`META_KEY`). Signing out raises the generation, which ends every session issued
before, on every node sharing the ledger and across restarts. A change of ``SMT_STATUS_TOKEN`` ends them
too: the MAC no longer matches, and ``serve`` raises the generation when it starts with a token other than
the last one (kept as a salted PBKDF2 fingerprint, never the token), so going back to an old token does not
revive its cookies.

:class:`SignInThrottle` bounds guessing, memory and the log: at most ``SMT_STATUS_SIGNIN_ATTEMPTS`` (5) wrong
tokens per client address and ``SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL`` (30) in all per :data:`WINDOW_SECONDS`
(:meth:`SignInThrottle.from_settings`); beyond, sign-in
(and ``Authorization: Bearer`` on ``/status.json``) answers ``429`` with ``Retry-After`` without looking at
the token. At most :data:`MAX_TRACKED` addresses are remembered, and per window at most
:data:`MAX_WARNINGS` warning lines name an address; the rest is counted into one summary line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from smt_watch.config import Secret, Settings
from smt_watch.ledger.roles import Meta

log = logging.getLogger("smt_watch.server")

META_KEY: Final = "status_sessions"
SESSION_SECONDS: Final = 12 * 3600
FINGERPRINT_ROUNDS: Final = 200_000
WINDOW_SECONDS: Final = 60.0
PER_CLIENT_ATTEMPTS: Final = 5  # SMT_STATUS_SIGNIN_ATTEMPTS's default, for a throttle built without settings
OVERALL_ATTEMPTS: Final = 30  # SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL's default
MAX_TRACKED: Final = 4096
MAX_WARNINGS: Final = 20


def _mac(token: Secret, label: str, value: str) -> str:
    return hmac.new(token.reveal().encode(), f"{label}\0{value}".encode(), hashlib.sha256).hexdigest()


def _fingerprint(token: Secret, salt: bytes) -> str:
    return hashlib.pbkdf2_hmac("sha256", token.reveal().encode(), salt, FINGERPRINT_ROUNDS).hex()


class Sessions:
    """Sessions under one token, their generation kept in the ledger (blocking calls: run them in a thread)."""

    def __init__(self, token: Secret, ledger: Meta) -> None:
        self.token = token
        self.ledger = ledger

    def _read(self) -> dict[str, object]:
        raw = self.ledger.meta(META_KEY)
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            value = {}
        return value if isinstance(value, dict) else {}

    def generation(self) -> int:
        gen = self._read().get("generation", 0)
        return gen if isinstance(gen, int) else 0

    def adopt_token(self) -> None:
        """At start: a token other than the last one ends every session issued before."""
        value = self._read()
        salt_hex, stored = value.get("salt"), value.get("fingerprint")
        if isinstance(salt_hex, str) and isinstance(stored, str):
            try:
                if hmac.compare_digest(_fingerprint(self.token, bytes.fromhex(salt_hex)), stored):
                    return
            except ValueError:
                pass
        salt = os.urandom(16)
        generation = self.generation() + (1 if stored else 0)
        if stored:
            log.info("Status page: SMT_STATUS_TOKEN changed; every earlier session is ended")
        self.ledger.set_meta(META_KEY, json.dumps({"generation": generation, "salt": salt.hex(),
                                                   "fingerprint": _fingerprint(self.token, salt)}))

    def end_all(self) -> None:
        """Sign-out: every session issued so far is ended."""
        value = self._read()
        value["generation"] = self.generation() + 1
        self.ledger.set_meta(META_KEY, json.dumps(value))

    def new(self, now: float | None = None) -> str:
        body = f"{int(time.time() if now is None else now)}.{self.generation()}"
        return f"{body}.{_mac(self.token, 'session', body)}"

    def valid(self, cookie: str | None, now: float | None = None) -> bool:
        if not cookie or cookie.count(".") != 2:
            return False
        issued, generation, mac = cookie.split(".")
        if not (issued.isdigit() and generation.isdigit()):
            return False
        if not hmac.compare_digest(mac.encode(), _mac(self.token, "session", f"{issued}.{generation}").encode()):
            return False
        age_seconds = (time.time() if now is None else now) - int(issued)
        return -60 <= age_seconds <= SESSION_SECONDS and int(generation) == self.generation()


@dataclass
class _Window:
    started: float
    attempts: int = 0
    warned: bool = False


class SignInThrottle:
    """Wrong status tokens per client address and overall, per fixed window (module docstring)."""

    def __init__(self, *, window: float = WINDOW_SECONDS, per_client: int = PER_CLIENT_ATTEMPTS,
                 overall: int = OVERALL_ATTEMPTS, max_tracked: int = MAX_TRACKED,
                 max_warnings: int = MAX_WARNINGS) -> None:
        self.window = window
        self.per_client = per_client
        self.overall = overall
        self.max_tracked = max_tracked
        self.max_warnings = max_warnings
        self._clients: OrderedDict[str, _Window] = OrderedDict()
        self._all = _Window(0.0)
        self._warnings = 0
        self._unlogged = 0
        self._refused = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> SignInThrottle:
        """The throttle ``serve`` uses: its bounds are the operator's settings."""
        return cls(per_client=settings.status_signin_attempts, overall=settings.status_signin_attempts_total)

    def _roll(self, now: float) -> None:
        if now - self._all.started >= self.window:
            if self._unlogged or self._refused:
                log.warning("Status page: %d wrong tokens not named above and %d sign-ins throttled in the "
                            "last %g s", self._unlogged, self._refused, self.window)
            self._all = _Window(now)
            self._warnings = self._unlogged = self._refused = 0

    def _client(self, client: str, now: float) -> _Window | None:
        w = self._clients.get(client)
        if w is not None and now - w.started >= self.window:
            del self._clients[client]
            w = None
        return w

    def retry_after(self, client: str, now: float | None = None) -> int | None:
        """Seconds until ``client`` may try again, or None when it may try now."""
        now = time.monotonic() if now is None else now
        self._roll(now)
        w = self._client(client, now)
        waits = []
        if w is not None and w.attempts >= self.per_client:
            waits.append(w.started + self.window - now)
        if self._all.attempts >= self.overall:
            waits.append(self._all.started + self.window - now)
        if not waits:
            return None
        self._refused += 1
        if w is not None and not w.warned and self._warnings < self.max_warnings:
            w.warned = True
            self._warnings += 1
            log.warning("Status page: sign-in from %s throttled for %d s (%d wrong tokens)", client,
                        int(max(waits)) + 1, w.attempts)
        return int(max(waits)) + 1

    def failed(self, client: str, now: float | None = None) -> None:
        """A wrong token from ``client``: counted, and logged within the per-window bound."""
        now = time.monotonic() if now is None else now
        self._roll(now)
        self._all.attempts += 1
        w = self._client(client, now)
        if w is None:
            while len(self._clients) >= self.max_tracked:
                self._clients.popitem(last=False)  # the oldest window: it ends first anyway
            w = self._clients[client] = _Window(now)
        w.attempts += 1
        if w.attempts == 1 and self._warnings < self.max_warnings:
            self._warnings += 1
            log.warning("Status page: wrong token from %s", client)
        else:
            self._unlogged += 1
