"""SMT content end to end: PGP ``.asc`` and ``.zip`` unpacking, validation, ESIID choice, ``inspect``,
``sample`` (docs/contract.md §4, §6).

A real key pair is made with the real ``gpg`` in a private ``GNUPGHOME`` (once per module); deliveries go
to the reference receiver on loopback. A failed container must leave nothing behind: no request, no file
in ``SMT_STATE_DIR/work``, nothing written outside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from gpg_keys import GpgHome, make_home

from conftest import UPLOAD_TOKEN, wait_for
from smt_watch.config import Settings
from smt_watch.pipeline import Outcome, post_files
from smt_watch.reference import sample
from smt_watch.reference.receiver import Fault
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]

HEADER = (
    "ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
    "CONSUMPTION_SURPLUSGENERATION"
)
ESIID = "10443720000000001"
SECOND_ESIID = "10443720000000002"
DEFAULT_ESIID = "99999999999999999"
INTERVAL_NAME = "IntervalMeterUsage_M9_20251101.csv"
BILLING_NAME = "DailyMeterUsage_M9_20251101.csv"
JSON_KEYS = [
    "file", "kind", "esiids", "meter", "first_date", "last_date", "rows", "intervals", "blanks", "estimated",
    "gaps", "kwh_consumption", "kwh_generation", "first_start_utc", "last_end_utc",
]


def interval_csv(esiid: str = ESIID, day: str = "11/01/2025", rows: int = 8, kwh: str = "0.500") -> bytes:
    labels = [f"{h}:{m:02d}" for h in range(24) for m in (0, 15, 30, 45)][:rows]
    lines = [HEADER]
    for i, start in enumerate(labels):
        end = labels[i + 1] if i + 1 < len(labels) else "0:00"
        lines.append(f"'{esiid},{day},11/02/2025,{start},{end},{kwh},A,Consumption")
    return ("\n".join(lines) + "\n").encode()


def billing_csv(esiid: str = ESIID) -> bytes:
    return (
        "ESIID,USAGE_DATE,REVISION_DATE,ACTUAL_KWH,ESTIMATED_KWH,METER_START,METER_END\n"
        f"'{esiid},11/01/2025,11/02/2025,21.5,0,1000,1021.5\n"
    ).encode()


INTERVAL = interval_csv()
BILLING = billing_csv()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_of(entries: dict[str, bytes], level: int = 6) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=level)
    return buf.getvalue()


SMT_ZIP = zip_of({INTERVAL_NAME: INTERVAL, BILLING_NAME: BILLING})


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GpgHome]]:
    """Ours (in GNUPGHOME) and a stranger's (a key we do not hold), made once for the module."""
    root = tmp_path_factory.mktemp("gpg")  # short path: gpg-agent's socket lives in GNUPGHOME
    homes = {"ours": make_home(root / "ours", "SMT Test <smt-test@example.com>"),
             "stranger": make_home(root / "stranger", "Stranger <stranger@example.com>")}
    try:
        yield homes
    finally:
        for home in homes.values():
            home.close()


@pytest.fixture
def ours(keys: dict[str, GpgHome]) -> GpgHome:
    return keys["ours"]


@pytest.fixture
def settings(make_settings: Make, receiver: Any, ours: GpgHome) -> Settings:
    return make_settings(**env_for(receiver, ours))


def env_for(receiver: Any, ours: GpgHome, **extra: str) -> dict[str, str]:
    return {"SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN,
            "GNUPGHOME": str(ours.home), "ESIID_DEFAULT": DEFAULT_ESIID, "SMT_RETRY_ATTEMPTS": "1",
            "SMT_SETTLE_SECONDS": "0.2", **extra}


def drop(settings: Settings, name: str, data: bytes) -> Path:
    path = settings.local_dir / name
    path.write_bytes(data)
    return path


def rows_by_sha(settings: Settings) -> dict[str, Any]:
    with open_ledger(settings) as ledger:
        return {r.sha256: r for r in ledger.rows()}


def work_leftovers(settings: Settings) -> list[Path]:
    work = settings.state_dir / "work"
    return sorted(work.rglob("*")) if work.exists() else []


def stored(receiver: Any) -> dict[str, dict[str, Any]]:
    return {r["filename"]: r for r in receiver.stored()}


def post(settings: Settings, *paths: Path) -> list[Outcome]:
    return post_files(settings, list(paths))


