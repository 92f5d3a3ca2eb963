"""Linear layers arranged for the CPU kernels that run them fastest at decoding shapes.

With torch 2.13 on an x86 CPU, `F.linear(x, W)` is slow for the few-row products that decoding and
verification make, and very slow for 2 or 3 rows. Measured on the 2-core build machine:

    SmolLM2's 49,152 x 576 output head, rows:   1     2     3     4     8
        F.linear                               9.7  21.9  32.7  16.2  15.4 ms
        below                                  4.4   3.0   4.0   4.0   7.0 ms

    SmolLM2-135M, one forward at batch 1 over a 100-token cache, new tokens:   1   2   3   4
        stock linears                                                        51  68  78  69 ms
        below                                                                47  46  51  48 ms

The 2- to 4-token forwards are exactly what verifying a short draft costs, so this decides whether
BiLD can pay on a CPU at all. Several rows compute W @ x^T, which streams W once; one row through
the output head uses a transposed copy of W (a GEMV over contiguous columns).

The replacement only changes the arithmetic while a runner's forward is active (see `active()`);
anyone else calling the same model, such as a benchmark's transformers baseline, gets stock layers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

MAX_ROWS = 64  # measured up to 32 rows; larger products (prefill) keep the stock kernel
# The one-row copy of the output head doubles its memory: 113 MB for SmolLM2, but 0.5-1 GB for a
# 7B model's head, where the head is a small part of a step anyway. Bigger heads go without it.
TRANSPOSED_COPY_MAX_BYTES = 256 << 20
_state = threading.local()


class CpuLinear(nn.Module):
    """A float32 CPU `nn.Linear` with the arrangements above; the same parameters, not copies."""

    def __init__(self, linear: nn.Linear, transposed_copy: bool = False) -> None:
        super().__init__()
        self.weight = linear.weight  # shared: tied embeddings stay tied, state_dict keys unchanged
        self.bias = linear.bias
        # A snapshot for one-row products: only inference uses it, so the weights do not change.
        self.weight_t = linear.weight.detach().t().contiguous() if transposed_copy else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not is_active() or rows > MAX_ROWS or (rows == 1 and self.weight_t is None):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        out = flat @ self.weight_t if rows == 1 else (self.weight @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def install(model: nn.Module) -> None:
    """Replace the float32 CPU linear layers of `model` in place (idempotent)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32
    ]
    for parent, name, child in targets:
        copy = child is head and child.weight.numel() * child.weight.element_size() <= TRANSPOSED_COPY_MAX_BYTES
        setattr(parent, name, CpuLinear(child, transposed_copy=copy))


def is_active() -> bool:
    """Whether a runner's forward is running on this thread (see `active()`)."""
    return getattr(_state, "active", False)


@contextmanager
def active() -> Iterator[None]:
    """Use the arrangements in CpuLinear layers called from this thread inside the block."""
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous
