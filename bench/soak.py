"""Soak: many requests of every kind through nginx in front of two bild-servers, one of them drained
with SIGTERM and started again halfway; then check that nothing failed or leaked.

    python bench/soak.py [--requests 5000] [--concurrency 32] [--max-new-tokens 32] [--server-args "..."]
                         [--out bench/results/soak.md]

Requests cycle through chat and plain prompts, modes (bild, exact, large, small), greedy and sampled
(with and without a seed), stop strings and logprobs; mixed in are client cancels after the first
tokens, deadlines too short to finish, and hostile requests the server must refuse (INVALID_ARGUMENT).
Calls go through the plain generated stub on one channel to nginx (README's "Several replicas"
configuration), with gRPC's retries off, so that every failure shows. Pass criteria (exit code 1
otherwise): no status other than the one each kind of request asks for, each replica's resident
memory (server and engine processes) within 5% of its value after warm-up, and every KV slot of each
replica free, with nothing running or waiting, at the end (the engine's own gauges, from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from bild.v1 import bild_pb2, bild_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load import load_prompts  # bench/load.py and bench/serving.py, beside this script
from serving import server_pids, start_server

MODES = (bild_pb2.DECODING_MODE_BILD, bild_pb2.DECODING_MODE_EXACT, bild_pb2.DECODING_MODE_LARGE)
MODES += (bild_pb2.DECODING_MODE_SMALL,)
# README's nginx configuration ("Several replicas"), run unprivileged in a scratch directory.
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream bild {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        keepalive_requests 4294967295;
        location / {{
            grpc_pass grpc://bild;
            grpc_read_timeout 600s;
            grpc_next_upstream error timeout;
        }}
    }}
}}
"""


def hostile(i: int) -> bild_pb2.GenerateRequest | bytes:
    """Requests the server must refuse with INVALID_ARGUMENT, one kind after another."""
    kinds = [
        bild_pb2.GenerateRequest(prompt="hi", max_new_tokens=10**6),  # above the limit
        bild_pb2.GenerateRequest(prompt="hi", mode=77),  # no such mode
        bild_pb2.GenerateRequest(prompt="hi", top_logprobs=500),
        bild_pb2.GenerateRequest(prompt="x" * 300_000),  # cannot fit the context
        bild_pb2.GenerateRequest(messages=[bild_pb2.ChatMessage(role="wizard", content="hi")]),
        bild_pb2.GenerateRequest(prompt="hi", stop=["s"] * 100),
        bild_pb2.GenerateRequest(prompt="hi", temperature=-1.0),
        bild_pb2.GenerateRequest(),  # neither prompt nor messages
        b"\x0a\x04\xff\xfe\xfd\xfc",  # bytes that do not parse: a prompt of invalid UTF-8
    ]
    return kinds[i % len(kinds)]


