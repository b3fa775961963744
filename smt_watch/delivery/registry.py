"""What the delivery modes do with the settings: the ``auto`` rule, the own-``serve`` refusal, the sinks.

The modes themselves are one line each in :data:`smt_watch.config.MODES` (what a mode needs, where it
posts, its token, and its sink named by ``"module:Class"`` under ``smt_watch.delivery``), as uvicorn's
config names its protocols by string: ``config`` stays the leaf that every module may import, and a
sink module is imported only here, when a sink is built. Everything that depends on the set of modes
reads that table: ``SMT_DELIVERY``'s choices (``config``), the ``auto`` rule and its errors
(:func:`delivery_mode`), ``doctor``'s report and reachability check, and the ``--delivery`` help. Adding
a mode is one sink module and one line in that table.

The ``auto`` rule (docs/contract.md §1): ``multipart`` when ``SMT_UPLOAD_URL`` is set, else ``raw-upload``
when ``INTELLIWATT_BASE_URL`` is; ``inline`` only when named, because production answers it ``400
INLINE_DISABLED``. Whatever the mode, a target that is smt-watch's own ``serve`` is refused (exit 2): serve
would store the file back in the inbox and answer 202, so every file would be ``sent`` and none would reach
IntelliWatt (:func:`own_serve`).
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

from smt_watch.config import LEGACY_INLINE_WARNING, MODES, UPLOAD_URL, Mode, Settings, redact_url
from smt_watch.delivery.base import ChunkStore, Sink, SinkContext
from smt_watch.errors import ConfigError, DeliveryError

__all__ = ["LEGACY_INLINE_WARNING", "MODES", "Mode", "OwnServeTarget", "auto_targets", "choices", "choices_text",
           "delivery_mode", "make_sink", "own_serve", "refusal"]

log = logging.getLogger("smt_watch.delivery")

PROBE_TIMEOUT: Final = 2.0  # GET /health of a local target: loopback answers in milliseconds or not at all


def choices() -> tuple[str, ...]:
    """``SMT_DELIVERY``'s values: ``auto``, then every mode."""
    return ("auto", *MODES)


def choices_text() -> str:
    """The choices as a person reads them: ``auto, multipart, inline or raw-upload``."""
    *head, last = choices()
    return f"{', '.join(head)} or {last}"


def _auto_order() -> list[Mode]:
    return sorted((m for m in MODES.values() if m.auto), key=lambda m: m.auto)


def auto_targets() -> str:
    """What the ``auto`` rule looks for: ``SMT_UPLOAD_URL (multipart) or INTELLIWATT_BASE_URL (raw-upload)``."""
    return " or ".join(f"{m.needs.env} ({m.name})" for m in _auto_order())


