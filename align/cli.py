"""`bild-align`: make a BiLD small model agree with a large one (prediction alignment).

Steps, each resumable (rerun the same command after an interruption and it continues):
0. optionally (--magpie, --magpie-eval), user turns the large model writes itself (align/magpie.py):
   training prompts beside the template prompts of align/prompts.py, and evaluation prompts;
1. the large model's greedy continuations of prompts for evaluation only: held-out template prompts,
   the Magpie evaluation prompts, and hand-written chat conversations (--chat-prompts);
2. the large model's continuations of training prompts (greedy, optionally also sampled), with its
   top-k log-probs, in shards under --work-dir;
3. training of the small model (created from architecture flags, or continued from --small), with
   checkpoints under --work-dir, each also saved to --out so a usable model exists early;
4. optionally (--onpolicy-minutes), on-policy data: the trained small model writes greedy
   continuations of the training prompts and the large model labels them (align/label.py: one
   forward per continuation rather than one per token), then training continues on all the data;
5. the figures (agreement on each evaluation set, cost per token vs the large model), written to
   --out/alignment.json.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from align.evaluate import CHAT_PROMPTS, agreement, cost, evaluation_sets, heldout_records
from align.generate import GenSettings, adopt_shards, generate_shards, load_shards, spent_seconds
from align.magpie import EVAL_POOL, MagpieSettings, Seen, magpie_sets, write_prompts
from align.model import SmallArch, create_small, save_small
from align.prompts import Prompt, digest, prefix_digests, read_chat_prompts, split_prompts
from align.train import TrainSettings, predicted_vocab, train
from scheduler import output_vocab

log = logging.getLogger("bild.align")
# Magpie training prompts are continued in blocks of this many, each cached under its contents: the
# shipped drafts' stages grew by 8,000 prompts at a time.
MAGPIE_BLOCK = 8000


def training_run(work_dir: Path, signature: dict) -> tuple[str, Path]:
    """A training run's key and checkpoint path: the same signature (inputs and settings) finds the
    same checkpoint, which is how a rerun resumes."""
    key = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]
    ckpt = work_dir / "train" / key / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    (ckpt.parent / "signature.json").write_text(json.dumps(signature, indent=1))
    return key, ckpt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bild-align", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--large", default="smollm2-135m-instruct", help="large model: alias, GGUF path, directory or hub id"
    )
    p.add_argument(
        "--small", default=None, help="existing small model directory to continue from (else one is created)"
    )
    p.add_argument("--out", default=None, help="output directory (default: the repository's models/smollm2-135m-draft)")
    p.add_argument("--work-dir", default="align-work", help="data cache and checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny everything: checks the pipeline in about a minute")
    a = p.add_argument_group("small architecture (when --small is not given)")
    a.add_argument("--hidden-size", type=int, default=192)
    a.add_argument("--layers", type=int, default=5)
    a.add_argument("--heads", type=int, default=3)
    a.add_argument("--kv-heads", type=int, default=1)
    a.add_argument("--intermediate-size", type=int, default=512)
    d = p.add_argument_group("data")
    d.add_argument("--num-prompts", type=int, default=None, help="training prompts (default: all)")
    d.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts to evaluate on")
    d.add_argument("--max-new-tokens", type=int, default=96)
    d.add_argument("--topk", type=int, default=16, help="large-model log-probs kept per position")
    d.add_argument(
        "--gen-batch-size",
        type=int,
        default=32,
        help="sequences the large model writes at once, prompts and continuations (bfloat16: 128 pays)",
    )
    d.add_argument("--shard-prompts", type=int, default=128, help="prompts (or Magpie attempts) per shard file")
    d.add_argument("--no-greedy", action="store_true", help="skip greedy continuations")
    d.add_argument("--sampled", type=int, default=0, help="sampled continuations per prompt (after the greedy ones)")
    d.add_argument("--temperature", type=float, default=0.8)
    d.add_argument(
        "--gen-minutes",
        type=float,
        default=None,
        help="budget for generating this run's training data, counting what writing its cached sets took "
        "(a Magpie block an earlier stage continued too)",
    )
    d.add_argument(
        "--gen-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="type the large model writes training data in (Magpie prompts, continuations, on-policy labels); "
        "bfloat16 writes 2.2-2.4x faster on CPUs that compute it natively (AVX512-BF16, AMX), with greedy "
        "choices equal to float32's at about 98%% of positions; evaluation data is always float32",
    )
    d.add_argument(
        "--train-prompts",
        default="",
        help='more training prompts: JSON lines (.gz too) of {"messages": [...]} ending with a user turn, '
        "such as your own traffic's; continued by the large model and trained on first, beside the others; "
        "repeats of an evaluation prompt are dropped",
    )
    m = p.add_argument_group("prompts the large model writes (Magpie) and other evaluation sets")
    m.add_argument(
        "--magpie",
        type=int,
        default=0,
        help="training prompts the large model writes itself, continued (before the template prompts, within "
        "--gen-minutes; writing them is not counted there) and trained on beside them (0: none); continued in "
        f"blocks of {MAGPIE_BLOCK:,}, each cached, so a later, larger --magpie continues only the new ones (a "
        "block an earlier run left short lends its answers to the longer block it begins)",
    )
    m.add_argument(
        "--magpie-eval",
        type=int,
        default=0,
        help="Magpie evaluation prompts to report agreement on: the first of the --magpie-pool",
    )
    m.add_argument(
        "--magpie-pool",
        type=int,
        default=EVAL_POOL,
        help="Magpie prompts set aside for evaluation, which training prompts never repeat; keep it fixed, "
        "or the training prompts change",
    )
    m.add_argument(
        "--chat-prompts",
        default=str(CHAT_PROMPTS) if CHAT_PROMPTS.is_file() else "",
        help='chat conversations (JSON lines of {"messages": [...]}, each ending with a user turn) to report '
        "agreement on (default: bench/chat.jsonl; '': none)",
    )
    m.add_argument(
        "--prompts-only",
        action="store_true",
        help="write the Magpie prompts (--work-dir/magpie/train.jsonl and eval.jsonl) and stop",
    )
    t = p.add_argument_group("training")
    t.add_argument("--train-steps", type=int, default=None)
    t.add_argument("--train-minutes", type=float, default=None, help="budget (default when no steps: 30)")
    t.add_argument("--lr", type=float, default=TrainSettings.lr)
    t.add_argument("--warmup", type=float, default=TrainSettings.warmup, help="fraction of the run")
    t.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    t.add_argument("--weight-decay", type=float, default=TrainSettings.weight_decay)
    t.add_argument(
        "--kd-weight",
        type=float,
        default=TrainSettings.kd_weight,
        help="weight of distillation on top-k log-probs (0: off)",
    )
    t.add_argument(
        "--vocab-topk",
        type=int,
        default=TrainSettings.vocab_topk,
        help="train the output softmax only over tokens seen in the large model's top-k (0: full vocabulary; "
        "1, the tokens it chose, which are also the ones bild has the draft score)",
    )
    t.add_argument(
        "--negatives", type=int, default=TrainSettings.negatives, help="other tokens sampled into each step's softmax"
    )
    t.add_argument(
        "--batch-vocab",
        type=int,
        default=TrainSettings.batch_vocab,
        help="each step's softmax covers the batch's own top-k tokens and this many others from the training "
        "vocabulary (0: all of it)",
    )
    t.add_argument("--checkpoint-every", type=int, default=TrainSettings.checkpoint_every)
    t.add_argument("--eval-every", type=int, default=TrainSettings.eval_every)
    t.add_argument("--no-cost", action="store_true", help="skip timing the models at the end")
    o = p.add_argument_group("on-policy stage (after training)")
    o.add_argument(
        "--onpolicy-minutes",
        type=float,
        default=0.0,
        help="budget for continuations the trained small model writes and the large model labels (0: no such stage)",
    )
    o.add_argument(
        "--retrain-minutes",
        type=float,
        default=None,
        help="training on all the data after that (default: --train-minutes)",
    )
    o.add_argument(
        "--retrain-steps", type=int, default=None, help="the same as a number of steps (default: --train-steps)"
    )
    o.add_argument("--retrain-lr", type=float, default=None, help="peak learning rate of that training (default: --lr)")
    return p


def magpie_split(block: list[Prompt]) -> str:
    return f"train-magpie{len(block)}-{digest(block)}"


def adopt_earlier_block(data: Path, kind: GenSettings, writer_spec: str, block: list[Prompt]) -> None:
    """Give a Magpie block the answers an earlier stage wrote to its first prompts. A stage that ended
    mid-block (20,000 prompts: a last block of 4,000) left them under that shorter block's key; every
    such block (the longest first) lends the complete shards the block lacks, and the rest are
    continued as usual."""
    target, prefixes = data / kind.key(writer_spec, magpie_split(block)), prefix_digests(block)
    for length in range(len(block) - 1, kind.shard_prompts - 1, -1):
        earlier = data / kind.key(writer_spec, f"train-magpie{length}-{prefixes[length - 1]}")
        if earlier.is_dir() and (adopted := adopt_shards(target, earlier, length // kind.shard_prompts)):
            log.info("%s: %d shards from the earlier block %s", target.name, adopted, earlier.name)


def apply_smoke(args: argparse.Namespace) -> None:
    """Sizes that exercise every step in well under two minutes."""
    args.num_prompts = min(args.num_prompts or 16, 16)
    args.eval_prompts = min(args.eval_prompts, 4)
    args.magpie, args.magpie_eval, args.magpie_pool = (
        min(args.magpie, 16),
        min(args.magpie_eval, 4),
        min(args.magpie_pool, 8),
    )
    args.max_new_tokens = min(args.max_new_tokens, 8)
    args.gen_batch_size, args.shard_prompts = 8, 8
    args.hidden_size, args.layers, args.heads, args.kv_heads, args.intermediate_size = 64, 1, 2, 1, 128
    if args.train_minutes is None:
        args.train_steps = args.train_steps or 20
    args.batch_size = 4
    args.checkpoint_every = min(args.checkpoint_every, 10)
    args.eval_every = min(args.eval_every, 10)


def prompts_from_file(path: Path, evaluation: list[Prompt]) -> list[Prompt]:
    """The file's conversations, less repeats of one another and of an evaluation prompt: an
    agreement measured on prompts the draft trained on would flatter it."""
    seen, kept, dropped = Seen(evaluation), [], 0
    for prompt in read_chat_prompts(path):
        if seen.repeat(prompt):
            dropped += 1
            continue
        seen.add(prompt)
        kept.append(prompt)
    log.info("training prompts from %s: %d kept, %d repeats dropped", path, len(kept), dropped)
    if not kept:
        raise SystemExit(f"bild-align: no training prompts left in {path}")
    return kept


def run(args: argparse.Namespace, stop_after_steps: int | None = None) -> dict:
    from scheduler.loading import DEFAULT_SMALL_DIR, DTYPES, load_model

    if args.smoke:
        apply_smoke(args)
    out = Path(args.out) if args.out else DEFAULT_SMALL_DIR
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.time()

    large, tokenizer = load_model(args.large)
    if large.config.is_encoder_decoder:
        raise SystemExit(f"bild-align aligns drafts of decoder-only models; {args.large} is an encoder-decoder")
    # Training data may come from a faster copy; what the draft is measured against stays the float32
    # model bild serves by default. The copy is made before any runner rearranges the model's layers.
    writer, writer_spec = large, args.large
    if args.gen_dtype != "float32":
        writer, writer_spec = copy.deepcopy(large).to(DTYPES[args.gen_dtype]), f"{args.large}@{args.gen_dtype}"
    # Training prompts follow the data flags (with their defaults, MagpieSettings' own: caches written
    # before they applied stay valid); the evaluation pool keeps MagpieSettings', so that figures stay
    # comparable whatever writes the training data. --smoke shrinks both.
    writing = MagpieSettings(batch_size=args.gen_batch_size, shard_attempts=args.shard_prompts)
    pool_writing = writing if args.smoke else MagpieSettings()
    magpie_train, magpie_eval = magpie_sets(
        large,
        tokenizer,
        args.large,
        work,
        args.magpie,
        args.magpie_eval,
        args.seed,
        args.magpie_pool,
        pool_writing,
        writer=(writer, writer_spec, writing),
    )
    written = {}  # for people to read: the pipeline itself keeps them in memory
    for name, prompts in (("train", magpie_train), ("eval", magpie_eval)):
        if prompts:
            path = work / "magpie" / f"{name}.jsonl"
            write_prompts(path, prompts)
            written[name] = {"prompts": len(prompts), "file": str(path)}
    if args.prompts_only:
        return {"magpie_prompts": written}

    gen = GenSettings(
        max_new_tokens=args.max_new_tokens,
        topk=args.topk,
        batch_size=args.gen_batch_size,
        shard_prompts=args.shard_prompts,
        temperature=args.temperature,
        seed=args.seed,
    )
    # Evaluation data, like the Magpie evaluation pool, keeps the default batch whatever the flags say
    # (a batch changes float32 results in their last bits), so figures compare across data runs.
    defaults = GenSettings()
    scoring = gen if args.smoke else replace(gen, batch_size=defaults.batch_size, shard_prompts=defaults.shard_prompts)
    held = heldout_records(large, tokenizer, args.large, work, args.eval_prompts, args.seed, scoring)
    chats = read_chat_prompts(Path(args.chat_prompts)) if args.chat_prompts else []
    evals = evaluation_sets(large, tokenizer, args.large, work, magpie_eval, chats, scoring)

    train_prompts, held_prompts = split_prompts(args.seed)
    held_prompts = held_prompts[: args.eval_prompts]
    train_prompts = train_prompts[: args.num_prompts] if args.num_prompts else train_prompts
    prompt_sets = [("train", train_prompts)]
    # Magpie prompts are splits of their own, under their contents: their caches never meet the template
    # prompts'. They go first: they are what people ask, so a tight budget should not be spent before
    # them. In blocks, so that a later stage with more of them (the first ones stay the same) continues
    # only the new ones.
    blocks = [magpie_train[i : i + MAGPIE_BLOCK] for i in range(0, len(magpie_train), MAGPIE_BLOCK)]
    prompt_sets[:0] = [(magpie_split(block), block) for block in blocks]
    if args.train_prompts:
        given = prompts_from_file(Path(args.train_prompts), [*held_prompts, *magpie_eval, *chats])
        prompt_sets.insert(0, (f"train-file{len(given)}-{digest(given)}", given))
    budget = args.gen_minutes * 60 if args.gen_minutes is not None else None
    sources: list[tuple[str, int]] = []  # (data key, complete shards) that training reads
    records: list[dict] = []
    kinds = ([] if args.no_greedy else [replace(gen, sampled=False)]) + [
        replace(gen, sampled=True, seed=args.seed + 1 + i) for i in range(args.sampled)
    ]
    # One budget over this run's own data sets (a resumed run counts what it already spent); data
    # cached for other prompt sets is not charged to it, or a run with more Magpie prompts than an
    # earlier one would find its budget gone before writing any.
    jobs = [(kind, prompts, kind.key(writer_spec, split)) for kind in kinds for split, prompts in prompt_sets]
    for kind in kinds:
        for block in blocks:
            adopt_earlier_block(work / "data", kind, writer_spec, block)
    for kind, prompts, key in jobs:
        spent_before = sum(spent_seconds(work / "data" / other) for _, _, other in jobs if other != key)
        left = None if budget is None else max(budget - spent_before, 0.0)
        n = generate_shards(
            writer, tokenizer, prompts, work / "data" / key, kind, budget_s=left, desc=f"data {key[:-13]}"
        )
        sources.append((key, n))
        records += load_shards(work / "data" / key, n)
    n_tokens = sum(r["cont_ids"].numel() for r in records)
    log.info("training data: %d continuations, %d tokens", len(records), n_tokens)

    if args.small:
        from transformers import AutoModelForCausalLM

        small = AutoModelForCausalLM.from_pretrained(args.small, dtype=torch.float32)
        if small.config.vocab_size != large.config.vocab_size:
            raise ValueError("the small model's vocabulary differs from the large model's")
        # Relative to --out (often "." when a stage refines the draft in place): no machine's paths in a shipped file.
        origin = {"small": os.path.relpath(Path(args.small).resolve(), Path(args.out).resolve())}
    else:
        arch = SmallArch(args.hidden_size, args.layers, args.heads, args.kv_heads, args.intermediate_size)
        small = create_small(large, arch, args.seed)
        origin = {"arch": asdict(arch)}
    small.train()

    if args.train_steps is None and args.train_minutes is None:
        args.train_minutes = 30.0
    settings = TrainSettings(
        lr=args.lr,
        warmup=args.warmup,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        kd_weight=args.kd_weight,
        vocab_topk=args.vocab_topk,
        negatives=args.negatives,
        batch_vocab=args.batch_vocab,
        steps=args.train_steps,
        minutes=args.train_minutes,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    run_key, ckpt = training_run(
        work, {"large": args.large, "data": sources, "origin": origin, "train": settings.signature()}
    )

    specials = [
        i
        for i in (
            tokenizer.eos_token_id,
            tokenizer.bos_token_id,
            tokenizer.pad_token_id,
            small.config.eos_token_id,
            small.config.bos_token_id,
        )
        if isinstance(i, int)
    ]
    vocab_ids = predicted_vocab(records, specials)
    info = {
        "large": args.large,
        "origin": origin,
        "train_settings": asdict(settings),
        "gen_settings": asdict(gen),
        "train_continuations": len(records),
        "train_tokens": n_tokens,
        "sampled_per_prompt": args.sampled,
        "magpie_train_prompts": len(magpie_train),
        "magpie_eval_prompts": len(magpie_eval),
    }

    def on_eval(model, step: int) -> dict:
        return {
            "heldout_agreement": agreement(model, held)["agreement"],
            **{f"{name}_agreement": agreement(model, recs)["agreement"] for name, recs in evals.items()},
        }

    # Checkpoints are chosen on the Magpie evaluation set when there is one: no training prompt came
    # from its generator, unlike the template held-out set, which flatters a model that overfits.
    judge, judged = ("magpie", evals["magpie"]) if "magpie" in evals else ("heldout", held)

    def on_checkpoint(model, step: int) -> None:
        # Ship what we have, so a later failure still leaves a usable model in --out; but never
        # replace a shipped model that agrees better (an earlier run's, or this run's warm-up).
        path = out / "alignment.json"
        shipped = json.loads(path.read_text()) if path.is_file() else {}
        scores = {judge: agreement(model, judged)["agreement"]}
        # Like with like: a model shipped before it was measured on `judge`'s set is compared on held-out.
        name = judge if not shipped or f"{judge}_agreement" in shipped else "heldout"
        if name not in scores:
            scores[name] = agreement(model, held)["agreement"]
        if scores[name] >= shipped.get(f"{name}_agreement", -1.0):
            figures = {f"{k}_agreement": v for k, v in scores.items()}
            save_small(
                model, tokenizer, out, info={**info, "step": step, "final": False, **figures}, vocab_ids=vocab_ids
            )
            log.info("checkpoint at step %d shipped to %s (%s agreement %.4f)", step, out, name, scores[name])

    summary = train(
        small,
        records,
        settings,
        ckpt,
        tokenizer.pad_token_id or 0,
        on_eval,
        on_checkpoint,
        stop_after_steps,
        specials=specials,
    )
    if summary.get("interrupted"):
        return summary
    if args.onpolicy_minutes > 0:
        # The model just trained writes (greedily, scoring only its output vocabulary: what bild's
        # runner would draft); its identity is the run that made it, so a resumed run finds the data.
        drafter = copy.deepcopy(small).eval()
        output_vocab.install(drafter, vocab_ids)
        kind = replace(gen, writer=run_key)
        key = kind.key(writer_spec, "train")
        n = generate_shards(
            drafter,
            tokenizer,
            train_prompts,
            work / "data" / key,
            kind,
            budget_s=args.onpolicy_minutes * 60,
            desc=f"on-policy {key[:14]}",
            labeller=writer,
        )
        del drafter
        onpolicy = load_shards(work / "data" / key, n)
        records += onpolicy
        vocab_ids = predicted_vocab(records, specials)
        info.update(
            onpolicy_continuations=len(onpolicy),
            onpolicy_tokens=sum(r["cont_ids"].numel() for r in onpolicy),
            train_continuations=len(records),
            train_tokens=sum(r["cont_ids"].numel() for r in records),
        )
        log.info("on-policy data: %d continuations, %d tokens", info["onpolicy_continuations"], info["onpolicy_tokens"])
        steps = args.retrain_steps if args.retrain_steps is not None else args.train_steps
        minutes = (
            None
            if steps is not None
            else args.retrain_minutes
            if args.retrain_minutes is not None
            else args.train_minutes
        )
        settings = replace(
            settings, steps=steps, minutes=minutes, lr=args.retrain_lr if args.retrain_lr is not None else args.lr
        )
        run_key, ckpt = training_run(
            work, {"after": run_key, "data": [*sources, (key, n)], "train": settings.signature()}
        )
        info.update(
            retrain_settings=asdict(settings),
            first_stage={"step": summary["step"], "train_minutes": summary.get("minutes")},
        )
        first_history = [{**h, "stage": 1} for h in summary.get("history") or []]
        summary = train(
            small,
            records,
            settings,
            ckpt,
            tokenizer.pad_token_id or 0,
            on_eval,
            on_checkpoint,
            stop_after_steps,
            specials=specials,
        )
        if summary.get("interrupted"):
            return summary
        summary["history"] = first_history + [{**h, "stage": 2} for h in summary.get("history") or []]
    figures = {"agreement": agreement(small, held), **{name: agreement(small, recs) for name, recs in evals.items()}}
    if not args.no_cost:
        figures["cost"] = cost(
            small,
            large,
            held,
            n_prompts=2 if args.smoke else 6,
            new_tokens=8 if args.smoke else 32,
            vocab_ids=vocab_ids,
        )
    info.update(
        final=True,
        step=summary["step"],
        heldout_agreement=figures["agreement"]["agreement"],
        **{f"{name}_agreement": figures[name]["agreement"] for name in evals},
        train_minutes=summary.get("minutes"),
        history=summary.get("history"),
        heldout=figures,
        total_minutes=round((time.time() - started) / 60, 1),
    )
    size = save_small(small, tokenizer, out, info=info, vocab_ids=vocab_ids)
    log.info("saved %s (%.1f MB): %s", out, size / 1e6, json.dumps(figures))
    return {**info, "out": str(out), "bytes": size}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    result = run(args)
    print(json.dumps({k: result[k] for k in ("out", "bytes", "heldout", "magpie_prompts") if k in result}, indent=1))


if __name__ == "__main__":
    main()
