"""Train the small model to agree with the large one on the large model's continuations.

Loss per continuation position: cross-entropy on the large model's greedy token there (for
sampled data too: the sampled continuation only supplies the prefix) plus `kd_weight` times the
cross-entropy against the large model's top-k distribution
(renormalised over its k tokens): the soft part tells the small model how sure the large one was,
so its own confidence, which BiLD's fallback policy reads, means something. Prompt positions carry
no loss and no output projection (which is most of the cost at a 49k vocabulary).

Checkpoints hold model, optimizer and progress; the batch order is a pure function of (seed, step),
so a resumed run sees the same batches it would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from align.cpu import governor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decays to this fraction of lr
    warmup: float = 0.03  # fraction of the run spent warming up
    batch_size: int = 16
    # 0.1 rather than 0.01: a draft sees each continuation many times in a training run and
    # overfits (training accuracy well above held-out agreement); 0.1 held out a little better.
    weight_decay: float = 0.1
    kd_weight: float = 1.0
    steps: int | None = None  # a fixed number of steps, or...
    minutes: float | None = None  # ...a wall-clock budget (the schedule then follows elapsed time)
    # Train the output softmax over tokens in the large model's top-k (0: full vocab). With 1 (its
    # choices, as in the data and output_vocab.json) the softmax is much narrower than at a larger
    # k, so more tokens go through in the same time, and held-out agreement came out higher.
    vocab_topk: int = 1
    negatives: int = 1024  # other tokens sampled into each step's softmax, so none can creep up unseen
    # With N > 0, each step's softmax covers only the batch's own tokens (its top-k) and N others
    # sampled from the training vocabulary, not all of it (see `SoftmaxColumns`): more steps fit
    # into the same time, and held-out agreement came out higher than with the whole training
    # vocabulary every step (measured: README, "The default small model").
    batch_vocab: int = 2048
    checkpoint_every: int = 200  # steps
    eval_every: int = 500  # steps
    seed: int = 0

    def signature(self) -> dict:
        """The settings that identify a training run; batch_vocab, added later, is left out when off,
        so the runs made before it keep their keys."""
        return {k: v for k, v in asdict(self).items() if k != "batch_vocab" or v}


@dataclass
class Example:
    input_ids: torch.Tensor  # prompt + continuation[:-1]
    start: int  # first position whose next-token prediction is a continuation token
    targets: torch.Tensor  # continuation ids
    topk_ids: torch.Tensor
    topk_logp: torch.Tensor


def make_examples(records: list[dict]) -> list[Example]:
    out = []
    for r in records:
        prompt, cont = r["prompt_ids"].long(), r["cont_ids"].long()
        if cont.numel() == 0:
            continue
        out.append(
            Example(
                input_ids=torch.cat([prompt, cont[:-1]]),
                start=prompt.numel() - 1,
                # The large model's own choice there: the continuation itself when it is greedy,
                # not the sampled token when it is sampled (that only supplies a fresh prefix).
                targets=r["topk_ids"][:, 0].long(),
                topk_ids=r["topk_ids"].long(),
                topk_logp=r["topk_logp"].float(),
            )
        )
    return out


def batch_order(n_examples: int, batch_size: int, lengths: list[int], seed: int, epoch: int) -> list[list[int]]:
    """Batches for one epoch: shuffled, then sorted by length within windows of 32 batches so a
    batch pads little, then the batches shuffled again."""
    rng = random.Random(seed * 7919 + epoch)
    idx = list(range(n_examples))
    rng.shuffle(idx)
    window = batch_size * 32
    batches = []
    for w in range(0, n_examples, window):
        chunk = sorted(idx[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_batch(inputs: list[torch.Tensor], starts: list[int], counts: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id sequences into one batch, with the (row, col) of each sequence's `counts`
    predicted positions from `starts` on: what position_logits reads."""
    ids = torch.full((len(inputs), max(x.numel() for x in inputs)), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, x in enumerate(inputs):
        ids[b, : x.numel()] = x
        attn[b, : x.numel()] = 1  # right padding: real positions never attend to it
    rows = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    cols = torch.cat([torch.arange(start, start + n) for start, n in zip(starts, counts)])
    return {"input_ids": ids, "attention_mask": attn, "rows": rows, "cols": cols}


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    k = examples[0].topk_ids.shape[1]
    counts = [e.targets.numel() for e in examples]
    return {
        **pad_batch([e.input_ids for e in examples], [e.start for e in examples], counts, pad_id),
        "targets": torch.cat([e.targets for e in examples]),
        "topk_ids": torch.cat([e.topk_ids[:m, :k] for e, m in zip(examples, counts)]),
        "topk_logp": torch.cat([e.topk_logp[:m, :k] for e, m in zip(examples, counts)]),
    }


def position_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    vocab: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits at the chosen (row, col) positions only: the output projection is skipped elsewhere.
    With `vocab`, only over those token ids (columns in that order)."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[rows, cols]
    if vocab is None:
        return model.lm_head(hidden)
    return hidden @ model.lm_head.weight[vocab].T


def _token_ids(always: list[int], parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.unique(torch.cat([torch.tensor(always, dtype=torch.long), *(p.long().flatten() for p in parts)]))


def training_vocab(records: list[dict], topk: int, always: list[int]) -> torch.Tensor:
    """Token ids the large model actually puts in its top-k (plus every target): the output softmax
    is trained over these, because at a 49k vocabulary the output layer is most of the cost and
    most tokens never come up."""
    return _token_ids(always, [t for r in records for t in (r["cont_ids"], r["topk_ids"][:, :topk])])


def predicted_vocab(records: list[dict], always: list[int]) -> list[int]:
    """Token ids the large model chose somewhere in the data (plus `always`): the only tokens the
    small model is trained to predict, so the only ones bild needs it to score. Narrower than
    training_vocab(records, 1, ...), which also holds the tokens of sampled continuations."""
    return _token_ids(always, [r["topk_ids"][:, 0] for r in records]).tolist()


class SoftmaxColumns:
    """Which tokens each training step's output softmax covers, and the batch's ids remapped to
    those columns (-1 for a top-k token left out: it drops out of the distillation target).

    All of `vocab` (the training vocabulary) every step, or with `batch_vocab` > 0 only the batch's
    own tokens (its targets and the training-vocabulary tokens of its top-k) plus that many others
    drawn from `vocab`: far fewer columns, since a batch's own tokens are a small share of the
    training vocabulary, and the tokens that compete at the batch's positions are all there. Either
    way, `negatives` tokens from outside `vocab` are added too, so none of those can creep up unseen."""

    def __init__(self, vocab: torch.Tensor, vocab_size: int, batch_vocab: int, negatives: int, seed: int) -> None:
        self.vocab, self.batch_vocab, self.negatives, self.seed = vocab, batch_vocab, negatives, seed
        self.remap = torch.full((vocab_size,), -1, dtype=torch.long)
        self.remap[vocab] = torch.arange(vocab.numel())
        outside = torch.ones(vocab_size, dtype=torch.bool)
        outside[vocab] = False
        self.outside = outside.nonzero().squeeze(1)

    def for_step(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The step's columns (token ids); remaps batch["targets"] and batch["topk_ids"] in place."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # the same draws on resume
        columns, remap = self.vocab, self.remap
        if self.batch_vocab > 0:
            ids = batch["topk_ids"]
            own = torch.cat([batch["targets"], ids[self.remap[ids] >= 0]])
            pick = torch.randint(0, self.vocab.numel(), (self.batch_vocab,), generator=g)
            columns = torch.unique(torch.cat([own, self.vocab[pick]]))
            remap = torch.full_like(self.remap, -1)
            remap[columns] = torch.arange(columns.numel())
        batch["targets"] = remap[batch["targets"]]
        batch["topk_ids"] = remap[batch["topk_ids"]]
        if self.negatives > 0 and self.outside.numel() > 0:
            pick = torch.randint(0, self.outside.numel(), (self.negatives,), generator=g)
            columns = torch.cat([columns, self.outside[pick]])
        return columns


def alignment_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], kd_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    hard = F.nll_loss(logp, batch["targets"])
    loss = hard
    stats = {"ce": hard.item()}
    if kd_weight > 0:
        valid = batch["topk_ids"] >= 0  # top-k tokens outside a reduced training vocabulary drop out
        teacher = torch.softmax(batch["topk_logp"].masked_fill(~valid, float("-inf")), dim=-1)  # renormalised
        soft = -(teacher * logp.gather(1, batch["topk_ids"].clamp(min=0))).sum(-1).mean()
        loss = loss + kd_weight * soft
        stats["kd"] = soft.item()
    stats["acc"] = (logits.argmax(-1) == batch["targets"]).float().mean().item()
    return loss, stats


def lr_factor(progress: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to min_ratio; progress runs from 0 to 1."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    t = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def train(
    model: PreTrainedModel,
    records: list[dict],
    settings: TrainSettings,
    ckpt_path: Path,
    pad_id: int,
    on_eval: Callable[[PreTrainedModel, int], dict] | None = None,
    on_checkpoint: Callable[[PreTrainedModel, int], None] | None = None,
    stop_after_steps: int | None = None,
    specials: Sequence[int] = (),
) -> dict:
    """Train in place, resuming from `ckpt_path` if it exists. Returns a summary of the run.

    specials: token ids (EOS, BOS, ...) the training softmax always covers, as does the shipped
    output vocabulary. stop_after_steps stops this call early (after a checkpoint), as an
    interruption would: tests use it.
    """
    if settings.steps is None and settings.minutes is None:
        raise ValueError("give a number of steps or a time budget")
    examples = make_examples(records)
    if not examples:
        raise ValueError("no training examples: generate data first")
    lengths = [e.input_ids.numel() for e in examples]
    vocab_size = model.get_input_embeddings().weight.shape[0]
    columns = None
    if settings.vocab_topk > 0:
        vocab = training_vocab(records, settings.vocab_topk, list(specials))
        columns = SoftmaxColumns(vocab, vocab_size, settings.batch_vocab, settings.negatives, settings.seed)
        log.info(
            "training softmax over %s of %d tokens (+%d sampled per step)",
            f"the batch's own and {settings.batch_vocab} more" if settings.batch_vocab else vocab.numel(),
            vocab_size,
            settings.negatives,
        )
    n_batches = math.ceil(len(examples) / settings.batch_size)
    torch.manual_seed(settings.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    step, elapsed, history = 0, 0.0, []
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        log.info("resuming training from %s at step %d (%.1f min done)", ckpt_path, step, elapsed / 60)

    def progress() -> float:
        if settings.steps is not None:
            return step / settings.steps
        return elapsed / (settings.minutes * 60)

    def save() -> None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(f".tmp{os.getpid()}")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "history": history,
                "settings": asdict(settings),
            },
            tmp,
        )
        tmp.rename(ckpt_path)  # atomic: an interruption leaves the previous checkpoint intact
        if on_checkpoint is not None:
            on_checkpoint(model, step)
            model.train()  # the hook may evaluate, which puts the model in eval mode

    model.train()
    total = settings.steps if settings.steps is not None else None
    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    tokens_seen, t_mark = 0, time.time()
    last_step_saved = step
    orders: dict[int, list[list[int]]] = {}
    while progress() < 1.0:
        epoch, within = divmod(step, n_batches)
        if epoch not in orders:
            orders = {epoch: batch_order(len(examples), settings.batch_size, lengths, settings.seed, epoch)}
        batch_idx = orders[epoch][within]
        governor().poll()  # other jobs on the machine come and go: match threads to the free cores
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = settings.lr * lr_factor(progress(), settings.warmup, settings.min_lr_ratio)
        batch = collate([examples[i] for i in batch_idx], pad_id)
        step_vocab = columns.for_step(batch, step) if columns is not None else None
        logits = position_logits(
            model, batch["input_ids"], batch["attention_mask"], batch["rows"], batch["cols"], step_vocab
        )
        loss, stats = alignment_loss(logits, batch, settings.kd_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed += time.time() - t0
        tokens_seen += batch["targets"].numel()
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            acc=f"{stats['acc']:.3f}",
            lr=f"{opt.param_groups[0]['lr']:.1e}",
            tok_s=f"{tokens_seen / (time.time() - t_mark):.0f}",
            ep=epoch,
        )
        if on_eval is not None and step % settings.eval_every == 0:
            model.eval()
            entry = {"step": step, "minutes": round(elapsed / 60, 2), **on_eval(model, step)}
            model.train()
            history.append(entry)
            log.info("eval %s", json.dumps(entry))
        if step % settings.checkpoint_every == 0:
            save()
            last_step_saved = step
            if stop_after_steps is not None and step >= stop_after_steps:
                bar.close()
                return {"step": step, "interrupted": True}
    bar.close()
    if last_step_saved != step:
        save()
    model.eval()
    return {"step": step, "minutes": round(elapsed / 60, 2), "examples": len(examples), "history": history}
