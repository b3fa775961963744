"""gpg for SMT's ``.asc`` files: every run in a private, writable copy of the operator's keyring.

IntelliWatt keeps its SMT decryption key in the ``deploy`` user's default keyring (``~deploy/.gnupg``; the
old script runs plain ``gpg -d``), or in ``GNUPGHOME`` when that is set. The shipped units run with
``ProtectHome=read-only``, which also makes ``/run/user`` read-only, and gpg cannot decrypt from a read-only
home: it cannot take its keyring lock nor start gpg-agent (whose socket lives in the home or in
``/run/user/UID/gnupg``); it says "can't connect to the agent: Read-only file system" and then "No secret
key". So every gpg run of smt-watch (decrypting for ``watch``/``post``/``inspect``, ``doctor``'s round trip)
works on a copy, in or out of the sandbox alike:

1. the key material of the keyring (:data:`KEY_FILES`, nothing else: no ``gpg.conf``) is copied into a new
   mode-0700 directory under the temp dir (in the unit: its ``PrivateTmp`` ``/tmp``), a short path, so
   gpg-agent's socket fits in a socket address;
2. gpg runs with ``--homedir`` there and the agent it starts puts its sockets there too (gpg falls back to
   the home when ``/run/user/UID/gnupg`` cannot be made, as in the sandbox; out of it, the
   ``/run/user/UID/gnupg/d.<hash>`` it makes instead is removed by ``gpgconf --remove-socketdir``);
3. the agent is stopped (``gpgconf --kill all``) and the copy removed, whatever happened.

The operator's keyring is only ever read, so ``doctor`` run by hand proves the path the service takes.
gpg's output is streamed to a file and counted: past ``SMT_MAX_UNPACKED_BYTES`` (an 800-byte ``.asc`` can
decompress to hundreds of MB: a PGP packet is compressed too) or :data:`TIMEOUT` seconds gpg is killed and
what it wrote removed. A failure is one :class:`ContentError` line carrying gpg's own reason
(:func:`reason`), the most informative line first.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from smt_watch.config import Settings
from smt_watch.errors import ContentError

log = logging.getLogger("smt_watch.gpg")

# What a decryption needs from a keyring: public keys (keybox, legacy keyring, or gpg 2.4's keyboxd store
# with the common.conf that turns it on), secret keys (gpg 2.1+, and a gpg 1 secring gpg migrates in the
# copy), the trust database.
KEY_FILES: Final = ("pubring.kbx", "pubring.gpg", "secring.gpg", "trustdb.gpg", "private-keys-v1.d",
                    "public-keys.d", "common.conf")
TIMEOUT: Final = 600.0  # one decryption: 1 GB of plaintext takes well under a minute
GPGCONF_TIMEOUT: Final = 30.0
READ_BLOCK: Final = 1024 * 1024
# gpg's lines that say why it could not decrypt, the most informative first (the last, "decryption failed:
# No secret key", is what gpg ends with whatever went wrong before).
REASONS: Final = ("public key decryption failed", "can't connect to the agent", "no valid openpgp data",
                  "batchmode", "decryption failed", "decrypt_message failed")


def keyring(settings: Settings) -> Path:
    """Where the decryption key is: ``GNUPGHOME`` when set, else the service user's ``~/.gnupg`` (gpg's own
    default, where IntelliWatt's ``deploy`` user keeps it)."""
    return settings.gnupghome or Path.home() / ".gnupg"


def _copy_keys(source: Path, home: Path) -> None:
    for name in KEY_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, home / name, copy_function=shutil.copyfile,
                            ignore=shutil.ignore_patterns("*.lock", ".#lk*"))
        elif src.is_file():
            shutil.copyfile(src, home / name)
    for sub in home.rglob("*"):
        sub.chmod(0o700 if sub.is_dir() else 0o600)


