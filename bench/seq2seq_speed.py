"""Tokens/s of an encoder-decoder pair in bild's engine against transformers' `generate`, on random
weights of real shapes (no encoder-decoder weights install offline here).

    python bench/seq2seq_speed.py [--streams 1 8] [--max-new-tokens 48] [--rounds 2]

The large model has flan-t5-base's shape and the small one flan-t5-small's (gated-gelu T5, the
32,128-token vocabulary). Random weights agree by chance only, so this measures the runner, not
BiLD's speed-up:
  * mode large at one stream against `generate` (greedy, one beam, the same model and sources):
    the runner's own cost, encoders included;
  * mode large at several streams: what continuous batching gives an encoder-decoder;
  * mode exact with a draft that agrees by chance: what the load-adaptive plan makes of drafts
    whose worth it must learn (random pairs tend to repeat tokens, so some sequences agree often
    and others never).
A run at N streams keeps N sequences in the batch, admitting the next source as one ends, as a
server under N clients does (waiting for a whole batch to end would time the sequence that agrees
least). Every generation has the same length (EOS ignored). Rounds alternate the runs, so drift on
a shared machine touches them alike; the table gives each figure's median over rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from offline import generate  # bench/offline.py, beside this script
from transformers import T5Config, T5ForConditionalGeneration

from scheduler.engine_core import runner
from scheduler.request import Mode, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig

SHAPES = {  # flan-t5's
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
}


def build(shape: str, seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **SHAPES[shape],
    )
    return T5ForConditionalGeneration(config).eval()


def transformers_tokens_per_s(model, sources: list[list[int]], new_tokens: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for source in sources:
            model.generate(
                torch.tensor([source]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
    return len(sources) * new_tokens / (time.perf_counter() - started)


def bild_tokens_per_s(scheduler: Scheduler, sources, params) -> tuple[float, float]:
    """(tokens/s, share of tokens from the small model), as many sources in the batch at a time as
    the scheduler has slots."""
    outputs, requests, seconds = generate(scheduler, sources, params)
    tokens = sum(map(len, outputs))
    return tokens / seconds, sum(r.stats.small_tokens for r in requests) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sources", type=int, default=16, help="sources per run")
    parser.add_argument("--source-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    large, small = build("base", seed=1), build("small", seed=2)
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randint(2, 32128, (args.source_tokens,), generator=gen).tolist() for _ in range(args.sources)]
    n = args.max_new_tokens
    started = time.perf_counter()
    schedulers = {}  # one per stream count, its slots the streams; each measures its costs
    for streams in args.streams:
        config = SchedulerConfig(max_num_seqs=streams, max_seq_len=args.source_tokens + n + 8)
        schedulers[streams] = Scheduler(runner(small, config), runner(large, config), config, {1})
    profiled = time.perf_counter() - started
    plain = SamplingParams(mode=Mode.LARGE, max_new_tokens=n, ignore_eos=True)
    exact = SamplingParams(mode=Mode.EXACT, max_new_tokens=n, ignore_eos=True)

    figures: dict[str, list[float]] = {}
    shares: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        figures.setdefault("transformers generate, 1 stream", []).append(transformers_tokens_per_s(large, sources, n))
        for streams in args.streams:
            for name, params in (("large", plain), ("exact", exact)):
                speed, share = bild_tokens_per_s(schedulers[streams], sources, params)
                figures.setdefault(f"bild {name}, {streams} streams", []).append(speed)
                shares.setdefault(f"bild {name}, {streams} streams", []).append(share)
    baseline = statistics.median(figures["transformers generate, 1 stream"])

    print(
        f"T5 (gated-gelu) flan-t5-base shape (large) and flan-t5-small shape (small), random weights; "
        f"{args.sources} sources of {args.source_tokens} tokens, {n} new tokens each; {args.rounds} rounds; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; cost profiles measured in {profiled:.0f} s\n"
    )
    print("| run | tokens/s (median) | vs transformers generate | small-token share |")
    print("|---|---|---|---|")
    for name, values in figures.items():
        speed = statistics.median(values)
        share = f"{statistics.median(shares[name]):.0%}" if name in shares else ""
        print(f"| {name} | {speed:.1f} | {speed / baseline:.2f}x | {share} |")
    print(f"\n`python {' '.join(sys.argv)}`")


if __name__ == "__main__":
    main()
