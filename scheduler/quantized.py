"""Linear layers over a GGUF file's own 4-bit weights, on torch's int4 CPU kernel.

At one stream a forward is bound by the bytes of weights it streams: SmolLM2-135M's products in
float32 are 513 MB, its GGUF file's Q4_1 blocks 92 MB. Dequantizing the file to float32 (what
transformers' GGUF loader does) throws that away, so for `--weights int4` the layers whose GGUF
tensors are Q4_1 or Q4_0 keep the file's own 4-bit values and run on
`_weight_int4pack_mm_for_cpu`, which reads 4-bit weights with a float scale and zero point per
group of 32 input features, as GGUF's blocks are laid out:

- Q4_1: w = d * q + m, q in 0..15, per block of 32 (fp16 d and m) -> scale d, zero m + 8 d;
- Q4_0: w = d * (q - 8) -> scale d, zero 0.

The values are the file's exactly (up to float32's rounding of the zero point), so the model is the
one the file holds, not a second quantization of it. Tensors of other types (SmolLM2's Q8_0
embedding, which the output head shares) keep the loader's float copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

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


class Int4Linear(nn.Module):
    """y = x @ W.T with W held as 4-bit values and a float scale and zero point per group of 32."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """q: [N, K] integers 0..15; scales, zeros: [N, K / GROUP] float32; w = (q - 8) * scale + zero."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.to(torch.uint8), persistent=False)  # kept to join and to re-pack
        self.register_buffer("scales", scales.float().contiguous(), persistent=False)
        self.register_buffer("zeros", zeros.float().contiguous(), persistent=False)
        self._pack()

    def _pack(self) -> None:
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.q.to(torch.int32), INNER_K_TILES)
        # [K / GROUP, N, 2], the kernel's layout, in its activations' dtype (bfloat16: the scales
        # keep 8 of fp16's 11 significant bits)
        scales_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)
        self.scales_zeros = scales_zeros.to(torch.bfloat16).contiguous()

    @classmethod
    def joined(cls, linears: list[Int4Linear]) -> Int4Linear:
        """One layer computing the outputs of `linears` side by side (q, k and v as one product)."""
        return cls(
            torch.cat([m.q for m in linears]),
            torch.cat([m.scales for m in linears]),
            torch.cat([m.zeros for m in linears]),
        )

    def dequantized(self) -> torch.Tensor:
        """The float32 [N, K] weight these values stand for."""
        groups = self.q.float().view(self.out_features, -1, GROUP) - 8
        return (groups * self.scales[..., None] + self.zeros[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel's fast path takes bfloat16 activations (float32 ones ran 5-9x slower): inputs are
        # rounded to bfloat16 there, as llama.cpp rounds them to 8 bits for its Q4 products.
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from scheduler import cpu_linear

        if not cpu_linear.is_active():
            return nn.functional.linear(x, self.weight, self.bias)
        return cpu_linear.packed(x, self._product, is_head=True)

    def _product(self, flat: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.int8, self.scales).to(flat.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


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
        layer = Int4Linear(q, scales, zeros)
        if layer.dequantized().shape != linear.weight.shape or not torch.allclose(
            layer.dequantized(), linear.weight.float(), rtol=0, atol=1e-5
        ):
            raise ValueError(f"{gguf_file.name}: {tensor.name} does not match the loader's weights as read")
        setattr(parent, projection, layer)
        replaced += 1
    return replaced
