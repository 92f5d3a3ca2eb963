"""Held-out figures for a small model: agreement with the large model and cost per token.

- agreement: top-1 agreement of the small model with the large model along the large model's
  greedy continuations of held-out prompts (teacher forcing: each position sees the large model's
  own prefix), overall, per prompt family, and how much of it a confidence threshold keeps. It is
  reported on up to three sets: the held-out template prompts (`agreement`), which resemble the
  training prompts closely; user turns the large model wrote itself (`magpie`, align/magpie.py),
  which no training prompt repeats; and hand-written chat conversations (`chat`, bench/chat.jsonl),
  independent of anything the alignment made.
- cost: milliseconds per generated token at batch 1, float32, for both models on the same prompts,
  and their ratio: in a plain transformers loop with a KV cache (`transformers`), and in bild's own
  runner (`bild`: its CPU kernels, and only the tokens of output_vocab.json for the small model),
  which is what a server pays.

The evaluation sets are the large model's greedy continuations, generated once and cached under
--work-dir/data beside bild-align's training data; bild-align takes them, and the figures, from here.

Usage: python -m align.evaluate --small models/smollm2-135m-draft [--large smollm2-135m-instruct]
       [--magpie-eval 300] [--write]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from align.generate import GenSettings, generate_shards, load_shards
from align.prompts import Prompt, digest, read_chat_prompts, split_prompts
from align.train import collate, make_examples, position_logits
from scheduler import output_vocab
from scheduler.model_runner import CausalLMRunner, ForwardItem

log = logging.getLogger(__name__)

# Written for benchmarks, never part of any training prompt: the fairest test of a draft at hand.
CHAT_PROMPTS = Path(__file__).resolve().parent.parent / "bench" / "chat.jsonl"


def greedy_records(
    large, tokenizer, large_spec: str, work_dir: Path, prompts: list[Prompt], split: str, settings: GenSettings
) -> list[dict]:
    """The large model's greedy continuations of `prompts` (generated once), for evaluation."""
    data_dir = work_dir / "data" / settings.key(large_spec, split)
    generate_shards(large, tokenizer, prompts, data_dir, settings, desc=f"{split} data")
    return load_shards(data_dir)


def heldout_records(
    large, tokenizer, large_spec: str, work_dir: Path, n_prompts: int, seed: int, settings: GenSettings | None = None
) -> list[dict]:
    """The large model's greedy continuations of the first n held-out prompts (generated once)."""
    settings = replace(settings or GenSettings(), sampled=False, seed=seed)
    _, held = split_prompts(seed)
    return greedy_records(large, tokenizer, large_spec, work_dir, held[:n_prompts], f"heldout{n_prompts}", settings)


def eval_records(
    large,
    tokenizer,
    large_spec: str,
    work_dir: Path,
    prompts: list[Prompt],
    name: str,
    settings: GenSettings | None = None,
) -> list[dict]:
    """The same for another evaluation set, cached under its contents (the seed plays no part)."""
    settings = replace(settings or GenSettings(), sampled=False, seed=0)
    split = f"{name}{len(prompts)}-{digest(prompts)}"
    return greedy_records(large, tokenizer, large_spec, work_dir, prompts, split, settings)


def evaluation_sets(
    large,
    tokenizer,
    large_spec: str,
    work_dir: Path,
    magpie_eval: list[Prompt],
    chats: list[Prompt],
    settings: GenSettings | None = None,
) -> dict[str, list[dict]]:
    """Greedy continuations of the Magpie evaluation prompts and of the chat conversations, by name,
    for those there are."""
    sets = {}
    if magpie_eval:
        sets["magpie"] = eval_records(large, tokenizer, large_spec, work_dir, magpie_eval, "magpie-eval", settings)
    if chats:
        sets["chat"] = eval_records(large, tokenizer, large_spec, work_dir, chats, "chat", settings)
    return sets


@torch.inference_mode()
def agreement(small: PreTrainedModel, records: list[dict], thresholds: tuple[float, ...] = (0.5, 0.6, 0.7)) -> dict:
    """Top-1 agreement with the large model's continuation tokens, in total and per family."""
    small.eval()
    examples = make_examples(records)
    pad = small.config.pad_token_id if small.config.pad_token_id is not None else 0
    hits, total = 0, 0
    per_family: dict[str, list[int]] = {}
    conf_all: list[torch.Tensor] = []
    ok_all: list[torch.Tensor] = []
    for start in range(0, len(examples), 16):
        chunk = examples[start : start + 16]
        batch = collate(chunk, pad)
        logits = position_logits(
            small, batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"]
        ).float()
        prob, pred = torch.softmax(logits, -1).max(-1)
        ok = pred == batch["targets"]
        conf_all.append(prob)
        ok_all.append(ok)
        hits += int(ok.sum())
        total += ok.numel()
        for b, rec in enumerate(records[start : start + 16]):
            fam = per_family.setdefault(rec.get("family", "all"), [0, 0])
            sel = batch["rows"] == b
            fam[0] += int(ok[sel].sum())
            fam[1] += int(sel.sum())
    conf, ok = torch.cat(conf_all), torch.cat(ok_all)
    confident = {}
    for t in thresholds:
        keep = conf >= t
        confident[str(t)] = {
            "coverage": round(keep.float().mean().item(), 4),
            "accuracy": round(ok[keep].float().mean().item(), 4) if keep.any() else None,
        }
    return {
        "agreement": round(hits / max(total, 1), 4),
        "positions": total,
        "prompts": len(examples),
        "per_family": {k: round(v[0] / max(v[1], 1), 4) for k, v in sorted(per_family.items())},
        "confident": confident,
    }


