"""BiLD's two policies, as pure functions of logits and thresholds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.request import Mode


@dataclass(frozen=True)
class Draft:
    token: int
    confident: bool  # False: fall back to the large model, the token is discarded


def draft(small_logits: torch.Tensor, fallback_threshold: float) -> Draft:
    """Fallback policy: keep the small model's token only if its top probability reaches the threshold."""
    probs = torch.softmax(small_logits, dim=-1)
    p_max, token = probs.max(dim=-1)
    return Draft(token=int(token), confident=float(p_max) >= fallback_threshold)


@dataclass(frozen=True)
class Verdict:
    accepted: int  # how many of the drafted tokens stand
    next_token: int  # the large model's token at position `accepted` (a replacement or the next one)
    rolled_back: bool


def verify(large_logits: torch.Tensor, drafted: list[int], mode: Mode, rollback_threshold: float) -> Verdict:
    """Rollback policy over `drafted` tokens given the large model's logits at each of their positions.

    `large_logits` has len(drafted) + 1 rows: row i predicts drafted[i], the last row the token after
    them. In bild mode a token is discarded when -log p_large(token) exceeds the threshold (unless it
    is the large model's own argmax, which can happen when its distribution is flat); in exact mode
    any token other than the argmax is. The first discarded token and all after it are replaced by
    the large model's argmax at that position.
    """
    targets = large_logits.argmax(dim=-1)
    k = len(drafted)
    if k:
        drafted_t = torch.tensor(drafted, device=large_logits.device)
        disagree = targets[:k] != drafted_t
        if mode is Mode.BILD:
            nll = -torch.log_softmax(large_logits[:k], dim=-1).gather(-1, drafted_t[:, None])[:, 0]
            disagree &= nll > rollback_threshold
        bad = torch.nonzero(disagree)
        if len(bad):
            first = int(bad[0, 0])
            return Verdict(accepted=first, next_token=int(targets[first]), rolled_back=True)
    return Verdict(accepted=k, next_token=int(targets[k]), rolled_back=False)
