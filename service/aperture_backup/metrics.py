"""Prometheus metrics (PyPI `prometheus-client`) on `APERTURE_BACKUP_METRICS_LISTEN`, off by default.

Counters and the duration histogram are updated as jobs end and calls return; the gauges are read from
the archive store and the job slot at each scrape, so they are never stale. Each server has a registry of
its own (tests run several in one process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .app import App
from .compression import INFLATED
from .jobs import Job, JobSlot
from .model import Compression, Location, State
from .notify import Notifier
from .offsite import Offsite
from .rpc_handlers import Behavior, rewrap
from .storage.catalog import Archives

_logger = logging.getLogger(__name__)

#: Backups and restores take seconds to hours.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, float("inf"))


class _StateCollector(Collector):
    """Gauges computed from the store, the job slot and the notifier when scraped."""

    def __init__(self, archives: Archives, slot: JobSlot, offsite: Offsite | None, notifier: Notifier | None = None):
        self._archives = archives
        self._slot = slot
        self._offsite = offsite
        self._notifier = notifier

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        backups = self._archives.list_backups()
        ready = [b for b in backups if b.state is State.READY]
        newest = ready[0] if ready else None
        last_success = GaugeMetricFamily(
            "aperture_backup_last_success_timestamp_seconds",
            "When the newest READY backup finished (Unix time); 0 when there is none.",
        )
        finished = newest.create_time.timestamp() + (newest.duration_seconds or 0.0) if newest else 0.0
        last_success.add_metric([], finished)
        yield last_success
        verified = [b.verification for b in backups if b.verification is not None]
        last_verify = GaugeMetricFamily(
            "aperture_backup_last_verify_timestamp_seconds",
            "When a backup was last verified (restored into a scratch database and checked), whatever the "
            "outcome (Unix time); 0 when none was.",
        )
        last_verify.add_metric([], max((v.time.timestamp() for v in verified), default=0.0))
        yield last_verify
        last_verify_success = GaugeMetricFamily(
            "aperture_backup_last_verify_success_timestamp_seconds",
            "When a verification last passed (Unix time); 0 when none did. Below "
            "aperture_backup_last_verify_timestamp_seconds: the last verification failed.",
        )
        last_verify_success.add_metric([], max((v.time.timestamp() for v in verified if v.passed), default=0.0))
        yield last_verify_success
        newest_bytes = GaugeMetricFamily("aperture_backup_newest_archive_bytes", "Size of the newest READY archive.")
        newest_bytes.add_metric([], float(newest.size_bytes) if newest else 0.0)
        yield newest_bytes
        archives = GaugeMetricFamily(
            "aperture_backup_archives", "READY archives, by where they are.", labels=["location"]
        )
        for location in Location:
            archives.add_metric([location.value], float(sum(location in b.locations for b in ready)))
        yield archives
        pending = GaugeMetricFamily(
            "aperture_backup_offsite_pending", "READY archives of the directory not yet copied to the bucket."
        )
        pending.add_metric([], float(len(self._offsite.pending())) if self._offsite is not None else 0.0)
        yield pending
        running = GaugeMetricFamily(
            "aperture_backup_job_running", "1 while a backup, restore or verification runs, by kind.", labels=["kind"]
        )
        job = self._slot.current
        for kind in ("backup", "restore", "verify"):
            running.add_metric([kind], 1.0 if job is not None and job.kind.value == kind else 0.0)
        yield running
        if self._notifier is not None and self._notifier.enabled:
            # A notifier that cannot deliver is the one failure it cannot tell itself: let Prometheus.
            delivery = self._notifier.status()
            pending = GaugeMetricFamily(
                "aperture_backup_notifications_pending", "Notifications waiting to be sent or tried again."
            )
            pending.add_metric([], float(delivery.pending))
            yield pending
            given_up = CounterMetricFamily(
                "aperture_backup_notifications_given_up",
                "Notifications given up after their last delivery attempt, since the service started.",
            )
            given_up.add_metric([], float(delivery.given_up))
            yield given_up
        inflated = CounterMetricFamily(
            "aperture_backup_inflated_bytes",
            "Compressed bytes decompressed since the process started (upload checks, restores, "
            "verifications), by compression: the CPU archives cost to read.",
            labels=["compression"],
        )
        counts = INFLATED.snapshot()
        for compression in (Compression.GZIP, Compression.ZSTD):
            inflated.add_metric([compression.value], float(counts.get(compression, 0)))
        yield inflated


class Metrics:
    """The service's metrics and, once `serve()`d, the HTTP endpoint that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "aperture_backup_runs",
            "Backups and restores that ended, by kind, trigger and result (success, failure, cancelled).",
            ["kind", "trigger", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "aperture_backup_duration_seconds",
            "How long backups and restores took, by kind.",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.calls = Counter(
            "aperture_backup_grpc_requests",
            "gRPC calls that ended, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self._server: Any = None
        self._lock = threading.Lock()

    def attach(self, app: App) -> None:
        """Read the app's state at each scrape, and count its jobs as they end."""
        self.registry.register(_StateCollector(app.archives, app.slot, app.offsite, app.notifier))
        app.slot.on_end.append(self.job_ended)

    def job_ended(self, job: Job) -> None:
        if job.error is None:
            result = "success"
        elif job.error.reason == "CANCELLED":
            result = "cancelled"
        else:
            result = "failure"
        self.runs.labels(job.kind.value, job.trigger.value, result).inc()
        self.duration.labels(job.kind.value).observe(job.elapsed())

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (`/metrics`); the port it listens on."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        with self._lock:
            self._server = server
        bound = int(server.server_address[1])
        _logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call by method and the status code it ended with (outermost, so it sees the code the
    error mapping set)."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rpartition("/")[2]
        count = self._metrics.calls

        def record(context: grpc.ServicerContext) -> None:
            code = context.code()  # type: ignore[attr-defined]
            name = code.name if isinstance(code, grpc.StatusCode) else "OK" if code in (None, 0) else str(code)
            count.labels(method, name).inc()

        def unary(behavior: Behavior) -> Behavior:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behavior(request, context)
                finally:
                    record(context)

            return wrapper

        def stream(behavior: Behavior) -> Behavior:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behavior(request, context)
                finally:
                    record(context)

            return wrapper

        return rewrap(handler, unary=unary, stream=stream)
