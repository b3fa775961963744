"""The status page's session, attacked: guessing the token, a cookie kept after sign-out or a token change,
and the cookie's ``Secure`` behind the README's TLS proxy.

A real `smt-watch serve` process on loopback; clients bound to their own loopback addresses (127.0.x.y) so
the per-address throttle sees distinct clients. Restarts reuse the same state directory (the ledger).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from test_server_process import Serve, serving
from test_server_process import env as env  # the fixture, shared

from faults.support import assert_clean

pytestmark = pytest.mark.faults

TOKEN = "status-token-session-tests-0123456789abcdef"
OTHER = "status-token-session-tests-fedcba9876543210"
OPERATOR_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "operator.md"
PER_CLIENT, OVERALL, MAX_WARNINGS = 5, 30, 20  # smt_watch.sessions' limits, as the README states them


@contextmanager
def status_serve(env: dict[str, str], tmp_path: Path, token: str = TOKEN, **extra: str) -> Iterator[Serve]:
    with serving({**env, "SMT_STATUS_TOKEN": token, **extra}, tmp_path / "serve.log") as s:
        yield s
        assert_clean(s.text(), "serve log")
        assert token not in s.text()


def client(s: Serve, source: str = "127.0.0.1") -> httpx.Client:
    return httpx.Client(base_url=s.url, trust_env=False, timeout=30,
                        transport=httpx.HTTPTransport(local_address=source))


def sign_in(c: httpx.Client, token: str = TOKEN, **headers: str) -> httpx.Response:
    return c.post("/status/login", data={"token": token}, headers=headers)


def cookie_of(r: httpx.Response) -> str:
    assert r.status_code == 303, r.text
    match = re.match(r"smt_status=([^;]+);", r.headers["set-cookie"])
    assert match, r.headers["set-cookie"]
    return match.group(1)


def page_with(s: Serve, cookie: str) -> int:
    with client(s) as c:
        return c.get("/status", headers={"Cookie": f"smt_status={cookie}"}).status_code


def csrf_of(c: httpx.Client, cookie: str) -> str:
    page = c.get("/status", headers={"Cookie": f"smt_status={cookie}"})
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert match, page.text[:500]
    return match.group(1)


# --- sessions end ------------------------------------------------------------------------------------------


def test_sign_out_ends_every_session_and_a_restart_does_not_revive_them(env: dict[str, str], tmp_path: Path) -> None:
    with status_serve(env, tmp_path) as s, client(s) as c:
        first, second = cookie_of(sign_in(c)), cookie_of(sign_in(c))
        assert page_with(s, first) == 200 and page_with(s, second) == 200
        assert TOKEN not in first
        r = c.post("/status/logout", data={"csrf": csrf_of(c, first)}, headers={"Cookie": f"smt_status={first}"})
        assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]
        assert page_with(s, first) == 401 and page_with(s, second) == 401  # the other browser's too
        third = cookie_of(sign_in(c))
        assert page_with(s, third) == 200
        with client(s) as bearer:  # scripts still get in with the token itself
            assert bearer.get("/status.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    with status_serve(env, tmp_path) as s:  # the same ledger after a restart
        assert page_with(s, first) == 401 and page_with(s, second) == 401
        assert page_with(s, third) == 200


def test_a_changed_token_ends_sessions_even_when_changed_back(env: dict[str, str], tmp_path: Path) -> None:
    with status_serve(env, tmp_path) as s, client(s) as c:
        old = cookie_of(sign_in(c))
        assert page_with(s, old) == 200
    with status_serve(env, tmp_path, token=OTHER) as s:
        assert page_with(s, old) == 401
    with status_serve(env, tmp_path) as s, client(s) as c:  # back to the first token: its cookies stay dead
        assert page_with(s, old) == 401
        assert page_with(s, cookie_of(sign_in(c))) == 200
    assert OTHER not in (tmp_path / "serve.log").read_text()


# --- guessing is throttled -------------------------------------------------------------------------------


def test_wrong_tokens_from_one_address_are_throttled_and_others_are_not(env: dict[str, str], tmp_path: Path) -> None:
    with status_serve(env, tmp_path) as s, client(s, "127.0.4.1") as guesser, client(s, "127.0.4.2") as other:
        for i in range(PER_CLIENT):
            r = sign_in(guesser, f"wrong-guess-{i:04d}-xxxxxxxxxx")
            assert r.status_code == 401 and "Wrong token." in r.text
        r = sign_in(guesser, "wrong-guess-again-xxxxxxxxxx")
        assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 61
        assert "try again in" in r.text
        assert sign_in(guesser).status_code == 429  # the right token is not even looked at now
        r = guesser.get("/status.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 429 and r.json()["error"] == "too_many_attempts" and "retry-after" in r.headers
        assert page_with(s, cookie_of(sign_in(other))) == 200  # another address signs in
        log = s.text()
        assert log.count("wrong token from 127.0.4.1") == 1  # one line per address per window
        assert log.count("sign-in from 127.0.4.1 throttled") == 1


def test_guessing_from_many_addresses_is_throttled_overall_with_a_bounded_log(env: dict[str, str],
                                                                              tmp_path: Path) -> None:
    with status_serve(env, tmp_path) as s:
        statuses = []
        for i in range(OVERALL + 20):  # one wrong token from each of 50 addresses
            with client(s, f"127.0.5.{i + 1}") as c:
                statuses.append(sign_in(c, f"wrong-guess-{i:04d}-xxxxxxxxxx").status_code)
        assert statuses == [401] * OVERALL + [429] * 20
        with client(s, "127.0.6.1") as fresh:
            r = sign_in(fresh)
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 0  # until the window ends
        lines = [line for line in s.text().splitlines() if "Status page" in line]
        assert sum("wrong token from" in line for line in lines) == MAX_WARNINGS
        assert len(lines) <= MAX_WARNINGS + 1, lines  # the rest is counted, not logged


def test_the_sign_in_limits_are_settings(env: dict[str, str], tmp_path: Path) -> None:
    """SMT_STATUS_SIGNIN_ATTEMPTS=2: the third wrong token from one address is 429; with
    SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL=3, the fourth from anywhere is too."""
    with status_serve(env, tmp_path, SMT_STATUS_SIGNIN_ATTEMPTS="2", SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL="3") as s:
        with client(s, "127.0.7.1") as guesser:
            statuses = [sign_in(guesser, f"wrong-guess-{i:04d}-xxxxxxxxxx").status_code for i in range(3)]
            assert statuses == [401, 401, 429]
        with client(s, "127.0.7.2") as second:
            assert sign_in(second, "wrong-guess-second-xxxxxxxxxx").status_code == 401  # the third in all
        with client(s, "127.0.7.3") as third:
            r = sign_in(third)  # the right token, but the overall limit is reached: not looked at
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 0


# --- Secure behind the documented TLS proxy --------------------------------------------------------------


def documented_proxy() -> tuple[dict[str, str], dict[str, str]]:
    """The operator guide's nginx set-up: the headers it sets (nginx variables filled as for an https request from
    203.0.113.7) and the settings it tells serve to use."""
    section = OPERATOR_GUIDE.read_text(encoding="utf-8").split("## Behind a TLS proxy", 1)[1].split("\n#", 1)[0]
    nginx = re.search(r"```nginx\n(.*?)```", section, re.S)
    assert nginx, "the operator guide's proxy section has no nginx block"
    fill = {"$scheme": "https", "$host": "smt.example.com", "$remote_addr": "203.0.113.7",
            "$proxy_add_x_forwarded_for": "203.0.113.7"}
    headers = {name: fill.get(value, value) for name, value in
               re.findall(r"proxy_set_header\s+(\S+)\s+(\S+);", nginx.group(1))}
    settings = dict(re.findall(r"^(SMT_[A-Z_]+)=(\S+)$", section, re.M))
    return headers, settings


def test_the_documented_tls_proxy_set_up_gives_a_secure_cookie(env: dict[str, str], tmp_path: Path) -> None:
    headers, settings = documented_proxy()
    assert headers.get("X-Forwarded-Proto") == "https" and "SMT_TRUSTED_PROXIES" in settings
    with status_serve(env, tmp_path, **settings) as s:
        with client(s) as proxy:  # nginx on the same machine connects from 127.0.0.1
            r = sign_in(proxy, **headers)
            assert r.status_code == 303 and "; Secure" in r.headers["set-cookie"], r.headers
        with client(s, "127.0.7.1") as direct:  # a peer that is not the proxy: its X-Forwarded-Proto is ignored
            r = sign_in(direct, **headers)
            assert r.status_code == 303 and "Secure" not in r.headers["set-cookie"]
    with status_serve(env, tmp_path) as s, client(s) as proxy:  # without SMT_TRUSTED_PROXIES: ignored too
        r = sign_in(proxy, **headers)
        assert r.status_code == 303 and "Secure" not in r.headers["set-cookie"]
