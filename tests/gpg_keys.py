"""Throw-away OpenPGP key pairs for tests: made with the real ``gpg`` in a private ``GNUPGHOME``.

Keys are ed25519 (certify/sign) with a cv25519 encryption subkey and no passphrase, which gpg makes in
well under a second. Each home gets its own gpg-agent; :meth:`GpgHome.close` stops it (by homedir, via
``gpgconf``), so no agent outlives the test module that made it.

A passphrase-protected key is protected with the fewest S2K iterations gpg-agent allows
(``AGENT_CONF``): by default the agent first calibrates a count worth 100 ms of its CPU, which took
seconds on a loaded 2-core machine; the key is protected by its passphrase all the same.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 30.0
AGENT_CONF = "s2k-count 65536\n"  # gpg-agent.conf of a test home: the minimum count, no calibration


@dataclass(frozen=True)
class GpgHome:
    home: Path
    fingerprint: str
    uid: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "GNUPGHOME": str(self.home)}

    def gpg(self, *args: str, data: bytes | None = None) -> bytes:
        done = subprocess.run(["gpg", "--batch", "--yes", *args], input=data, capture_output=True,
                              env=self.env(), timeout=TIMEOUT, check=True)
        return done.stdout

    def encrypt(self, data: bytes) -> bytes:
        """Armoured encryption to this home's key, straight with gpg (independent of smt_watch)."""
        return self.gpg("--armor", "--trust-model", "always", "--encrypt", "--recipient", self.fingerprint,
                        data=data)

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=self.env(), capture_output=True, timeout=TIMEOUT,
                       check=False)


def make_home(home: Path, uid: str, passphrase: str = "") -> GpgHome:
    """A new GNUPGHOME at ``home`` holding one key pair for ``uid``, unprotected unless ``passphrase``."""
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    (home / "gpg-agent.conf").write_text(AGENT_CONF)
    env = {**os.environ, "GNUPGHOME": str(home)}

    def gpg(*args: str) -> str:
        return subprocess.run(["gpg", "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", passphrase,
                               *args], capture_output=True, text=True, env=env, timeout=TIMEOUT,
                              check=True).stdout

    gpg("--quick-gen-key", uid, "ed25519", "cert,sign", "never")
    listing = gpg("--list-keys", "--with-colons", uid)
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    gpg("--quick-add-key", fingerprint, "cv25519", "encr", "never")
    return GpgHome(home, fingerprint, uid)
