"""Configuration that cannot be sent is refused at start, naming the variable and the rule, never the value.

The real CLI's ``main()`` in this process (conftest's ``cli_in_process``: the exit status and the output a
process would give, without ~1 s of interpreter start per run, which under load was most of this file's 20 s);
one case, the ``@``-signs URL that also reaches the network, runs as a real subprocess, so the output a
process writes to its own descriptors is checked too. A token with a newline or a non-ASCII character would
otherwise fail every request while the library's error quoted it; a URL whose password holds ``#``, ``/``,
``?`` or ``@`` misleads every URL parser, and was printed whole.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import SMT_WATCH, cli_in_process, write_csv
from faults.support import logged_through_redaction, subprocess_env

pytestmark = pytest.mark.faults

HEADER_SECRETS = ("SMT_UPLOAD_TOKEN", "ADMIN_TOKEN", "INTELLIWATT_WEBHOOK_SECRET")
BAD_TOKENS = {"newline": "tok\nen-SECRETVALUE", "non-ascii": "tök-SECRETVALUE", "space": "tok en-SECRETVALUE",
              "escape": "tok\x1b[2J-SECRETVALUE"}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``smt-watch ARGS`` with exactly ``env``, in this process (what it prints and exits with)."""
    return cli_in_process(args, env, Path(env["HOME"]).parent)


def run_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SMT_WATCH, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("variable", HEADER_SECRETS)
@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_a_token_that_cannot_be_sent_is_exit_2_without_its_value(base_env: dict[str, str], tmp_path: Path,
                                                                   variable: str, kind: str) -> None:
    csv = write_csv(tmp_path / "a.csv")
    env = subprocess_env(base_env, tmp_path / "home", SMT_UPLOAD_URL="http://127.0.0.1:9/upload",
                         INTELLIWATT_BASE_URL="http://127.0.0.1:9", **{variable: BAD_TOKENS[kind]})
    post = run(env, "post", str(csv))
    assert post.returncode == 2, (post.stdout, post.stderr)
    lines = post.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and "visible ASCII" in lines[0], post.stderr
    doctor = run(env, "doctor", "--offline")  # doctor reports it as its failed config check (exit 1)
    assert doctor.returncode == 1 and f"FAIL  config: {variable} must be visible ASCII" in doctor.stdout
    for proc in (post, doctor):
        assert "SECRETVALUE" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("password", ["pa#ss-SECRETPW", "pa/ss-SECRETPW", "pa?ss-SECRETPW"])
def test_a_url_whose_password_misleads_the_parser_is_exit_2_and_redacted(base_env: dict[str, str],
                                                                         tmp_path: Path, password: str) -> None:
    csv = write_csv(tmp_path / "a.csv")
    env = subprocess_env(base_env, tmp_path / "home", SMT_UPLOAD_URL=f"http://user:{password}@127.0.0.1:9/upload")
    for args, code in ((("post", str(csv)), 2), (("doctor",), 1)):
        proc = run(env, *args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == code, (args, out)
        assert "SMT_UPLOAD_URL" in out and "SECRETPW" not in out and "Traceback" not in out, out


def test_a_password_with_at_signs_never_shows(base_env: dict[str, str], tmp_path: Path) -> None:
    """`p@ss@word` parses (the last @ ends the user-info): nothing printed may hold any part of it."""
    csv = write_csv(tmp_path / "a.csv")
    env = subprocess_env(base_env, tmp_path / "home", SMT_UPLOAD_URL="http://user:p@ss@SECRETPW@127.0.0.1:9/upload",
                         SMT_RETRY_ATTEMPTS="1")
    for args in (("post", str(csv)), ("doctor",), ("ledger", "list", "--json")):
        out = run_process(env, *args)
        text = out.stdout + out.stderr
        assert "SECRETPW" not in text and "p@ss" not in text and "Traceback" not in text, (args, text)


@pytest.mark.parametrize("variable", ["SMT_KEY_PASSPHRASE", "SMT_GPG_PASSPHRASE"])
def test_a_passphrase_may_hold_spaces_but_not_a_newline(base_env: dict[str, str], tmp_path: Path,
                                                         variable: str) -> None:
    ok = run(subprocess_env(base_env, tmp_path / "home", **{variable: "two words SECRETVALUE"}), "ledger", "list")
    assert ok.returncode == 1 and "no ledger at" in ok.stderr, ok.stderr  # the settings passed; no ledger yet
    bad = run(subprocess_env(base_env, tmp_path / "home", **{variable: "two\nlines SECRETVALUE"}), "ledger", "list")
    assert bad.returncode == 2 and variable in bad.stderr and "SECRETVALUE" not in bad.stdout + bad.stderr


def test_url_user_info_is_redacted_from_any_log_text(make_settings: Any) -> None:
    """Defence in depth for text a library produces (httpx once quoted a misparsed password as a port):
    the user-info of every URL setting is one of the secrets the log filter replaces. In-process, with the
    smt_watch logger restored afterwards (other tests capture it)."""
    settings = make_settings(SMT_UPLOAD_URL="http://user:p%40ss-SECRETPW@127.0.0.1:9/upload")
    logged = logged_through_redaction(settings, "InvalidURL: Invalid port: 'p%40ss-SECRETPW@127.0.0.1:9'")
    assert "SECRETPW" not in logged and "***" in logged, logged
