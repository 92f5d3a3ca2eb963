"""Linear layers over a GGUF file's own 4-bit weights, and an 8-bit output head.

At one stream a forward is bound by the bytes of weights it streams: SmolLM2-135M's products in
float32 are 513 MB, its GGUF file's Q4_1 blocks 92 MB. Dequantizing the file to float32 (what
transformers' GGUF loader does) throws that away, so for `--weights int4` the layers whose GGUF
tensors are Q4_1 or Q4_0 keep the file's own 4-bit values, in GGUF's blocks of 32 input features:

- Q4_1: w = d * q + m, q in 0..15, per block of 32 (fp16 d and m);
- Q4_0: w = d * (q - 8), that is m = -8 d.

The values are the file's, so the model is the one the file holds, not a second quantization of it.
Tensors of other types (SmolLM2's Q8_0 embedding, which the output head shares) keep the loader's
float copy; the head gets an 8-bit copy of its own (Int8Head).

**Native kernels** (scheduler/native, built with the machine's C compiler on first use) compute
as llama.cpp does: the file's blocks with their exact fp16 scales and offsets, against activations
quantized per row to 8 bits in blocks of 32, summed as integers. Every output element is computed
alone in a fixed order, so a token's result is bit for bit the same whatever forward it is in, at
any load and in every mode: exact equals large by construction. They compute every forward, wide
ones too: oneDNN's float32 GEMM is faster from a few dozen rows on (prefill, full batches), but a
second kernel would round a token differently by the forward it lands in, and 8-bit activations
turn the smallest difference into a different rounding step (bench/results/cpu_kernels.md).

Without a C compiler the layers run on torch's `_weight_int4pack_mm_for_cpu` (scale d and zero point
m + 8 d per group, rounded to bfloat16 as it takes them; bfloat16 activations), and forwards over
more than INT4_MAX_ROWS rows on oneDNN with inputs and outputs rounded to bfloat16 as that kernel's
are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scheduler import cpu_linear, native

log = logging.getLogger(__name__)

GROUP = 32  # GGUF's block of input features, and the kernel's group size
# A Llama layer's GGUF tensor -> (its module in transformers' layer, the projection)
LAYER_TENSORS = {
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}
INNER_K_TILES = 2  # the packing's tiling of K (2, 4 or 8; 2 ran fastest at decoding shapes here)
# Above these row counts oneDNN's float32 GEMM beats the integer GEMVs (bench/cpu_kernels.py).
INT4_MAX_ROWS = 12
INT8_HEAD_MAX_ROWS = 6


def _bfloat16_rounded(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def _wide_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's reordered float32 copy of `weight` for wide forwards, or None where this torch has none."""
    return cpu_linear.onednn_weight(weight.float().contiguous())


