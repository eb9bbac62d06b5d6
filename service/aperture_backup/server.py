"""The gRPC server: BackupService, health checking and reflection.

`create_server` builds and starts a server on the configured address (port 0 picks a free one, for tests)
and returns it with its port; `serve` adds signal handling for the command line.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aperture.backup.v1 import backup_pb2, backup_pb2_grpc

from .app import App
from .auth import AuthInterceptor, TokenAuthenticator
from .config import Config, is_loopback, parse_listen
from .metrics import Metrics, MetricsInterceptor
from .reflection_docs import documented_pool
from .rpc_errors import ErrorInterceptor
from .servicer import BackupServicer

if TYPE_CHECKING:  # cryptography (a tenth of a second of imports) loads only when TLS is configured
    from .tls import ReloadableServerCredentials

_logger = logging.getLogger(__name__)

SERVICE_NAME = backup_pb2.DESCRIPTOR.services_by_name["BackupService"].full_name
HEALTH_INTERVAL_SECONDS = 5.0
#: Large archives stream in chunks of up to 4 MiB; leave room for the message around a chunk.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
WORKERS = 16
#: How long a thread may hold the interpreter while another waits for it (Python's default: 5 ms). A call
#: passes through several threads (gRPC's poller, a worker, the poller again), each waiting for the
#: interpreter while a backup's threads use it. Measured with 20 callers of List and GetStatus while a
#: backup ran (1,000 archives, 2 cores): p99 45-62 ms at 5 ms against 22-48 ms at 0.2 ms, medians 11-20
#: against 7-12 ms (four runs each, 2026-12-04). It was withdrawn once as the suspect of serve processes
#: that did not stop on SIGTERM; that was a signal handed to another thread (`SignalInbox`).
SWITCH_INTERVAL_SECONDS = 0.0002


class HealthMonitor:
    """SERVING only while the database answers: a backup service that cannot reach its database is not
    healthy, and an orchestrator should know."""

    def __init__(self, app: App, servicer: health.HealthServicer, interval: float = HEALTH_INTERVAL_SECONDS):
        self._app = app
        self._servicer = servicer
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
        self._last: bool | None = None

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for name in ("", SERVICE_NAME):
            self._servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def check(self) -> None:
        ok = self._app.database.ping()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self._servicer.set(name, status)
        if ok != self._last:
            log = _logger.info if ok else _logger.warning
            log("health: %s is %s", self._app.database.describe(), "reachable" if ok else "NOT reachable")
            self._last = ok

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    app: App
    health: HealthMonitor
    tls: ReloadableServerCredentials | None = None
    metrics: Metrics | None = None
    metrics_port: int = 0

    def reload_tls(self) -> bool:
        """Re-read the TLS certificate and key (SIGHUP); False when TLS is off or the new files are bad."""
        return self.tls.reload() if self.tls is not None else False

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, cancel a running job (its partial archive is removed), stop the app."""
        self.health.stop()
        if self.metrics is not None:
            self.metrics.stop()
        stopped = self.server.stop(grace)
        self.app.stop()
        stopped.wait(grace)


def create_server(config: Config, *, app: App | None = None, start_scheduler: bool = True) -> RunningServer:
    """Build and start the server; the returned port is the one actually bound. Raises ConfigError when
    the TLS files cannot be used, before anything starts."""
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        from .tls import ReloadableServerCredentials, TlsFiles

        tls = ReloadableServerCredentials(TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca))
    host, port = parse_listen(config.listen)
    _warn_about_exposure(config, host, tls)
    metrics = Metrics() if config.metrics_listen else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="rpc"),
        # Errors outermost, so that a refused token reaches the caller like any other domain error.
        interceptors=[
            *([MetricsInterceptor(metrics)] if metrics is not None else []),
            ErrorInterceptor(),
            AuthInterceptor(TokenAuthenticator(config.token, config.read_token)),
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT by default, so a second instance on the same address would "listen"
            # too and take half the calls; without it, that instance fails to bind, as it should.
            ("grpc.so_reuseport", 0),
        ],
    )
    # Bind before the app starts: an instance that cannot listen must not sweep the backup directory or
    # start a database that another instance is using.
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError:  # newer gRPC raises where older ones returned 0
        bound = 0
    if bound == 0:
        raise OSError(
            f"cannot listen on {config.listen}: the address is in use (another aperture-backup?) or not "
            "available on this machine; stop the other program or set APERTURE_BACKUP_LISTEN"
        )
    try:
        app = app or App.build(config)
        app.start(scheduler=start_scheduler)
    except BaseException:
        server.stop(None)
        raise
    metrics_port = 0
    if metrics is not None:
        metrics.attach(app)
        metrics_host, wanted = parse_listen(config.metrics_listen or "", variable="APERTURE_BACKUP_METRICS_LISTEN")
        try:
            metrics_port = metrics.serve(metrics_host, wanted)
        except OSError as exc:
            server.stop(None)
            app.stop()
            raise OSError(f"cannot serve metrics on {config.metrics_listen}: {exc.strerror or exc}") from None
    backup_pb2_grpc.add_BackupServiceServicer_to_server(BackupServicer(app), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
        pool=documented_pool(),
    )
    server.start()
    monitor = HealthMonitor(app, health_servicer)
    monitor.start()
    transport = ("mutual TLS" if tls.mutual else "TLS") if tls else "plaintext"
    callers = "tokens" if config.token else "client certificates" if config.authenticated else "no authentication"
    _logger.info("aperture-backup listening on %s:%d (%s, %s)", host, bound, transport, callers)
    return RunningServer(server, bound, app, monitor, tls, metrics, metrics_port)


