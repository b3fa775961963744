"""smt_watch.gpg with the real gpg: a private copy of the keyring per run, gpg's own reason on failure, nothing
left behind, and ``doctor``'s round trip. (The same inside the units' sandbox: tests/test_sandbox.py.)"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gpg_keys import GpgHome, make_home

from smt_watch import gpg
from smt_watch.config import Settings
from smt_watch.doctor import FAIL, OK, WARN, check_gpg
from smt_watch.errors import ContentError

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")
Make = Callable[..., Settings]
PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GpgHome]]:
    root = tmp_path_factory.mktemp("gpg")  # short paths: gpg-agent's socket lives in the home
    made = {"plain": make_home(root / "plain", "Plain <plain@example.invalid>"),
            "locked": make_home(root / "locked", "Locked <locked@example.invalid>", PASSPHRASE),
            "stranger": make_home(root / "stranger", "Stranger <stranger@example.invalid>")}
    for home in made.values():
        home.close()
    yield made
    for home in made.values():
        home.close()


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The temp dir gpg's private homes go to, of this test alone (as PrivateTmp gives the unit its own)."""
    tmp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: the agent's socket path must fit
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def digest(home: Path) -> dict[str, str]:
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*")) if p.is_file() and not p.name.startswith("S.")}


def agents_for(path: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            if proc.name.isdigit() and "gpg-agent" in cmd and str(path) in cmd:
                found.append(proc.name)
        except OSError:
            continue
    return found


def test_gpgs_informative_line_comes_first_not_no_secret_key() -> None:
    """What gpg says under a read-only home: the agent line is the reason, "No secret key" only follows."""
    outcome = gpg.Outcome(returncode=2)
    outcome.lines.extend(["encrypted with 255-bit ECDH key, ID B88654567A0EFEC6, created 2026-12-07",
                          "can't connect to the agent: Read-only file system",
                          "decryption failed: No secret key"])
    assert gpg.reason(outcome) == ("can't connect to the agent: Read-only file system; "
                                   "decryption failed: No secret key")
    outcome.lines.appendleft("public key decryption failed: Bad passphrase")
    assert gpg.reason(outcome).startswith("public key decryption failed: Bad passphrase; can't connect")
    assert gpg.reason(gpg.Outcome(returncode=2)) == "gpg exited with status 2"


def test_decrypt_uses_a_private_copy_and_leaves_nothing_behind(keys: dict[str, GpgHome], make_settings: Make,
                                                                 private_tmp: Path, tmp_path: Path) -> None:
    home = keys["plain"].home
    asc = tmp_path / "a.asc"
    asc.write_bytes(keys["plain"].encrypt(b"ESIID,X\n'1,2\n"))
    before = digest(home)
    out = gpg.decrypt(make_settings(GNUPGHOME=str(home)), asc, tmp_path / "plain")
    assert out.read_bytes() == b"ESIID,X\n'1,2\n"
    assert digest(home) == before, "the operator's keyring was written to"
    assert list(private_tmp.iterdir()) == [], "the private keyring copy was left behind"
    assert agents_for(private_tmp) == [], "its gpg-agent is still running"


def test_a_key_that_is_not_there_names_gpgs_reason_and_the_keyring(keys: dict[str, GpgHome], make_settings: Make,
                                                                    private_tmp: Path, tmp_path: Path) -> None:
    asc = tmp_path / "theirs.CSV.1.asc"
    asc.write_bytes(keys["stranger"].encrypt(b"x"))
    with pytest.raises(ContentError) as err:
        gpg.decrypt(make_settings(GNUPGHOME=str(keys["plain"].home)), asc, tmp_path / "out")
    assert str(err.value) == (f"theirs.CSV.1.asc: cannot decrypt: decryption failed: No secret key "
                              f"(no secret key for it in {keys['plain'].home})")
    assert not (tmp_path / "out").exists() and list(private_tmp.iterdir()) == []
    with pytest.raises(ContentError, match=r"cannot decrypt: no keyring at .*nowhere"):
        gpg.decrypt(make_settings(GNUPGHOME=str(tmp_path / "nowhere")), asc, tmp_path / "out")


def test_a_passphrase_protected_key_needs_smt_gpg_passphrase(keys: dict[str, GpgHome], make_settings: Make,
                                                            private_tmp: Path, tmp_path: Path) -> None:
    asc = tmp_path / "a.asc"
    asc.write_bytes(keys["locked"].encrypt(b"ESIID\n'1\n"))
    locked = str(keys["locked"].home)
    with pytest.raises(ContentError, match="set SMT_GPG_PASSPHRASE") as err:
        gpg.decrypt(make_settings(GNUPGHOME=locked), asc, tmp_path / "out")
    assert "No secret key" not in str(err.value).split(";")[0]
    with pytest.raises(ContentError) as wrong:
        gpg.decrypt(make_settings(GNUPGHOME=locked, SMT_GPG_PASSPHRASE="Wr0ngPass"), asc, tmp_path / "out")
    assert "cannot decrypt: public key decryption failed: Bad passphrase;" in str(wrong.value)
    assert "Wr0ngPass" not in str(wrong.value)
    out = gpg.decrypt(make_settings(GNUPGHOME=locked, SMT_GPG_PASSPHRASE=PASSPHRASE), asc, tmp_path / "out")
    assert out.read_bytes() == b"ESIID\n'1\n"
    assert list(private_tmp.iterdir()) == [] and agents_for(private_tmp) == []


def test_doctor_proves_decryption_by_a_round_trip(keys: dict[str, GpgHome], make_settings: Make,
                                                  private_tmp: Path, tmp_path: Path) -> None:
    plain = keys["plain"]
    [ok] = check_gpg(make_settings(GNUPGHOME=str(plain.home)))
    assert (ok.status, ok.name) == (OK, "gpg") and "decryption works" in ok.detail and plain.fingerprint in ok.detail
    [locked] = check_gpg(make_settings(GNUPGHOME=str(keys["locked"].home)))
    assert locked.status == FAIL and "SMT_GPG_PASSPHRASE" in locked.detail
    [unlocked] = check_gpg(make_settings(GNUPGHOME=str(keys["locked"].home), SMT_GPG_PASSPHRASE=PASSPHRASE))
    assert unlocked.status == OK
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    [none] = check_gpg(make_settings(GNUPGHOME=str(empty)))
    assert none.status == FAIL and "no secret key" in none.detail and "--import" in none.hint
    [missing] = check_gpg(make_settings(GNUPGHOME=str(tmp_path / "nowhere")))
    assert missing.status == FAIL and "no keyring at" in missing.detail
    assert list(private_tmp.iterdir()) == [] and agents_for(private_tmp) == []


def test_doctor_warns_for_one_key_that_cannot_decrypt_beside_one_that_can(
        keys: dict[str, GpgHome], make_settings: Make, private_tmp: Path, tmp_path: Path) -> None:
    both = tmp_path / "both"
    shutil.copytree(keys["locked"].home, both, ignore=shutil.ignore_patterns("S.*"))
    exported = keys["plain"].gpg("--export-secret-keys", keys["plain"].fingerprint)
    GpgHome(both, "", "").gpg("--import", data=exported)
    GpgHome(both, "", "").close()
    lines = list(check_gpg(make_settings(GNUPGHOME=str(both))))
    assert [c.status for c in lines] == [WARN, OK], [c.line() for c in lines]
    assert keys["locked"].fingerprint in lines[0].detail and keys["plain"].fingerprint in lines[1].detail


def test_doctor_does_not_check_gpg_when_no_pattern_takes_asc(make_settings: Make, tmp_path: Path) -> None:
    assert list(check_gpg(make_settings(SMT_PATTERNS="*.csv,*.zip", GNUPGHOME=str(tmp_path / "none")))) == []
    [line] = check_gpg(make_settings(SMT_PATTERNS="*.csv.*", GNUPGHOME=str(tmp_path / "none")))
    assert line.status == FAIL  # the old script's pattern takes IntervalMeterUsage.CSV.1.asc


def test_gpg_is_stopped_past_its_time(keys: dict[str, GpgHome], make_settings: Make, private_tmp: Path,
                                      tmp_path: Path) -> None:
    """A gpg that never finishes (here: its input never ends, a FIFO nobody closes) is killed at the deadline."""
    fifo = tmp_path / "endless.asc"
    os.mkfifo(fifo)
    keep_open = os.open(fifo, os.O_RDWR)  # a writer that never writes nor closes: gpg waits for input forever
    try:
        with gpg.private_home(make_settings(GNUPGHOME=str(keys["plain"].home))) as home, \
                (tmp_path / "out").open("wb") as sink:
            outcome = gpg.run(home, ["--decrypt"], fifo, sink, 1024, timeout=0.5)
    finally:
        os.close(keep_open)
    assert outcome.timed_out and not outcome.decrypted
    assert list(private_tmp.iterdir()) == []


def test_a_signature_gpg_cannot_check_does_not_fail_the_decryption(
        keys: dict[str, GpgHome], make_settings: Make, private_tmp: Path, tmp_path: Path) -> None:
    """SMT may sign what it encrypts: gpg exits 2 for a signer key it lacks, but the plaintext is sound."""
    signer = GpgHome(tmp_path / "signer", keys["stranger"].fingerprint, keys["stranger"].uid)
    shutil.copytree(keys["stranger"].home, signer.home, ignore=shutil.ignore_patterns("S.*"))
    try:
        signer.gpg("--import", data=keys["plain"].gpg("--export", keys["plain"].fingerprint))
        asc = tmp_path / "signed.asc"
        asc.write_bytes(signer.gpg("--armor", "--trust-model", "always", "--sign", "--local-user",
                                   signer.fingerprint, "--encrypt", "--recipient", keys["plain"].fingerprint,
                                   data=b"ESIID\n'1\n"))
    finally:
        signer.close()
    out = gpg.decrypt(make_settings(GNUPGHOME=str(keys["plain"].home)), asc, tmp_path / "out")
    assert out.read_bytes() == b"ESIID\n'1\n"
