"""Sampling: logit processing, position-keyed randomness, and the rejection rule of speculative sampling.

Randomness is a pure function of (seed, position, purpose): the uniform number that decides the
token at position p of a request never depends on what else is in the batch, on how many drafts were
made before, or on the order of iterations. So a seed reproduces a request anywhere.

Mode guarantees, with sampling:
- `large`: the token at each position is drawn from the large model's processed distribution p.
- `exact`: speculative sampling (Leviathan et al. 2023, Chen et al. 2023): a draft x drawn from the
  small model's processed distribution q is kept with probability min(1, p(x)/q(x)), else the token
  is drawn from norm(max(0, p - q)); every emitted token is then distributed exactly as p.
- `bild`: BiLD's policies on sampled tokens. The small model falls back when max q < the fallback
  threshold; a draft x is rolled back when -log p(x) > the rollback threshold and the token there is
  drawn from p. So every emitted token is either drawn from p, or a draft that p gives at least
  exp(-rollback_threshold) probability. The output distribution is not p's: that is the trade.
- `small`: drawn from q.
"""

from __future__ import annotations

import torch

from scheduler.request import SamplingParams

DRAFT, ACCEPT, RESAMPLE, TARGET = 1, 2, 3, 4  # purposes: independent streams of uniforms
_MASK64 = (1 << 64) - 1


def uniform(seed: int, position: int, purpose: int) -> float:
    """A uniform number in [0, 1) from (seed, position, purpose), by SplitMix64."""
    z = (seed + 0x9E3779B97F4A7C15 * (position * 8 + purpose + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * (1.0 / (1 << 53))


def penalize(logits: torch.Tensor, contexts: list[list[int]], penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on [n, V] logits; row i's context is contexts[i]."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for row, context in zip(logits, contexts):
        seen = torch.tensor(sorted(set(context)), dtype=torch.long, device=logits.device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def process(logits: torch.Tensor, params: SamplingParams, contexts: list[list[int]]) -> torch.Tensor:
    """[n, V] raw logits -> [n, V] probabilities of the request's rule (greedy: its argmax is the token)."""
    logits = penalize(logits.float(), contexts, params.repetition_penalty)
    if not params.sampling:
        return torch.softmax(logits, dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pick(probs: torch.Tensor, params: SamplingParams, seed: int, position: int, purpose: int) -> int:
    """The token at `position` under the request's rule: argmax if greedy, else a keyed draw."""
    if not params.sampling:
        return int(probs.argmax())
    return draw(probs, uniform(seed, position, purpose))


def draw(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from one [V] distribution."""
    cdf = probs.cumsum(-1)
    index = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], device=probs.device)))
    index = min(index, probs.shape[-1] - 1)
    if probs[index] <= 0:  # only at the very edges of the CDF: take the nearest possible token
        possible = torch.nonzero(probs > 0)[:, 0]
        index = int(possible[(possible - index).abs().argmin()])
    return index


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int, seed: int, position: int) -> int | None:
    """Speculative sampling's test for one draft: None if kept, else the replacement token."""
    p_x, q_x = float(p[token]), float(q[token])
    if q_x > 0 and uniform(seed, position, ACCEPT) < min(1.0, p_x / q_x):
        return None
    residual = (p - q).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is right
        residual = p
    return draw(residual, uniform(seed, position, RESAMPLE))