def _warn_about_exposure(config: Config, host: str, tls: ReloadableServerCredentials | None) -> None:
    """Say at every start what an operator chose that leaves the data less protected."""
    if is_loopback(host):
        return
    if not config.authenticated:
        _logger.warning(
            "APERTURE_BACKUP_INSECURE is set: anyone who reaches %s can download, delete and restore the "
            "whole database without a token; set APERTURE_BACKUP_TOKEN_FILE unless something in front of "
            "the service authenticates callers",
            config.listen,
        )
    elif tls is None:
        _logger.warning(
            "serving %s without TLS: tokens and archives cross the network in clear text; set "
            "APERTURE_BACKUP_TLS_CERT and APERTURE_BACKUP_TLS_KEY unless the network is private",
            config.listen,
        )


class SignalInbox:
    """The signals the command line acts on, read one at a time by the main thread.

    Python runs a signal's handler only in the main thread, and only when that thread runs bytecode. The
    kernel may deliver a process's signal to any of its threads (pg_dump's, gRPC's, the compressor's): a
    main thread blocked in `Event.wait()` is then never interrupted and the handler never runs, so SIGTERM
    was sometimes ignored. Here the C-level handler writes each signal's number into a socket
    (`signal.set_wakeup_fd`) from whichever thread it lands on, and the main thread blocks reading that
    socket, which wakes it whatever the thread."""

    def __init__(self, signums: tuple[signal.Signals, ...]) -> None:
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous = {signum: signal.signal(signum, self._ignore) for signum in signums}

    @staticmethod
    def _ignore(signum: int, frame: FrameType | None) -> None:
        """A Python-level handler must exist for the wakeup byte to be written; the work is in `next`."""

    def next(self) -> signal.Signals:
        """Block until one of the signals arrives; signals that came earlier are returned in order."""
        while True:
            data = self._reader.recv(1)
            if data and data[0] in self._previous:
                return signal.Signals(data[0])

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()


def freeze_start_up_objects() -> None:
    """Leave what start-up made (modules, the gRPC server, the protobuf and S3 clients' models: several
    hundred thousand objects that live as long as the process) out of every later garbage collection. A full
    collection walks every tracked object while holding the interpreter lock, so every call in flight
    waits for it: with a bucket configured it took 40-56 ms, once per backup, measured."""
    gc.collect()
    gc.freeze()


def tune_interpreter() -> None:
    """Settings of the interpreter for a serving process (the whole process: `serve` calls this, tests that
    build a server with `create_server` keep theirs)."""
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then stop cleanly: no half-written archive is left behind. SIGHUP
    re-reads the TLS certificate and key."""
    tune_interpreter()
    # Before the server starts: a stop asked for while it starts is honoured once it has started.
    inbox = SignalInbox((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    try:
        running = create_server(config)
        freeze_start_up_objects()
        while (signum := inbox.next()) == signal.SIGHUP:
            if running.tls is None:
                _logger.info("received SIGHUP; ignored: TLS is not configured")
            else:
                _logger.info("received SIGHUP; reloading the TLS certificate")
                running.reload_tls()
        _logger.info("received %s; shutting down", signum.name)
        running.stop()
    finally:
        inbox.close()
    _logger.info("stopped")
