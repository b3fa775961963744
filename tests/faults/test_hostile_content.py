"""Archives and CSV content a hostile (or broken) sender makes: hard limits, no overwrite, no payload
injection, one clear line. Real files, the real receiver on loopback, the real CLI.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import UPLOAD_TOKEN, write_csv
from smt_watch.config import Settings
from smt_watch.pipeline import post_files
from smt_watch.statedir import open_ledger

pytestmark = pytest.mark.faults

Make = Callable[..., Settings]
HEADER = ("ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
          "CONSUMPTION_SURPLUSGENERATION\n")


def settings_for(make: Make, receiver: Any, **env: str) -> Settings:
    return make(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, **env)


def zip_of(path: Path, entries: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())
    return path


def csv_with_esiid(esiid: str, seed: int = 0) -> bytes:
    return (HEADER + f"'{esiid},01/01/2026,01/02/2026,00:00,00:15,0.{seed:03d},A,Consumption\n").encode()


def test_a_zip_with_too_many_entries_fails_as_a_whole(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    entries = {f"e{i:03d}.csv": csv_with_esiid("10443720000000001", i) for i in range(101)}
    archive = zip_of(tmp_path / "many.zip", entries)
    [o] = post_files(settings_for(make_settings, receiver), [archive])
    assert o.result == "failed" and "SMT_MAX_ZIP_ENTRIES (100)" in (o.error or ""), o
    assert receiver.state.requests == []
    few = zip_of(tmp_path / "few.zip", dict(list(entries.items())[:3]))
    [ok] = post_files(settings_for(make_settings, receiver, SMT_MAX_ZIP_ENTRIES="3"), [few])
    assert ok.result == "sent" and len(receiver.stored()) == 3


def test_zip_entries_whose_names_collide_are_all_delivered(make_settings: Make, receiver: Any,
                                                           tmp_path: Path) -> None:
    """`2_x.csv`, `x.csv`, `d/x.csv` and `X.CSV`: once one overwrote another on extraction and the parent
    was reported sent with a CSV never delivered."""
    entries = {name: csv_with_esiid("10443720000000001", i)
               for i, name in enumerate(["2_x.csv", "x.csv", "d/x.csv", "X.CSV"])}
    archive = zip_of(tmp_path / "collide.zip", entries)
    settings = settings_for(make_settings, receiver)
    [o] = post_files(settings, [archive])
    assert o.result == "sent", o
    assert sorted(r["sha256"] for r in receiver.stored()) == sorted(
        hashlib.sha256(d).hexdigest() for d in entries.values())
    assert sorted(c.name or "" for c in o.children) == ["2_x.csv", "X.CSV", "x.csv", "x.csv"]


@pytest.mark.parametrize("esiid", ["=cmd|' /C calc'!A0", "1044\x1b[2J3720000000001", "1" * 60_000, "123"],
                         ids=["formula", "control", "huge", "short"])
def test_an_invalid_esiid_is_failed_or_replaced_never_sent(make_settings: Make, receiver: Any, tmp_path: Path,
                                                           esiid: str) -> None:
    f = tmp_path / "evil.csv"
    f.write_bytes(csv_with_esiid(esiid))
    [o] = post_files(settings_for(make_settings, receiver, ESIID_DEFAULT="10443720000000099"), [f])
    assert o.result == "failed" and "invalid ESIID" in (o.error or ""), o
    assert len(o.error or "") < 200 and "\x1b" not in (o.error or "")
    assert receiver.state.requests == []
    [sent] = post_files(settings_for(make_settings, receiver, SMT_VALIDATE="0", ESIID_DEFAULT="10443720000000099"),
                        [f], force=True)
    assert sent.result == "sent"
    [req] = receiver.state.requests
    assert req.fields["esiid"] == "10443720000000099"  # the default, never the column's content


def test_a_very_long_line_is_failed_quickly_with_flat_memory(make_settings: Make, receiver: Any,
                                                             tmp_path: Path) -> None:
    f = tmp_path / "long.csv"
    with f.open("wb") as out:
        out.write(HEADER.encode() + b"'10443720000000001," + b"9" * (64 * 1024 * 1024) + b"\n")
    started = time.monotonic()
    [o] = post_files(settings_for(make_settings, receiver), [f])
    assert o.result == "failed" and "longer than 1,048,576 bytes" in (o.error or ""), o
    assert time.monotonic() - started < 10  # was quadratic: minutes for a line of this size
    assert receiver.state.requests == []
    with open_ledger(settings_for(make_settings, receiver)) as ledger:
        row = ledger.get(o.sha256 or "")
    assert row is not None and row.state == "failed"


def test_inspect_of_a_huge_field_is_one_clear_line(run_cli: Any, tmp_path: Path) -> None:
    f = tmp_path / "field.csv"
    f.write_text(HEADER + "'10443720000000001,\"" + "x" * 200_000 + "\",1,2,3,4,5,6\n")
    proc = run_cli("inspect", str(f))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a readable CSV" in lines[0] and "internal error" not in lines[0], proc.stderr
    assert write_csv(tmp_path / "fine.csv") and run_cli("inspect", str(tmp_path / "fine.csv")).returncode == 0


@pytest.fixture(scope="module")
def gpg_home(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from gpg_keys import make_home

    home = make_home(tmp_path_factory.mktemp("gpg") / "home", "SMT Test <smt-test@example.com>")
    yield home
    home.close()


def test_a_pgp_bomb_is_stopped_at_the_cap(make_settings: Make, receiver: Any, tmp_path: Path, gpg_home: Any) -> None:
    """A few KB of armour that decrypt to 200 MB (PGP compresses its payload): gpg is stopped once its
    output passes SMT_MAX_UNPACKED_BYTES, what it wrote is removed, and the parent is failed with why."""
    bomb = tmp_path / "bomb.CSV.1.asc"
    bomb.write_bytes(gpg_home.encrypt(HEADER.encode() + b"0" * (200 * 1024 * 1024)))
    assert bomb.stat().st_size < 1024 * 1024
    settings = settings_for(make_settings, receiver, GNUPGHOME=str(gpg_home.home),
                            SMT_MAX_UNPACKED_BYTES=str(4 * 1024 * 1024))
    started = time.monotonic()
    [o] = post_files(settings, [bomb])
    assert o.result == "failed" and "unpacks to more than 4194304 bytes" in (o.error or ""), o
    assert time.monotonic() - started < 20  # stopped, not run to the end
    assert receiver.state.requests == []
    work = settings.state_dir / "work"
    assert not work.exists() or not any(p.is_file() for p in work.rglob("*")), list(work.rglob("*"))


def test_a_long_line_is_refused_wherever_it_falls_between_read_blocks(make_settings: Make, receiver: Any,
                                                                      tmp_path: Path) -> None:
    """A 1.2 MiB line that starts half-way through one 1 MiB read block and ends in the next (so it is never
    a carried-over tail longer than the limit): still refused. Checked against mutant hostile-long-line-span."""
    short = b"'10443720000000001,01/01/2026,01/02/2026,00:00,00:15,0.100,A,Consumption\n"
    head = HEADER.encode() + short * ((512 * 1024) // len(short))
    f = tmp_path / "late.csv"
    f.write_bytes(head + b"'10443720000000001," + b"9" * (1229 * 1024) + b"\n" + short * 10)
    [o] = post_files(settings_for(make_settings, receiver), [f])
    assert o.result == "failed" and "longer than 1,048,576 bytes" in (o.error or ""), o


def test_sniffing_a_very_long_line_holds_no_more_than_a_block(tmp_path: Path) -> None:
    """Memory, measured in a child of its own: the line's tail is never accumulated (it was, and copied
    again for every block: quadratic time, memory the size of the line). Checked against hostile-long-line."""
    f = tmp_path / "long.csv"
    with f.open("wb") as out:
        out.write(HEADER.encode() + b"'10443720000000001,")
        for _ in range(96):
            out.write(b"9" * (1024 * 1024))
        out.write(b"\n")
    # VmHWM of the child's own image (exec starts a new one); ru_maxrss would include the parent's memory
    # that the child had between fork and exec
    code = ("import sys; from pathlib import Path; from smt_watch.smtcsv import LineTooLong, sniff\n"
            "try:\n    sniff(Path(sys.argv[1]))\nexcept LineTooLong as exc:\n    print(exc)\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and "longer than 1,048,576 bytes" in lines[0], proc.stdout + proc.stderr
    assert int(lines[-1]) < 80 * 1024, f"sniff held {int(lines[-1]) // 1024} MiB for a 96 MiB line"
