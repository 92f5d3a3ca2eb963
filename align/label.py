"""The large model's top-k log-probs along continuations someone else wrote (teacher forcing).

Generating with the large model costs one forward per token; scoring a finished continuation
costs one forward per continuation, so labelled tokens come faster than generated ones, even with
the small model's writing counted (measured: README, "The default small model"). It makes on-policy
alignment data cheaper: the small model writes the continuations (its own mistakes included, which
is where it needs teaching, as in DistillSpec), and the large model only labels them.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from align.train import pad_batch, position_logits


@torch.inference_mode()
def label_records(large: PreTrainedModel, records: list[dict], topk: int, batch_tokens: int = 2048) -> None:
    """Set each record's topk_ids / topk_logp (in place) to the large model's top-k log-probs at
    every continuation position: the prediction of cont_ids[j] from prompt_ids + cont_ids[:j].
    The same figures generation records, so labelled and generated shards train alike."""
    order = sorted(range(len(records)), key=lambda i: len(records[i]["prompt_ids"]) + len(records[i]["cont_ids"]))
    batch: list[int] = []
    for i in [*order, None]:
        if i is not None:
            width = len(records[i]["prompt_ids"]) + len(records[i]["cont_ids"])
            if not batch or width * (len(batch) + 1) <= batch_tokens:
                batch.append(i)
                continue
        if batch:
            _label_batch(large, [records[j] for j in batch], topk)
        batch = [i] if i is not None else []


def _label_batch(large: PreTrainedModel, records: list[dict], topk: int) -> None:
    counts = [r["cont_ids"].numel() for r in records]
    batch = pad_batch(
        [torch.cat([r["prompt_ids"].long(), r["cont_ids"].long()[:-1]]) for r in records],
        [r["prompt_ids"].numel() - 1 for r in records],
        counts,
        pad_id=0,
    )
    top = torch.log_softmax(position_logits(large, **batch).float(), dim=-1).topk(topk, dim=-1)
    for r, ids, logp in zip(records, top.indices.split(counts), top.values.split(counts)):
        r["topk_ids"], r["topk_logp"] = ids.to(torch.int32), logp.to(torch.float16)
