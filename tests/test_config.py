"""Settings: defaults, the bash script's env file verbatim, precedence, one-line errors naming the variable."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from smt_watch.config import Secret, load_settings, parse_env_file
from smt_watch.delivery.registry import LEGACY_INLINE_WARNING, delivery_mode
from smt_watch.errors import ConfigError

# The /etc/default/intelliwatt-smt of the bash script it replaces, verbatim (with a placeholder token).
SEED_ENV = """\
ADMIN_TOKEN=REDACTED_64_CHAR
INTELLIWATT_BASE_URL=https://intelliwatt.com

SMT_HOST=ftp.smartmetertexas.biz
SMT_USER=intellipathsolutionsftp
SMT_KEY=/home/deploy/.ssh/intelliwatt_smt_rsa4096
SMT_REMOTE_DIR=/
SMT_LOCAL_DIR=/home/deploy/smt_inbox

# Optional overrides used by fetch_and_post.sh
SOURCE_TAG=adhocusage
METER_DEFAULT=M1
ESIID_DEFAULT=10443720000000001
"""


def test_defaults(tmp_path: Path) -> None:
    s = load_settings({"HOME": str(tmp_path)})
    assert s.delivery == "auto"
    assert s.inline_encoding == "base64"
    assert s.inline_max_bytes == 4_500_000  # Vercel's request body limit
    assert s.raw_lines_per_chunk == 5000
    assert (s.source_tag, s.meter_default, s.esiid_default) == ("adhocusage", "M1", None)
    assert s.smt_port == 22 and s.smt_remote_dirs == ("/",)
    assert (s.upload_host, s.upload_port) == ("127.0.0.1", 8081)  # the Node upload server's, behind nginx
    assert (s.webhook_host, s.webhook_port) == ("0.0.0.0", 8787)  # the old bridge's: the web app calls it there
    assert s.upload_max_bytes == 1_073_741_824
    assert (s.upload_admin_limit, s.upload_customer_limit) == (40_000, 5)  # the Node server's defaults
    assert (s.upload_window("admin"), s.upload_window("customer")) == (86_400.0, 30 * 86_400.0)
    assert s.cors_origins == ("https://intelliwatt.com",)
    assert (s.settle_seconds, s.rescan_seconds, s.workers) == (1.0, 300.0, 2)
    assert s.patterns == ("*.csv", "*.csv.*", "*.asc", "*.zip")  # the old script's find takes *.csv.* too
    assert s.after_send == "keep" and s.validate is True
    assert s.archive_path == s.state_dir / "archive"
    assert s.ledger_path.name == "ledger.sqlite3"


def test_seed_env_file_verbatim(tmp_path: Path) -> None:
    env_file = tmp_path / "intelliwatt-smt"
    env_file.write_text(SEED_ENV)
    s = load_settings({}, env_file=env_file)
    assert s.admin_token == Secret("REDACTED_64_CHAR")
    assert s.base_url == "https://intelliwatt.com"
    assert s.smt_host == "ftp.smartmetertexas.biz"
    assert s.smt_user == "intellipathsolutionsftp"
    assert s.smt_key == Path("/home/deploy/.ssh/intelliwatt_smt_rsa4096")
    assert s.local_dir == Path("/home/deploy/smt_inbox")
    assert s.esiid_default == "10443720000000001"


def test_env_file_syntax(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text(
        "# comment\n; also a comment\n  \nA=\"quoted value\"\nB='single'\nexport C=3\nD=a\\\nb\nE=x=y\n"
        'F="esc \\" quote"\n'
    )
    assert parse_env_file(f) == {
        "A": "quoted value", "B": "single", "C": "3", "D": "ab", "E": "x=y", "F": 'esc " quote'
    }


def test_env_file_errors_do_not_echo_values(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("GOOD=1\nthis line has the secret s3cr3t\n")
    with pytest.raises(ConfigError) as err:
        parse_env_file(f)
    assert ":2:" in str(err.value) and "s3cr3t" not in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        parse_env_file(tmp_path / "missing")


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("SOURCE_TAG=from-file\nMETER_DEFAULT=M7\nSMT_WORKERS=3\n")
    s = load_settings({"SOURCE_TAG": "from-env", "SMT_WORKERS": "4"}, env_file=f, overrides={"SMT_WORKERS": "5"})
    assert (s.source_tag, s.meter_default, s.workers) == ("from-env", "M7", 5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SMT_UPLOAD_URL", "not a url"),
        ("SMT_UPLOAD_URL", "ftp://host/upload"),
        ("INTELLIWATT_BASE_URL", "intelliwatt.com"),
        ("SMT_INLINE_MAX_BYTES", "-1"),
        ("SMT_SETTLE_SECONDS", "-0.5"),
        ("SMT_SETTLE_SECONDS", "nan"),
        ("SMT_WORKERS", "0"),
        ("SMT_PORT", "70000"),
        ("SMT_AFTER_SEND", "shred"),
        ("SMT_DELIVERY", "carrier-pigeon"),
        ("SMT_INLINE_ENCODING", "gzip"),
        ("SMT_VALIDATE", "maybe"),
        ("SMT_PATTERNS", " , "),
        ("SMT_STATUS_SIGNIN_ATTEMPTS", "0"),
        ("SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL", "many"),
        ("SMT_BRIDGE_MAX_BODY_BYTES", "0"),
        ("SMT_BRIDGE_MAX_BODY_BYTES", "8388609"),  # over a quarter of the default 32 MiB buffer: never fits
        ("SMT_BRIDGE_BUFFER_BYTES", "2"),
        ("SMT_LINGER_SECONDS", "0"),
        ("SMT_LINGER_SECONDS", "3601"),
        ("SMT_LINGER_IDLE_SECONDS", "inf"),
        ("SMT_LINGER_MAX_BYTES", "-1"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({name: value})
    assert str(err.value).startswith(name)
    assert "\n" not in str(err.value)


def test_url_credentials_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"SMT_UPLOAD_URL": "ftp://user:hunter2@host/x"})
    assert "hunter2" not in str(err.value)


def test_secrets_never_print(tmp_path: Path) -> None:
    s = load_settings({"ADMIN_TOKEN": "tok-A", "SMT_UPLOAD_TOKEN": "tok-U", "DROPLET_WEBHOOK_SECRET": "tok-W"})
    assert "tok-" not in repr(s) and "tok-" not in str(s)
    assert sorted(s.secrets()) == ["tok-A", "tok-U", "tok-W"]
    assert s.webhook_secret is not None and s.webhook_secret.reveal() == "tok-W"


def test_auto_mode_rule(caplog: pytest.LogCaptureFixture) -> None:
    assert delivery_mode(load_settings({"SMT_UPLOAD_URL": "http://h/upload", "INTELLIWATT_BASE_URL": "http://b"})) \
        == "multipart"
    # production refuses inline (400 INLINE_DISABLED): the base URL alone means raw-upload
    with caplog.at_level(logging.WARNING, logger="smt_watch"):
        assert delivery_mode(load_settings({"INTELLIWATT_BASE_URL": "https://intelliwatt.com/"})) == "raw-upload"
    assert LEGACY_INLINE_WARNING not in caplog.text
    with caplog.at_level(logging.WARNING, logger="smt_watch"):
        assert delivery_mode(load_settings({"SMT_DELIVERY": "inline", "INTELLIWATT_BASE_URL": "https://i.com"})) \
            == "inline"
    assert LEGACY_INLINE_WARNING in caplog.text
    with pytest.raises(ConfigError, match="SMT_UPLOAD_URL"):
        delivery_mode(load_settings({}))
    with pytest.raises(ConfigError, match="needs SMT_UPLOAD_URL"):
        delivery_mode(load_settings({"SMT_DELIVERY": "multipart", "INTELLIWATT_BASE_URL": "http://b"}))
    assert load_settings({"INTELLIWATT_BASE_URL": "https://x.com/"}).base_url == "https://x.com"


# --- serve as the droplet runs it (issue 22 §3) ---------------------------------------------------------


def test_the_node_upload_servers_variables_are_read_and_ours_win(tmp_path: Path) -> None:
    """The Node server's env (its unit sets SMT_UPLOAD_DIR; the env file may set its limits) keeps its
    meaning; where smt-watch's own name is set too, ours wins."""
    node = {"SMT_ADMIN_UPLOAD_DAILY_LIMIT": "123", "SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT": "7",
            "SMT_ADMIN_UPLOAD_WINDOW_MS": "3600000", "SMT_CUSTOMER_UPLOAD_WINDOW_MS": "172800000",
            "SMT_UPLOAD_DIR": str(tmp_path / "node-inbox")}
    s = load_settings(node)
    assert (s.upload_limit("admin"), s.upload_limit("customer")) == (123, 7)
    assert (s.upload_window("admin"), s.upload_window("customer")) == (3600.0, 172_800.0)
    assert s.local_dir == tmp_path / "node-inbox"
    ours = load_settings({**node, "SMT_UPLOAD_ADMIN_LIMIT": "9", "SMT_UPLOAD_CUSTOMER_LIMIT": "2",
                          "SMT_LOCAL_DIR": str(tmp_path / "inbox")})
    assert (ours.upload_limit("admin"), ours.upload_limit("customer")) == (9, 2)
    assert ours.local_dir == tmp_path / "inbox"


