"""Tokens/s of the engine in modes large, exact and bild, at batch 1 and batch 8, on one model pair.

    python bench/engine_speed.py [--large SPEC] [--small SPEC] [--max-new-tokens 64]

Prompts: bench/chat.jsonl (chat prompts written for benchmarks, never part of the draft's training),
or with --heldout bild-align's held-out prompts.

Batch 1 runs the prompts one after another; batch B keeps B of them in the batch at once. Every
figure of one table comes from the same process, so ratios are measured side by side. On a shared
machine whose speed drifts by 5-10% within minutes, `--rounds N` runs the modes N times in turn and
reports each mode's median speed-up over its own round's large-only run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
from offline import generate  # bench/offline.py, beside this script

from scheduler.loading import DEFAULT_SMALL_DIR, SMOLLM2_ALIAS, shown
from scheduler.model_runner import CausalLMRunner
from scheduler.pair import load_pair
from scheduler.request import Mode, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig

PROMPTS = Path(__file__).with_name("chat.jsonl")
MODES = (Mode.LARGE, Mode.EXACT, Mode.BILD)


def load_prompts(tokenizer, n: int, heldout: bool) -> list[list[int]]:
    if heldout:  # bild-align's held-out prompts, which the shipped draft never trained on
        from align.generate import encode_prompts
        from align.prompts import split_prompts

        return encode_prompts(tokenizer, [p.text for p in split_prompts(0)[1][:n]])
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()][:n]
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for r in rows
    ]


HEADER = [
    "| batch | mode | tokens/s | speed-up vs large | same tokens as large | small-token share | large calls / token |",
    "|---|---|---|---|---|---|---|",
]


def table(
    pair,
    prompts: list[list[int]],
    batch_sizes: list[int],
    max_new_tokens: int,
    rounds: int,
    overrides: dict,
    batch_independent: bool = False,
) -> list[str]:
    """The table's lines: modes large, exact and bild at each batch size, each round's ratios to its own large run."""
    lines = list(HEADER)
    max_len = max(map(len, prompts)) + max_new_tokens + 1
    for batch in batch_sizes:
        runners = (CausalLMRunner(pair.small, batch, max_len), CausalLMRunner(pair.large, batch, max_len))
        config = SchedulerConfig(max_num_seqs=batch, max_num_tokens=batch * max_len, max_seq_len=max_len)
        scheduler = Scheduler(*runners, config, pair.eos_token_ids)
        generate(scheduler, prompts[:batch], SamplingParams(mode=Mode.LARGE, max_new_tokens=4))  # warm-up
        rates: dict[Mode, list[float]] = {mode: [] for mode in MODES}
        ratios: dict[Mode, list[float]] = {mode: [] for mode in MODES}
        quality: dict[Mode, tuple[float, float, float]] = {}
        for _ in range(rounds):
            baseline = None
            for mode in MODES:
                params = SamplingParams(
                    mode=mode, max_new_tokens=max_new_tokens, batch_independent=batch_independent, **overrides
                )
                outputs, requests, seconds = generate(scheduler, prompts, params)
                tokens = sum(map(len, outputs))
                rate = tokens / seconds
                if baseline is None:
                    baseline = (rate, outputs)
                rates[mode].append(rate)
                ratios[mode].append(rate / baseline[0])
                # Deterministic decoding: these are the same in every round.
                same = sum(a == b for o, ref in zip(outputs, baseline[1]) for a, b in zip(o, ref))
                share = sum(r.stats.small_tokens for r in requests) / max(1, tokens)
                calls = sum(r.stats.large_forward_calls for r in requests) / max(1, tokens)
                quality[mode] = (same / max(1, sum(map(len, baseline[1]))), share, calls)
        for mode in MODES:
            same, share, calls = quality[mode]
            spread = f" ({min(ratios[mode]):.2f}-{max(ratios[mode]):.2f})" if rounds > 1 else ""
            line = (
                f"| {batch} | {mode.value} | {statistics.median(rates[mode]):.1f} | "
                f"{statistics.median(ratios[mode]):.2f}x{spread} | {same:.1%} | {share:.1%} | {calls:.2f} |"
            )
            lines.append(line)
            print(line, file=sys.stderr, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default=SMOLLM2_ALIAS)
    ap.add_argument("--small", default=str(DEFAULT_SMALL_DIR))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--heldout", action="store_true", help="bild-align's held-out prompts instead of bench/chat.jsonl")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--fallback-threshold", type=float, default=None)
    ap.add_argument("--rollback-threshold", type=float, default=None)
    ap.add_argument("--max-small-tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=1, help="run the modes this many times in turn; report medians")
    ap.add_argument("--batch-independent", action="store_true", help="as the server's flag")
    args = ap.parse_args()

    pair = load_pair(args.large, args.small, args.device, args.dtype)
    prompts = load_prompts(pair.tokenizer, args.prompts, args.heldout)
    overrides = {
        k: v
        for k, v in (
            ("fallback_threshold", args.fallback_threshold),
            ("rollback_threshold", args.rollback_threshold),
            ("max_small_tokens", args.max_small_tokens),
        )
        if v is not None
    }
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{os.cpu_count()}-core {platform.machine()} CPU"
    )
    print(
        f"large={args.large} small={shown(args.small)} device={device} dtype={args.dtype} torch={torch.__version__} "
        f"prompts={len(prompts)}{' held-out' if args.heldout else ''} max_new_tokens={args.max_new_tokens} "
        f"rounds={args.rounds} batch_independent={args.batch_independent} {overrides or ''}\n"
    )
    print(
        "\n".join(
            table(pair, prompts, args.batch_sizes, args.max_new_tokens, args.rounds, overrides, args.batch_independent)
        )
    )


if __name__ == "__main__":
    main()