def _gpgconf(home: Path, *args: str) -> None:
    try:
        subprocess.run(["gpgconf", "--homedir", str(home), *args], capture_output=True, timeout=GPGCONF_TIMEOUT,
                       check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("gpgconf %s for %s failed: %s", " ".join(args), home, exc)


@contextmanager
def private_home(settings: Settings) -> Iterator[Path]:
    """A private, writable copy of the keyring for one gpg run (see the module docstring); its agent is
    stopped and the copy removed on the way out."""
    source = keyring(settings)
    if not source.is_dir():
        raise ContentError(f"no keyring at {source} (GNUPGHOME, else ~/.gnupg of the service user)")
    try:
        home = Path(tempfile.mkdtemp(prefix="smt-gpg-"))  # mode 0700
    except OSError as exc:
        raise ContentError(f"cannot make a private gpg home in {tempfile.gettempdir()}: {exc.strerror}") from exc
    try:
        try:
            _copy_keys(source, home)
        except OSError as exc:
            raise ContentError(f"cannot read the keyring {source}: {exc.strerror or exc}") from exc
        yield home
    finally:
        _gpgconf(home, "--kill", "all")
        _gpgconf(home, "--remove-socketdir")  # only acts on a /run/user/UID/gnupg/d.<hash> of this home
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Outcome:
    """What one gpg run did: its exit status, its status keywords and its human lines (``gpg: …``)."""

    returncode: int = 0
    written: int = 0
    exceeded: bool = False
    timed_out: bool = False
    statuses: set[str] = field(default_factory=set)
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    @property
    def decrypted(self) -> bool:
        return ("DECRYPTION_OKAY" in self.statuses and "DECRYPTION_FAILED" not in self.statuses
                and not self.exceeded and not self.timed_out)


def _read_stderr(stream: IO[bytes], outcome: Outcome) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip()
        if line.startswith("[GNUPG:] "):
            outcome.statuses.add(line.split()[1] if len(line.split()) > 1 else "")
        elif line.startswith("gpg: "):
            outcome.lines.append(line[5:])


def run(home: Path, args: list[str], source: Path, sink: IO[bytes], cap: int, passphrase: str | None = None,
        timeout: float = TIMEOUT) -> Outcome:
    """``gpg --homedir HOME ARGS`` reading ``source``, its output written to ``sink`` up to ``cap`` bytes.

    The passphrase (loopback pinentry) goes through a pipe of its own, never argv or the environment."""
    cmd = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--yes", "--status-fd", "2",
           "--pinentry-mode", "loopback"]
    pass_fds: tuple[int, ...] = ()
    pass_read = -1
    if passphrase is not None:
        pass_read, pass_write = os.pipe()
        with os.fdopen(pass_write, "wb") as w:
            w.write(passphrase.encode() + b"\n")  # a passphrase is far below a pipe's buffer
        cmd += ["--passphrase-fd", str(pass_read)]
        pass_fds = (pass_read,)
    outcome = Outcome()
    try:
        with source.open("rb") as fh:
            try:
                proc = subprocess.Popen([*cmd, *args], stdin=fh, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        pass_fds=pass_fds)
            except FileNotFoundError as exc:
                raise ContentError("gpg is not installed (apt-get install gnupg)") from exc
    finally:
        if pass_read >= 0:
            os.close(pass_read)
    assert proc.stdout is not None and proc.stderr is not None  # PIPE was asked for

    def overdue() -> None:
        outcome.timed_out = True
        proc.kill()

    timer = threading.Timer(timeout, overdue)
    timer.daemon = True
    reader = threading.Thread(target=_read_stderr, args=(proc.stderr, outcome), daemon=True)
    timer.start()
    reader.start()
    finished = False
    try:
        while chunk := proc.stdout.read(READ_BLOCK):
            outcome.written += len(chunk)
            if outcome.written > cap:
                outcome.exceeded = True
                break
            sink.write(chunk)
        finished = not outcome.exceeded
    finally:
        if not finished and proc.poll() is None:  # over the cap, or the sink failed (disk full): stop gpg
            proc.kill()
        proc.stdout.close()
        outcome.returncode = proc.wait()
        timer.cancel()
        reader.join(GPGCONF_TIMEOUT)
        proc.stderr.close()
    return outcome


def reason(outcome: Outcome) -> str:
    """gpg's own reason, one line: its informative lines in the order of :data:`REASONS`, each once."""
    picked: list[str] = []
    for marker in REASONS:
        picked += [line for line in outcome.lines if marker in line.lower() and line not in picked]
    if not picked and outcome.lines:
        picked = [outcome.lines[-1]]
    return "; ".join(picked) or f"gpg exited with status {outcome.returncode}"


