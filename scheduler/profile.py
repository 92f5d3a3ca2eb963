"""Measure what the two models' forwards cost on this device, for the plan's cost model.

At start-up each model runs forwards over 1, 2, 3, ... new tokens in all (up to 8 for every slot),
spread over as many sequences as the batch holds, over a cached prefix. A count whose forward is
slower than a larger count's runs as the larger one (`CausalLMRunner.run_as`). Results are
kept under the bild cache, keyed by everything that changes them (the models' shapes, dtype,
device, threads, CPU, torch), so a restart does not measure again. The plan corrects for drift
online (`CostModel.observed`), but only by one factor per model: it cannot mend a table whose
counts were slowed unevenly. So each count keeps its fastest of several passes over all counts (a
burst of other work slows one pass of a count, not all), and a profile measured while other
processes kept this one's threads waiting for a core (two replicas starting at once, a build) is
used for that run only, never cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from scheduler import cpu_linear
from scheduler.loading import cache_dir
from scheduler.model_runner import CausalLMRunner, ForwardItem
from scheduler.policy import CostModel, CostTable

log = logging.getLogger(__name__)

# Of the runner's arithmetic and of how it is measured: change it when either changes, so caches are remeasured.
VERSION = 7  # 7: int4 models and drafts run as one native call (scheduler/native)
PREFIX = 64  # cached tokens under each measured forward
REPEATS = 3  # passes over every count; a count costs its fastest pass
BUSY = 0.2  # share of the measuring threads' time spent waiting for a core beyond which nothing is cached
MAX_WIDTH = 8  # tokens per sequence measured at most; the plan extrapolates beyond


# Every count up to 16, where kernels change the most from one count to the next, then coarser.
COUNTS = (*range(1, 17), 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def _token_counts(max_rows: int) -> list[int]:
    """Token counts to measure, up to what a full batch feeds in one forward."""
    return [n for n in COUNTS if n <= max_rows * MAX_WIDTH]


def _table(runner: CausalLMRunner, counts: list[int], max_rows: int) -> CostTable:
    prefix = max(1, min(PREFIX, runner.cache.max_len - MAX_WIDTH - 1))
    runner.run_as = []  # each count as itself
    for slot in range(max_rows):
        if runner.encoder_decoder:  # its decoder attends over a source as well
            runner.encode(slot, [1] * prefix)
        runner.next_token_logits([ForwardItem(slot, 0, [1] * prefix)])
    shapes = []
    for n in counts:
        rows = min(n, max_rows)  # the tokens spread as evenly as the sequences allow
        shapes.append([ForwardItem(slot, prefix, [1] * (n // rows + (slot < n % rows))) for slot in range(rows)])
    for items in shapes:
        runner.token_logits(items)  # warm-up: the first forward of a shape is slower
    seconds = [math.inf] * len(shapes)
    for _ in range(REPEATS):
        for i, items in enumerate(shapes):
            started = time.perf_counter()
            runner.token_logits(items)
            if runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)
            seconds[i] = min(seconds[i], time.perf_counter() - started)
    return CostTable(counts, seconds)


def _scheduling() -> tuple[float, float] | None:
    """Seconds this process's threads have run on a core and waited for one (Linux schedstat), or None."""
    ran = waited = 0.0
    try:
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
                fields = (task / "schedstat").read_text().split()
                ran, waited = ran + int(fields[0]) / 1e9, waited + int(fields[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None
    return ran, waited


def waiting_share(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """Of the time this process's threads wanted a core between two `_scheduling` readings, the share
    they waited for one: near 0 on a machine left to bild, large when other processes take the cores."""
    if before is None or after is None:
        return None
    ran, waited = after[0] - before[0], after[1] - before[1]
    return waited / (ran + waited) if ran + waited > 0 else None


def _key(runners: tuple[CausalLMRunner, CausalLMRunner], counts: list[int], max_rows: int) -> str:
    parts = []
    for runner in runners:
        head = runner.model.get_output_embeddings()
        parts.append(
            {
                "config": runner.model.config.to_dict(),
                "parameters": sum(p.numel() for p in runner.model.parameters()),
                "head": [type(head).__name__, len(getattr(head, "token_ids", []))],
                # int4 and float layers cost differently: a profile measured on one never plans the other
                "modules": sorted({type(m).__name__ for m in runner.model.modules()}),
                "dtype": str(runner.dtype),
                "device": str(runner.device),
                "pack": runner.pack,
                "invariant": runner.invariant,
            }
        )
    machine = {
        "cpu": cpu_linear.machine_key(),
        "gpu": torch.cuda.get_device_name() if any(r.device.type == "cuda" for r in runners) else "",
        "counts": counts,
        "rows": max_rows,
        "prefix": PREFIX,
        "version": VERSION,
    }
    text = json.dumps([parts, machine], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(path: Path) -> CostModel:
    """A cost profile from JSON: {"large": table, "small": table}, each {"tokens": [...], "seconds": [...]}."""
    data = json.loads(Path(path).read_text())
    return CostModel(CostTable(**data["large"]), CostTable(**data["small"]))


def save(model: CostModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tables = {"large": model.large_table, "small": model.small_table}
    tmp.write_text(json.dumps({name: {"tokens": t.tokens, "seconds": t.seconds} for name, t in tables.items()}))
    tmp.rename(path)  # atomic: a concurrent start never reads half a file


def cost_model(small: CausalLMRunner, large: CausalLMRunner, max_rows: int) -> CostModel:
    """The pair's cost model: from the cache if these models were measured here before, else measured now."""
    counts = _token_counts(max_rows)
    path = cache_dir() / "costs" / f"{_key((small, large), counts, max_rows)}.json"
    if path.is_file():
        try:
            return load(path)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable cost profile %s", path)
    started, scheduled = time.perf_counter(), _scheduling()
    model = CostModel(_table(large, counts, max_rows), _table(small, counts, max_rows))
    waited = waiting_share(scheduled, _scheduling())
    if waited is not None and waited > BUSY:
        log.warning(
            "measured the models' forward costs while other processes held the cores (bild's threads waited "
            "%.0f%% of the time): planning with them for this run, not keeping them; start on an idle "
            "machine, or give --cost-profile",
            100 * waited,
        )
        return model
    log.info("measured the models' forward costs in %.1fs (kept in %s)", time.perf_counter() - started, path)
    try:
        save(model, path)
    except OSError as error:
        log.warning("could not keep the cost profile: %s", error)
    return model
