"""Health transitions and graceful shutdown of a real bild-server on the real SmolLM2 model."""

from __future__ import annotations

import asyncio
import signal
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bild.v1 import bild_pb2
from client import BildClient
from scheduler.loading import SMOLLM2_ALIAS, load_tokenizer
from tests.server_util import start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_while_loading_serving_and_draining_then_exit_0():
    load_tokenizer(SMOLLM2_ALIAS)  # dequantize the GGUF before timing anything
    server = start_server("--large", SMOLLM2_ALIAS, "--no-small", "--grace", "60")
    try:
        # The port opens before the 135M-parameter model has loaded (a second or more).
        assert server.health() == NOT_SERVING
        assert server.health("bild.v1.Generator") == NOT_SERVING
        server.wait_serving()

        statuses: list[int] = []
        watching = threading.Event()

        def watch() -> None:
            with grpc.insecure_channel(server.target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120):
                        statuses.append(response.status)
                        watching.set()
                except grpc.RpcError:
                    pass  # the server went away

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert watching.wait(30)

        async def stream_through_shutdown():
            async with BildClient(server.target) as client:
                pieces = []
                async for response in client.generate("Count from one to fifty:", max_new_tokens=40, mode="large"):
                    pieces.append(response)
                    if len(pieces) == 2:
                        server.proc.send_signal(signal.SIGTERM)
                return pieces

        pieces = asyncio.run(stream_through_shutdown())
        # The stream that was in flight finished normally within the grace period.
        assert pieces[-1].finish_reason == bild_pb2.FINISH_REASON_LENGTH
        assert sum(len(p.token_ids) for p in pieces) == 40
        assert server.proc.wait(60) == 0
        watcher.join(30)
        assert statuses[0] == SERVING and NOT_SERVING in statuses
    finally:
        server.stop()
