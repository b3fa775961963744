"""``serve``'s ``/status`` page in a real headless Chromium, as tests/test_browser.py drives the upload pages.

``serve`` is the real CLI in a subprocess on loopback; a real ``watch`` (in-thread, conftest's ``watching``)
delivers to the reference receiver, which refuses the first file with HTTP 400. The page refuses without the
token, loads with it, shows the delivered and the failed file; its retry button moves the failed row back to
``pending`` and ``watch`` delivers it. Forged requests (no session, a wrong or missing CSRF token, a foreign
Origin) are refused with a clear status and change nothing. One screenshot per state in ``tmp_path``.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ports import free_port

from conftest import (
    LOOPBACK,
    SMT_WATCH,
    TLS_CONTEXT,
    UPLOAD_TOKEN,
    chromium_missing,
    fresh_chromium,
    wait_for,
    watching,
    write_csv,
)
from smt_watch.reference.receiver import Fault

if why := chromium_missing():
    pytest.skip(why, allow_module_level=True)

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.browser

STATUS_TOKEN = "status-token-0123456789abcdef-SECRET"
SHORT = 30.0  # deadline for a page or a delivery, generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def browser(chromium_session: WebDriver) -> WebDriver:
    """conftest's one Chromium, fresh for this module."""
    return fresh_chromium(chromium_session, width=1000, height=1100, page_load=SHORT)


class Serve:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = log.open("ab")
        argv = [*SMT_WATCH, "serve", "--port", str(self.port), "--webhook-port", "0"]  # never 0.0.0.0:8787 in a test
        self.proc = subprocess.Popen(argv, env=env, stdout=self._fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=log.parent)

    def up(self) -> bool:
        try:
            return LOOPBACK.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Killed, not stopped gracefully: no case here is about stopping (serve starts no sync here, so no
        child is left), and a graceful stop waited ~0.4 s for the browser's kept-alive connections."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._fh.close()


@pytest.fixture
def serve(base_env: dict[str, str], tmp_path: Path) -> Iterator[Serve]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env,
           "SMT_STATUS_TOKEN": STATUS_TOKEN}
    s = Serve(env, tmp_path / "serve.log")
    try:
        wait_for(lambda: s.up() or s.proc.poll() is not None, SHORT, "serve to answer /health")
        assert s.proc.poll() is None, s.log.read_text()
        yield s
    finally:
        s.stop()


def shot(driver: WebDriver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / f"status-{name}.png"))


def ledger_state(settings: Any, sha: str) -> str | None:
    from smt_watch.statedir import open_ledger

    with open_ledger(settings) as ledger:
        row = ledger.get(sha)
    return row.state if row else None


def signed_in(serve: Serve) -> tuple[httpx.Client, str]:
    """An HTTP client holding a session cookie (from the login form), and the page's CSRF token."""
    client = httpx.Client(base_url=serve.url, trust_env=False, timeout=SHORT, verify=TLS_CONTEXT)
    r = client.post("/status/login", data={"token": STATUS_TOKEN})
    assert r.status_code == 303 and r.headers["location"] == "/status", r.text
    page = client.get("/status")
    assert page.status_code == 200
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert match, page.text[:2000]
    return client, match.group(1)


