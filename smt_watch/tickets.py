"""Signed upload tickets: a rate-limit identity a client cannot simply declare (``SMT_UPLOAD_TICKET_SECRET``).

Without tickets ``serve`` takes ``role`` and ``accountKey`` from the client, as IntelliWatt's Node server
did: anyone can claim ``admin`` or spend another customer's quota. With a shared secret, the web app mints a
short-lived ticket server-side and its page sends it as ``x-smt-upload-ticket``; ``serve`` then takes the
identity from the ticket only.

Format (documented in docs/how-it-works.md with the TypeScript that mints one)::

    base64url(JSON {"role": "admin"|"customer", "accountKey": str, "exp": unix seconds})
    + "." + base64url(HMAC-SHA256(secret, <the first part as ASCII>))

base64url without padding. The signature covers the encoded payload exactly as sent, so no JSON
canonicalisation is needed on either side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Final

from smt_watch.errors import TicketError

ROLES: Final = ("admin", "customer")
MAX_TICKET_BYTES: Final = 4096
MIN_SECRET_BITS: Final = 256  # 32 bytes of entropy: HMAC-SHA256's key strength; a short secret is brute-forced
MIN_SECRET_DISTINCT: Final = 12  # fewer distinct characters is a pattern, not random material
HOW_TO_MAKE: Final = "`openssl rand -base64 32` or `python3 -c 'import secrets;print(secrets.token_urlsafe(32))'`"
_TTL = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Ticket:
    role: str
    account: str
    exp: int


def secret_weakness(secret: str) -> str | None:
    """Why ``secret`` is too weak to sign tickets with, or None. Never quotes the secret.

    With a one-character secret, one customer ticket was enough to recover it by trying every value and to
    mint an admin ticket. The estimate is an upper bound on what the text can hold: its length times the
    bits per character of the alphabet its character classes span (hex digits 4, base64 about 6, all
    visible ASCII about 6.5), so ``openssl rand -base64 32`` (44 characters), ``token_urlsafe(32)`` (43) and
    ``openssl rand -hex 32`` (64) pass while a word, a UUID or a short token does not. A value of fewer than
    12 distinct characters, or one that repeats a shorter unit, is refused whatever its length.
    """
    if all(c in "0123456789abcdefABCDEF" for c in secret):
        alphabet = 16
    else:
        alphabet = sum(size for test, size in ((str.islower, 26), (str.isupper, 26), (str.isdigit, 10))
                       if any(c.isascii() and test(c) for c in secret))
        alphabet += 32 if any(not (c.isascii() and c.isalnum()) for c in secret) else 0
    bits = int(len(secret) * math.log2(max(alphabet, 2)))
    periodic = len(secret) > 1 and (secret + secret).find(secret, 1) < len(secret)
    if bits < MIN_SECRET_BITS or len(set(secret)) < MIN_SECRET_DISTINCT or periodic:
        return (f"is too weak to sign upload tickets with ({len(secret)} characters, at most about {bits} bits of "
                f"entropy; at least {MIN_SECRET_BITS} bits, 32 random bytes, are needed): make one with {HOW_TO_MAKE}")
    return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode("ascii"), hashlib.sha256).digest())


def parse_ttl(text: str) -> int:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` → seconds (at least 1)."""
    m = _TTL.match(text)
    if not m or int(m[1]) < 1:
        raise ValueError(f"not a duration: {text!r} (e.g. 90, 30s, 10m, 2h, 1d)")
    return int(m[1]) * _UNITS[m[2]]


def mint(secret: str, role: str, account: str, ttl_seconds: int, now: float | None = None) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not account or not account.isprintable():
        raise ValueError("account must be a non-empty printable string")
    exp = int((time.time() if now is None else now) + ttl_seconds)
    payload = _b64(json.dumps({"role": role, "accountKey": account, "exp": exp}, separators=(",", ":")).encode())
    return f"{payload}.{_sign(secret, payload)}"


def verify(secret: str, ticket: str, now: float | None = None) -> Ticket:
    """The identity in a valid, unexpired ticket; else :class:`TicketError` saying why.

    Every failure is a TicketError (a 401 at the server), whatever the header holds: a ticket is base64url
    and a dot, so anything not ASCII is refused before it reaches the signing step (whose ASCII encoding
    would otherwise raise outside the ticket error, a 500)."""
    if len(ticket) > MAX_TICKET_BYTES or not ticket.isascii() or ticket.count(".") != 1:
        raise TicketError("malformed upload ticket")
    payload, signature = ticket.split(".")
    if not hmac.compare_digest(_sign(secret, payload).encode(), signature.encode("ascii")):
        raise TicketError("upload ticket signature does not match")
    try:
        claims = json.loads(_unb64(payload))
    except (ValueError, TypeError, RecursionError) as exc:
        raise TicketError("malformed upload ticket") from exc
    if not isinstance(claims, dict):
        raise TicketError("malformed upload ticket")
    role, account, exp = claims.get("role"), claims.get("accountKey"), claims.get("exp")
    if role not in ROLES or not isinstance(account, str) or not account or type(exp) is not int:
        raise TicketError("upload ticket lacks a valid role, accountKey or exp")
    if exp < (time.time() if now is None else now):
        raise TicketError("upload ticket has expired")
    return Ticket(role, account, exp)
