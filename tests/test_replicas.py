"""Several replicas behind a load balancer: real servers, the real client, real nginx.

Three bild-servers on loopback reached through gRPC client-side round robin (BildClient over their
addresses): calls spread over all three, every call succeeds while one replica drains after SIGTERM,
and only streams in flight on a killed one fail. Two behind nginx's grpc_pass (Debian's package),
called as a new user would, with the plain generated stub and no retries: a drain under 16 streams
loses no call made before, during or after it, and a kill -9 fails only the streams in flight on
the killed replica.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest
from bild.v1 import bild_pb2, bild_pb2_grpc
from grpc_health.v1 import health_pb2

from client import BildClient, least_loaded
from tests.server_util import start_server

pytestmark = [pytest.mark.slow, pytest.mark.nginx]

PROMPTS = ["one two three", "the cat sat", "hello there", "a b c d"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return int(sum(float(v) for v in re.findall(r"^bild_requests_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)))


@pytest.fixture
def replicas(tiny_dirs, free_costs):
    procs = []
    for _ in range(3):
        metrics = free_port()
        proc = start_server(
            "--large", tiny_dirs["large"], "--small", tiny_dirs["draft"], "--cost-profile", free_costs,
            "--metrics-port", str(metrics), "--drain-delay", "2", "--grace", "20", "--max-new-tokens", "16",
        )  # fmt: skip
        proc.metrics_port = metrics
        procs.append(proc)
    for proc in procs:
        proc.wait_serving()
    yield procs
    stop_all(procs)


def stop_all(servers) -> None:
    """SIGTERM every server first, then wait for each: their drains overlap."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in servers:
        server.stop()


async def traffic(client: BildClient, until: asyncio.Event, streams: int = 4) -> list[str]:
    """Requests on `streams` streams until `until` is set; the status of each."""
    outcomes: list[str] = []

    async def worker(w: int) -> None:
        i = 0
        while not until.is_set():
            i += 1
            try:
                ids = []
                async for response in client.generate(PROMPTS[(w + i) % 4], max_new_tokens=12, timeout=60):
                    ids.extend(response.token_ids)
                outcomes.append("OK" if ids else "EMPTY")
            except grpc.aio.AioRpcError as error:
                outcomes.append(error.code().name)

    await asyncio.gather(*[worker(w) for w in range(streams)])
    return outcomes


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc.poll()


