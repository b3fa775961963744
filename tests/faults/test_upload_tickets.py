"""Signed upload tickets (SMT_UPLOAD_TICKET_SECRET): a rate-limit identity a client cannot simply declare.

`serve` in process on loopback (tests/test_server.py's ``running``), raw sockets for "refused before the
body", and the real `smt-watch ticket` CLI as the reference minter.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server import FORM_TYPE, Running, connect, read_response, running, upload

from conftest import SMT_WATCH, cli_in_process
from smt_watch.config import Settings
from smt_watch.logs import RedactFilter
from smt_watch.tickets import TicketError, mint, verify

pytestmark = pytest.mark.faults

Make = Callable[..., Settings]
SECRET = "J9_lIcwHgs9isVKIMMLJLzVFpsEqtGrPO_Vh-DOuRnM"  # secrets.token_urlsafe(32): strong enough to sign with


@pytest.fixture
def ticketed(make_settings: Make) -> Iterator[Running]:
    with running(make_settings(SMT_UPLOAD_TICKET_SECRET=SECRET, SMT_UPLOAD_CUSTOMER_LIMIT="1",
                               SMT_UPLOAD_ADMIN_LIMIT="5")) as r:
        yield r


def post(srv: Running, data: bytes, ticket: str | None = None, **fields: str) -> Any:
    headers = {"x-smt-upload-ticket": ticket} if ticket is not None else {}
    with srv.client() as client:
        return upload(client, data, token=None, headers=headers, fields=fields)


def test_the_identity_comes_from_the_ticket_only(ticketed: Running) -> None:
    ticket = mint(SECRET, "admin", "ops-1", 600)
    r = post(ticketed, b"ESIID\n1\n", ticket, role="customer", accountKey="someone-else")
    assert r.status_code == 202, r.text
    assert (r.json()["meta"]["role"], r.json()["meta"]["accountKey"]) == ("admin", "ops-1")


def test_without_a_ticket_fields_and_headers_cannot_declare_an_identity(ticketed: Running) -> None:
    first = post(ticketed, b"ESIID\n1\n", role="admin", accountKey="ops-1")
    assert first.status_code == 202 and (first.json()["meta"]["role"], first.json()["meta"]["accountKey"]) == (
        "customer", "127.0.0.1")
    with ticketed.client() as client:  # rotating the declared account does not dodge the limit
        second = upload(client, b"ESIID\n2\n", token=None, fields={"accountKey": "fresh"},
                        headers={"x-smt-upload-role": "admin", "x-smt-upload-account-key": "fresh"})
    assert second.status_code == 429 and second.json()["accountKey"] == "127.0.0.1"
    assert len(ticketed.stored()) == 1


@pytest.mark.parametrize("kind", ["wrong-secret", "expired", "tampered", "garbage"])
def test_a_bad_ticket_is_401_before_the_body(ticketed: Running, kind: str) -> None:
    good = mint(SECRET, "customer", "HOME-1", 600)
    ticket = {
        "wrong-secret": mint("another-secret", "admin", "ops-1", 600),
        "expired": mint(SECRET, "admin", "ops-1", 1, now=0),
        "tampered": mint(SECRET, "customer", "HOME-1", 600).replace(good.split(".")[0],
                                                                   mint(SECRET, "admin", "x", 600).split(".")[0]),
        "garbage": "not.a-ticket.at-all",
    }[kind]
    with connect(ticketed.port) as sock:  # headers only: the refusal must not wait for the body
        sock.sendall((f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{ticketed.port}\r\nContent-Type: {FORM_TYPE}\r\n"
                      f"Content-Length: 500000000\r\nx-smt-upload-ticket: {ticket}\r\n\r\n").encode())
        status, _, body = read_response(sock)
    reply = json.loads(body)
    assert status == 401 and reply["error"] == "invalid_ticket" and reply["message"].startswith("Upload refused")
    assert SECRET not in body.decode()
    assert ticketed.stored() == [] and ticketed.temps() == []


def test_preflight_allows_the_ticket_header(make_settings: Make) -> None:
    with running(make_settings(SMT_UPLOAD_TICKET_SECRET=SECRET)) as srv, srv.client() as client:
        resp = client.options("/upload", headers={"Origin": "https://intelliwatt.com",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "x-smt-upload-ticket"})
    assert resp.status_code == 200 and "x-smt-upload-ticket" in resp.headers["access-control-allow-headers"]


def test_the_ticket_command_mints_what_serve_accepts(base_env: dict[str, str], tmp_path: Path) -> None:
    env = {**base_env, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SMT_UPLOAD_TICKET_SECRET": SECRET}
    proc = cli_in_process(["ticket", "--role", "admin", "--account", "ops-1", "--ttl", "2h"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    ticket = proc.stdout.strip().splitlines()[-1]
    claims = verify(SECRET, ticket)
    assert (claims.role, claims.account) == ("admin", "ops-1")
    assert SECRET not in proc.stdout + proc.stderr
    no_secret = {k: v for k, v in env.items() if k != "SMT_UPLOAD_TICKET_SECRET"}
    refused = cli_in_process(["ticket", "--role", "admin", "--account", "x"], no_secret, tmp_path)
    assert refused.returncode == 2 and "SMT_UPLOAD_TICKET_SECRET" in refused.stderr


WEAK = ["x", "ds", "password", "correct-horse-battery-staple", "0123456789abcdef0123456789abcdef",
        "ticket-secret-3e3e3e3e3e3e-SECRET", "ab" * 40, "a" * 100, "6f1c2b7e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"]


@pytest.mark.timeout(600)  # a CLI start on a shared, loaded machine
@pytest.mark.parametrize("weak", WEAK)
def test_a_secret_too_weak_to_sign_with_is_refused_at_start_and_by_the_ticket_command(
        base_env: dict[str, str], tmp_path: Path, weak: str) -> None:
    """A one-character secret was recovered from one customer ticket in 11 tries. serve refuses a weak
    secret before it listens, the ticket command before it mints; one line, exit 2, the secret not in it.
    ``serve`` runs as a process (if it did start, it would listen until killed); ``ticket`` in this one."""
    env = {**base_env, "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "SMT_UPLOAD_TICKET_SECRET": weak,
           "SMT_UPLOAD_PORT": "0"}
    for args in (["ticket", "--role", "admin", "--account", "ops-1"], ["serve"]):
        proc = (subprocess.run([*SMT_WATCH, *args], env=env, capture_output=True, text=True, timeout=60)
                if args[0] == "serve" else cli_in_process(args, env, tmp_path))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, (args, out)
        assert "SMT_UPLOAD_TICKET_SECRET" in out and "too weak" in out and "openssl rand -base64 32" in out, out
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in out, out
        assert weak not in out.replace("SMT_UPLOAD_TICKET_SECRET", ""), out


@pytest.mark.parametrize("make", ["openssl-base64", "token_urlsafe", "hex"])
def test_the_documented_ways_of_making_a_secret_are_accepted(base_env: dict[str, str], tmp_path: Path,
                                                             make: str) -> None:
    strong = {"openssl-base64": base64.b64encode(secrets.token_bytes(32)).decode(),  # what openssl prints
              "token_urlsafe": secrets.token_urlsafe(32), "hex": secrets.token_hex(32)}[make]
    env = {**base_env, "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "SMT_UPLOAD_TICKET_SECRET": strong}
    proc = cli_in_process(["ticket", "--role", "customer", "--account", "HOME-1"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert verify(strong, proc.stdout.strip().splitlines()[-1]).account == "HOME-1"


NOT_ASCII = [b"\xff\xfe.\x80", "é.é".encode(), b"abc.d\xe9f", "\u2603.x".encode(), b"\xc3\xa9" * 10 + b".sig",
             b"eyJyb2xlIjoiYWRtaW4ifQ.\xff"]


@pytest.mark.parametrize("raw", NOT_ASCII, ids=range(len(NOT_ASCII)))
def test_a_ticket_header_that_is_not_ascii_is_401_never_500(ticketed: Running, raw: bytes) -> None:
    """Any header, any bytes: the ticket error, a 401, not a traceback from the signing step."""
    with connect(ticketed.port) as sock:
        sock.sendall((f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{ticketed.port}\r\nContent-Type: {FORM_TYPE}\r\n"
                      "Content-Length: 500000000\r\nx-smt-upload-ticket: ").encode() + raw + b"\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 401, body
    assert json.loads(body)["error"] == "invalid_ticket"
    assert ticketed.stored() == [] and ticketed.temps() == []


@pytest.mark.parametrize("text", ["\xff\xfe.\x80", "é.é", "abc.d\u00e9f", "\u2603.x", "\udcff.x", "e30.\x00"])
def test_verify_raises_only_the_ticket_error(text: str) -> None:
    with pytest.raises(TicketError):
        verify(SECRET, text)


def _redacted(secret: str, message: str) -> str:
    record = logging.LogRecord("smt_watch", logging.INFO, __file__, 1, message, (), None)
    f = RedactFilter()
    f.add([secret])
    f.filter(record)
    return record.getMessage()


def test_log_redaction_replaces_whole_tokens_never_pieces_of_words() -> None:
    """A short secret "ds" must not turn "Serving uploads" into "Serving uplo***ds" (which gives it away);
    as a token it is still redacted wherever it stands."""
    assert _redacted("ds", "Serving uploads on 127.0.0.1:8080 (words: dsl, odds, ds2)") == (
        "Serving uploads on 127.0.0.1:8080 (words: dsl, odds, ds2)")
    for shown, expected in [("token=ds", "token=***"), ("Authorization: Bearer ds", "Authorization: Bearer ***"),
                            ("https://u:ds@host/x", "https://u:***@host/x"), ("key: 'ds'", "key: '***'"),
                            ('"ds"', '"***"'), ("ds", "***"), ("?password=ds&x=1", "?password=***&x=1")]:
        assert _redacted("ds", shown) == expected, shown
    long = "Zq8vN3kLmP0xR7tY"  # 16 characters and more: redacted wherever it occurs, even glued to a word
    assert _redacted(long, f"x{long}y and {long}") == "x***y and ***"