@pytest.mark.timeout(240)
def test_status_page_login_failures_retry_and_delivery(browser: WebDriver, serve: Serve, receiver: Any,
                                                       make_settings: Any, base_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="0.1")
    inbox = Path(base_env["SMT_LOCAL_DIR"])
    receiver.state.faults.append(Fault(status=400, body={"ok": False, "error": "unknown ESIID <b>x</b>"}))
    with watching(settings):
        bad = write_csv(inbox / "refused <i>.csv", rows=30, seed=4)
        from smt_watch.hashing import identify

        bad_sha = identify(bad).sha256
        wait_for(lambda: ledger_state(settings, bad_sha) == "failed", SHORT, "the first file refused")
        good_sha = identify(write_csv(inbox / "delivered.csv", rows=30, seed=5)).sha256
        wait_for(lambda: len(receiver.stored()) == 1, SHORT, "the second file delivered")
        # the receiver stores before it answers, and watch records `sent` once the answer is in
        wait_for(lambda: ledger_state(settings, good_sha) == "sent", SHORT, "the second file marked sent")

        # --- refused without the token (and never from a URL) ---------------------------------------------
        for path in ("/status", f"/status?token={STATUS_TOKEN}"):
            r = LOOPBACK.get(serve.url + path, timeout=SHORT)
            assert r.status_code == 401 and 'name="token"' in r.text and "delivered.csv" not in r.text
        r = LOOPBACK.get(f"{serve.url}/status.json", timeout=SHORT)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        r = LOOPBACK.get(f"{serve.url}/status.json", headers={"Authorization": f"Bearer {STATUS_TOKEN}"}, timeout=SHORT)
        assert r.status_code == 200 and r.json()["counts"]["failed"] == 1

        browser.delete_all_cookies()
        browser.get(f"{serve.url}/status")
        assert browser.find_element(By.ID, "token").get_attribute("type") == "password"
        assert "delivered.csv" not in browser.page_source
        shot(browser, tmp_path, "1-login")
        browser.find_element(By.ID, "token").send_keys("wrong-token-wrong-token")
        browser.find_element(By.ID, "login").click()
        WebDriverWait(browser, SHORT).until(lambda d: d.find_elements(By.ID, "login-error"))
        assert browser.find_element(By.ID, "login-error").text == "Wrong token."
        assert browser.get_cookies() == []
        shot(browser, tmp_path, "2-wrong-token")

        # --- signed in: the delivered and the failed file -------------------------------------------------
        browser.find_element(By.ID, "token").send_keys(STATUS_TOKEN)
        browser.find_element(By.ID, "login").click()
        WebDriverWait(browser, SHORT).until(lambda d: d.find_elements(By.ID, "failures"))
        assert STATUS_TOKEN not in browser.current_url
        (cookie,) = browser.get_cookies()
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and STATUS_TOKEN not in cookie["value"]
        assert "running since" in browser.find_element(By.ID, "watch").text
        recent = browser.find_element(By.ID, "recent").text
        assert "delivered.csv" in recent
        failures = browser.find_elements(By.CSS_SELECTOR, "#failures tr.failure")
        assert len(failures) == 1
        text = failures[0].text
        assert "refused <i>.csv" in text and "unknown ESIID <b>x</b>" in text  # shown as text, not markup
        assert f"smt-watch ledger retry {bad_sha}" in text
        assert browser.find_elements(By.CSS_SELECTOR, "#failures i, #failures b") == []
        assert browser.find_element(By.ID, "chart-deliveries").tag_name == "svg"
        assert browser.find_element(By.ID, "chart-latency").tag_name == "svg"
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(u.startswith(serve.url) for u in resources), resources
        shot(browser, tmp_path, "3-failed-and-delivered")

        # --- forged requests change nothing ---------------------------------------------------------------
        client, csrf = signed_in(serve)
        try:
            anonymous = LOOPBACK.post(f"{serve.url}/status/retry", data={"sha256": bad_sha, "csrf": csrf},
                                      timeout=SHORT)
            assert anonymous.status_code == 401
            r = client.post("/status/retry", data={"sha256": bad_sha, "csrf": "0" * 64})
            assert r.status_code == 403 and r.json()["error"] == "csrf"
            r = client.post("/status/retry", data={"sha256": bad_sha})
            assert r.status_code == 403 and r.json()["error"] == "csrf"
            r = client.post("/status/retry", data={"sha256": bad_sha, "csrf": csrf},
                            headers={"Origin": "https://evil.example"})
            assert r.status_code == 403 and r.json()["error"] == "origin_not_allowed"
            r = client.post("/status/retry", data={"sha256": "not-a-hash", "csrf": csrf})
            assert r.status_code == 400
            r = client.post("/status/login", data={"token": STATUS_TOKEN}, headers={"Origin": "https://evil.example"})
            assert r.status_code == 403 and "set-cookie" not in r.headers
        finally:
            client.close()
        assert ledger_state(settings, bad_sha) == "failed"
        assert len(receiver.stored()) == 1

        # --- the retry button: back to pending, then delivered ------------------------------------------------
        failures[0].find_element(By.CSS_SELECTOR, "button.retry").click()
        WebDriverWait(browser, SHORT).until(lambda d: d.find_elements(By.ID, "notice"))
        assert browser.find_element(By.ID, "notice").text.startswith(f"Back to pending: {bad_sha[:12]}")
        shot(browser, tmp_path, "4-retried")
        wait_for(lambda: len(receiver.stored()) == 2, SHORT, "watch to deliver the retried file")
        # the receiver stores before it answers, and watch records `sent` once the answer is in
        wait_for(lambda: ledger_state(settings, bad_sha) == "sent", SHORT, "the retried row marked sent")
        browser.get(f"{serve.url}/status")
        assert browser.find_elements(By.CSS_SELECTOR, "#failures tr.failure") == []
        assert "refused <i>.csv" in browser.find_element(By.ID, "recent").text
        shot(browser, tmp_path, "5-delivered")

        browser.find_element(By.ID, "logout").click()
        WebDriverWait(browser, SHORT).until(lambda d: d.find_elements(By.ID, "token"))
        assert browser.get_cookies() == []
    assert STATUS_TOKEN not in serve.log.read_text()
    assert "wrong token from 127.0.0.1" in serve.log.read_text()


def test_status_page_is_off_without_a_token(base_env: dict[str, str], tmp_path: Path) -> None:
    """serve without SMT_STATUS_TOKEN: no page, no JSON, no login (404 saying how to turn it on)."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env}
    off = Serve(env, tmp_path / "serve-off.log")
    try:
        wait_for(lambda: off.up() or off.proc.poll() is not None, SHORT, "serve to answer /health")
        r = LOOPBACK.get(f"{off.url}/status", timeout=SHORT)
        assert r.status_code == 404 and "set SMT_STATUS_TOKEN" in r.text
        r = LOOPBACK.post(f"{off.url}/status/login", data={"token": STATUS_TOKEN}, timeout=SHORT)
        assert r.status_code == 404 and "set-cookie" not in r.headers
        assert LOOPBACK.get(f"{off.url}/status.json", timeout=SHORT).status_code == 404
    finally:
        off.stop()
