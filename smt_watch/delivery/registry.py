"""The delivery modes, one line each: what a mode needs, where it posts, its token, and its sink.

Everything that depends on the set of modes reads it from :data:`MODES`: ``SMT_DELIVERY``'s choices
(``config``), the ``auto`` rule and its errors (:func:`delivery_mode`), ``doctor``'s report and reachability
check, and the ``--delivery`` help. Adding a mode is one sink module and one line here.

An entry names its sink as ``"module:Class"`` under ``smt_watch.delivery``, imported only when a sink is
built: ``config`` reads this module at import time and must not load httpx.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from smt_watch.delivery.base import ChunkStore, Sink, SinkContext
from smt_watch.errors import ConfigError, DeliveryError

if TYPE_CHECKING:
    from smt_watch.config import Secret, Settings

log = logging.getLogger("smt_watch.delivery")

LEGACY_INLINE_WARNING: Final = "SMT_UPLOAD_URL not configured; will attempt legacy inline POST"


@dataclass(frozen=True)
class Setting:
    """A setting a mode reads: its :class:`~smt_watch.config.Settings` field and the variable that sets it."""

    field: str
    env: str

    def value(self, settings: Settings) -> object:
        return getattr(settings, self.field)


UPLOAD_URL: Final = Setting("upload_url", "SMT_UPLOAD_URL")
UPLOAD_TOKEN: Final = Setting("upload_token", "SMT_UPLOAD_TOKEN")
BASE_URL: Final = Setting("base_url", "INTELLIWATT_BASE_URL")
ADMIN_TOKEN: Final = Setting("admin_token", "ADMIN_TOKEN")


@dataclass(frozen=True)
class Mode:
    """One delivery mode. ``auto``: the ``auto`` rule may pick it (in registry order) when ``needs`` is set,
    logging ``warning`` when it does."""

    name: str
    needs: Setting  # the target setting it cannot run without
    url: Callable[[Settings], str]  # where it posts, derived from the settings
    token: Setting  # the credential it sends
    sink: str  # "module:Class" under smt_watch.delivery
    auto: bool = False
    warning: str = ""

    def build(self, settings: Settings, *, chunks: ChunkStore | None = None, announce: bool = True) -> Sink:
        module, _, name = self.sink.partition(":")
        factory: Callable[[SinkContext], Sink] = getattr(importlib.import_module(f"smt_watch.delivery.{module}"), name)
        return factory(SinkContext(settings, self.url(settings), self.secret(settings), chunks, announce))

    def secret(self, settings: Settings) -> Secret | None:
        """The token it sends (None: not set)."""
        token: Secret | None = getattr(settings, self.token.field)
        return token


MODES: Final[Mapping[str, Mode]] = MappingProxyType({m.name: m for m in (
    Mode("multipart", UPLOAD_URL, lambda s: s.upload_url or "", UPLOAD_TOKEN, "multipart:MultipartSink", auto=True),
    Mode("inline", BASE_URL, lambda s: f"{s.base_url}/api/admin/smt/pull", ADMIN_TOKEN, "inline:InlineSink",
         auto=True, warning=LEGACY_INLINE_WARNING),
    Mode("raw-upload", BASE_URL, lambda s: f"{s.base_url}/api/admin/smt/raw-upload", ADMIN_TOKEN,
         "rawupload:RawUploadSink"),
)})


def choices() -> tuple[str, ...]:
    """``SMT_DELIVERY``'s values: ``auto``, then every mode."""
    return ("auto", *MODES)


def choices_text() -> str:
    """The choices as a person reads them: ``auto, multipart, inline or raw-upload``."""
    *head, last = choices()
    return f"{', '.join(head)} or {last}"


def auto_targets() -> str:
    """What the ``auto`` rule looks for: ``SMT_UPLOAD_URL (multipart) or INTELLIWATT_BASE_URL (inline)``."""
    return " or ".join(f"{m.needs.env} ({m.name})" for m in MODES.values() if m.auto)


def delivery_mode(settings: Settings) -> str:
    """The delivery mode the ``auto`` rule of docs/contract.md §1 picks, checking that its target is
    configured.

    Only commands that deliver call this, so ``sync`` works without any delivery target.
    """
    name = settings.delivery
    if name == "auto":
        picked = next((m for m in MODES.values() if m.auto and m.needs.value(settings)), None)
        if picked is None:
            raise ConfigError(f"no delivery target: set {auto_targets()}")
        if picked.warning:
            log.warning(picked.warning)
        name = picked.name
    mode = MODES[name]
    if not mode.needs.value(settings):
        raise ConfigError(f"SMT_DELIVERY={name} needs {mode.needs.env}")
    return name


def make_sink(settings: Settings, mode: str, *, chunks: ChunkStore | None = None, announce: bool = True) -> Sink:
    """The sink for ``mode`` (a name :func:`delivery_mode` returned). ``chunks``: the ledger, for a sink that
    resumes a file in parts; ``announce=False`` leaves out its start line (a watch worker process)."""
    if mode not in MODES:
        raise DeliveryError(f"delivery mode {mode!r} is not available")
    return MODES[mode].build(settings, chunks=chunks, announce=announce)
