"""Signed upload tickets (SMT_UPLOAD_TICKET_SECRET): a rate-limit identity a client cannot simply declare.

`serve` in process on loopback (tests/test_server.py's ``running``), raw sockets for "refused before the
body", and the real `smt-watch ticket` CLI as the reference minter.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server import FORM_TYPE, Running, connect, read_response, running, upload

from conftest import SMT_WATCH
from smt_watch.config import Settings
from smt_watch.tickets import mint, verify

pytestmark = pytest.mark.faults

Make = Callable[..., Settings]
SECRET = "ticket-secret-3e3e3e3e3e3e-SECRET"


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
    proc = subprocess.run([*SMT_WATCH, "ticket", "--role", "admin", "--account", "ops-1", "--ttl", "2h"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    ticket = proc.stdout.strip().splitlines()[-1]
    claims = verify(SECRET, ticket)
    assert (claims.role, claims.account) == ("admin", "ops-1")
    assert SECRET not in proc.stdout + proc.stderr
    no_secret = {k: v for k, v in env.items() if k != "SMT_UPLOAD_TICKET_SECRET"}
    refused = subprocess.run([*SMT_WATCH, "ticket", "--role", "admin", "--account", "x"], env=no_secret,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "SMT_UPLOAD_TICKET_SECRET" in refused.stderr
