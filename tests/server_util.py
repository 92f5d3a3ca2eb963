"""Run bild-server as a real subprocess on an ephemeral loopback port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
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
    """Start `bild-server --port 0 ARGS`; return once it listens (models may still be loading).

    Without a --drain-delay of their own, test servers stop at once: the default's 5 s wait for load
    balancers would only add up across the suite (tests of the delay give theirs)."""
    if "--drain-delay" not in args:
        args = (*args, "--drain-delay", "0")
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


# Tiny models need no OpenMP team; one thread keeps them fast beside other work on a small machine.
ENV = {"OMP_NUM_THREADS": "1"}


def start_http_server(*args: str, env: dict[str, str] = ENV) -> tuple[ServerProcess, str]:
    """bild-server with --http-port 0, once it serves; returns it and its HTTP base URL."""
    server = start_server("--http-port", "0", *args, env=env)
    deadline = time.monotonic() + 60
    while not (match := re.search(r"HTTP \(.*\) on (http://[^ ]+:\d+)/", "".join(server.log))):
        assert time.monotonic() < deadline and server.proc.poll() is None, "no HTTP port:\n" + "".join(server.log)
        time.sleep(0.05)
    server.wait_serving()
    return server, match.group(1)


def fetch(url: str, data: bytes | None = None, key: str | None = None) -> tuple[int, str]:
    """A plain HTTP request: (status, body)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(base: str, key: str | None = None) -> dict[str, float]:
    """The server's Prometheus samples from its HTTP port's /metrics, by name with labels."""
    status, text = fetch(base + "/metrics", key=key)
    assert status == 200, text
    return {m[0]: float(m[1]) for m in re.findall(r"^(bild_[^ ]+) ([0-9.e+]+)$", text, re.M)}