def request(i: int, rows: list, max_new_tokens: int) -> tuple[str, bild_pb2.GenerateRequest | bytes]:
    """The i-th request and its kind: every combination comes round within a few hundred requests."""
    if i % 17 == 9:
        return "hostile", hostile(i // 17)
    messages = rows[i % len(rows)]
    req = bild_pb2.GenerateRequest(max_new_tokens=max_new_tokens, mode=MODES[i % 4], request_id=f"soak-{i}")
    if i % 2:
        req.messages.extend(bild_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        req.prompt = messages[-1]["content"]
    if i % 3 == 1:
        req.temperature, req.top_p = 0.8, 0.95
        if i % 2:
            req.seed = i
    if i % 5 == 2:
        req.stop.extend([".", "\n\n"])
    if i % 7 == 3:
        req.logprobs, req.top_logprobs = True, 2
    kind = "cancel" if i % 11 == 5 else "deadline" if i % 13 == 7 else "plain"
    return kind, req


# What each kind of request may end with; anything else is an error.
EXPECTED = {
    "plain": {"OK"},
    "cancel": {"OK", "CANCELLED (by the client)"},
    "deadline": {"OK", "DEADLINE_EXCEEDED"},
    "hostile": {"INVALID_ARGUMENT"},
}


@dataclass
class Replica:
    name: str
    args: list[str]
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen | None = None
    rss: dict[str, int] = field(default_factory=dict)  # checkpoint -> bytes
    lives: int = 0

    def start(self) -> None:
        self.metrics_port = self.metrics_port or free_port()
        port = ["--port", str(self.port)] if self.port else []
        self.proc, target = start_server(["--metrics-port", str(self.metrics_port), *self.args, *port])
        self.port = int(target.rsplit(":", 1)[1])
        self.lives += 1

    def measure(self, checkpoint: str) -> None:
        self.rss[checkpoint] = rss_bytes(server_pids(self.proc.pid))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def gauges(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^bild_engine_(\w+) ([0-9.e+-]+)$", text, re.M)}


def start_nginx(replicas: list[Replica], scratch: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{r.port};" for r in replicas)
    (scratch / "nginx.conf").write_text(NGINX_CONF.format(dir=scratch, servers=servers, port=port))
    proc = subprocess.Popen([binary, "-c", str(scratch / "nginx.conf"), "-p", str(scratch)])
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("nginx did not start")
        time.sleep(0.1)


def drain_and_restart(replica: Replica, log: list[str]) -> None:
    """SIGTERM the replica under load, wait for it to exit, start it again on its port (a thread)."""
    started = time.monotonic()
    replica.proc.send_signal(signal.SIGTERM)
    code = replica.proc.wait(300)
    exited = time.monotonic()
    replica.start()
    log.append(
        f"{replica.name}: SIGTERM, exited with code {code} after {exited - started:.1f} s, "
        f"serving again {time.monotonic() - exited:.1f} s later"
    )


async def soak(target: str, args, replicas: list[Replica]) -> tuple[Counter, float, list[str]]:
    rows = load_prompts()
    statuses: Counter = Counter()  # (kind, status)
    details: dict[tuple[str, str], list[str]] = {}  # (kind, status) -> the first few messages
    issued = 0
    events: list[str] = []
    checkpoints = {args.requests // 10: "warm", args.requests // 2: "middle", args.requests * 3 // 5: "restarted"}
    rng = random.Random(0)
    restart: asyncio.Task | None = None
    restarted_at: int | None = None

    async def one(stub, raw, i: int) -> None:
        kind, req = request(i, rows, args.max_new_tokens)
        timeout = rng.uniform(0.05, 0.5) if kind == "deadline" else 600
        cancel_after = rng.randint(1, 4) if kind == "cancel" else None
        seen = 0
        call = (raw if isinstance(req, bytes) else stub.Generate)(req, timeout=timeout)
        try:
            async for response in call:
                seen += len(response.token_ids)
                if cancel_after is not None and seen >= cancel_after:
                    call.cancel()
                    statuses[kind, "CANCELLED (by the client)"] += 1
                    return
            statuses[kind, "OK"] += 1
        except grpc.aio.AioRpcError as error:
            statuses[kind, error.code().name] += 1
            said = details.setdefault((kind, error.code().name), [])
            if len(said) < 3:
                said.append(
                    f"request {i} after {seen} tokens, {time.perf_counter() - started:.0f} s in: {error.details()}"
                )

    async def worker(stub, raw) -> None:
        nonlocal issued, restart, restarted_at
        while issued < args.requests:
            i = issued
            issued += 1
            if i in checkpoints:
                name = checkpoints[i]
                for replica in replicas[1:] if name == "restarted" else replicas:
                    replica.measure(name)
                if name == "middle":
                    restart = asyncio.create_task(asyncio.to_thread(drain_and_restart, replicas[0], events))
            # The restarted replica's warm-up: a twentieth of the requests after it serves again.
            if restart is not None and restart.done() and "restarted" not in replicas[0].rss:
                if restarted_at is None:
                    restarted_at = i
                elif i >= restarted_at + args.requests // 20:
                    replicas[0].measure("restarted")
            await one(stub, raw, i)
            done = sum(statuses.values())
            if done % 250 == 0:
                summary = {f"{k} {s}": n for (k, s), n in sorted(statuses.items())}
                print(f"  {done}/{args.requests} {summary}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    # gRPC's own retries off: every failure reaches the count.
    async with grpc.aio.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as channel:
        stub = bild_pb2_grpc.GeneratorStub(channel)
        raw = channel.unary_stream(
            "/bild.v1.Generator/Generate",
            request_serializer=lambda data: data,
            response_deserializer=bild_pb2.GenerateResponse.FromString,
        )
        await asyncio.gather(*[worker(stub, raw) for _ in range(args.concurrency)])
    if restart is not None:
        await restart
    for replica in replicas:
        replica.measure("end")
    events += [
        f"{k} {s}: {message}" for (k, s), messages in details.items() if s not in EXPECTED[k] for message in messages
    ]
    return statuses, time.perf_counter() - started, events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", "-n", type=int, default=5000)
    ap.add_argument("--concurrency", "-c", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--server-args", default="", help="more bild-server flags, as one string")
    ap.add_argument("--out", default="", help="also write the report here (markdown)")
    args = ap.parse_args()
    server_args = ["--drain-delay", "5", "--grace", "30", *shlex.split(args.server_args)]
    # Two replicas on one machine share its cores: one thread team each, sized to its share.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    replicas = [Replica("replica A", server_args), Replica("replica B", server_args)]
    scratch = Path(tempfile.mkdtemp(prefix="bild-soak-"))
    nginx = None
    try:
        for replica in replicas:
            replica.start()
        nginx, target = start_nginx(replicas, scratch)
        statuses, seconds, events = asyncio.run(soak(target, args, replicas))
        time.sleep(1.0)  # the engine's last gauges travel after the last stream ends
        loads = {r.name: gauges(r.metrics_port) for r in replicas}
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for replica in replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.terminate()
                replica.proc.wait(120)
        nginx_errors = (scratch / "error.log").read_text() if (scratch / "error.log").exists() else ""
        shutil.rmtree(scratch, ignore_errors=True)
    report, ok = render(args, statuses, seconds, events, replicas, loads, nginx_errors)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0 if ok else 1


def nginx_version() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    result = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return (result.stderr or result.stdout).strip().removeprefix("nginx version: ") or "nginx"


def growth(rss: dict[str, int], start: str, end: str) -> float:
    return (rss[end] - rss[start]) / rss[start] if rss.get(start) else float("nan")


def render(args, statuses, seconds, events, replicas, loads, nginx_errors) -> tuple[str, bool]:
    errors = {f"{k}: {s}": n for (k, s), n in statuses.items() if s not in EXPECTED[k]}
    mb = 2**20
    lines = [
        f"# Soak through nginx in front of two replicas ({os.cpu_count()}-core {platform.machine()} CPU; "
        f"the default pair unless --server-args says otherwise)",
        "",
        f"`python bench/soak.py -n {args.requests} -c {args.concurrency} --max-new-tokens {args.max_new_tokens}"
        + (f" --server-args {args.server_args!r}" if args.server_args else "")
        + "`",
        "",
        f"{args.requests} requests at {args.concurrency} streams in {seconds:.0f} s through {nginx_version()} "
        "(`grpc_pass`, README's configuration) in front of two replicas; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} each; "
        "replica A drained with SIGTERM halfway and started again on its port. " + " ".join(events),
        "",
        "| kind | statuses | expected |",
        "|---|---|---|",
    ]
    for kind in EXPECTED:
        got = {s: n for (k, s), n in sorted(statuses.items()) if k == kind}
        lines.append(f"| {kind} | {got} | {' or '.join(sorted(EXPECTED[kind]))} |")
    lines += ["", f"Errors (a status its request did not ask for): {errors or 'none'}.", ""]
    lines += ["| replica | RSS after warm-up | middle | after restart | end | growth | engine at the end |"]
    lines += ["|---|---|---|---|---|---|---|"]
    ok = not errors
    for r in replicas:
        rss = {k: f"{v / mb:.0f} MB" for k, v in r.rss.items()}
        if r.lives > 1:  # warm -> middle is the first process; restarted -> end the second
            spans = [growth(r.rss, "warm", "middle"), growth(r.rss, "restarted", "end")]
            shown = f"{spans[0]:+.1%} (first process), {spans[1]:+.1%} (second)"
        else:
            spans = [growth(r.rss, "warm", "end")]
            shown = f"{spans[0]:+.1%}"
        load = loads[r.name]
        idle = load.get("running") == load.get("waiting") == load.get("reserved_tokens") == 0
        free = f"{load.get('free_slots', 0):.0f} slots free, {load.get('running', 0):.0f} running, "
        free += f"{load.get('waiting', 0):.0f} waiting"
        ok = ok and idle and all(abs(g) < 0.05 for g in spans)
        lines.append(
            f"| {r.name} | {rss.get('warm')} | {rss.get('middle')} | {rss.get('restarted')} | {rss.get('end')} "
            f"| {shown} | {free} |"
        )
    refused = len(re.findall(r"connect\(\) failed \(111", nginx_errors))
    other = [line for line in nginx_errors.splitlines() if "[error]" in line and "connect() failed (111" not in line]
    lines += ["", f"nginx: {refused} connections refused (tried on the other replica), {len(other)} other errors."]
    lines += [f"    {line[:200]}" for line in other[:5]]
    return "\n".join(lines) + "\n", ok


if __name__ == "__main__":
    sys.exit(main())
