"""Delivery: sinks that take one file from the ledger to IntelliWatt (docs/contract.md §4).

The package, one job per module (the shape of Vector's ``src/sinks``):

- :mod:`.base`      the :class:`Sink` protocol and what flows through it (Payload, Body, Delivered), the
                    default :func:`~.base.classify` of a response; no httpx
- :mod:`.stream`    verified streaming: a file's bytes, never sent complete unless they are the bytes hashed
- :mod:`.http`      the one poster: keep-alive client, in-call retries, transport-error mapping, backoff
- :mod:`.multipart`, :mod:`.inline`, :mod:`.rawupload`   one sink per mode
- :mod:`.registry`  what the modes (one line each in ``config.MODES``, sinks named by string) do: the
                    ``auto`` rule, the own-``serve`` refusal, building a sink; doctor and the CLI help read it

Callers build a sink once (``make_sink(settings, delivery_mode(settings), chunks=ledger)``), call
``sink.send(payload, progress)`` per file and ``sink.close()`` at the end. Adding a mode is one sink module
and one line in ``config.MODES``.
"""

from smt_watch.delivery.base import Delivered, Payload, Progress, Sink
from smt_watch.delivery.registry import MODES, delivery_mode, make_sink

__all__ = ["MODES", "Delivered", "Payload", "Progress", "Sink", "delivery_mode", "make_sink"]
