"""BiLD's two policies, applied to a whole batch of logits at once.

Each function moves only a few small tensors to the host (one sync per batch, not per sequence),
which matters on a GPU where every `.item()` waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.request import Mode


@dataclass(frozen=True)
class Draft:
    token: int
    confidence: float  # the small model's top probability
    q: torch.Tensor | None = None  # the distribution it was drawn from, kept for speculative sampling


def drafts(last_logits: torch.Tensor) -> list[Draft]:
    """The small model's greedy token and its probability, per row of [B, V] logits.

    The fallback policy then keeps a draft only if its confidence reaches the request's threshold.
    """
    p_max, tokens = torch.softmax(last_logits.float(), dim=-1).max(dim=-1)
    return [Draft(t, p) for t, p in zip(tokens.tolist(), p_max.tolist())]


@dataclass(frozen=True)
class Verdict:
    accepted: int  # how many drafted tokens stand
    next_token: int  # the large model's token at position `accepted`: a replacement, or the next one
    rolled_back: bool


@dataclass(frozen=True)
class VerifyRow:
    inputs: list[int]  # tokens fed to the large model: the last settled token, then the drafts
    mode: Mode
    rollback_threshold: float


def verify(logits: torch.Tensor, rows: list[VerifyRow]) -> list[Verdict]:
    """Rollback policy for each row of left-padded [B, Q, V] large-model logits.

    Column j of a row's inputs predicts its input j+1, so the drafts are checked against the logits
    one column to their left. In bild mode a draft is discarded when -log p_large(draft) exceeds the
    threshold, unless it is the large model's own argmax (possible when its distribution is flat);
    in exact mode any draft other than the argmax is. The first discarded draft and all after it
    are replaced by the large model's argmax at that position.
    """
    batch, width = logits.shape[:2]
    targets = torch.zeros((batch, width), dtype=torch.long)
    for b, row in enumerate(rows):
        drafted = row.inputs[1:]
        if drafted:
            start = width - len(row.inputs)
            targets[b, start : start + len(drafted)] = torch.tensor(drafted)
    targets = targets.to(logits.device)
    argmax = logits.argmax(dim=-1).tolist()
    nll = None
    if any(row.mode is Mode.BILD and len(row.inputs) > 1 for row in rows):
        logits = logits.float()
        nll = (torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[..., None])[..., 0]).tolist()
    verdicts = []
    for b, row in enumerate(rows):
        start = width - len(row.inputs)
        verdict = Verdict(len(row.inputs) - 1, argmax[b][-1], False)
        for i, token in enumerate(row.inputs[1:]):
            col = start + i
            if argmax[b][col] != token and (row.mode is not Mode.BILD or nll[b][col] > row.rollback_threshold):
                verdict = Verdict(i, argmax[b][col], True)
                break
        verdicts.append(verdict)
    return verdicts
