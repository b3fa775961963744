"""``doctor``'s host checks: old units that would run beside smt-watch, and ports another process holds.

IntelliWatt's droplet keeps its old SMT units alive on its own: ``intelliwatt-ensure-services.timer`` enables
and starts ``smt-ingest.timer``, ``smt-ingest.service`` and the Node ``smt-upload-server.service`` every two
minutes when they are installed, and every deploy of the web app copies the Node unit back into
``/etc/systemd/system`` and starts it. A unit that is merely disabled comes back; only a masked one stays off
(docs/operator.md "Migrating from fetch_and_post.sh"). The old webhook bridge (``smt-webhook.service``) listens on its
``PORT`` (8787 unless a drop-in moves it), the port ``serve``'s webhook listener wants.

This is the only module that asks systemd (one ``systemctl show`` call, the binary found on ``PATH``) and reads
``/proc/net``. Where systemd is not running (a container, CI) the unit checks say so and pass; the port checks
need only ``/proc``. Each finding is a ``(status, name, detail, hint)`` tuple: ``doctor`` turns it into a
line, and every FAIL's hint is the command that fixes it.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from smt_watch.config import Settings

OK, WARN, FAIL = "ok", "warn", "FAIL"
Finding = tuple[str, str, str, str]  # (status, name, detail, hint): doctor.Check's fields, in that order

UNIT_DIR = "/etc/systemd/system"  # where IntelliWatt's deploy script copies its units, and masks live
OLD_UNITS = ("smt-ingest.timer", "smt-ingest.service", "smt-upload-server.service")
NODE_UNIT = "smt-upload-server.service"  # re-installed and started by every deploy (apply_droplet_services.sh)
BRIDGE_UNIT = "smt-webhook.service"
BRIDGE_DEFAULT_PORT = 8787  # webhook_server.py: int(os.environ.get("PORT", "8787")), on 0.0.0.0
BRIDGE_MOVED_PORT = 8788  # where docs/operator.md's migration moves it
BRIDGE_DROPIN = f"{UNIT_DIR}/{BRIDGE_UNIT}.d/smt-watch-port.conf"  # the deploy script rewrites override.conf only
ENSURE_TIMER = "intelliwatt-ensure-services.timer"
SERVE_UNIT = "smt-watch-serve.service"
SYSTEMD_BOOTED = "/run/systemd/system"  # exists iff systemd is PID 1 (sd_booted(3))
SYSTEMCTL_TIMEOUT = 15.0  # seconds; systemctl show answers in milliseconds when systemd is healthy
RUNNING = frozenset({"active", "activating", "reloading", "deactivating", "refreshing"})
ENABLED = frozenset({"enabled", "enabled-runtime", "linked", "linked-runtime", "alias"})
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


@dataclass(frozen=True)
class UnitState:
    """What ``systemctl show`` says of one unit (``load`` is ``not-found`` for a unit that is not installed)."""

    name: str
    load: str = "not-found"
    file_state: str = ""
    active: str = "inactive"
    main_pid: int = 0
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def installed(self) -> bool:
        return self.load not in ("not-found", "masked")

    @property
    def running(self) -> bool:
        return self.active in RUNNING


class SystemdUnavailable(Exception):
    """``systemctl`` is missing or cannot reach systemd (no systemd as PID 1: a container, CI)."""


def _parse_environment(value: str) -> dict[str, str]:
    """``Environment=`` as ``systemctl show`` prints it: space-separated ``KEY=VALUE``, quoted when needed."""
    try:
        words = shlex.split(value)
    except ValueError:
        words = value.split()
    return dict(word.split("=", 1) for word in words if "=" in word)


def parse_show(text: str) -> list[UnitState]:
    """``systemctl show`` output: one block of ``Key=Value`` lines per unit, blocks separated by a blank line."""
    states: list[UnitState] = []
    for block in text.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if not props.get("Id"):
            continue
        pid = props.get("MainPID", "0")
        states.append(UnitState(
            name=props["Id"], load=props.get("LoadState", "not-found") or "not-found",
            file_state=props.get("UnitFileState", ""), active=props.get("ActiveState", "inactive") or "inactive",
            main_pid=int(pid) if pid.isdigit() else 0,
            environment=_parse_environment(props.get("Environment", ""))))
    return states


def query_units(units: Sequence[str]) -> dict[str, UnitState]:
    """One ``systemctl show`` for all ``units``; a unit systemd does not know comes back as not-found."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise SystemdUnavailable("systemctl is not installed")
    try:
        proc = subprocess.run(
            [systemctl, "show", "--no-pager", "-p", "Id,LoadState,UnitFileState,ActiveState,MainPID,Environment",
             "--", *units], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemdUnavailable(f"systemctl show failed: {exc}") from exc
    found = {state.name: state for state in parse_show(proc.stdout)}
    if proc.returncode != 0 or not found:
        reason = (proc.stderr.strip().splitlines() or [f"systemctl show exited {proc.returncode}"])[0]
        raise SystemdUnavailable(reason)
    return {unit: found.get(unit, UnitState(unit)) for unit in units}


# --- the old units ---------------------------------------------------------------------------------------


def mask_command(unit: str, state: UnitState) -> str:
    """Stop it, take the deploy script's copy out of /etc/systemd/system (mask refuses while it is there), mask."""
    if state.load == "not-found":
        return f"sudo systemctl mask {unit}"
    return (f"sudo systemctl disable --now {unit} && sudo rm -f {UNIT_DIR}/{unit} && "
            f"sudo systemctl mask {unit} && sudo systemctl daemon-reload")


def unit_findings(units: dict[str, UnitState]) -> Iterator[Finding]:
    ensure = units[ENSURE_TIMER]
    ensure_on = ensure.running or ensure.file_state in ENABLED
    for name in OLD_UNITS:
        state = units[name]
        label = f"old unit {name}"
        if state.running and state.load == "masked":
            yield FAIL, label, f"masked but still {state.active} (pid {state.main_pid or '?'})", \
                f"sudo systemctl stop {name}"
        elif state.running:
            yield FAIL, label, f"{state.active}: it runs beside smt-watch", mask_command(name, state)
        elif state.load == "masked":
            yield OK, label, "masked", ""
        elif state.load == "not-found" and name == NODE_UNIT and ensure.load != "not-found":
            yield FAIL, label, (f"not masked: IntelliWatt's deploy ({ENSURE_TIMER} is installed) copies it into "
                                f"{UNIT_DIR} and starts it"), mask_command(name, state)
        elif state.load == "not-found":
            yield OK, label, "not installed", ""
        elif state.file_state in ENABLED:
            yield FAIL, label, f"{state.file_state}: it starts beside smt-watch", mask_command(name, state)
        elif ensure_on:
            yield FAIL, label, (f"installed and not masked: {ENSURE_TIMER} enables and starts it within "
                                "2 minutes"), mask_command(name, state)
        else:
            yield OK, label, f"installed, {state.file_state or 'disabled'} and {state.active}", ""


def bridge_findings(s: Settings, units: dict[str, UnitState]) -> Iterator[Finding]:
    """The old bridge's ``PORT`` against serve's webhook port, and SMT_WEBHOOK_FORWARD_URL against the bridge."""
    bridge = units[BRIDGE_UNIT]
    webhook_port = s.webhook_port
    if not bridge.installed or webhook_port is None:
        return
    raw = bridge.environment.get("PORT", str(BRIDGE_DEFAULT_PORT))
    port = int(raw) if raw.isdigit() else BRIDGE_DEFAULT_PORT
    if port == webhook_port:
        yield FAIL, "bridge", (f"{BRIDGE_UNIT} (the old webhook bridge) listens on PORT={port}, the port "
                               f"serve's webhook wants (SMT_WEBHOOK_PORT)"), move_bridge_command()
        return
    forward = s.webhook_forward_url
    parts = urlsplit(forward) if forward else None
    forward_port = (parts.port or (443 if parts.scheme == "https" else 80)) if parts else None
    if forward is None:
        yield WARN, "bridge", (f"{BRIDGE_UNIT} listens on PORT={port} but SMT_WEBHOOK_FORWARD_URL is not set: "
                               "the app's other webhook routes and reasons reach nothing"), \
            f"set SMT_WEBHOOK_FORWARD_URL=http://127.0.0.1:{port} in the env file"
    elif forward_port != port:
        yield FAIL, "bridge", (f"SMT_WEBHOOK_FORWARD_URL points at port {forward_port}, but {BRIDGE_UNIT} "
                               f"listens on PORT={port}"), \
            f"set SMT_WEBHOOK_FORWARD_URL=http://127.0.0.1:{port} in the env file"
    else:
        yield OK, "bridge", f"{BRIDGE_UNIT} on PORT={port}, serve's webhook on {webhook_port}, forwarding to it", ""


def move_bridge_command(port: int = BRIDGE_MOVED_PORT) -> str:
    return (f"sudo mkdir -p {UNIT_DIR}/{BRIDGE_UNIT}.d && printf '[Service]\\nEnvironment=PORT={port}\\n' | "
            f"sudo tee {BRIDGE_DROPIN} && sudo systemctl daemon-reload && sudo systemctl restart {BRIDGE_UNIT}"
            f" (and SMT_WEBHOOK_FORWARD_URL=http://127.0.0.1:{port})")


# --- ports -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket from ``/proc/net/tcp`` or ``tcp6``."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    inode: int


def _hex_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net's addresses are the kernel's 32-bit words printed in host (little-endian) byte order."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.IPv4Address(words) if len(words) == 4 else ipaddress.IPv6Address(words)


def listeners(proc: Path = Path("/proc")) -> list[Listener]:
    found: list[Listener] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != LISTEN:
                continue
            address, _, port = cols[1].partition(":")
            found.append(Listener(_hex_address(address), int(port, 16), int(cols[9])))
    return found


def _covers(listening: ipaddress.IPv4Address | ipaddress.IPv6Address, wanted: str) -> bool:
    """Would binding ``wanted`` collide with a socket listening on ``listening`` (same port)?"""
    try:
        want = ipaddress.ip_address(wanted)
    except ValueError:
        return True  # a host name: assume it resolves to something that collides
    if isinstance(listening, ipaddress.IPv6Address) and listening.ipv4_mapped is not None:
        listening = listening.ipv4_mapped
    return listening.is_unspecified or want.is_unspecified or listening == want


def socket_owners(inodes: Iterable[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """inode → pid for the sockets among ``inodes`` whose owner this user may see (``/proc/<pid>/fd``)."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    owners: dict[int, int] = {}
    for entry in proc.iterdir():
        if len(owners) == len(wanted):
            break
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:
            continue  # another user's process, or gone
        for fd in fds:
            try:
                target = os.readlink(entry / "fd" / fd)
            except OSError:
                continue
            if target in wanted:
                owners[wanted[target]] = int(entry.name)
    return owners


def command_line(pid: int, proc: Path = Path("/proc")) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_serve(argv: Sequence[str]) -> bool:
    """smt-watch's own ``serve``: ``…/smt-watch serve`` or ``python -m smt_watch serve``."""
    names = {Path(arg).name for arg in argv}
    return bool(names & {"smt-watch", "smt_watch"}) and "serve" in argv


def wanted_ports(s: Settings) -> list[tuple[str, str, int]]:
    """(setting, address, port) for each port serve listens on."""
    ports = [("SMT_UPLOAD_PORT", s.upload_host, s.upload_port)]
    if s.webhook_port:
        ports.append(("SMT_WEBHOOK_PORT", s.webhook_host, s.webhook_port))
    return [p for p in ports if p[2]]


def port_findings(s: Settings, units: dict[str, UnitState] | None, proc: Path = Path("/proc")) -> Iterator[Finding]:
    """Each port serve needs: free, or held by serve itself; else FAIL naming the holder and its unit."""
    table = listeners(proc)
    unit_of = {u.main_pid: u for u in (units or {}).values() if u.main_pid}
    serve_unit = (units or {}).get(SERVE_UNIT)
    for setting, host, port in wanted_ports(s):
        label = f"port {port}"
        holders = [lst for lst in table if lst.port == port and _covers(lst.address, host)]
        if not holders:
            yield OK, label, f"free for serve ({setting}, {host})", ""
            continue
        owners = socket_owners({h.inode for h in holders}, proc)
        pids = sorted(set(owners.values()))
        own = [pid for pid in pids if is_serve(command_line(pid, proc))
               or (serve_unit is not None and pid == serve_unit.main_pid)]
        others = [pid for pid in pids if pid not in own]
        if others:
            pid = others[0]
            argv = _shown_command(command_line(pid, proc))
            unit = unit_of.get(pid)
            where = f" ({unit.name})" if unit else ""
            yield FAIL, label, f"{setting} {port} is held by pid {pid}{where}: {argv}", _free_hint(
                unit.name if unit else None, setting, port)
        elif own:
            yield OK, label, f"held by smt-watch serve (pid {own[0]})", ""
        elif serve_unit is not None and serve_unit.running:
            yield WARN, label, (f"{setting} {port} is in use by a process this user cannot see; "
                                f"{SERVE_UNIT} is running, probably it"), f"sudo ss -ltnp 'sport = :{port}'"
        else:
            yield FAIL, label, f"{setting} {port} is in use by a process this user cannot see", \
                f"sudo ss -ltnp 'sport = :{port}' names it; stop it or choose another {setting}"


def _shown_command(argv: Sequence[str], limit: int = 160) -> str:
    """The holder's command line; too long, its paths by their base names (the arguments say what it is)."""
    text = " ".join(argv)
    if len(text) > limit:
        text = " ".join(Path(arg).name if arg.startswith("/") else arg for arg in argv)
    return text[:limit] or "?"


def _free_hint(unit: str | None, setting: str, port: int) -> str:
    if unit == BRIDGE_UNIT:
        return move_bridge_command()
    if unit in OLD_UNITS:
        return mask_command(unit, UnitState(unit, load="loaded"))
    if unit:
        return f"sudo systemctl stop {unit}, or choose another {setting}"
    return f"stop it, or choose another {setting}"


# --- doctor's entry point --------------------------------------------------------------------------------


def checks(s: Settings, proc: Path = Path("/proc"), booted: Path = Path(SYSTEMD_BOOTED)) -> Iterator[Finding]:
    """Every host finding, the unit checks first (their one systemctl call also names ports' holders)."""
    units: dict[str, UnitState] | None
    try:
        units = query_units((*OLD_UNITS, ENSURE_TIMER, BRIDGE_UNIT, SERVE_UNIT))
    except SystemdUnavailable as exc:
        units = None
        if booted.is_dir():  # sd_booted(): systemd runs here, this user cannot ask it
            yield WARN, "systemd", f"cannot ask systemd ({exc}): old-unit and bridge checks skipped", \
                "run doctor as root: sudo /opt/smt-watch/bin/smt-watch doctor --env-file /etc/default/intelliwatt-smt"
        else:
            yield OK, "systemd", f"not running here ({exc}): old-unit and bridge checks skipped", ""
    if units is not None:
        yield from unit_findings(units)
        yield from bridge_findings(s, units)
    yield from port_findings(s, units, proc)
