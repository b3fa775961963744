"""Client CPU of one ``Connection.download`` a GiB: this checkout's ``smt_watch/sftp.py`` against another
version of that file, alternating in one process against one OpenSSH sshd (issue 27).

Why this shape: on a shared 2-core machine wall time and even a whole command's CPU swing with the load
(other processes' cache traffic, start-up), so a change to sftp.py's per-packet work is measured where
everything else is equal: the same interpreter, the same server, the same file warm in the page cache,
the two versions taking turns (order swapped every round), the median kept. It measures one stream
(no worker processes, no ledger): the part of ``sync`` that the per-packet work is.

    git show origin/main:smt_watch/sftp.py > /tmp/old_sftp.py
    .venv/bin/python bench/sftp_cpu.py --other /tmp/old_sftp.py [--mib 256] [--rounds 10]

The SSH packet path lives in ``smt_watch/sshfast.py`` (split from sftp.py): to compare a version of it, also
give ``--other-sshfast <its sshfast.py>`` (the other sftp.py then imports that one, not this checkout's).

Prints, per version, the median and minimum CPU seconds (user + system, both threads) a GiB and the
median wall seconds a GiB; each download's SHA-256 is checked against the file's.

Not measured here: process-wide settings. ``keep_freed_memory`` (glibc's allocator thresholds, set by
``smt-watch sync`` and sync's worker processes, not by ``Connection``) is not set here, for either version;
compare it with whole commands (``bench_sync.py --src``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sftp_server import running_sshd, sftp_env  # the test suite's sshd harness

import smt_watch.sftp as this_sftp
from smt_watch.config import load_settings

MIB = 1024 * 1024


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def load_other(path: Path, sshfast: Path | None = None) -> ModuleType:
    """The other sftp.py; with ``sshfast``, its ``from smt_watch.sshfast import ...`` gets that file's."""
    if sshfast is None:
        return load_module("other_sftp", path)
    this_sshfast = sys.modules["smt_watch.sshfast"]
    sys.modules["smt_watch.sshfast"] = load_module("other_sshfast", sshfast)
    try:
        return load_module("other_sftp", path)
    finally:
        sys.modules["smt_watch.sshfast"] = this_sshfast


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--other", type=Path, required=True, help="the other sftp.py to compare against")
    parser.add_argument("--other-sshfast", type=Path, help="the other sshfast.py (its packet path), if it has one")
    parser.add_argument("--mib", type=int, default=256, help="size of the file downloaded (default 256)")
    parser.add_argument("--rounds", type=int, default=6, help="downloads per version (default 6)")
    args = parser.parse_args(argv)
    if not args.other.is_file():
        raise SystemExit(f"{args.other}: no such file")
    versions = {"this": this_sftp, "other": load_other(args.other, args.other_sshfast)}
    cpu: dict[str, list[float]] = {name: [] for name in versions}
    wall: dict[str, list[float]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory(prefix="sftp-cpu-", dir="/tmp") as tmp:
        work = Path(tmp)
        with running_sshd(work / "sshd") as server:
            source = server.root / "big.csv"
            block = os.urandom(MIB)
            with source.open("wb") as fh:
                for _ in range(args.mib):
                    fh.write(block)
            expected = hashlib.sha256(source.read_bytes()).hexdigest()
            settings = load_settings(sftp_env(server, work / "known_hosts", timeout=60,
                                              SMT_LOCAL_DIR=str(work / "inbox"), SMT_STATE_DIR=str(work / "state")))
            for r in range(args.rounds):
                order = list(versions) if r % 2 == 0 else list(reversed(versions))
                for name in order:
                    module = versions[name]
                    part = work / "download.part"
                    part.unlink(missing_ok=True)
                    with module.Connection(settings) as conn:
                        c0, w0 = cpu_seconds(), time.perf_counter()
                        sha = conn.download(module.RemoteFile(str(source), args.mib * MIB, 0), part)
                        c, w = cpu_seconds() - c0, time.perf_counter() - w0
                    if sha != expected:
                        raise SystemExit(f"{name}: SHA-256 of the download differs from the source")
                    per_gib = 1024 / args.mib
                    cpu[name].append(c * per_gib)
                    wall[name].append(w * per_gib)
                    print(f"round {r + 1}/{args.rounds} {name}: {c * per_gib:.2f} CPU s/GiB, "
                          f"{w * per_gib:.2f} wall s/GiB", file=sys.stderr, flush=True)
    for name in versions:
        print(f"{name}: median {statistics.median(cpu[name]):.2f} CPU s/GiB (min {min(cpu[name]):.2f}), "
              f"median wall {statistics.median(wall[name]):.2f} s/GiB, {args.rounds} x {args.mib} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
