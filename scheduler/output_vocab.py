"""A draft's output head restricted to the tokens it was trained to predict.

bild-align trains a draft only on the large model's own choices, about 14k distinct tokens of
SmolLM2's 49k. It records them in `output_vocab.json` beside the weights; the draft then scores only
those tokens inside a runner's forward, and every other token gets the lowest logit (probability 0).
The draft's argmax and confidence on held-out prompts are unchanged by this (51.34% agreement
either way), while its output head, the largest product of a draft step, has 3.5 times fewer rows
and now fits the CPU's cache: a draft step in bild's runner went from 5.7 to 2.7 ms on the 2-core
build machine (the head alone from 1.26 to 0.23 ms).

Like CpuLinear, the restriction applies only while a runner's forward is active; transformers'
own `generate()` and training see the full head, so the saved model stays a plain transformers
model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from scheduler import cpu_linear

FILENAME = "output_vocab.json"


def save(directory: Path, token_ids: list[int], note: str) -> None:
    data = {"note": note, "token_ids": sorted(set(token_ids))}
    (Path(directory) / FILENAME).write_text(json.dumps(data, separators=(",", ":")))


def load(directory: Path) -> list[int] | None:
    path = Path(directory) / FILENAME
    if not path.is_file():
        return None
    ids = json.loads(path.read_text())["token_ids"]
    if not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{path}: token_ids must be a non-empty list of token ids")
    return ids


class SubsetHead(nn.Module):
    """An output head that, inside a runner's forward, scores only `token_ids`."""

    def __init__(self, head: nn.Linear, token_ids: list[int]) -> None:
        super().__init__()
        vocab = head.weight.shape[0]
        if max(token_ids) >= vocab or min(token_ids) < 0:
            raise ValueError(f"output vocabulary has ids outside the model's {vocab} tokens")
        self.weight = head.weight  # shared: tied embeddings stay tied, state_dict keys unchanged
        self.bias = head.bias
        self.vocab_size = vocab
        self.register_buffer("token_ids", torch.tensor(token_ids, device=head.weight.device), persistent=False)
        # A snapshot of the rows it scores (inference only, so the weights do not change);
        # buffers, so that moving the model moves them, but not saved with it.
        with torch.no_grad():
            self.register_buffer("weight_sub", head.weight[self.token_ids].contiguous(), persistent=False)
            bias = None if head.bias is None else head.bias[self.token_ids].clone()
            self.register_buffer("bias_sub", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_linear.is_active():
            return F.linear(x, self.weight, self.bias)
        return cpu_linear.packed(x, self._scores, is_head=True)

    def _scores(self, flat: torch.Tensor) -> torch.Tensor:
        scores = cpu_linear.product(self.weight_sub, flat)
        if self.bias_sub is not None:
            scores = scores + self.bias_sub
        out = flat.new_full((flat.shape[0], self.vocab_size), torch.finfo(flat.dtype).min)
        out[:, self.token_ids] = scores
        return out


def install(model: nn.Module, token_ids: list[int]) -> None:
    """Swap the model's output head for a SubsetHead over `token_ids` (before cpu_linear.install)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"an output vocabulary needs a linear output head, not {type(head).__name__}")
    model.set_output_embeddings(SubsetHead(head, token_ids))
