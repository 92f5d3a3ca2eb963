"""Measure what the two models' forwards cost on this device, for the plan's cost model.

At start-up each model runs forwards over 1, 2, 3, ... new tokens in all (up to 8 for every slot),
spread over as many sequences as the batch holds, over a cached prefix. A count whose forward is
slower than a larger count's runs as the larger one (`CausalLMRunner.run_as`). Results are
kept under the bild cache, keyed by everything that changes them (the models' shapes, dtype,
device, threads, CPU, torch), so a restart does not measure again. The plan corrects for drift
online (`CostModel.observed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from scheduler import cpu_linear
from scheduler.loading import cache_dir
from scheduler.model_runner import CausalLMRunner, ForwardItem
from scheduler.policy import CostModel, CostTable

log = logging.getLogger(__name__)

VERSION = 1  # of the runner's arithmetic: change it when forwards' costs change, so caches are remeasured
PREFIX = 64  # cached tokens under each measured forward
REPEATS = 2
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
        if hasattr(runner, "encode"):  # an encoder-decoder: its decoder attends over a source as well
            runner.encode(slot, [1] * prefix)
        runner.next_token_logits([ForwardItem(slot, 0, [1] * prefix)])
    seconds = []
    for n in counts:
        rows = min(n, max_rows)  # the tokens spread as evenly as the sequences allow
        items = [ForwardItem(slot, prefix, [1] * (n // rows + (slot < n % rows))) for slot in range(rows)]
        runner.token_logits(items)  # warm-up: the first forward of a shape is slower
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            runner.token_logits(items)
            if runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)
            times.append(time.perf_counter() - started)
        seconds.append(statistics.median(times))
    return CostTable(counts, seconds)


def _key(runners: tuple[CausalLMRunner, CausalLMRunner], counts: list[int], max_rows: int) -> str:
    parts = []
    for runner in runners:
        head = runner.model.get_output_embeddings()
        parts.append(
            {
                "config": runner.model.config.to_dict(),
                "parameters": sum(p.numel() for p in runner.model.parameters()),
                "head": [type(head).__name__, len(getattr(head, "token_ids", []))],
                "dtype": str(runner.dtype),
                "device": str(runner.device),
                "pack": runner.pack,
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
    started = time.perf_counter()
    model = CostModel(_table(large, counts, max_rows), _table(small, counts, max_rows))
    log.info("measured the models' forward costs in %.1fs (kept in %s)", time.perf_counter() - started, path)
    try:
        save(model, path)
    except OSError as error:
        log.warning("could not keep the cost profile: %s", error)
    return model
