"""Assembles the gRPC server: the Generator service, health checking and reflection, and its lifecycle.

The port opens before the models load, with health NOT_SERVING, so orchestrators see the process
come up (calls that arrive meanwhile wait for the models); it turns SERVING once the engine runs, and
back to NOT_SERVING while draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from bild.v1 import bild_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from scheduler.engine import Engine, EngineConfig, EngineFailed
from scheduler.pair import ModelPair
from server.metrics import Metrics
from server.openai_http import HttpFrontEnd
from server.reflection import enable_reflection
from server.security import ApiKeyInterceptor, SecurityConfig
from server.service import GeneratorService, ServiceConfig, add_to_server

log = logging.getLogger(__name__)

SERVICE_NAME = bild_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
# Ask clients' and proxies' keepalive pings to be tolerated on long streams.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


class HealthServicer(health.aio.HealthServicer):
    """grpc's health service, whose Watch streams end (OK) once the server stops taking calls, after
    the last status they watch: they never end by themselves, and a stop waits for every call."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses = {"": health_pb2.HealthCheckResponse.SERVING}  # as the base class starts
        self._changed = asyncio.Condition()
        self._frozen = self._ended = False

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await super().set(service, status)
        if not self._frozen:
            self._statuses[service] = status
        await self._notify()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._frozen = True
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._notify()

    async def end_watches(self) -> None:
        self._ended = True
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        last = None
        async with self._changed:
            while True:
                status = self._statuses.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                if self._ended:
                    return
                await self._changed.wait()


@dataclass
class ServerHandle:
    server: grpc.aio.Server
    port: int
    service: GeneratorService
    health: HealthServicer
    engine: Engine | None = None
    http: HttpFrontEnd | None = None  # the OpenAI API and the page, with --http-port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start_engine(self, engine: Engine) -> None:
        """Start the engine process (it loads the models), attach it, report SERVING."""
        await asyncio.to_thread(engine.start)
        self.engine = engine
        self.service.attach(engine, engine.tokenizer)
        await self.set_serving(True)
        log.info("serving %s on port %d", SERVICE_NAME, self.port)

    async def drain(self, grace: float, delay: float = 0.0) -> None:
        """Stop serving, losing no call: health turns NOT_SERVING at once, while for `delay` seconds
        every call is still served, new ones included (load balancers that poll health move away;
        those that do not, nginx's grpc_pass, keep sending, and nothing fails). Then the ports stop
        taking connections, so that a proxy connecting meets a closed port and tries another
        upstream, and the calls in flight get `grace` seconds to finish, their last messages and
        statuses included, before what is left is cancelled."""
        await self.health.enter_graceful_shutdown()  # NOT_SERVING, and no later set() undoes it
        self.service.draining = True
        ports = [self.port] + ([self.http.port] if self.http is not None else [])
        if delay > 0:
            await asyncio.sleep(delay)
            # Closing a listening socket resets the connections the kernel has queued but the server
            # has not accepted yet, whose requests a proxy has already sent (and so will not retry
            # elsewhere). Drop new connection attempts first, let the queued ones in, then close.
            if hold_new_connections(ports):
                await asyncio.sleep(SETTLE_SECONDS)
        # From here on, new connections are refused and gRPC sends GOAWAY on the open ones.
        await self.health.end_watches()  # health watchers never end by themselves; they would hold the stop
        if self.http is not None:
            await self.http.close_port()
        generations = asyncio.create_task(self._wait_idle(grace))
        # Returns once every call has ended and its connection closed, or cancels what is left at `grace`.
        await self.server.stop(grace)
        await generations
        if self.http is not None:
            await self.http.stop()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)

    async def _wait_idle(self, grace: float) -> None:
        try:
            await asyncio.wait_for(self.service.wait_idle(), grace)
        except asyncio.TimeoutError:
            log.warning("grace period over: cancelling the streams still in flight")


# After the drain delay: how long new connection attempts are dropped (the clients' SYNs, which
# they send again after a second, to meet a closed port) while the connections the kernel has
# already queued are accepted and their calls start.
SETTLE_SECONDS = 0.5
SO_ATTACH_FILTER = 26  # Linux's socket option: attach a classic BPF program to a socket


