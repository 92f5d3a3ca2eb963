"""Linear layers over a GGUF file's own 4-bit weights, on torch's int4 CPU kernel.

At one stream a forward is bound by the bytes of weights it streams: SmolLM2-135M's products in
float32 are 513 MB, its GGUF file's Q4_1 blocks 92 MB. Dequantizing the file to float32 (what
transformers' GGUF loader does) throws that away, so for `--weights int4` the layers whose GGUF
tensors are Q4_1 or Q4_0 keep the file's own 4-bit values and run on
`_weight_int4pack_mm_for_cpu`, which reads 4-bit weights with a float scale and zero point per
group of 32 input features, as GGUF's blocks are laid out:

- Q4_1: w = d * q + m, q in 0..15, per block of 32 (fp16 d and m) -> scale d, zero m + 8 d;
- Q4_0: w = d * (q - 8) -> scale d, zero 0.

The values are the file's (the scales rounded to bfloat16, which the kernel takes), so the model is
the one the file holds, not a second quantization of it. Tensors of other types (SmolLM2's Q8_0
embedding, which the output head shares) keep the loader's float copy; the head gets an int8 copy
of its own (Int8Head).

The integer kernels are GEMVs: fastest over a few rows, and several times slower than oneDNN's
float32 GEMM over many (bench/results/cpu_kernels.md: int4 2.1x faster than float32 over one row,
even at 16, 1.7x slower at 64). Decoding steps are few rows; verification, full batches and
prefill many. So a forward over more than INT4_MAX_ROWS rows runs oneDNN over a float32 copy of the
very weights the int4 kernel computes with, on inputs rounded to bfloat16 and outputs rounded to
bfloat16 as the kernel's are: the same arithmetic up to the order of float32 additions, the kind of
difference that batching already makes in float32 (see llama_forward's invariant kernels).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scheduler import cpu_linear

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

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, wide: bool = True) -> None:
        """q: [N, K] integers 0..15; scales, zeros: [N, K / GROUP] float32; w = (q - 8) * scale + zero.
        `wide`: keep oneDNN's float32 copy for forwards over more than INT4_MAX_ROWS rows (else the
        int4 kernel computes every forward)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.to(torch.uint8), persistent=False)  # kept to join and to re-pack
        # The kernel takes its scales and zero points in its activations' dtype: bfloat16.
        self.register_buffer("scales", _bfloat16_rounded(scales.float()).contiguous(), persistent=False)
        self.register_buffer("zeros", _bfloat16_rounded(zeros.float()).contiguous(), persistent=False)
        self._pack()
        self.onednn = _wide_copy(self.dequantized()) if wide else None

    # oneDNN's copy has no storage to copy: a deep or unpickled copy makes its own again.
    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "onednn": self.onednn is not None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.onednn = _wide_copy(self.dequantized()) if state["onednn"] else None

    def _pack(self) -> None:
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.q.to(torch.int32), INNER_K_TILES)
        # [K / GROUP, N, 2], the kernel's layout, in its activations' dtype (bfloat16: the scales
        # keep 8 of fp16's 11 significant bits)
        scales_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)
        self.scales_zeros = scales_zeros.to(torch.bfloat16).contiguous()

    @classmethod
    def joined(cls, linears: list[Int4Linear]) -> Int4Linear:
        """One layer computing the outputs of `linears` side by side (q, k and v as one product);
        theirs keep the int4 kernel only, so that the float32 copy exists once."""
        for m in linears:
            m.onednn = None
        return cls(
            torch.cat([m.q for m in linears]),
            torch.cat([m.scales for m in linears]),
            torch.cat([m.zeros for m in linears]),
        )

    def dequantized(self) -> torch.Tensor:
        """The float32 [N, K] weight the kernel computes with."""
        return _values(self.q, self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > INT4_MAX_ROWS and self.onednn is not None and flat.dtype == torch.float32:
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
    """An output head over int8 weights with one scale per output row, on `_weight_int8pack_mm`.

    The head of SmolLM2 (its tied embedding, Q8_0 in the file: 32-value blocks) is 28M of its 134M
    parameters: in float32, 113 MB that every step streams, as much as its int4 layers together.
    The kernel takes one scale per row, not per block, so the file's values are quantized again
    (to the row's largest, over 127). Runner forwards use it (cpu_linear.active()); anything else
    calling the model gets the float weight, which stays shared with the embedding.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.weight = head.weight  # the float weight, tied to the embedding where the model ties them
        self.bias = getattr(head, "bias", None)
        self.out_features, self.in_features = self.weight.shape
        with torch.no_grad():
            weight = self.weight.float()
            scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
            self.int8 = torch.round(weight / scales[:, None]).to(torch.int8)
            self.scales = scales.to(torch.bfloat16)
            # Wide forwards (verification, full batches): oneDNN over these same int8 values in float32.
            self.onednn = self._wide()

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
        if flat.shape[0] > INT8_HEAD_MAX_ROWS and self.onednn is not None and flat.dtype == torch.float32:
            out = cpu_linear.onednn_product(_bfloat16_rounded(flat), self.onednn) * self.scales.float()
            out = _bfloat16_rounded(out)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.int8, self.scales).to(flat.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


def _values(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(q - 8) * scale + zero per group of 32: [N, K] float32."""
    n, k = q.shape
    return ((q.float().view(n, -1, GROUP) - 8) * scales[..., None] + zeros[..., None]).view(n, k)


def _blocks(data: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GGUF tensor's raw Q4_0/Q4_1 blocks [N, blocks * bytes] -> (q [N, K], scales, zeros [N, K / 32])."""
    n = data.shape[0]
    size = {"Q4_0": 18, "Q4_1": 20}[kind]
    blocks = data.reshape(n, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., 4:]
        zeros = m + 8 * d
    else:
        nibbles = blocks[..., 2:]
        zeros = np.zeros_like(d)
    # Byte j holds element j in its low nibble and element j + 16 in its high one.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, -1)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zeros)


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
        q, scales, zeros = _blocks(np.asarray(tensor.data), kind)
        if parts[2] in heads:
            q, scales, zeros = (_unpermute(t, heads[parts[2]]) for t in (q, scales, zeros))
        values = _values(q, scales, zeros)
        if values.shape != linear.weight.shape or not torch.allclose(values, linear.weight.float(), rtol=0, atol=1e-5):
            raise ValueError(f"{gguf_file.name}: {tensor.name} does not match the loader's weights as read")
        # Projections that the Llama stack joins (q/k/v, gate/up) get their float32 copy joined too.
        setattr(parent, projection, Int4Linear(q, scales, zeros, wide=projection in ("o_proj", "down_proj")))
        replaced += 1
    return replaced