class OwnServeTarget(ConfigError):
    """The delivery target is smt-watch's own ``serve``: ``detail`` says how it was recognised, ``fix`` what
    to do (doctor prints them apart; the CLI prints both on one line, exit 2)."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(f"{detail}; {fix}")
        self.detail, self.fix = detail, fix


def delivery_mode(settings: Settings, *, probe: bool = True) -> str:
    """The delivery mode the ``auto`` rule of docs/contract.md §1 picks, checking that its target is
    configured and is not smt-watch's own ``serve`` (:func:`own_serve`; ``probe``: also ask a local target's
    ``/health``).

    Only commands that deliver call this (``watch`` at start-up, ``post``, ``doctor``), so ``sync`` works
    without any delivery target.
    """
    name = settings.delivery
    if name == "auto":
        picked = next((m for m in _auto_order() if m.needs.value(settings)), None)
        if picked is None:
            raise ConfigError(f"no delivery target: set {auto_targets()}")
        name = picked.name
    mode = MODES[name]
    if not mode.needs.value(settings):
        raise ConfigError(f"SMT_DELIVERY={name} needs {mode.needs.env}")
    url = mode.url(settings)
    why = own_serve(settings, url, probe=probe)
    if why is not None:
        fix = (f"point {mode.needs.env} at IntelliWatt's upload server, or unset it to deliver by raw-upload to "
               "INTELLIWATT_BASE_URL" if mode.needs is UPLOAD_URL else f"point {mode.needs.env} at IntelliWatt")
        raise OwnServeTarget(f"{mode.needs.env} {redact_url(url)} is smt-watch's own serve ({why}): files would "
                             "go back into the inbox and never reach IntelliWatt", fix)
    if mode.warning:
        log.warning(mode.warning)
    return name


def own_serve(settings: Settings, url: str, *, probe: bool = True) -> str | None:
    """How ``url`` is recognised as smt-watch's own ``serve``, or None when it is not.

    Only a host on this machine (``localhost``, a loopback or unspecified address, ``SMT_UPLOAD_HOST``, the host
    name, or an address of one of its interfaces) can be; a remote ``serve`` is left alone (its own ``watch``
    may deliver onward). There a request costs a loopback round trip, so (``probe``) ``GET <origin>/health``
    is asked first: ``service: "smt-watch"`` is serve, whatever the port. Static: the port is
    ``SMT_UPLOAD_PORT``, unless ``/health`` named another service (the Node server says
    ``smt-upload-server``, the reference receiver its own name), so serve not running yet is still caught."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if not host or not _is_this_host(host, settings.upload_host):
        return None
    service = _health_service(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/health") if probe else None
    if service == "smt-watch":
        return f"{host}:{port}/health answers service smt-watch"
    if port == settings.upload_port and service is None:
        return f"port {port} on this host is SMT_UPLOAD_PORT, where serve listens"
    return None


def _is_this_host(host: str, upload_host: str) -> bool:
    name = host.lower().rstrip(".")
    if name in ("localhost", upload_host.lower(), socket.gethostname().lower()) or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False  # another name: resolving it could stall start-up on DNS
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:  # binding succeeds only for an address one of this machine's interfaces holds
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(address), 0))
    except OSError:
        return False
    return True


def _health_service(url: str) -> str | None:
    """The ``service`` a ``/health`` answer names, or None (no answer, not JSON, no name)."""
    import httpx

    from smt_watch.tls import default_trust

    try:
        # plain http loads no CA bundle (~30 ms of CPU); https verifies with the process's one default context
        # (doctor asks this once per check that resolves the mode)
        verify = False if url.lower().startswith("http://") else default_trust(trust_env=False)
        response = httpx.get(url, timeout=PROBE_TIMEOUT, trust_env=False, follow_redirects=False, verify=verify)
        data = response.json()
    except (httpx.HTTPError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return None
    service = data.get("service") if isinstance(data, dict) else None
    return service if isinstance(service, str) and service else None


def refusal(mode: str, kind: str) -> str | None:
    """Why ``mode`` does not send a CSV of ``kind`` (the ledger's ``failed`` reason), or None when it does."""
    if mode not in MODES or kind not in MODES[mode].refuses:
        return None
    return (f"not sent: daily or billing CSV; IntelliWatt's {mode} route reads interval CSVs only (kind {kind}; the old"
            " script and the Node upload server leave these out too)")


def make_sink(settings: Settings, mode: str, *, chunks: ChunkStore | None = None, announce: bool = True,
              stop: threading.Event | None = None) -> Sink:
    """The sink for ``mode`` (a name :func:`delivery_mode` returned). ``chunks``: the ledger, for a sink that
    resumes a file in parts; ``announce=False`` leaves out its start line (a watch worker process); ``stop``, once
    set, ends every wait for the outbound limit (smt_watch/limits.py) without sending."""
    if mode not in MODES:
        raise DeliveryError(f"delivery mode {mode!r} is not available")
    spec = MODES[mode]
    module, _, name = spec.sink.partition(":")
    factory: Callable[[SinkContext], Sink] = getattr(importlib.import_module(f"smt_watch.delivery.{module}"), name)
    return factory(SinkContext(settings, spec.url(settings), spec.secret(settings), chunks, announce, stop))
