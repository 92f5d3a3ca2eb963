"""A load generator for bild-server: N concurrent streams for a duration or a request count.

    python bench/load.py --concurrency 16 --requests 200 --max-new-tokens 64 [--mode bild] [--target host:port]

Prints a ghz-like summary: count, errors by status, requests/s, latency percentiles of the whole
stream, of the first token (which ghz cannot see in a server stream) and between tokens, and the
aggregate settled tokens/s. Prompts cycle through bench/chat.jsonl (chat messages).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from client import BildClient

PROMPTS = Path(__file__).with_name("chat.jsonl")


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    inter_token: list[float] = field(default_factory=list)
    tokens: int = 0
    statuses: Counter = field(default_factory=Counter)
    outputs: dict[int, list[int]] = field(default_factory=dict)  # prompt index -> token ids (last run of it)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def one_request(client: BildClient, index: int, messages, args, results: Results) -> None:
    start = last = time.perf_counter()
    ids: list[int] = []
    try:
        async for response in client.generate(
            messages=messages, max_new_tokens=args.max_new_tokens, mode=args.mode, timeout=args.timeout
        ):
            now = time.perf_counter()
            if response.token_ids:
                if last == start:  # the first tokens of this stream
                    results.first_token.append(now - start)
                else:
                    # Several tokens may settle at once: spread the gap over them.
                    results.inter_token.extend([(now - last) / len(response.token_ids)] * len(response.token_ids))
                last = now
                results.tokens += len(response.token_ids)
                ids.extend(response.token_ids)
        results.latencies.append(time.perf_counter() - start)
        results.outputs[index] = ids
        results.statuses["OK"] += 1
    except grpc.aio.AioRpcError as error:
        results.statuses[error.code().name] += 1


def load_prompts() -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in PROMPTS.read_text().splitlines() if line.strip()]


async def run(args, rows: list | None = None) -> Results:
    rows = rows or load_prompts()
    results = Results()
    deadline = time.perf_counter() + args.duration if args.duration else None
    issued = 0

    async def worker(client: BildClient) -> None:
        nonlocal issued
        while (args.requests is None or issued < args.requests) and (
            deadline is None or time.perf_counter() < deadline
        ):
            index = issued % len(rows)
            issued += 1
            await one_request(client, index, rows[index], args, results)

    async with BildClient(args.target) as client:
        await asyncio.gather(*[worker(client) for _ in range(args.concurrency)])
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--concurrency", "-c", type=int, default=8)
    ap.add_argument("--requests", "-n", type=int, help="total requests (default: until --duration)")
    ap.add_argument("--duration", "-z", type=float, help="seconds to keep issuing requests")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--mode", default="bild", choices=["bild", "exact", "large", "small"])
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    if args.requests is None and args.duration is None:
        args.requests = 4 * args.concurrency
    started = time.perf_counter()
    results = asyncio.run(run(args))
    wall = time.perf_counter() - started
    count = sum(results.statuses.values())

    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1e3

    print(f"Summary ({args.mode}, concurrency {args.concurrency}, max_new_tokens {args.max_new_tokens}):")
    print(f"  Count:        {count}")
    print(f"  Total:        {wall:.2f} s")
    print(f"  Requests/sec: {count / wall:.2f}")
    print(f"  Tokens/sec:   {results.tokens / wall:.1f}")
    if results.latencies:
        print(f"  Slowest:      {max(results.latencies) * 1e3:.0f} ms")
        print(f"  Fastest:      {min(results.latencies) * 1e3:.0f} ms")
        print(f"  Average:      {statistics.mean(results.latencies) * 1e3:.0f} ms")
    print("\nLatency distribution (ms):\n  | | p50 | p90 | p95 | p99 |\n  |---|---|---|---|---|")
    for name, values in (
        ("stream", results.latencies),
        ("first token", results.first_token),
        ("between tokens", results.inter_token),
    ):
        print(f"  | {name} | " + " | ".join(f"{ms(values, q):.0f}" for q in (50, 90, 95, 99)) + " |")
    print("\nStatus code distribution:")
    for status, n in results.statuses.most_common():
        print(f"  [{status}]  {n} responses")


if __name__ == "__main__":
    main()
