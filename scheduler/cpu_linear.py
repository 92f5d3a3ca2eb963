"""Linear layers arranged for the CPU kernels that run them fastest at decoding shapes.

With torch 2.13 on an x86 CPU, `F.linear(x, W)` in float32 is slow for the few-row products that
decoding and verification make, and its cost climbs steeply with the row count: on a 2-core EPYC,
SmolLM2-135M's products took 22 ms over one row and 40 ms over 8. Verifying a draft of k tokens is
a forward over k + 1 rows, so that slope decides how far drafts may run before BiLD stops paying.
oneDNN's inner product over a weight reordered once into its blocked layout runs the same products
in 11 ms over one row, 15 over 8 and 50 over 64 (2.5x faster than F.linear up to 512 rows; W @ x^T,
which bild used before, took 13, 30 and 146), so CpuLinear keeps such a copy of its weight
(`onednn_weight`), which costs the layer's weights once more in memory. Where this torch has no
such kernel, W @ x^T stands in, which streams W once for a few rows (one row runs as two, see
`product`).

A CPU that computes bfloat16 natively (AVX512-BF16, AMX) gets the same for bfloat16 weights, whose
reordered products over SmolLM2's shapes took 7.8 ms over one row, 9.5 over 8 and 26 over 64,
against float32's 14.2, 16.4 and 49.4 (side by side). Without such a copy, bfloat16 runs F.linear.

The replacement only changes the arithmetic while a runner's forward is active (see `active()`);
anyone else calling the same model, such as a benchmark's transformers baseline, gets stock layers.
A draft's restricted output head (output_vocab.py) has a switch of its own, which the runner turns
on beside this one. The reordered copy is a snapshot: these layers serve inference, whose weights
do not change after loading.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from scheduler import precision

MAX_ROWS = 256  # without oneDNN, W @ x^T beat F.linear at every row count measured up to this
# The row count oneDNN's weight layout is chosen for: from 1 to 512 rows every hint from 16 to 256
# ran within 10% of the best here.
ONEDNN_ROWS = 64
_state = threading.local()


def reorders(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` get oneDNN's reordered copy on this CPU: float32 wherever this
    torch has oneDNN, bfloat16 where the CPU also computes it natively (emulated, it is slower)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and precision.native_bfloat16())


def onednn_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` reordered for oneDNN's inner product, or None where that kernel does not apply: not
    a CPU weight of a dtype it `reorders`, or a torch build without it (checked against F.linear in
    float32 on a probe, to the dtype's precision)."""
    if weight.device.type != "cpu" or not reorders(weight.dtype):
        return None
    try:
        with torch.no_grad():
            reordered = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ONEDNN_ROWS)
            probe = torch.linspace(-1.0, 1.0, 2 * weight.shape[1]).reshape(2, -1)
            got = onednn_product(probe.to(weight.dtype), reordered).float()
            want = F.linear(probe.to(weight.dtype).float(), weight.float())
            if weight.dtype == torch.float32:
                same = torch.allclose(got, want, rtol=1e-4, atol=1e-4)
            else:  # bfloat16's 8-bit mantissa, and products rounded to it
                same = torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    except (AttributeError, NotImplementedError, RuntimeError):  # no such op, or not for this build's CPU
        return None
    return reordered if same else None


