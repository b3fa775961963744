"""A shipped unit's filesystem sandbox, emulated with bubblewrap, for running its ``ExecStart`` as systemd would.

systemd itself cannot be booted here (as PID 1 it would take over the host's cgroups), and
``systemd-analyze verify`` only checks syntax; what breaks on a droplet is what the process sees. So this
module reads a unit file's ``[Service]`` section and builds the same view of the filesystem with mount
namespaces (Debian's ``bwrap``):

- ``ProtectSystem=strict``: the whole host read-only (``full``/``yes``: ``/usr``, ``/boot``, ``/efi``, and
  for ``full`` ``/etc``);
- ``ProtectHome=read-only``: ``/home``, ``/root`` and ``/run/user`` read-only; the host's own homes are not the
  droplet's, so each is an empty read-only tmpfs holding only what the test maps there (``/home/deploy``, and
  ``/run/user/UID``: an empty, read-only dir of the user, as a logged-in ``deploy`` has);
- ``ReadWritePaths=`` and ``StateDirectory=`` (``/var/lib/NAME``, owned by ``User=``, ``StateDirectoryMode=``):
  writable, bound from the test's dirs;
- ``PrivateTmp=yes``: a fresh ``/tmp`` and ``/var/tmp`` (mode 1777); ``PrivateDevices=yes``: a minimal ``/dev``;
- ``Environment=`` then ``EnvironmentFile=`` (files win, as in systemd; read from the test's file mapped at
  that path, never the host's), over what systemd gives a ``User=`` service (``PATH``, ``HOME``, ``USER``,
  ``LOGNAME``, ``SHELL``);
- ``UMask=``; ``NoNewPrivileges=`` and an empty ``CapabilityBoundingSet=``.

``User=``/``Group=``: bwrap runs as root (CI runs as root) and ``setpriv`` switches to an unprivileged uid and
gid given by the test, the owner of the test's home, inbox and state dir, just before ``exec``. Not bwrap's
``--uid``: that needs a user namespace, where files of the real uid would show as ``nobody`` and which
containers often refuse. A target path the host lacks (``/opt/smt-watch``, ``/var/lib/smt-watch``) is made
on an empty read-only tmpfs over its nearest existing parent, since a read-only ``/`` takes no new mount point.
``/opt/smt-watch/bin/smt-watch`` is the venv's console script, and the repository, the venv and the Python it
was made from stay visible, read-only, at their own paths (PrivateTmp's ``/tmp`` would hide a checkout under
``/tmp``, ProtectHome a pyenv Python under ``/root``).

Not emulated (not filesystem): seccomp (``SystemCallFilter=``), ``RestrictAddressFamilies=``,
``MemoryDenyWriteExecute=``, the ``Protect{Kernel,Clock,…}`` switches. The network is the host's, so servers
on 127.0.0.1 are reachable.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smt_watch.config import parse_env_file

ROOT = Path(__file__).resolve().parent.parent
INSTALLED_EXE = "/opt/smt-watch/bin/smt-watch"
VENV_EXE = Path(os.path.normpath(Path(sys.executable).parent / "smt-watch"))
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNPRIVILEGED = (65534, 65534)  # nobody:nogroup: present on every Debian, owns nothing of the host's


def unavailable() -> str | None:
    """Why the sandbox cannot run here, or None."""
    if os.geteuid() != 0:
        return "the sandbox emulation needs root (bwrap binds, setpriv to the unit's user); CI runs as root"
    for tool, package in (("bwrap", "bubblewrap"), ("setpriv", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package}; .ci/run installs it)"
    return None


def require() -> None:
    """Skip with the reason; under CI (``CI=true``) fail instead, so a run never passes by skipping these."""
    reason = unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"sandbox tests cannot run: {reason}")
        pytest.skip(reason)


@dataclass
class Unit:
    """The ``[Service]`` settings of a unit file, each key's values in order (a key may repeat)."""

    path: Path
    service: dict[str, list[str]]

    def get(self, key: str, default: str = "") -> str:
        values = self.service.get(key)
        return values[-1] if values else default

    def all(self, key: str) -> list[str]:
        """Every value of a list setting (space-separated, repeated lines add; an empty value resets)."""
        out: list[str] = []
        for value in self.service.get(key, []):
            out = [] if not value else out + shlex.split(value)
        return out

    @property
    def exec_start(self) -> list[str]:
        return shlex.split(self.get("ExecStart").lstrip("-@+!:"))