# --- delivering an encrypted SMT ZIP -----------------------------------------------------------------


def test_encrypted_zip_becomes_two_deliveries_with_the_csv_esiid(
    settings: Settings, receiver: Any, ours: GpgHome, run_cli: Callable[..., Any]
) -> None:
    asc = drop(settings, "IntervalMeterUsage_M9_20251101.CSV.1.asc", ours.encrypt(SMT_ZIP))
    env = env_for(receiver, ours)
    done = run_cli("post", str(asc), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr

    got = stored(receiver)
    assert sorted(got) == sorted([INTERVAL_NAME, BILLING_NAME])
    for name, data in ((INTERVAL_NAME, INTERVAL), (BILLING_NAME, BILLING)):
        assert got[name]["sha256"] == sha(data)
        assert got[name]["esiid"] == ESIID  # from the CSV, not ESIID_DEFAULT
        assert got[name]["meter"] == "M9"
        assert receiver.read(sha(data)) == data
    assert len(receiver.state.requests) == 2

    listing = run_cli("ledger", "list", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    rows = {r["sha256"]: r for r in json.loads(listing.stdout)}
    parent = sha(asc.read_bytes())
    assert set(rows) == {parent, sha(INTERVAL), sha(BILLING)}
    assert rows[parent]["state"] == "sent" and rows[parent]["parent"] is None
    for child in (sha(INTERVAL), sha(BILLING)):
        assert rows[child]["state"] == "sent"
        assert rows[child]["parent"] == parent
    assert {rows[sha(INTERVAL)]["filename"], rows[sha(BILLING)]["filename"]} == {INTERVAL_NAME, BILLING_NAME}

    assert work_leftovers(settings) == []
    assert sorted(p.name for p in settings.local_dir.iterdir()) == [asc.name]  # nothing unpacked in the inbox


def test_plain_zip_is_unpacked_too(settings: Settings, receiver: Any) -> None:
    z = drop(settings, "smt.zip", SMT_ZIP)
    [outcome] = post(settings, z)
    assert outcome.result == "sent"
    assert sorted((c.name, c.result) for c in outcome.children) == [(BILLING_NAME, "sent"), (INTERVAL_NAME, "sent")]
    assert {r["esiid"] for r in receiver.stored()} == {ESIID}
    assert rows_by_sha(settings)[sha(INTERVAL)].parent == sha(z.read_bytes())
    assert work_leftovers(settings) == []


def test_asc_holding_a_plain_csv(settings: Settings, receiver: Any, ours: GpgHome) -> None:
    asc = drop(settings, "IntervalMeterUsage_M5.CSV.3.asc", ours.encrypt(INTERVAL))
    [outcome] = post(settings, asc)
    assert outcome.result == "sent", outcome
    [row] = receiver.stored()
    assert (row["sha256"], row["esiid"], row["meter"]) == (sha(INTERVAL), ESIID, "M5")
    assert row["filename"].endswith(".csv")


def test_same_csv_encrypted_twice_is_delivered_once(settings: Settings, receiver: Any, ours: GpgHome) -> None:
    first = drop(settings, "a.CSV.1.asc", ours.encrypt(SMT_ZIP))
    second = drop(settings, "a.CSV.2.asc", ours.encrypt(SMT_ZIP))
    assert first.read_bytes() != second.read_bytes()  # different ciphertext, same CSVs
    one, two = post(settings, first, second)
    assert (one.result, two.result) == ("sent", "sent")
    assert sorted(c.result for c in one.children) == ["sent", "sent"]
    assert sorted(c.result for c in two.children) == ["duplicate", "duplicate"]
    assert len(receiver.state.requests) == 2
    assert sorted(r["sha256"] for r in receiver.stored()) == sorted([sha(INTERVAL), sha(BILLING)])
    rows = rows_by_sha(settings)
    assert rows[sha(first.read_bytes())].state == rows[sha(second.read_bytes())].state == "sent"

    # The same CSV as a plain file is a duplicate as well.
    plain = drop(settings, "again.csv", INTERVAL)
    [again] = post(settings, plain)
    assert again.result == "duplicate" and len(receiver.state.requests) == 2


def test_sample_encrypt_to_then_post(
    settings: Settings, receiver: Any, ours: GpgHome, run_cli: Callable[..., Any]
) -> None:
    asc = settings.local_dir / "IntervalMeterUsage.CSV.1.asc"
    env = env_for(receiver, ours)
    made = run_cli("sample", "--days", "3", "--esiid", SECOND_ESIID, "--encrypt-to", ours.fingerprint, "-o",
                   str(asc), env=env)
    assert made.returncode == 0, made.stderr
    assert asc.read_bytes().startswith(b"-----BEGIN PGP MESSAGE-----")
    [outcome] = post(settings, asc)
    assert outcome.result == "sent", outcome
    got = receiver.stored()
    assert len(got) == 2 and {r["esiid"] for r in got} == {SECOND_ESIID}
    interval = sample.interval_csv(3, SECOND_ESIID)
    assert sha(interval) in {r["sha256"] for r in got}


# --- containers that must fail, cleanly --------------------------------------------------------------


def _lying_zip() -> bytes:
    """A ZIP whose headers declare 1,000 bytes for an entry that really inflates to ~100 kB."""
    big = interval_csv(rows=96) * 12
    data = bytearray(zip_of({"lying.csv": big}))
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, 1000)
    struct.pack_into("<I", data, central + 24, 1000)
    return bytes(data)


def _bomb() -> bytes:
    data = zip_of({"bomb.csv": HEADER.encode() + b"\n" + b"0" * 8_000_000}, level=9)
    assert len(data) * 200 < 8_000_000 and len(data) < 20_000
    return data


def _random_rows(n: int) -> bytes:
    # Hex digests do not compress far: the ratio stays well under 200.
    return (HEADER + "\n" + "".join(f"'{ESIID},{hashlib.sha256(str(i).encode()).hexdigest()}\n"
                                    for i in range(n))).encode()


FAILURES: dict[str, tuple[str, Callable[[dict[str, GpgHome]], bytes], str]] = {
    "wrong-key": ("a.CSV.1.asc", lambda k: k["stranger"].encrypt(SMT_ZIP), "no secret key"),
    "garbage-armour": ("b.CSV.1.asc",
                       lambda k: b"-----BEGIN PGP MESSAGE-----\n\nbm90IHJlYWxseQ==\n-----END PGP MESSAGE-----\n",
                       "cannot decrypt"),
    "not-pgp-at-all": ("c.CSV.1.asc", lambda k: b"hello, I am not encrypted\n", "cannot decrypt"),
    "zip-bomb-ratio": ("bomb.zip", lambda k: _bomb(), "200x"),
    "zip-bomb-ratio-asc": ("bomb.CSV.1.asc", lambda k: k["ours"].encrypt(_bomb()), "200x"),
    "over-max-unpacked": ("big.zip", lambda k: zip_of({"big.csv": _random_rows(100)}), "SMT_MAX_UNPACKED_BYTES"),
    "size-lies": ("lying.zip", lambda k: _lying_zip(), "cannot be extracted|larger than declared"),
    "traversal-dotdot": ("t1.zip", lambda k: zip_of({INTERVAL_NAME: INTERVAL, "../evil.csv": INTERVAL}),
                         "unsafe ZIP entry name '../evil.csv'"),
    "traversal-deep": ("t2.zip", lambda k: zip_of({"a/../../../evil.csv": INTERVAL}), "unsafe ZIP entry name"),
    "traversal-backslash": ("t3.zip", lambda k: zip_of({"..\\evil.csv": INTERVAL}), "unsafe ZIP entry name"),
    "absolute": ("t4.zip", lambda k: zip_of({INTERVAL_NAME: INTERVAL, "/abs.csv": INTERVAL}),
                 "unsafe ZIP entry name '/abs.csv'"),
    "traversal-asc": ("t5.CSV.1.asc", lambda k: k["ours"].encrypt(zip_of({"../evil.csv": INTERVAL})),
                      "unsafe ZIP entry name"),
    "no-csv": ("nocsv.zip", lambda k: zip_of({"readme.txt": b"hello\n", "data.xml": b"<x/>"}), "no CSV inside"),
    "not-a-zip": ("junk.zip", lambda k: b"this is not a zip file at all\n", "not a ZIP file"),
    "truncated-zip": ("cut.zip", lambda k: SMT_ZIP[: len(SMT_ZIP) // 2], "not a readable ZIP"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_bad_container_fails_with_a_reason_and_leaves_nothing(
    case: str, make_settings: Make, receiver: Any, keys: dict[str, GpgHome], tmp_path: Path
) -> None:
    name, build, reason = FAILURES[case]
    limit = {"SMT_MAX_UNPACKED_BYTES": "5000"} if case in ("over-max-unpacked", "size-lies") else {}
    settings = make_settings(**env_for(receiver, keys["ours"], **limit))
    path = drop(settings, name, build(keys))
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    before = {p for p in tmp_path.rglob("*") if "received" not in p.parts}

    [outcome] = post(settings, path)

    assert outcome.result == "failed", outcome
    assert re.search(reason, outcome.error or ""), outcome.error
    assert "\n" not in (outcome.error or "") and "Traceback" not in (outcome.error or "")
    rows = rows_by_sha(settings)
    assert list(rows) == [sha(path.read_bytes())]  # only the parent: nothing inside became a row
    assert rows[sha(path.read_bytes())].state == "failed"
    assert re.search(reason, rows[sha(path.read_bytes())].last_error or "")
    assert receiver.state.requests == [] and receiver.stored() == []
    assert work_leftovers(settings) == []
    after = {p for p in tmp_path.rglob("*") if "received" not in p.parts}
    new = {p for p in after - before if not (p.parent == settings.state_dir and p.name.startswith("ledger"))}
    assert new <= {settings.state_dir / "work"}, sorted(map(str, new))
    assert not list(tmp_path.rglob("evil.csv")) and not Path("/abs.csv").exists()
    assert sorted(p.name for p in settings.local_dir.iterdir()) == [name]


def test_a_failed_container_does_not_affect_others(settings: Settings, receiver: Any, ours: GpgHome,
                                                   keys: dict[str, GpgHome]) -> None:
    bad = drop(settings, "bad.CSV.1.asc", keys["stranger"].encrypt(SMT_ZIP))
    good = drop(settings, "good.CSV.1.asc", ours.encrypt(SMT_ZIP))
    worse = drop(settings, "evil.zip", zip_of({"../evil.csv": INTERVAL}))
    results = {o.path.name: o.result for o in post(settings, bad, good, worse)}
    assert results == {"bad.CSV.1.asc": "failed", "good.CSV.1.asc": "sent", "evil.zip": "failed"}
    assert sorted(stored(receiver)) == sorted([INTERVAL_NAME, BILLING_NAME])
    assert work_leftovers(settings) == []


def test_reason_for_an_asc_names_the_asc(settings: Settings, ours: GpgHome) -> None:
    asc = drop(settings, "bomb.CSV.7.asc", ours.encrypt(zip_of({"x.txt": b"no csv"})))
    [outcome] = post(settings, asc)
    assert outcome.result == "failed"
    assert ".decrypted" not in (outcome.error or ""), outcome.error
    assert "bomb.CSV.7.asc" in (outcome.error or ""), outcome.error


# --- validation and ESIID choice ---------------------------------------------------------------------


def test_non_smt_csv_fails_unless_validation_is_off(make_settings: Make, receiver: Any, ours: GpgHome) -> None:
    settings = make_settings(**env_for(receiver, ours))
    notes = drop(settings, "notes.csv", b"date,kwh\n2025-01-01,3\n")
    [outcome] = post(settings, notes)
    assert outcome.result == "failed"
    assert outcome.error is not None and outcome.error.startswith("not an SMT file")
    assert rows_by_sha(settings)[sha(notes.read_bytes())].state == "failed"
    assert receiver.state.requests == []

    lenient = make_settings(**env_for(receiver, ours, SMT_VALIDATE="0"))
    [outcome] = post(lenient, notes)  # post takes failed rows again
    assert outcome.result == "sent"
    [row] = receiver.stored()
    assert (row["filename"], row["esiid"]) == ("notes.csv", DEFAULT_ESIID)


def test_non_smt_csv_inside_a_zip_fails_the_whole_container(settings: Settings, receiver: Any) -> None:
    """Every CSV is validated when the container is opened: one that is not SMT data refuses them all."""
    z = drop(settings, "mixed.zip", zip_of({INTERVAL_NAME: INTERVAL, "notes.csv": b"date,kwh\n1,2\n"}))
    [outcome] = post(settings, z)
    assert outcome.result == "failed"
    assert (outcome.error or "").startswith("not an SMT file: notes.csv")
    assert list(rows_by_sha(settings)) == [sha(z.read_bytes())]
    assert receiver.state.requests == []
    assert work_leftovers(settings) == []

    lenient = dataclasses.replace(settings, validate=False)
    [outcome] = post(lenient, z)  # SMT_VALIDATE=0: both go
    assert outcome.result == "sent"
    assert sorted(r["filename"] for r in receiver.stored()) == sorted([INTERVAL_NAME, "notes.csv"])


def test_smt_other_csv_is_delivered_as_is(settings: Settings, receiver: Any) -> None:
    daily = drop(settings, "DailyMeterUsage_M4.csv", billing_csv(SECOND_ESIID))
    [outcome] = post(settings, daily)
    assert outcome.result == "sent"
    [row] = receiver.stored()
    assert (row["esiid"], row["meter"], row["sha256"]) == (SECOND_ESIID, "M4", sha(daily.read_bytes()))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_several_esiids_are_sent_with_the_default_and_a_warning(settings: Settings, receiver: Any) -> None:
    two = interval_csv(ESIID) + interval_csv(SECOND_ESIID).split(b"\n", 1)[1]
    path = drop(settings, "two.csv", two)
    handler = _Records()
    logger = logging.getLogger("smt_watch.content")
    logger.addHandler(handler)
    try:
        [outcome] = post(settings, path)
    finally:
        logger.removeHandler(handler)
    assert outcome.result == "sent"
    [row] = receiver.stored()
    assert row["esiid"] == DEFAULT_ESIID
    warnings = [r.getMessage() for r in handler.records if r.levelno == logging.WARNING]
    assert any("two.csv" in m and "2 ESIIDs" in m and "ESIID_DEFAULT" in m for m in warnings), warnings


def test_single_esiid_plain_csv_uses_it(settings: Settings, receiver: Any) -> None:
    path = drop(settings, "IntervalMeterUsage.csv", interval_csv(SECOND_ESIID))
    [outcome] = post(settings, path)
    assert outcome.result == "sent"
    [row] = receiver.stored()
    assert (row["esiid"], row["meter"]) == (SECOND_ESIID, "M1")  # METER_DEFAULT: no M<digits> in the name


# --- watch ---------------------------------------------------------------------------------------------


def test_watch_delivers_an_asc_landing_in_the_inbox(settings: Settings, receiver: Any, ours: GpgHome,
                                                    tmp_path: Path) -> None:
    from conftest import watching

    outside = tmp_path / "landing.tmp"
    outside.write_bytes(ours.encrypt(SMT_ZIP))
    with watching(settings):
        os.rename(outside, settings.local_dir / "w.CSV.1.asc")
        wait_for(lambda: len(receiver.stored()) == 2, 15, "both CSVs stored")
        parent = sha((settings.local_dir / "w.CSV.1.asc").read_bytes())
        wait_for(lambda: (r := rows_by_sha(settings).get(parent)) is not None and r.state == "sent", 10,
                 "parent row sent")
    assert {r["esiid"] for r in receiver.stored()} == {ESIID}
    rows = rows_by_sha(settings)
    assert rows[sha(INTERVAL)].parent == rows[sha(BILLING)].parent == parent
    assert work_leftovers(settings) == []


def test_watch_retries_a_child_csv_after_a_5xx(make_settings: Make, receiver: Any, ours: GpgHome,
                                              tmp_path: Path) -> None:
    from conftest import watching

    settings = make_settings(**env_for(receiver, ours))
    receiver.state.faults.append(Fault(status=503))  # the first CSV's only attempt
    outside = tmp_path / "landing.tmp"
    outside.write_bytes(ours.encrypt(SMT_ZIP))
    with watching(settings):
        os.rename(outside, settings.local_dir / "r.CSV.1.asc")

        def settled() -> bool:
            rows = rows_by_sha(settings)
            stuck = any(r.state == "failed" for r in rows.values())
            return stuck or len(receiver.stored()) == 2

        wait_for(settled, 20, "both CSVs stored or a row failed")
    rows = rows_by_sha(settings)
    assert sorted(stored(receiver)) == sorted([INTERVAL_NAME, BILLING_NAME]), [
        (r.filename, r.state, r.last_error) for r in rows.values()]
    assert all(r.state == "sent" for r in rows_by_sha(settings).values())


# --- inspect -----------------------------------------------------------------------------------------


def test_inspect_csv_json_is_one_object(settings: Settings, run_cli: Callable[..., Any], tmp_path: Path) -> None:
    path = tmp_path / "IntervalMeterUsage_M9.csv"
    path.write_bytes(interval_csv(rows=96))
    done = run_cli("inspect", str(path), "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert isinstance(got, dict) and list(got) == JSON_KEYS
    assert got == {
        "file": path.name, "kind": "interval", "esiids": [ESIID], "meter": "M9", "first_date": "2025-11-01",
        "last_date": "2025-11-01", "rows": 96, "intervals": 96, "blanks": 0, "estimated": 0, "gaps": 0,
        "kwh_consumption": 48.0, "kwh_generation": 0.0, "first_start_utc": "2025-11-01T05:00:00Z",
        "last_end_utc": "2025-11-02T05:00:00Z",
    }


def test_inspect_zip_and_asc_json_are_arrays(ours: GpgHome, run_cli: Callable[..., Any], tmp_path: Path) -> None:
    z = tmp_path / "smt.zip"
    z.write_bytes(SMT_ZIP)
    asc = tmp_path / "smt.CSV.1.asc"
    asc.write_bytes(ours.encrypt(SMT_ZIP))
    for path in (z, asc):
        done = run_cli("inspect", str(path), "--json", env={"GNUPGHOME": str(ours.home)})
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        assert isinstance(got, list) and [list(o) for o in got] == [JSON_KEYS, JSON_KEYS]
        by_name = {o["file"]: o for o in got}
        assert by_name[INTERVAL_NAME]["kind"] == "interval" and by_name[INTERVAL_NAME]["intervals"] == 8
        assert by_name[BILLING_NAME]["kind"] == "smt-other" and by_name[BILLING_NAME]["esiids"] == [ESIID]
        assert by_name[INTERVAL_NAME]["first_start_utc"] == "2025-11-01T05:00:00Z"
    assert not list(tmp_path.rglob("*.csv"))  # inspect unpacked into a private temp dir, not next to the file


def test_inspect_table(ours: GpgHome, run_cli: Callable[..., Any], tmp_path: Path) -> None:
    asc = tmp_path / "smt.CSV.1.asc"
    asc.write_bytes(ours.encrypt(SMT_ZIP))
    done = run_cli("inspect", str(asc), env={"GNUPGHOME": str(ours.home)})
    assert done.returncode == 0, done.stderr
    for word in ("kind", "interval", "smt-other", ESIID, "first_start_utc", "2025-11-01T05:00:00Z", "gaps",
                 INTERVAL_NAME, BILLING_NAME):
        assert word in done.stdout, word


def test_inspect_undecryptable_asc_exits_1_with_one_line(keys: dict[str, GpgHome], run_cli: Callable[..., Any],
                                                        tmp_path: Path) -> None:
    asc = tmp_path / "other.CSV.1.asc"
    asc.write_bytes(keys["stranger"].encrypt(SMT_ZIP))
    done = run_cli("inspect", str(asc), "--json", env={"GNUPGHOME": str(keys["ours"].home)})
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "other.CSV.1.asc" in lines[0] and "cannot decrypt" in lines[0] and "no secret key" in lines[0]
    missing = run_cli("inspect", str(tmp_path / "nope.csv"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "Traceback" not in missing.stderr


# --- sample ------------------------------------------------------------------------------------------


def test_sample_is_deterministic(run_cli: Callable[..., Any], tmp_path: Path) -> None:
    a, b, z = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.zip"
    for path in (a, b):
        done = run_cli("sample", "--days", "40", "--start", "2025-10-15", "--esiid", SECOND_ESIID, "-o", str(path))
        assert done.returncode == 0, done.stderr
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() == sample.interval_csv(40, SECOND_ESIID, date(2025, 10, 15))
    assert a.read_bytes().startswith(HEADER.encode() + b"\n'" + SECOND_ESIID.encode() + b",10/15/2025,")
    done = run_cli("sample", "--days", "2", "-o", str(z))
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
        assert len(names) == 2 and names[0] == "IntervalMeterUsage_10443720000000001_20250101.csv"
        assert zf.read(names[0]) == sample.interval_csv(2)


def test_sample_encrypt_to_unknown_key_is_a_usage_error(ours: GpgHome, run_cli: Callable[..., Any],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "x.asc"
    done = run_cli("sample", "--days", "1", "--encrypt-to", "nobody@example.invalid", "-o", str(out),
                   env={"GNUPGHOME": str(ours.home)})
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not out.exists()
