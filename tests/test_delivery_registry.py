"""The delivery registry: every mode it lists is a choice of SMT_DELIVERY and of ``--delivery``, builds a
sink that posts where the registry says, and an unknown mode is a configuration error (exit 2).

The expected names and paths are written out here, not read from the registry, so a mode dropped or
renamed by mistake fails a test."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_csv
from smt_watch.cli import app
from smt_watch.config import Settings
from smt_watch.delivery import MODES, make_sink

Run = Callable[..., subprocess.CompletedProcess[str]]
Make = Callable[..., Settings]

EXPECTED = {  # mode -> the path its sink posts to under the configured URL
    "multipart": "/upload",  # SMT_UPLOAD_URL as given
    "inline": "/api/admin/smt/pull",
    "raw-upload": "/api/admin/smt/raw-upload",
}


def test_the_registry_lists_the_three_modes() -> None:
    assert list(MODES) == list(EXPECTED)


@pytest.mark.parametrize("command", ["post", "watch"])
def test_every_registered_mode_is_in_the_delivery_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"NO_COLOR": "1"}, terminal_width=200)
    [line] = [x for x in result.output.splitlines() if "--delivery" in x]
    assert "auto, multipart, inline or raw-upload [SMT_DELIVERY]." in line
    assert all(name in line for name in MODES)


@pytest.mark.parametrize("how", ["env", "flag"])
def test_an_unknown_mode_is_exit_2_naming_the_choices(run_cli: Run, tmp_path: Path, how: str) -> None:
    f = write_csv(tmp_path / "a.csv")
    env = {"INTELLIWATT_BASE_URL": "http://127.0.0.1:9", "SMT_UPLOAD_URL": "http://127.0.0.1:9/upload"}
    if how == "env":
        proc = run_cli("post", str(f), env={**env, "SMT_DELIVERY": "carrier-pigeon"})
    else:
        proc = run_cli("post", "--delivery", "carrier-pigeon", str(f), env=env)
    assert proc.returncode == 2, proc.stderr
    assert "SMT_DELIVERY must be one of auto, multipart, inline, raw-upload: 'carrier-pigeon'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_every_registered_mode_builds_a_sink_posting_where_it_says(make_settings: Make, mode: str) -> None:
    settings = make_settings(SMT_UPLOAD_URL="http://u:p@127.0.0.1:9/upload", INTELLIWATT_BASE_URL="http://127.0.0.1:9")
    sink = make_sink(settings, mode, announce=False)
    try:
        assert sink.name == mode
        assert sink.url.endswith(EXPECTED[mode]) and sink.url == MODES[mode].url(settings)
        assert "p@" not in sink.destination and sink.destination.endswith(EXPECTED[mode])
    finally:
        sink.close()


def test_config_does_not_load_the_http_stack() -> None:
    """config reads the registry at import time; the sinks (and httpx) load only when one is built."""
    code = "import sys, smt_watch.config; assert 'httpx' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