def _cache_kw(model: PreTrainedModel) -> str:
    """transformers 5.x renamed the KV-cache keyword of forward(); use whichever this version has."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@torch.inference_mode()
def ms_per_token(model: PreTrainedModel, prompt: list[int], new_tokens: int = 32) -> float:
    """Milliseconds per decode step at batch 1 with a KV cache (prefill excluded)."""
    model.eval()
    kw = _cache_kw(model)
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    cache = _out_cache(out)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{kw: cache})
        cache = _out_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) * 1000 / new_tokens


def runner_ms_per_token(runner: CausalLMRunner, prompt: list[int], new_tokens: int = 32) -> float:
    """Milliseconds per decode step at batch 1 in bild's runner (prefill excluded)."""
    token = int(runner.next_token_logits([ForwardItem(0, 0, prompt)])[0].argmax())
    t0 = time.perf_counter()
    for i in range(new_tokens):
        token = int(runner.next_token_logits([ForwardItem(0, len(prompt) + i, [token])])[0].argmax())
    return (time.perf_counter() - t0) * 1000 / new_tokens


def cost(
    small: PreTrainedModel,
    large: PreTrainedModel,
    records: list[dict],
    n_prompts: int = 6,
    new_tokens: int = 32,
    vocab_ids: list[int] | None = None,
) -> dict:
    """Cost per token of both models at batch 1, float32, on the same held-out prompts: in a
    transformers loop, and in bild's runner (with the small model scoring only `vocab_ids`).

    The two models alternate prompt by prompt, so load from other processes on the machine
    affects both alike; medians over prompts, after one warm-up each."""
    prompts = [r["prompt_ids"].tolist() for r in records[:n_prompts]]
    small32 = copy.deepcopy(small).float().eval()  # the runner rearranges its layers: not the caller's model
    in_transformers = _timed(lambda m, p: ms_per_token(m, p, new_tokens), small32, large, prompts)
    if vocab_ids is not None:
        output_vocab.install(small32, vocab_ids)
    max_len = max(map(len, prompts)) + new_tokens + 1
    runners = {id(m): CausalLMRunner(m, 1, max_len) for m in (small32, large)}
    in_bild = _timed(lambda m, p: runner_ms_per_token(runners[id(m)], p, new_tokens), small32, large, prompts)
    return {"transformers": in_transformers, "bild": in_bild}


def _timed(
    ms: Callable[[PreTrainedModel, list[int]], float],
    small: PreTrainedModel,
    large: PreTrainedModel,
    prompts: list[list[int]],
) -> dict:
    ms(small, prompts[0][:8])
    ms(large, prompts[0][:8])
    small_ms = [ms(small, prompt) for prompt in prompts]
    large_ms = [ms(large, prompt) for prompt in prompts]
    s_med, l_med = statistics.median(small_ms), statistics.median(large_ms)
    return {"small_ms": round(s_med, 2), "large_ms": round(l_med, 2), "ratio": round(s_med / l_med, 4)}


def main(argv: list[str] | None = None) -> None:
    from align.magpie import EVAL_POOL, magpie_sets

    parser = argparse.ArgumentParser(description="Held-out agreement and cost of a BiLD small model.")
    parser.add_argument("--small", required=True, help="small model directory")
    parser.add_argument(
        "--large", default="smollm2-135m-instruct", help="large model spec (alias, GGUF, dir or hub id)"
    )
    parser.add_argument(
        "--work-dir", default="align-work", help="where held-out continuations are cached (as bild-align --work-dir)"
    )
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument(
        "--magpie-eval", type=int, default=0, help="Magpie evaluation prompts (as bild-align --magpie-eval)"
    )
    parser.add_argument("--magpie-pool", type=int, default=EVAL_POOL, help="as bild-align --magpie-pool")
    parser.add_argument(
        "--chat-prompts",
        default=str(CHAT_PROMPTS) if CHAT_PROMPTS.is_file() else "",
        help="chat conversations to evaluate on, as bild-align --chat-prompts ('': none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cost", action="store_true", help="skip the timing")
    parser.add_argument(
        "--write", action="store_true", help="also update the figures in the small model's alignment.json"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from scheduler.loading import load_model

    large, tokenizer = load_model(args.large)
    work = Path(args.work_dir)
    records = heldout_records(large, tokenizer, args.large, work, args.eval_prompts, args.seed)
    _, magpie_eval = magpie_sets(large, tokenizer, args.large, work, 0, args.magpie_eval, pool=args.magpie_pool)
    chats = read_chat_prompts(Path(args.chat_prompts)) if args.chat_prompts else []
    sets = evaluation_sets(large, tokenizer, args.large, work, magpie_eval, chats)
    small = AutoModelForCausalLM.from_pretrained(args.small, dtype=torch.float32).eval()
    report = {"agreement": agreement(small, records), **{name: agreement(small, recs) for name, recs in sets.items()}}
    if not args.no_cost:
        report["cost"] = cost(small, large, records, vocab_ids=output_vocab.load(Path(args.small)))
    print(json.dumps(report, indent=1))
    if args.write:
        path = Path(args.small) / "alignment.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        info["heldout"] = {**info.get("heldout", {}), **report}
        info["heldout_agreement"] = report["agreement"]["agreement"]
        info.update({f"{name}_agreement": report[name]["agreement"] for name in sets})
        path.write_text(json.dumps(info, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