class Int4Linear(nn.Module):
    """y = x @ W.T with W held as 4-bit values and a float scale and zero point per group of 32."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, wide: bool = True) -> None:
        """q: [N, K] integers 0..15; d, m: [N, K / GROUP] float32; w = d * q + m (GGUF's Q4_1; Q4_0 is
        m = -8 d). `wide`: keep oneDNN's float32 copy for wide forwards (see the module's docstring)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.to(torch.uint8), persistent=False)  # kept to join and to re-pack
        self.register_buffer("d", d.float().contiguous(), persistent=False)
        self.register_buffer("m", m.float().contiguous(), persistent=False)
        self.native = native.available()
        self._pack()
        self.onednn = _wide_copy(self.dequantized()) if wide and not self.native else None

    # oneDNN's copy has no storage to copy: a deep or unpickled copy makes its own again.
    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "onednn": self.onednn is not None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.onednn = _wide_copy(self.dequantized()) if state["onednn"] else None

    def _pack(self) -> None:
        if self.native:  # GGUF's block layout: byte j of a block holds value j and value j + 16
            blocks = self.q.view(self.out_features, -1, 2, GROUP // 2)
            self.nibbles = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(self.out_features, -1).contiguous()
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.q.to(torch.int32), INNER_K_TILES)
        # torch's kernel: w = (q - 8) * scale + zero, with scales and zero points in its activations'
        # dtype, [K / GROUP, N, 2] (bfloat16 keeps 8 of fp16's 11 significant bits)
        scales_zeros = torch.stack([self.d, self.m + 8 * self.d], dim=-1).transpose(0, 1)
        self.scales_zeros = scales_zeros.to(torch.bfloat16).contiguous()

    @classmethod
    def joined(cls, linears: list[Int4Linear]) -> Int4Linear:
        """One layer computing the outputs of `linears` side by side (q, k and v as one product);
        theirs keep the int4 kernel only, so that the float32 copy exists once."""
        for m in linears:
            m.onednn = None
        return cls(
            torch.cat([m.q for m in linears]),
            torch.cat([m.d for m in linears]),
            torch.cat([m.m for m in linears]),
        )

    def dequantized(self) -> torch.Tensor:
        """The float32 [N, K] weight the kernels compute with."""
        n, k = self.q.shape
        q = self.q.float().view(n, -1, GROUP)
        if self.native:
            return (q * self.d[..., None] + self.m[..., None]).view(n, k)
        # as torch's kernel computes: (q - 8) * scale + zero, in bfloat16's scales and zero points
        scale, zero = _bfloat16_rounded(self.d), _bfloat16_rounded(self.m + 8 * self.d)
        return ((q - 8) * scale[..., None] + zero[..., None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.native and flat.dtype == torch.float32 and flat.device.type == "cpu":
            out = native.q4_linear(flat, self.nibbles, self.d, self.m)
        elif flat.shape[0] > INT4_MAX_ROWS and self.onednn is not None and flat.dtype == torch.float32:
            out = _bfloat16_rounded(cpu_linear.onednn_product(_bfloat16_rounded(flat), self.onednn))
        else:
            # The kernel's fast path takes bfloat16 activations (float32 ones ran 5-9x slower): inputs
            # are rounded to bfloat16 there, as llama.cpp rounds them to 8 bits for its Q4 products.
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros
            ).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


class Int8Head(nn.Module):
    """An output head over 8-bit weights.

    The head of SmolLM2 (its tied embedding, Q8_0 in the file: 32-value blocks) is 28M of its 134M
    parameters: in float32, 113 MB that every step streams, as much as its int4 layers together.
    With the native kernels it keeps Q8_0's layout, a scale per block of 32 (the largest over 127:
    for the file's own Q8_0 values that gives back the file's blocks); without them it runs on
    `_weight_int8pack_mm`, which takes one scale per row, so the values are quantized again to the
    row's largest. Runner forwards use it (cpu_linear.active()); anything else calling the model
    gets the float weight, which stays shared with the embedding.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.weight = head.weight  # the float weight, tied to the embedding where the model ties them
        self.bias = getattr(head, "bias", None)
        self.out_features, self.in_features = self.weight.shape
        self.native = native.available() and self.in_features % GROUP == 0
        with torch.no_grad():
            weight = self.weight.float()
            if self.native:
                blocks = weight.view(self.out_features, -1, GROUP)
                self.scales = blocks.abs().amax(dim=-1) / 127  # [N, K / GROUP]
                divisor = torch.where(self.scales == 0, 1.0, self.scales)[..., None]
                self.int8 = torch.round(blocks / divisor).to(torch.int8).view(self.out_features, -1)
            else:
                scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
                self.int8 = torch.round(weight / scales[:, None]).to(torch.int8)
                self.scales = scales.to(torch.bfloat16)
            # Wide forwards (without native kernels): oneDNN over these same int8 values in float32.
            self.onednn = None if self.native else self._wide()

    def _wide(self) -> torch.Tensor | None:
        # The integer values themselves, scaled after the sum as the int8 kernel scales them.
        return _wide_copy(self.int8.float())

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "onednn": self.onednn is not None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.onednn = self._wide() if state["onednn"] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not cpu_linear.is_active():
            return nn.functional.linear(x, self.weight, self.bias)
        return cpu_linear.packed(x, self._product, is_head=True)

    def _product(self, flat: torch.Tensor) -> torch.Tensor:
        if self.native and flat.dtype == torch.float32 and flat.device.type == "cpu":
            out = native.q8_linear(flat, self.int8, self.scales)
        elif flat.shape[0] > INT8_HEAD_MAX_ROWS and self.onednn is not None and flat.dtype == torch.float32:
            out = cpu_linear.onednn_product(_bfloat16_rounded(flat), self.onednn) * self.scales.float()
            out = _bfloat16_rounded(out)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.int8, self.scales).to(flat.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        kind = "int8 per block of 32" if self.native else "int8 per row"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def _blocks(data: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GGUF tensor's raw Q4_0/Q4_1 blocks [N, blocks * bytes] -> (q [N, K], d, m [N, K / 32]): w = d * q + m."""
    n = data.shape[0]
    size = {"Q4_0": 18, "Q4_1": 20}[kind]
    blocks = data.reshape(n, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., 4:]
    else:
        nibbles = blocks[..., 2:]
        m = -8 * d
    # Byte j holds element j in its low nibble and element j + 16 in its high one.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, -1)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m)


def _unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which reorders q and k rows per head for its rotary layout."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def install_from_gguf(model: nn.Module, gguf_file: Path) -> int:
    """Replace `model`'s Llama layer projections by Int4Linear over the file's own 4-bit blocks, where
    the file holds them as Q4_0 or Q4_1; return how many were replaced.

    Each replacement is checked against the float weight the loader dequantized from the same
    blocks: a layout this code misreads fails loudly here, not as a model that answers badly.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    config = model.config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    layers = model.model.layers
    replaced = 0
    for tensor in reader.tensors:
        parts = tensor.name.split(".")  # blk.{i}.{name}.weight
        kind = tensor.tensor_type.name
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LAYER_TENSORS or kind not in ("Q4_0", "Q4_1"):
            continue
        owner, projection = LAYER_TENSORS[parts[2]]
        parent = getattr(layers[int(parts[1])], owner)
        linear = getattr(parent, projection)
        if getattr(linear, "bias", None) is not None:
            continue
        q, d, m = _blocks(np.asarray(tensor.data), kind)
        if parts[2] in heads:
            q, d, m = (_unpermute(t, heads[parts[2]]) for t in (q, d, m))
        values = (q.float().view(q.shape[0], -1, GROUP) * d[..., None] + m[..., None]).view(q.shape)
        if values.shape != linear.weight.shape or not torch.allclose(values, linear.weight.float(), rtol=0, atol=1e-5):
            raise ValueError(f"{gguf_file.name}: {tensor.name} does not match the loader's weights as read")
        # Projections that the Llama stack joins (q/k/v, gate/up) get their float32 copy joined too.
        setattr(parent, projection, Int4Linear(q, d, m, wide=projection in ("o_proj", "down_proj")))
        replaced += 1
    return replaced