def onednn_product(flat: torch.Tensor, reordered: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(flat, reordered, bias, "none", [], "")


def product(
    weight: torch.Tensor, flat: torch.Tensor, reordered: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """flat @ weight.T (+ bias) for a few rows, on the fastest kernel here: oneDNN's where `weight`
    was reordered for it (`onednn_weight`), else W @ x^T.

    The result is contiguous: a transposed view would hand every later product of the layer its
    input in the layout the slow kernels take.
    """
    # The module may have moved to another device or dtype since its weight was reordered.
    if reordered is not None and flat.device.type == "cpu" and flat.dtype == reordered.dtype:
        return onednn_product(flat, reordered, bias)
    if flat.shape[0] == 1:  # one row as two: a GEMM streams the weights faster than a GEMV does
        out = (weight @ torch.cat([flat, flat]).T)[:, :1].T.contiguous()
    else:
        out = (weight @ flat.T).T.contiguous()
    return out if bias is None else out + bias


class OnednnCopy(nn.Module):
    """A module that keeps `onednn`, oneDNN's reordered copy of its weight named `ONEDNN_OF`.

    The copy is a plain attribute: never saved or moved with the module. It has no storage to copy
    either, so a deep copy or unpickled copy of the module reorders its own weight again.
    """

    ONEDNN_OF = "weight"
    onednn: torch.Tensor | None

    def reorder(self) -> None:
        self.onednn = onednn_weight(getattr(self, self.ONEDNN_OF))

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "onednn": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.reorder()


class CpuLinear(OnednnCopy):
    """A CPU `nn.Linear` (float32, or bfloat16 where oneDNN `reorders` it) with the arrangements
    above; the same parameters, not copies, plus oneDNN's reordered copy of the weight where it applies."""

    def __init__(self, linear: nn.Linear, is_head: bool = False) -> None:
        super().__init__()
        self.weight = linear.weight  # shared: tied embeddings stay tied, state_dict keys unchanged
        self.bias = linear.bias
        self.is_head = is_head
        self.reorder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_active():
            return F.linear(x, self.weight, self.bias)
        return packed(x, self._product, self.is_head)

    def _product(self, flat: torch.Tensor) -> torch.Tensor:
        # W @ x^T was measured against F.linear in float32 only.
        if self.onednn is None and (flat.shape[0] > MAX_ROWS or flat.dtype != torch.float32):
            return F.linear(flat, self.weight, self.bias)
        return product(self.weight, flat, self.onednn, self.bias)


def install(model: nn.Module) -> int:
    """Replace the CPU linear layers of `model` in place (float32 ones, and bfloat16 ones where oneDNN
    `reorders` them; idempotent); return how many are CpuLinear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.device.type == "cpu"
        and (child.weight.dtype == torch.float32 or reorders(child.weight.dtype))
    ]
    for parent, name, child in targets:
        setattr(parent, name, CpuLinear(child, is_head=child is head))
    return sum(isinstance(m, CpuLinear) for m in model.modules())


def is_active() -> bool:
    """Whether a runner's forward is running on this thread (see `active()`)."""
    return getattr(_state, "active", False)


def packed(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], is_head: bool = False) -> torch.Tensor:
    """`product` over the rows of x that hold tokens (all of them unless the forward is packed).

    A batched forward pads every sequence to the widest one; the padding's outputs are never read,
    so its rows are left out of the product and come back as zeros. An output head returns only
    the token rows, as [1, tokens, V] (the runner asked for that; it saves writing padded logits).
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    index = getattr(_state, "token_rows", None)
    if index is None or flat.shape[0] != _state.all_rows:
        return product(flat).reshape(*lead, -1)
    out = product(flat.index_select(0, index))
    if is_head:
        return out[None]
    full = out.new_zeros(flat.shape[0], out.shape[-1])
    full.index_copy_(0, index, out)
    return full.reshape(*lead, -1)


@contextmanager
def active(token_rows: torch.Tensor | None = None, all_rows: int = 0) -> Iterator[None]:
    """Use the arrangements in CpuLinear layers called from this thread inside the block.

    With `token_rows`, products over `all_rows` rows (a padded [B, Q] batch, flattened) compute
    only those rows, and the output head returns only those.
    """
    previous = (getattr(_state, "active", False), getattr(_state, "token_rows", None), getattr(_state, "all_rows", 0))
    _state.active, _state.token_rows, _state.all_rows = True, token_rows, all_rows
    try:
        yield
    finally:
        _state.active, _state.token_rows, _state.all_rows = previous


def machine_key(cpuinfo: str | None = None) -> str:
    """What kernel timings depend on besides shapes: the CPU, the threads, the torch build.

    A virtual machine's CPU name can be as vague as "AMD EPYC" across generations whose kernels run
    at very different speeds (with AVX512-BF16 or without), so its instruction-set flags count too.
    `cpuinfo` is /proc/cpuinfo's text (read when None; absent off Linux).
    """
    if cpuinfo is None and os.path.exists("/proc/cpuinfo"):
        cpuinfo = Path("/proc/cpuinfo").read_text()
    lines = (cpuinfo or "").splitlines()
    fields = {name.strip(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    # x86 names its model and lists flags; ARM gives its implementer and part, and lists features.
    names = [fields[name] for name in ("model name", "CPU implementer", "CPU part") if fields.get(name)]
    cpu = " ".join(names) or platform.processor()
    flags = " ".join(sorted(fields.get("flags", fields.get("Features", "")).split()))
    capability = torch.backends.cpu.get_cpu_capability()
    text = f"{cpu}|{flags}|{capability}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