def decrypt(settings: Settings, path: Path, out: Path, name: str | None = None) -> Path:
    """Decrypt ``path`` (an ``.asc``) into ``out`` in a private copy of the keyring; ContentError with gpg's
    reason when it cannot."""
    name = name or path.name
    cap = settings.max_unpacked_bytes
    passphrase = settings.gpg_passphrase.reveal() if settings.gpg_passphrase else None
    try:
        with private_home(settings) as home, out.open("wb") as sink:
            outcome = run(home, ["--decrypt"], path, sink, cap, passphrase)
            sink.flush()
            os.fsync(sink.fileno())
    except ContentError as exc:
        out.unlink(missing_ok=True)
        raise ContentError(f"{name}: cannot decrypt: {exc}") from exc
    except OSError as exc:
        out.unlink(missing_ok=True)
        raise ContentError(f"{name}: gpg is not usable: {exc.strerror or exc}") from exc
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if outcome.decrypted:
        return out
    out.unlink(missing_ok=True)
    if outcome.exceeded:
        raise ContentError(f"{name}: unpacks to more than {cap} bytes (SMT_MAX_UNPACKED_BYTES); gpg stopped")
    if outcome.timed_out:
        raise ContentError(f"{name}: gpg took more than {TIMEOUT:.0f} s; stopped")
    why = reason(outcome)
    low = why.lower()
    if ("bad passphrase" in low or "batchmode" in low) and passphrase is None:
        why += " (the key is passphrase-protected: set SMT_GPG_PASSPHRASE)"
    elif "no valid openpgp data" in low:
        why += " (not PGP data: corrupt armour?)"
    elif low.endswith("no secret key") and ";" not in why:
        why += f" (no secret key for it in {keyring(settings)})"
    raise ContentError(f"{name}: cannot decrypt: {why}")


@dataclass(frozen=True)
class Key:
    """A secret key that can decrypt: its fingerprint and first user id."""

    fingerprint: str
    uid: str


def secret_keys(home: Path) -> list[Key]:
    """Secret keys with a usable encryption (sub)key (not expired, revoked or disabled), in keyring order."""
    try:
        listing = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--with-colons", "--list-secret-keys"],
                                 capture_output=True, text=True, timeout=GPGCONF_TIMEOUT, check=False).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ContentError(f"cannot list secret keys: {exc}") from exc
    keys: list[Key] = []
    usable, fpr = False, ""
    for fields in (line.split(":") for line in listing.splitlines()):
        if fields[0] == "sec":
            usable, fpr = "E" in fields[11] and fields[1] not in ("e", "r", "d", "i"), ""
        elif fields[0] == "fpr" and not fpr:
            fpr = fields[9]
        elif fields[0] == "uid" and usable and fpr and all(k.fingerprint != fpr for k in keys):
            keys.append(Key(fpr, fields[9]))
    return keys


@dataclass(frozen=True)
class Trial:
    """One key's round trip: ``error`` is None when what was encrypted to it came back intact."""

    key: Key
    error: str | None


def round_trip(settings: Settings, sample: bytes = b"smt-watch doctor round trip\n") -> list[Trial]:
    """Encrypt ``sample`` to each secret key of the keyring, then decrypt it with :func:`decrypt`, the very
    path the service takes (its own private copy, the sandbox's temp dir, the passphrase setting). No key:
    an empty list."""
    with tempfile.TemporaryDirectory(prefix="smt-gpg-trip-") as tmp:
        clear = Path(tmp) / "sample"
        clear.write_bytes(sample)
        sealed: list[tuple[Key, Path | str]] = []
        with private_home(settings) as home:
            for key in secret_keys(home):
                target = Path(tmp) / f"{key.fingerprint}.asc"
                with target.open("wb") as sink:
                    done = run(home, ["--armor", "--trust-model", "always", "--encrypt", "--recipient",
                                      key.fingerprint], clear, sink, 1024 * 1024)
                sealed.append((key, target if done.returncode == 0 else f"cannot encrypt to it: {reason(done)}"))
        trials = []
        for key, asc in sealed:
            if isinstance(asc, str):
                trials.append(Trial(key, asc))
                continue
            out = Path(tmp) / "plain"
            try:
                got = decrypt(settings, asc, out, asc.name).read_bytes()
            except ContentError as exc:
                trials.append(Trial(key, str(exc).removeprefix(f"{asc.name}: cannot decrypt: ")))
                continue
            trials.append(Trial(key, None if got == sample else "what came back differs from what was sent"))
        return trials