def parse_unit(path: Path) -> Unit:
    service: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            service.setdefault(key.strip(), []).append(value.strip())
    return Unit(path, service)


def units() -> list[Path]:
    return sorted((ROOT / "systemd").glob("*.service"))


def unit_running(command: str) -> Path:
    """The shipped unit whose ExecStart runs ``smt-watch COMMAND`` (found by content, not by file name)."""
    found = [p for p in units() if parse_unit(p).exec_start[1:2] == [command]]
    assert len(found) == 1, f"expected one unit running `smt-watch {command}`, found {found}"
    return found[0]


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


@dataclass
class Sandbox:
    """``unit`` run with ``paths`` (unit path → host path) mapped in, as ``uid``/``gid``."""

    unit: Unit
    paths: dict[str, Path]
    uid: int = UNPRIVILEGED[0]
    gid: int = UNPRIVILEGED[1]
    home: str = "/home/deploy"
    keep: list[Path] = field(default_factory=lambda: sorted({ROOT, Path(sys.prefix), Path(sys.base_prefix)}))
    output: Path | None = None  # where the process's stdout and stderr go (a file: a pipe could fill up)
    # in the environment of everything started inside (gpg-agent too), so a test finds its own leftovers
    # among those of tests running beside it
    marker: str = field(default_factory=lambda: f"SMT_SANDBOX_TEST={uuid.uuid4().hex}")

    def environment(self) -> dict[str, str]:
        user = self.unit.get("User", "root")
        env = {"PATH": SYSTEMD_PATH, "HOME": self.home, "USER": user, "LOGNAME": user, "SHELL": "/bin/sh",
               "LANG": "C.UTF-8", **dict([self.marker.split("=", 1)])}
        for assignment in self.unit.all("Environment"):
            key, _, value = assignment.partition("=")
            env[key] = value
        for name in self.unit.all("EnvironmentFile"):
            optional, name = name.startswith("-"), name.lstrip("-")
            host = self.paths.get(name)
            if host is None or not host.exists():
                assert optional, f"EnvironmentFile={name} is required but not mapped"
                continue
            env.update(parse_env_file(host))
        return env

    def state_dirs(self) -> list[str]:
        return [f"/var/lib/{name}" for name in self.unit.all("StateDirectory")]

    def argv(self, extra: list[str] | None = None, command: list[str] | None = None) -> list[str]:
        """bwrap's command line; ``command`` replaces ExecStart (e.g. plain ``gpg``, to show what it meets)."""
        u = self.unit
        args = ["bwrap", "--die-with-parent", "--new-session"]
        system = u.get("ProtectSystem", "no")
        if system == "strict":
            args += ["--ro-bind", "/", "/"]
        else:
            args += ["--bind", "/", "/"]
            for d in ("/usr", "/boot", "/efi") + (("/etc",) if system == "full" else ()):
                if system in ("yes", "full") and Path(d).exists():
                    args += ["--ro-bind", d, d]
        args += ["--dev", "/dev"] if u.get("PrivateDevices") == "yes" else ["--dev-bind", "/dev", "/dev"]
        args += ["--proc", "/proc"]
        if u.get("PrivateTmp") == "yes":
            args += ["--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--tmpfs", "/var/tmp"]
        protect_home = u.get("ProtectHome", "no")
        hidden = ("/home", "/root", "/run/user") if protect_home in ("read-only", "yes", "tmpfs") else ()
        readonly: list[str] = []
        for d in hidden:
            args += ["--tmpfs", d]
            readonly.append(d)
        targets = [INSTALLED_EXE, *self.paths, *self.state_dirs()]
        for target in targets:
            if target in self.paths and target.startswith("/etc/"):
                continue  # an EnvironmentFile: read by systemd outside the sandbox
            if any(target == d or target.startswith(d + "/") for d in hidden):
                continue
            parent = _existing_parent(Path(target))
            if str(parent) != target and str(parent) not in readonly:
                assert parent != Path("/"), f"no existing parent for {target}"
                args += ["--tmpfs", str(parent)]
                readonly.append(str(parent))
        fresh = [*readonly, "/tmp", "/var/tmp"]

        def bind(how: str, host: Path | str, target: str) -> list[str]:
            # parents made on a fresh tmpfs: bwrap would make them 0700, closed to the unit's user
            made = [str(a) for a in reversed(Path(target).parents)
                    if any(str(a).startswith(d + "/") for d in fresh)]
            return [*(x for a in made for x in ("--perms", "0755", "--dir", a)), how, str(host), target]

        for path in self.keep:
            # a parent the unit's user cannot pass (a CI checkout under a 0700 dir): an empty tmpfs instead
            closed = next((a for a in reversed(path.parents) if str(a) != "/" and not a.stat().st_mode & 0o001
                           and not any(str(a) == d or str(a).startswith(d + "/") for d in fresh)), None)
            if closed is not None:
                args += ["--tmpfs", str(closed)]
                readonly.append(str(closed))
                fresh.append(str(closed))
        for path in self.keep:
            args += bind("--ro-bind", path, str(path))
        args += bind("--ro-bind", VENV_EXE, INSTALLED_EXE)
        writable = set(u.all("ReadWritePaths")) | set(self.state_dirs())
        for target, host in sorted(self.paths.items()):
            if target.startswith("/etc/") or (protect_home == "yes" and any(target.startswith(d) for d in hidden)):
                continue
            args += bind("--bind" if target in writable else "--ro-bind", host, target)
        for target in sorted(writable):
            assert target in self.paths, f"map {target} (ReadWritePaths=/StateDirectory=) to a host dir"
        for d in readonly:
            args += ["--remount-ro", d]
        args += ["--cap-add", "CAP_SETUID,CAP_SETGID,CAP_SETPCAP"]
        user = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--inh-caps=-all"]
        if u.get("CapabilityBoundingSet", "x") == "":
            user.append("--bounding-set=-all")
        if u.get("NoNewPrivileges") == "yes":
            user.append("--no-new-privs")
        return [*args, "--", *user, *(command or u.exec_start), *(extra or [])]

    def prepare(self) -> None:
        """Give the unit's user what systemd would: its state dirs, with StateDirectoryMode."""
        mode = int(self.unit.get("StateDirectoryMode", "0755"), 8)
        for target in self.state_dirs():
            host = self.paths[target]
            host.mkdir(parents=True, exist_ok=True)
            os.chown(host, self.uid, self.gid)
            host.chmod(mode)

    def popen(self, extra: list[str] | None = None, command: list[str] | None = None) -> subprocess.Popen[bytes]:
        assert self.output is not None, "set Sandbox.output"
        self.prepare()
        umask = int(self.unit.get("UMask", "0022"), 8)
        with self.output.open("ab") as out:
            return subprocess.Popen(self.argv(extra, command), env=self.environment(), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, umask=umask, start_new_session=True)

    def text(self) -> str:
        """What the process wrote so far (stdout and stderr, as the journal would have it)."""
        assert self.output is not None
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def run(self, extra: list[str] | None = None, command: list[str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run to completion; the result's stdout is everything written by this run."""
        start = len(self.text())
        proc = self.popen(extra, command)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{shlex.join(command or self.unit.exec_start)} did not finish in {timeout}s:\n"
                                 f"{self.text()[start:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, self.text()[start:], "")

    @contextmanager
    def running(self, extra: list[str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
        """The ExecStart running in the background; on exit SIGTERM to it (as ``systemctl stop``) and a wait
        for it to end (SIGKILL to its session after 45 s, the units' TimeoutStopSec)."""
        proc = self.popen(extra)
        try:
            yield proc
        finally:
            child = _child_of(proc.pid)
            if child is not None:
                os.kill(child, signal.SIGTERM)
            try:
                proc.wait(45)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _child_of(pid: int) -> int | None:
    """The process bwrap started (setpriv exec'd into smt-watch): signals to bwrap are not passed on."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def leftovers(box: Sandbox, name: str = "gpg-agent") -> list[int]:
    """Processes called ``name`` that ``box`` started and that still run (not zombies)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "comm").read_text().strip() != name:
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                continue
            if box.marker.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for sub in path.rglob("*"):
        os.chown(sub, uid, gid, follow_symlinks=False)
