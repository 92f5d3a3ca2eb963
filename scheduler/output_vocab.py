"""A draft's output head restricted to the tokens it was trained to predict.

bild-align trains a draft only on the large model's own choices, a fraction of the vocabulary. It
records them in `output_vocab.json` beside the weights; the draft then scores only those tokens
inside a runner's forward, and every other token gets the lowest logit (probability 0). The draft
was never taught to pick any other token, so its argmax and confidence barely move, while its
output head, the largest product of a draft step, loses most of its rows and can fit the CPU's
cache (measured: bench/results/engine_speed.md).

The restriction is a switch of its own, `restricted()`, which the runner turns on around its
forwards; transformers' own `generate()` and training see the full head, so the saved model stays a
plain transformers model. Inside a runner's forward the head also leaves out padding rows, as
CpuLinear layers do (`cpu_linear.packed`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from scheduler import cpu_linear, quantized

FILENAME = "output_vocab.json"
_state = threading.local()


def is_restricted() -> bool:
    """Whether SubsetHeads called from this thread score only their tokens (see `restricted()`)."""
    return getattr(_state, "restricted", False)


@contextmanager
def restricted() -> Iterator[None]:
    """SubsetHeads called from this thread inside the block score only their tokens."""
    previous = is_restricted()
    _state.restricted = True
    try:
        yield
    finally:
        _state.restricted = previous


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


class SubsetHead(cpu_linear.OnednnCopy):
    """An output head that, inside `restricted()`, scores only `token_ids`."""

    ONEDNN_OF = "weight_sub"

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
        self.int8: quantized.Int8Head | None = None
        self.reorder()

    def reorder(self) -> None:
        # Scoring on int8 (quantize), the float copy would be memory that no forward reads.
        self.onednn = None if self.int8 is not None else cpu_linear.onednn_weight(self.weight_sub)

    def quantize(self) -> None:
        """Score on int8 copies of its rows (one scale per row, as quantized.Int8Head): a quarter of
        the bytes that every draft step streams (SmolLM2's draft: 5.5 MB against 22 MB)."""
        self.int8 = quantized.Int8Head(_Rows(self.weight_sub, self.bias_sub))
        self.reorder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_restricted():
            return F.linear(x, self.weight, self.bias)
        return cpu_linear.packed(x, self._scores, is_head=True)

    def _scores(self, flat: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            scores = self.int8._product(flat)
        else:
            scores = cpu_linear.product(self.weight_sub, flat, self.onednn, self.bias_sub)
        out = flat.new_full((flat.shape[0], self.vocab_size), torch.finfo(flat.dtype).min)
        out[:, self.token_ids] = scores
        return out


class _Rows(nn.Module):
    """The rows a SubsetHead scores, as the linear layer Int8Head quantizes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias


def install(model: nn.Module, token_ids: list[int]) -> None:
    """Swap the model's output head for a SubsetHead over `token_ids` (before cpu_linear.install)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"an output vocabulary needs a linear output head, not {type(head).__name__}")
    model.set_output_embeddings(SubsetHead(head, token_ids))
