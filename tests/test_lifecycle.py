"""Health transitions, draining and engine failure of real bild-server processes (SmolLM2 and tiny models)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from pathlib import Path

import grpc
import pytest
from bild.v1 import bild_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import BildClient
from scheduler.loading import SMOLLM2_ALIAS, load_tokenizer
from tests.server_util import start_server

pytestmark = pytest.mark.slow

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
        # --weights auto: the default GGUF file's own 4-bit weights, said in the log
        assert any("GGUF file's own 4-bit weights" in line for line in server.log), "".join(server.log[-20:])

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


def test_sigterm_turns_health_not_serving_while_calls_are_still_served_then_closes_the_port(tiny_dirs):
    """A load balancer that polls health sees NOT_SERVING (not a refused connection) for the drain
    delay; new calls meanwhile are served in full; then the port closes (a new connection is refused,
    so a proxy connects elsewhere), the stream in flight finishes, and the process exits 0."""
    server = start_server("--large", tiny_dirs["large"], "--no-small", "--drain-delay", "3", "--grace", "60")
    try:

        async def while_loading():  # a call made as the port opens waits for the models, then streams
            async with BildClient(server.target) as client:
                return [r async for r in client.generate("early", max_new_tokens=5, ignore_eos=True, timeout=120)]

        assert sum(len(r.token_ids) for r in asyncio.run(while_loading())) == 5
        server.wait_serving()

        async def scenario():
            async with BildClient(server.target) as client:
                stream = client.generate("drain me", max_new_tokens=200, mode="large", ignore_eos=True)
                first = await stream.__anext__()
                server.proc.send_signal(signal.SIGTERM)
                statuses = []
                for _ in range(5):  # within the 3 s delay
                    await asyncio.sleep(0.1)
                    statuses.append(await asyncio.to_thread(server.health))
                during = [r async for r in client.generate("a new call", max_new_tokens=6, ignore_eos=True)]
                while await asyncio.to_thread(port_open, server.port):  # closes after the delay
                    assert server.proc.poll() is None, "the port stayed open until the process exited"
                    await asyncio.sleep(0.1)
                rest = [r async for r in stream]
                return first, rest, statuses, during

        first, rest, statuses, during = asyncio.run(scenario())
        assert set(statuses) == {NOT_SERVING}
        assert sum(len(r.token_ids) for r in during) == 6
        assert rest[-1].finish_reason == bild_pb2.FINISH_REASON_LENGTH
        assert sum(len(r.token_ids) for r in [first, *rest]) == 200
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(3)  # new connections are dropped for a moment before the port closes
        return s.connect_ex(("127.0.0.1", port)) == 0


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            pass  # a process that just exited
    return found


def test_when_the_engine_process_dies_streams_fail_and_the_server_exits_1(tiny_dirs):
    server = start_server("--large", tiny_dirs["large"], "--no-small", "--drain-delay", "0")
    try:
        server.wait_serving()
        engine = next(
            pid for pid in children(server.proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )

        async def scenario():
            async with BildClient(server.target) as client:
                stream = client.generate("doomed", max_new_tokens=400, mode="large", ignore_eos=True)
                await stream.__anext__()
                os.kill(engine, signal.SIGKILL)
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    async for _ in stream:
                        pass
                return error.value

        error = asyncio.run(scenario())
        assert error.code() == grpc.StatusCode.INTERNAL and "engine process died" in error.details()
        assert server.proc.wait(60) == 1
        assert any("engine process died" in line for line in server.log)
    finally:
        server.stop()


def test_sigterm_while_the_models_load_exits_at_once():
    """A supervisor that stops a replica still loading gets an exit, not a wait for the models (or
    for its own kill timeout: the loading thread once held the process for good)."""
    load_tokenizer(SMOLLM2_ALIAS)  # dequantized already, so what follows is loading proper
    server = start_server("--large", SMOLLM2_ALIAS, "--drain-delay", "30")
    try:
        assert server.health() == NOT_SERVING
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0, "".join(server.log[-20:])
        assert not any("serving bild.v1.Generator" in line for line in server.log), "".join(server.log[-20:])
    finally:
        server.stop()
