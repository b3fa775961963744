"""Secrets in URL settings: every secret a URL or a libpq DSN can carry is redacted in every output and log.

``SMT_LEDGER_URL=postgresql://u@h/db?password=…`` printed the password in ``ledger list``, ``doctor`` and
``status --json`` errors: only ``user:password@`` was redacted. The real CLI's ``main()`` in this process
(conftest's ``cli_in_process``: what a process prints and exits with, without ~1 s of interpreter start per
command, twelve of them), and the DSN case as a real subprocess, so what a process writes to its own
descriptors is grepped too. PostgreSQL unreachable (port 1 on loopback refuses at once), each output grepped
for every secret.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import SMT_WATCH, cli_in_process
from faults.support import logged_through_redaction
from smt_watch.config import load_settings, redact_url

pytestmark = pytest.mark.faults

PW = "SEKRET-pw-7c1e"  # every secret below holds SEKRET-, which must appear in no output
LEDGER_URLS = [
    f"postgresql://smt@127.0.0.1:1/ledger?sslmode=disable&password={PW}&connect_timeout=5",
    f"postgres://smt:{PW}@127.0.0.1:1/ledger?sslpassword=SEKRET-sslpw&passfile=/etc/smt/pgpass",
    f"postgresql://smt@127.0.0.1:1/ledger?pass%77ord={PW}",  # libpq decodes parameter names
]
OTHER_URLS = {
    "SMT_UPLOAD_URL": "http://127.0.0.1:1/upload?token=SEKRET-upload-q",
    "INTELLIWATT_BASE_URL": "https://admin:SEKRET-basepw@127.0.0.1:1",
    "SMT_WEBHOOK_FORWARD_URL": "http://127.0.0.1:1/hook?sig=SEKRET-sig&api_key=SEKRET-key",
}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SMT_WATCH, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ledger_url", LEDGER_URLS, ids=range(len(LEDGER_URLS)))
def test_a_password_anywhere_in_a_url_setting_is_never_printed(base_env: dict[str, str], tmp_path: Path,
                                                               ledger_url: str) -> None:
    env = {**base_env, "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "SMT_LEDGER_URL": ledger_url,
           "SMT_UPLOAD_TOKEN": "SEKRET-upload-token", **OTHER_URLS}
    outputs = {}
    for args in (["ledger", "list"], ["doctor"], ["status", "--json"], ["--log-level", "debug", "status"]):
        proc = cli_in_process(args, env, tmp_path)
        out = outputs[args[-1]] = proc.stdout + proc.stderr
        assert proc.returncode != 0, (args, out)  # the ledger is unreachable: each says so
        assert "SEKRET-" not in out, (args, out)
        assert "Traceback" not in out and "internal error" not in out, (args, out)
        assert "127.0.0.1:1" in out, (args, out)  # the URL is shown, its secrets are not
    assert "passfile=/etc/smt/pgpass" in outputs["doctor"] or "passfile" not in ledger_url  # a path: shown


def test_a_libpq_key_value_dsn_is_refused_without_its_password(base_env: dict[str, str], tmp_path: Path) -> None:
    env = {**base_env, "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "SMT_LEDGER_URL": f"host=127.0.0.1 port=1 dbname=ledger password='{PW} x' sslpassword={PW}"}
    proc = _run(env, "ledger", "list")
    assert proc.returncode == 2 and "SMT_LEDGER_URL" in proc.stderr, proc.stderr
    assert "SEKRET-" not in proc.stdout + proc.stderr and "dbname=ledger" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u@h/db?password=p1&sslmode=require", "postgresql://***@h/db?password=***&sslmode=require"),
    ("postgresql://h/db?sslpassword=p2&passfile=/x/pgpass", "postgresql://h/db?sslpassword=***&passfile=/x/pgpass"),
    ("postgresql://u:a@b@h/db?x=1&password=q@r", "postgresql://***"),  # "@" in the query: more goes
    ("https://h/p?access_token=t&page=2", "https://h/p?access_token=***&page=2"),
    ("host=h password='a b' dbname=x", "host=h password=*** dbname=x"),
    ("https://h/plain", "https://h/plain"),
])
def test_one_redaction_function_covers_user_info_query_and_dsn(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_url_secrets_are_registered_with_the_log_filter(tmp_path: Path) -> None:
    """A library's error quoting a query value (decoded or not) is redacted too. In-process, with the
    smt_watch logger restored afterwards (other tests capture it)."""
    settings = load_settings({"SMT_LOCAL_DIR": str(tmp_path), "SMT_STATE_DIR": str(tmp_path / "s"),
                              "SMT_LEDGER_URL": "postgresql://u@h/db?password=SEKRET%2Dpct",
                              "SMT_UPLOAD_URL": "http://h/u?token=SEKRET-tok"})
    logged = logged_through_redaction(settings, "libpq: password=SEKRET-pct; httpx: SEKRET-tok; raw SEKRET%2Dpct")
    assert "SEKRET" not in logged and "***" in logged, logged