def hold_new_connections(ports: list[int]) -> bool:
    """Make this process's listening TCP sockets on `ports` drop every new connection attempt,
    leaving their accept queues and open connections alone (Linux: a socket filter that accepts no
    packet). Returns whether any socket took it; elsewhere, or without /proc, nothing happens."""
    if not sys.platform.startswith("linux"):
        return False
    drop_all = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K, 0 bytes
    program = struct.pack("HP", 1, ctypes.addressof(drop_all))  # struct sock_fprog
    held = False
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return False
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            duplicate = os.dup(fd)  # closing it leaves fd open
            try:
                sock = socket.socket(fileno=duplicate)
            except OSError:
                os.close(duplicate)
                continue
            with sock:
                if (
                    sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] in ports
                ):
                    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
                    held = True
        except OSError:
            continue  # closed meanwhile, or not an Internet socket
    return held


async def create_server(
    host: str,
    port: int,
    service_config: ServiceConfig,
    metrics_address: tuple[str, int] | None = None,
    security: SecurityConfig = SecurityConfig(),
    http_port: int | None = None,
) -> ServerHandle:
    interceptors = [ApiKeyInterceptor(security.api_keys)] if security.api_keys else []
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    metrics = None
    if metrics_address is not None:
        metrics = Metrics(lambda: service.engine)
        metrics.serve(*metrics_address)
    service = GeneratorService(service_config, metrics)
    add_to_server(service, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection([SERVICE_NAME, health.SERVICE_NAME], server)
    credentials = security.server_credentials()
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    handle = ServerHandle(server, bound, service, health_servicer)
    await handle.set_serving(False)
    await server.start()
    if http_port is not None:
        handle.http = HttpFrontEnd(service, security, metrics)
        try:
            await handle.http.start(host, http_port)
        except OSError:
            await server.stop(0)
            raise
    return handle


async def serve(
    host: str,
    port: int,
    service_config: ServiceConfig,
    engine_config: EngineConfig,
    load_pair: Callable[[], ModelPair],
    grace: float,
    metrics_address: tuple[str, int] | None = None,
    drain_delay: float = 0.0,
    security: SecurityConfig = SecurityConfig(),
    http_port: int | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then drain; return the process's exit code.

    If the engine process dies, health turns NOT_SERVING, its streams have already ended with an
    error, and the exit code is 1, so that a supervisor restarts the server.
    """
    handle = await create_server(host, port, service_config, metrics_address, security, http_port)
    log.info(
        "listening on %s:%d%s%s; loading models",
        host,
        handle.port,
        " with TLS" if security.tls_cert else "",
        f", {len(security.api_keys)} API key(s)" if security.api_keys else "",
    )
    if handle.http is not None:
        scheme = "https" if security.tls_cert else "http"
        log.info("HTTP (OpenAI API, chat page) on %s://%s:%d/", scheme, host, handle.http.port)
    stop = asyncio.Event()
    failed: list[str] = []
    received: list[signal.Signals] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda sig=sig: (received.append(sig), stop.set()))

    def on_failure(message: str) -> None:  # on the engine's reader thread
        failed.append(message)
        loop.call_soon_threadsafe(stop.set)

    engine = Engine(load_pair, engine_config)
    engine.on_failure = on_failure
    loader = asyncio.create_task(handle.start_engine(engine))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([loader, stopped], return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        await handle.server.stop(0)
        if handle.http is not None:
            await handle.http.stop()
        raise loader.exception()
    await stopped
    # An orchestrator's SIGTERM gets the drain delay, for its load balancers to see NOT_SERVING;
    # a person's Ctrl-C (SIGINT), a dead engine and a replica that never served do not wait for that.
    serving = loader.done() and not loader.cancelled() and loader.exception() is None
    delay = drain_delay if received[:1] == [signal.SIGTERM] and not failed and serving else 0.0
    if failed:
        log.error("%s: draining and exiting with code 1", failed[0])
    else:
        log.info(
            "%s received: NOT_SERVING; calls still served for %.0fs, then the port closes: %.0fs for streams in flight",
            received[0].name if received else "signal",
            delay,
            grace,
        )
    if not loader.done():
        # A signal before the models loaded: nothing is in flight, and the loading thread would
        # otherwise hold the process until the models were ready, past a supervisor's patience.
        engine.abort()
        with contextlib.suppress(EngineFailed, asyncio.CancelledError):
            await loader
    await handle.drain(grace, delay)
    log.info("stopped")
    return 1 if failed else 0
