"""Tokens/s through the gRPC server, as a user measures it: modes large, exact and bild side by side.

    python bench/serving.py [--streams 1 2 4 8 16 32 64] [--rounds 2] [--max-new-tokens 64] [--out FILE]

Starts bild-server with its defaults (plus --server-args), waits until it serves, and for each
number of concurrent streams runs the modes in turn, `--rounds` times, every other round in reverse
order (the machine's speed drifts by several percent within minutes; so a steady drift cancels out
of the ratios): each run sends
`--requests-per-stream` requests per stream (at least 8 in all) of chat prompts from
bench/chat.jsonl, written for this benchmark and never part of the draft's training. Speed-ups are
means over rounds of each mode against the large-only run of the same round. "Same tokens" compares
each output with large-only greedy output of the same prompt, position by position.

The load generator is this process: one asyncio gRPC client, no detokenization. Its CPU share, and
the server's (both of its processes), are reported beside the table, since they share 2 cores here.
Then, with the server stopped, the engine alone at batch 1 on the same prompts (bench/engine_speed.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from client import BildClient

PROMPTS = Path(__file__).with_name("chat.jsonl")
MODES = ("large", "exact", "bild")


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    small_tokens: int = 0
    first_token: list[float] = field(default_factory=list)
    outputs: dict[int, list[int]] = field(default_factory=dict)
    errors: int = 0
    client_cpu: float = 0.0  # seconds of this process's CPU
    server_cpu: float = 0.0  # seconds of the server's CPU (both processes)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def server_pids(pid: int) -> list[int]:
    """The server and its child processes (the engine core)."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return pids


async def run_mode(target: str, rows: list, mode: str, streams: int, requests: int, max_new: int, pids) -> Run:
    run = Run()
    issued = 0

    async def worker(client: BildClient) -> None:
        nonlocal issued
        while issued < requests:
            index = issued % len(rows)
            issued += 1
            started = time.perf_counter()
            ids: list[int] = []
            try:
                async for response in client.generate(messages=rows[index], max_new_tokens=max_new, mode=mode):
                    if response.token_ids and not ids:
                        run.first_token.append(time.perf_counter() - started)
                    ids.extend(response.token_ids)
                    if response.HasField("stats"):
                        run.small_tokens += response.stats.small_tokens
            except grpc.aio.AioRpcError:
                run.errors += 1
                continue
            run.tokens += len(ids)
            run.outputs[index] = ids

    async with BildClient(target) as client:
        cpu0, server0 = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(pids)
        started = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(streams)])
        run.seconds = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        run.client_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        run.server_cpu = cpu_seconds(pids) - server0
    return run


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        sys.stderr.write(line)
        match = re.search(r"listening on [^ ]+:(\d+)", line)
        if match:
            target = f"127.0.0.1:{match.group(1)}"
            break
    else:
        raise SystemExit("bild-server did not start")
    # Keep draining its output so that it never blocks on a full pipe.
    import threading

    threading.Thread(
        target=lambda: [sys.stderr.write(line) for line in proc.stdout if "ERROR" in line], daemon=True
    ).start()
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return proc, target
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise SystemExit("bild-server did not become SERVING")


