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
    assert (s.upload_host, s.upload_port, s.webhook_port) == ("127.0.0.1", 8080, None)
    assert s.upload_max_bytes == 1_073_741_824
    assert (s.upload_admin_limit, s.upload_customer_limit) == (50, 5)
    assert s.cors_origins == ("https://intelliwatt.com",)
    assert (s.settle_seconds, s.rescan_seconds, s.workers) == (1.0, 300.0, 2)
    assert s.patterns == ("*.csv", "*.asc", "*.zip")
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
