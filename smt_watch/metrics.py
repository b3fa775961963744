"""Prometheus metrics for ``watch`` (``--metrics-port``), in a private registry (no globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from smt_watch.limits import OutboundStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 5, 10, 30, 60, 300, 900)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.delivered = Counter("smt_watch_files_delivered", "Files delivered (2xx)", ["mode"], registry=r)
        self.duplicates = Counter("smt_watch_files_duplicate", "Files skipped as already sent", registry=r)
        self.failed = Counter("smt_watch_files_failed", "Files refused by the target", ["mode"], registry=r)
        self.retried = Counter("smt_watch_files_retried", "Deliveries left to retry later", ["mode"], registry=r)
        self.bytes = Counter("smt_watch_bytes_delivered", "Bytes of files delivered", ["mode"], registry=r)
        self.latency = Histogram(
            "smt_watch_delivery_latency_seconds", "From file ready to 2xx", buckets=LATENCY_BUCKETS, registry=r
        )
        self.verdicts = Counter("smt_watch_verdicts", "Files verified in the app, by verdict", ["verdict"],
                                registry=r)
        self.queue_depth = Gauge("smt_watch_queue_depth", "Files waiting to be delivered", registry=r)
        self.last_success = Gauge(
            "smt_watch_last_success_timestamp_seconds", "Unix time of the last delivery", registry=r
        )

    def outbound(self, read: Callable[[], OutboundStats]) -> None:
        """The outbound limit's node-wide counters (smt_watch/limits.py keeps them in files, so requests
        from worker processes count too), read when scraped."""
        self.registry.register(_Outbound(read))

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


class _Outbound(Collector):
    def __init__(self, read: Callable[[], OutboundStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        yield CounterMetricFamily("smt_watch_outbound_throttled_requests",
                                  "Requests toward the app that waited for the outbound limit", value=stats.waited)
        yield CounterMetricFamily("smt_watch_outbound_wait_seconds",
                                  "Seconds requests waited for the outbound limit", value=stats.wait_seconds)
        if stats.in_flight is not None:
            yield GaugeMetricFamily("smt_watch_outbound_in_flight",
                                    "Requests toward the app out now (this node's in-flight slots held)",
                                    value=stats.in_flight)
