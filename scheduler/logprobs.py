"""Log-probabilities of emitted tokens, from the raw logits of the model that settled them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens there, best first


def token_logprobs(logits: torch.Tensor, tokens: list[int], top_n: int) -> list[TokenLogprob]:
    """Row i of [n, V] logits predicted tokens[i]: its log-probability, and the top_n alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if not top_n:
        return [TokenLogprob(t, lp) for t, lp in zip(tokens, chosen)]
    values, ids = torch.topk(logp, top_n, dim=-1)
    return [TokenLogprob(t, lp, list(zip(i, v))) for t, lp, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]