@pytest.mark.parametrize(("name", "value"), [("SMT_ADMIN_UPLOAD_WINDOW_MS", "soon"),
                                             ("SMT_CUSTOMER_UPLOAD_WINDOW_MS", "999"),
                                             ("SMT_CUSTOMER_UPLOAD_WINDOW_MS", str(32 * 86_400_000)),
                                             ("SMT_ADMIN_UPLOAD_DAILY_LIMIT", "-1")])
def test_a_bad_node_limit_variable_names_itself(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


def test_both_webhook_secrets_are_kept() -> None:
    s = load_settings({"INTELLIWATT_WEBHOOK_SECRET": "tok-A", "DROPLET_WEBHOOK_SECRET": "tok-B"})
    assert [x.reveal() for x in s.webhook_secrets] == ["tok-A", "tok-B"]
    assert sorted(s.secrets()) == ["tok-A", "tok-B"] and "tok-" not in repr(s)


def test_webhook_port_0_turns_the_separate_listener_off() -> None:
    s = load_settings({"SMT_WEBHOOK_PORT": "0", "SMT_WEBHOOK_HOST": "10.0.0.5"})
    assert s.webhook_port is None and s.webhook_host == "10.0.0.5"


def test_the_hostile_input_limits_keep_their_defaults_and_take_other_values() -> None:
    """Issue 24: the limits that were constants are settings now; unset, they are what the constants were."""
    from smt_watch import linger, sessions

    s = load_settings({})
    assert (s.status_signin_attempts, s.status_signin_attempts_total) == (
        sessions.PER_CLIENT_ATTEMPTS, sessions.OVERALL_ATTEMPTS) == (5, 30)
    assert (s.bridge_max_body_bytes, s.bridge_buffer_bytes) == (1024 * 1024, 32 * 1024 * 1024)
    assert (s.linger_seconds, s.linger_idle_seconds, s.linger_max_bytes) == (
        linger.LINGER_SECONDS, linger.LINGER_IDLE_SECONDS, linger.LINGER_MAX_BYTES) == (30.0, 5.0, 64 * 1024 * 1024)
    s = load_settings({"SMT_STATUS_SIGNIN_ATTEMPTS": "2", "SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL": "7",
                       "SMT_BRIDGE_BUFFER_BYTES": "4096", "SMT_BRIDGE_MAX_BODY_BYTES": "1024",
                       "SMT_LINGER_SECONDS": "2.5", "SMT_LINGER_IDLE_SECONDS": "1", "SMT_LINGER_MAX_BYTES": "0"})
    assert (s.status_signin_attempts, s.status_signin_attempts_total) == (2, 7)
    assert (s.bridge_max_body_bytes, s.bridge_buffer_bytes) == (1024, 4096)
    assert (s.linger_seconds, s.linger_idle_seconds, s.linger_max_bytes) == (2.5, 1.0, 0)
    with pytest.raises(ConfigError, match=r"^SMT_BRIDGE_MAX_BODY_BYTES must be an integer ≥ 1 and ≤ 1024"):
        load_settings({"SMT_BRIDGE_BUFFER_BYTES": "4096", "SMT_BRIDGE_MAX_BODY_BYTES": "1025"})