# What README's "Several replicas" section shows; the test fills in the addresses.
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream bild {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        keepalive_requests 4294967295;  # README's: no GOAWAY by a count of calls
        location / {{
            grpc_pass grpc://bild;
            grpc_read_timeout 600s;       # a long generation streams for minutes
            grpc_next_upstream error timeout;  # a replica that is gone: try the next
        }}
    }}
}}
"""


def start_nginx(replicas, tmp_path) -> subprocess.Popen:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.fail("nginx is missing: .ci/run installs it (apt-get install nginx)")
    port = free_port()
    servers = "\n".join(f"        server {p.target};" for p in replicas)
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp_path, servers=servers, port=port))
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    proc.target = f"127.0.0.1:{port}"
    return proc


def test_get_load_reports_each_replica_and_picks_the_least_loaded(replicas):
    a, b, _ = replicas

    async def scenario():
        async with BildClient(a.target) as busy:
            # Keep replica a busy with long streams, then ask every replica how loaded it is.
            streams = [
                asyncio.create_task(collect(busy.generate("x", max_new_tokens=400, ignore_eos=True, mode="large")))
                for _ in range(6)
            ]
            while (await busy.load()).running == 0:
                assert not all(s.done() for s in streams), "the streams ended before the load was read"
                await asyncio.sleep(0.01)
            loads = {}
            for p in replicas:
                async with BildClient(p.target) as client:
                    loads[p.target] = await client.load()
            choice = await least_loaded([p.target for p in replicas])
            await asyncio.gather(*streams)
        return loads, choice

    loads, choice = asyncio.run(scenario())
    assert loads[a.target].running > 0 and loads[a.target].utilization > 0
    assert all(load.serving and load.max_batch_size > 0 for load in loads.values())
    assert loads[b.target].running == 0 and choice != a.target


async def collect(stream) -> list[int]:
    return [t async for r in stream for t in r.token_ids]


def test_client_side_round_robin_spreads_and_fails_over(replicas):
    check_failover(replicas, [p.target for p in replicas])


def check_failover(replicas, target) -> None:
    a, b, c = replicas

    async def scenario() -> dict[str, list[str]]:
        phases = {}
        async with BildClient(target) as client:
            # 1. Spread: every replica serves some of 30 calls.
            done = asyncio.Event()
            task = asyncio.create_task(traffic(client, done))
            while sum(served(p.metrics_port) for p in replicas) < 30:
                await asyncio.sleep(0.2)
            done.set()
            phases["spread"] = await task
            phases["per replica"] = [served(p.metrics_port) for p in replicas]

            # 2. Drain: SIGTERM one replica under load; every call still succeeds.
            done = asyncio.Event()
            task = asyncio.create_task(traffic(client, done))
            await asyncio.sleep(1.0)
            a.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(wait_exit, a.proc, 60)
            await asyncio.sleep(1.0)  # and some calls after it is gone
            done.set()
            phases["drain"] = await task
            phases["drain exit"] = [str(code)]

            # 3. Kill: SIGKILL another under load; only its streams in flight fail.
            done = asyncio.Event()
            task = asyncio.create_task(traffic(client, done))
            await asyncio.sleep(1.0)
            b.proc.kill()
            b.proc.wait()
            before = served(c.metrics_port)
            while served(c.metrics_port) < before + 12:  # the survivor carries on alone
                await asyncio.sleep(0.2)
            done.set()
            phases["kill"] = await task
        return phases

    phases = asyncio.run(scenario())
    print({k: v if k.endswith(("replica", "exit")) else Counter(v) for k, v in phases.items()})
    assert set(phases["spread"]) == {"OK"}
    assert all(n > 0 for n in phases["per replica"]), phases["per replica"]
    assert set(phases["drain"]) == {"OK"} and phases["drain exit"] == ["0"], phases["drain"]
    failed = [s for s in phases["kill"] if s != "OK"]
    # At most the one stream per worker in flight there; gRPC says UNAVAILABLE for a connection that
    # went away, nginx resets the stream it was proxying (INTERNAL).
    assert len(failed) <= 4 and set(failed) <= {"UNAVAILABLE", "INTERNAL"}, failed
    assert phases["kill"].count("OK") >= 12


# ---- behind nginx, with the plain generated stub and no retries -----------------------------------

DRAIN_DELAY = 1.0
REPLICA_ARGS = ("--drain-delay", str(DRAIN_DELAY), "--grace", "20", "--max-new-tokens", "16")
TOKENS = 12  # each call's full count (ignore_eos)


@dataclass
class Call:
    request_id: str
    started: float
    ended: float = 0.0
    status: str = ""
    tokens: int = 0
    details: str = ""


class Trio:
    """Three replicas and two nginx: one in front of a and b (a is drained), one in front of b and c (c
    is killed). Starting all three at once costs less time than restarting one."""

    def __init__(self, tiny_dirs, free_costs, tmp_path) -> None:
        args = ("--large", tiny_dirs["large"], "--small", tiny_dirs["draft"], "--cost-profile", free_costs)
        self.servers = []
        for _ in range(3):
            metrics = free_port()
            server = start_server(*args, *REPLICA_ARGS, "--metrics-port", str(metrics))
            server.metrics_port = metrics
            self.servers.append(server)
        for server in self.servers:
            server.wait_serving()
        a, b, c = self.servers
        (tmp_path / "ab").mkdir()
        (tmp_path / "bc").mkdir()
        self.nginx = [start_nginx([a, b], tmp_path / "ab"), start_nginx([b, c], tmp_path / "bc")]

    def close(self) -> None:
        for proc in self.nginx:
            proc.terminate()
            proc.wait(10)
        stop_all(self.servers)


@pytest.fixture(scope="module")
def trio(tiny_dirs, free_costs, tmp_path_factory):
    trio = Trio(tiny_dirs, free_costs, tmp_path_factory.mktemp("nginx"))
    yield trio
    trio.close()


async def plain_call(stub_or_target, request_id: str, prompt: str = PROMPTS[0], mode: int = 0) -> Call:
    """One Generate call with the generated stub, as it ended: when, its status and its tokens."""
    if isinstance(stub_or_target, str):
        async with grpc.aio.insecure_channel(stub_or_target) as channel:
            return await plain_call(bild_pb2_grpc.GeneratorStub(channel), request_id, prompt, mode)
    call = Call(request_id, time.monotonic())
    request = bild_pb2.GenerateRequest(
        prompt=prompt, max_new_tokens=TOKENS, ignore_eos=True, mode=mode, request_id=request_id
    )
    try:
        async for response in stub_or_target.Generate(request, timeout=60):
            call.tokens += len(response.token_ids)
        call.status = "OK"
    except grpc.aio.AioRpcError as error:
        call.status, call.details = error.code().name, error.details() or ""
    call.ended = time.monotonic()
    return call


async def plain_calls(target: str, until: asyncio.Event, streams: int = 16) -> list[Call]:
    """Generate calls on `streams` streams through the generated stub (no retry policy, no client
    health checking) until `until` is set."""
    calls: list[Call] = []
    modes = [bild_pb2.DECODING_MODE_BILD, bild_pb2.DECODING_MODE_EXACT, bild_pb2.DECODING_MODE_LARGE]

    async def worker(stub, w: int) -> None:
        i = 0
        while not until.is_set():
            i += 1
            calls.append(await plain_call(stub, f"w{w}-{i}", PROMPTS[(w + i) % 4], modes[(w + i) % 3]))

    async with grpc.aio.insecure_channel(target) as channel:
        stub = bild_pb2_grpc.GeneratorStub(channel)
        await asyncio.gather(*[worker(stub, w) for w in range(streams)])
    return calls


async def wait_served(server, more: int) -> None:
    """Until `server` has finished `more` calls beyond what it had now."""
    target = await asyncio.to_thread(served, server.metrics_port) + more
    while await asyncio.to_thread(served, server.metrics_port) < target:
        await asyncio.sleep(0.1)


def test_nginx_drain_loses_no_call_made_before_during_or_after_it(trio):
    """SIGTERM one replica under 16 streams with calls still arriving: health turns NOT_SERVING, the
    replica goes on serving new calls for the drain delay, then closes its port (nginx connects to
    the other one) and finishes its streams; every call ends OK with all its tokens."""
    a, b, _ = trio.servers

    async def scenario():
        until = asyncio.Event()
        traffic = asyncio.create_task(plain_calls(trio.nginx[0].target, until))
        await asyncio.gather(wait_served(a, 4), wait_served(b, 4))  # before
        signalled = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        health = await asyncio.to_thread(a.health)
        # A new call straight to it, during the delay, is served in full.
        direct = await plain_call(a.target, "w-direct")
        code = await asyncio.to_thread(wait_exit, a.proc, 60)
        exited = time.monotonic()
        await wait_served(b, 16)  # after: b alone
        until.set()
        return [direct, *await traffic], signalled, exited, health, code

    calls, signalled, exited, health, code = asyncio.run(scenario())
    phases = Counter("before" if c.started < signalled else "during" if c.started < exited else "after" for c in calls)
    failed = [(c.status, c.tokens, c.details) for c in calls if c.status != "OK" or c.tokens != TOKENS]
    print(f"{len(calls)} calls {dict(phases)}")
    assert not failed, f"{len(failed)} of {len(calls)} calls failed: {Counter(failed)}"
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING and code == 0
    assert calls[0].started < signalled + DRAIN_DELAY  # the direct call, within the delay
    assert min(phases["before"], phases["during"], phases["after"]) > 0, phases


def test_nginx_kill_fails_only_the_streams_in_flight_on_the_killed_replica(trio):
    _, b, c = trio.servers

    async def scenario():
        until = asyncio.Event()
        traffic = asyncio.create_task(plain_calls(trio.nginx[1].target, until))
        await asyncio.gather(wait_served(b, 4), wait_served(c, 4))
        killed = time.monotonic()
        c.proc.kill()
        c.proc.wait()
        await wait_served(b, 16)  # the survivor carries on alone
        until.set()
        return await traffic, killed

    calls, killed = asyncio.run(scenario())
    failed = [c for c in calls if c.status != "OK" or c.tokens != TOKENS]
    print(f"{len(calls)} calls, {len(failed)} failed: {Counter((c.status, c.details) for c in failed)}")
    # Only streams in flight at the kill (16 at most, nearly half of them on c) fail; nginx resets the
    # stream it was proxying. Every call made after the kill goes to the survivor.
    assert all(c.started < killed < c.ended for c in failed), [(c.started - killed, c.status) for c in failed]
    assert len(failed) <= 16 and {c.status for c in failed} <= {"UNAVAILABLE", "INTERNAL"}
    after = [c for c in calls if c.started > killed]
    assert len(after) >= 16 and all(c.status == "OK" and c.tokens == TOKENS for c in after)
