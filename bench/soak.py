"""Soak: many requests of every kind through a real bild-server, then check that nothing leaked.

    python bench/soak.py [--requests 5000] [--concurrency 32] [--max-new-tokens 32] [--server-args "..."]

Requests cycle through modes (bild, exact, large, small), greedy and sampled (with and without a
seed), stop strings, logprobs, and client cancels after the first tokens. Pass criteria (exit code 1
otherwise): no error status other than the client's own CANCELLED, the server's resident memory
(both processes) grows less than 5% from the end of warm-up to the end, and every KV slot is free
with nothing running or waiting at the end (the engine's own gauges, read from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shlex
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load import load_prompts  # bench/load.py and bench/serving.py, beside this script
from serving import server_pids, start_server

from client import BildClient

MODES = ("bild", "exact", "large", "small")


def kind(i: int) -> dict:
    """The i-th request's options: every combination comes round within a few dozen requests."""
    options: dict = {"mode": MODES[i % 4]}
    if i % 3 == 1:
        options.update(temperature=0.8, top_p=0.95)
        if i % 2:
            options["seed"] = i
    if i % 5 == 2:
        options["stop"] = [".", "\n\n"]
    if i % 7 == 3:
        options.update(logprobs=True, top_logprobs=2)
    return options


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


async def soak(target: str, args, pids: list[int]) -> tuple[Counter, int, int, float]:
    rows = load_prompts()
    statuses: Counter = Counter()
    issued = 0
    warm_rss = 0
    warm_at = max(1, args.requests // 10)
    rng = random.Random(0)

    async def one(client: BildClient, i: int) -> None:
        cancel_after = rng.randint(1, 4) if i % 11 == 5 else None  # tokens before the client gives up
        seen = 0
        call = client.generate(messages=rows[i % len(rows)], max_new_tokens=args.max_new_tokens, **kind(i))
        try:
            async for response in call:
                seen += len(response.token_ids)
                if cancel_after is not None and seen >= cancel_after:
                    statuses["CANCELLED (by the client)"] += 1
                    await call.aclose()
                    return
            statuses["OK"] += 1
        except grpc.aio.AioRpcError as error:
            statuses[error.code().name] += 1

    async def worker(client: BildClient) -> None:
        nonlocal issued, warm_rss
        while issued < args.requests:
            i = issued
            issued += 1
            if i == warm_at:
                warm_rss = rss_bytes(pids)
            await one(client, i)
            done = sum(statuses.values())
            if done % 250 == 0:
                print(f"  {done}/{args.requests} {dict(statuses)}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    async with BildClient(target) as client:
        await asyncio.gather(*[worker(client) for _ in range(args.concurrency)])
    return statuses, warm_rss, rss_bytes(pids), time.perf_counter() - started


async def max_batch_size(target: str) -> int:
    async with BildClient(target) as client:
        return (await client.model_info(timeout=10)).max_batch_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", "-n", type=int, default=5000)
    ap.add_argument("--concurrency", "-c", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--metrics-port", type=int, default=9477)
    ap.add_argument("--server-args", default="", help="more bild-server flags, as one string")
    args = ap.parse_args()
    proc, target = start_server(["--metrics-port", str(args.metrics_port), *shlex.split(args.server_args)])
    try:
        pids = server_pids(proc.pid)
        statuses, warm, end, seconds = asyncio.run(soak(target, args, pids))
        time.sleep(1.0)  # the engine's last gauges travel after the last stream ends
        load = gauges(args.metrics_port)
        slots = asyncio.run(max_batch_size(target))
    finally:
        proc.terminate()
        proc.wait(120)
    growth = (end - warm) / warm if warm else float("nan")
    errors = {k: v for k, v in statuses.items() if k not in ("OK", "CANCELLED (by the client)")}
    idle = load.get("running") == load.get("waiting") == load.get("reserved_tokens") == 0
    idle = idle and load.get("free_slots") == slots
    print(f"# Soak: {args.requests} requests, {args.concurrency} streams, {args.max_new_tokens} new tokens")
    server_args = f" --server-args {args.server_args!r}" if args.server_args else ""
    print(
        f"`python bench/soak.py -n {args.requests} -c {args.concurrency} --max-new-tokens {args.max_new_tokens}"
        f"{server_args}`\n"
    )
    print("| check | value | pass |\n|---|---|---|")
    print(f"| statuses | {dict(statuses)} | {not errors} |")
    print(f"| wall time | {seconds:.0f} s | |")
    rss = f"{warm / 2**20:.0f} MB -> {end / 2**20:.0f} MB ({growth:+.1%})"
    print(f"| server RSS after warm-up -> end | {rss} | {growth < 0.05} |")
    print(f"| engine at the end | {load} | {idle} |")
    return 0 if not errors and growth < 0.05 and idle else 1


if __name__ == "__main__":
    sys.exit(main())
