"""Run bild-server as a real subprocess on an ephemeral loopback port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited:\n" + "".join(self.log[-30:])
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become SERVING:\n" + "".join(self.log[-30:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_server(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `bild-server --port 0 ARGS`; return once it listens (models may still be loading)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--port", "0", *args],
        stderr=subprocess.STDOUT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    log: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def pump() -> None:  # keep reading so the pipe never fills and blocks the server
        for line in proc.stdout:
            log.append(line)
            match = re.search(r"listening on [^ ]+:(\d+)", line)
            if match and not port:
                port.append(int(match.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(120) or not port:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(log[-30:]))
    return ServerProcess(proc, port[0], log)