def engine_rows(prompts: list, n: int, max_new: int, rounds: int, server_args: list[str]) -> list[str]:
    """The engine alone, stepped on this process's main thread, batch 1, the same prompts, with the
    server's models, device and dtype (read from its own flags)."""
    import engine_speed

    from scheduler.pair import load_pair
    from server.cli import parse_args

    flags = parse_args(server_args)
    pair = load_pair(flags.large, None if flags.no_small else flags.small, flags.device, flags.dtype)
    tok = pair.tokenizer
    ids = [
        tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        for m in prompts[:n]
    ]
    return engine_speed.table(pair, ids, [1], max_new, rounds, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="", help="extra bild-server flags, as one string")
    ap.add_argument(
        "--engine-prompts", type=int, default=16, help="prompts for the engine-only batch-1 table (0: skip it)"
    )
    ap.add_argument("--out", type=Path, help="also write the report here (markdown)")
    args = ap.parse_args()

    rows = [json.loads(line)["messages"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    proc, target = start_server(args.server_args.split())
    pids = server_pids(proc.pid)
    server_args = f" --server-args {args.server_args!r}" if args.server_args else ""
    columns = [
        "streams",
        "mode",
        "tokens/s",
        "speed-up vs large",
        "same tokens as large",
        "small-token share",
        "first token p50",
        "client CPU",
        "server CPU",
    ]
    lines = [
        f"# Through the gRPC server ({datetime.date.today()}, {os.cpu_count()}-core {platform.machine()} CPU)",
        "",
        f"`python bench/serving.py --streams {' '.join(map(str, args.streams))} --rounds {args.rounds} "
        f"--max-new-tokens {args.max_new_tokens}{server_args}`",
        "",
        f"bild-server with default flags{' and ' + args.server_args if args.server_args else ''}; "
        f"{len(rows)} chat prompts from bench/chat.jsonl, greedy, {args.max_new_tokens} new tokens; "
        f"{args.requests_per_stream} requests per stream (at least 8) per run; {args.rounds} rounds, every other one "
        f"in reverse order; tokens/s are medians, speed-ups means (with their range) over the rounds.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    print("\n".join(lines), flush=True)
    try:
        for streams in args.streams:
            requests = max(8, streams * args.requests_per_stream)
            runs: dict[str, list[Run]] = {m: [] for m in args.modes}
            for round_ in range(args.rounds):
                # Every other round in reverse order: the machine's speed drifts by several percent
                # within minutes, and this way a steady drift cancels out of the ratios.
                for mode in args.modes if round_ % 2 == 0 else reversed(args.modes):
                    runs[mode].append(
                        asyncio.run(run_mode(target, rows, mode, streams, requests, args.max_new_tokens, pids))
                    )
            reference = runs["large"][0].outputs if "large" in runs else {}
            for mode in args.modes:
                rs = runs[mode]
                rates = [r.tokens / r.seconds for r in rs]
                ratios = (
                    [r.tokens / r.seconds / (b.tokens / b.seconds) for r, b in zip(rs, runs["large"])]
                    if "large" in runs
                    else [float("nan")]
                )
                same = total = 0
                for i, ids in rs[-1].outputs.items():
                    ref = reference.get(i, [])
                    same += sum(a == b for a, b in zip(ids, ref))
                    total += len(ref)
                tokens = sum(r.tokens for r in rs)
                wall = sum(r.seconds for r in rs)
                errors = sum(r.errors for r in rs)
                line = (
                    f"| {streams} | {mode} | {statistics.median(rates):.1f} | {statistics.mean(ratios):.2f}x"
                    f"{f' ({min(ratios):.2f}-{max(ratios):.2f})' if len(ratios) > 1 else ''} | "
                    f"{same / max(1, total):.1%} | {sum(r.small_tokens for r in rs) / max(1, tokens):.1%} | "
                    f"{statistics.median([t for r in rs for t in r.first_token]) * 1e3:.0f} ms | "
                    f"{sum(r.client_cpu for r in rs) / wall:.0%} | {sum(r.server_cpu for r in rs) / wall:.0%} |"
                    + (f" {errors} errors" if errors else "")
                )
                lines.append(line)
                print(line, flush=True)
    finally:
        proc.terminate()
        proc.wait(120)
    lines += ["", "CPU shares are of one core (200% is the whole 2-core machine)."]
    if args.engine_prompts:
        lines += [
            "",
            f"The engine alone (the scheduler stepped on the main thread, no server), batch 1, the first "
            f"{args.engine_prompts} of the same prompts, {args.rounds} rounds:",
            "",
        ]
        table = engine_rows(rows, args.engine_prompts, args.max_new_tokens, args.rounds, args.server_args.split())
        lines += table
        print("\n".join(table), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
