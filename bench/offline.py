"""Run a batch of prompts to completion on a scheduler directly, without the engine process (for the benchmarks)."""

from __future__ import annotations

import time

from scheduler.request import Request, SamplingParams
from scheduler.scheduler import Scheduler


def generate(
    scheduler: Scheduler, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> tuple[list[list[int]], list[Request], float]:
    """Token ids per prompt, the requests (with their statistics) and the wall time in seconds."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    requests = [Request(str(i), p, q) for i, (p, q) in enumerate(zip(prompts, params))]
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for r in requests:
        scheduler.add(r)
    start = time.perf_counter()
    while scheduler.has_work():
        for o in scheduler.step():
            out[o.request.request_id] += o.tokens
    return [out[r.request_id] for r in requests], requests, time.perf_counter() - start
