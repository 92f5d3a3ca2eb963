"""What the choice of floating-point type costs on the serving device, said once at start-up.

On a CPU, bfloat16 is fast only where the CPU computes it natively (AVX512-BF16 or AMX). There its
linear layers run on oneDNN over weights reordered once, as float32's do (cpu_linear.py), and
stream half the bytes: on a 2-core EPYC with AVX512-BF16, through the server, mode `large` gave
1.3x to 1.8x of float32's tokens/s at 1 to 16 streams, and mode `exact` 1.0x to 1.35x (its draft
gains less than the large model). Without native support it is emulated, and forwards over
several tokens, which verification and full batches make, run several times slower than in
float32.

Its price is exactness. A kernel rounds a sequence's activations differently in a forward over one
token than in one over several, or beside other sequences; a float32 difference of that kind moves
logits by about 1e-4 and seldom decides a greedy choice, a bfloat16 one by up to 0.7 and often
does. So in bfloat16, greedy output depends on how tokens were batched: mode `exact` equals mode
`large` only up to rounding (in those measurements, at 62% to 75% of the positions of 64-token chat
answers at one stream), and `large` itself varies with the load. Batch-invariant kernels
(`--invariant-kernels`, llama_forward.py) round every token alike however it is batched, which
makes bfloat16 exact again on such a CPU, for some of its speed. float32 stays the default.
"""

from __future__ import annotations

import torch

EXACT_IN = "float32"


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 products natively (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def advice(device: str, dtype: str, native: bool | None = None, invariant: bool = False) -> str | None:
    """A line for the log when `dtype` on `device` is slow, inexact, or leaves speed unused; else None.

    `native`: whether the CPU computes bfloat16 natively (detected when None). `invariant`: the
    server runs batch-invariant kernels (llama_forward.py), which make bfloat16 exact on such a CPU.
    """
    on_cpu = device == "cpu"
    if on_cpu and native is None:
        native = native_bfloat16()
    if dtype == EXACT_IN:
        if on_cpu and native:
            return (
                "this CPU computes bfloat16 natively: --dtype bfloat16 serves faster (mode large 1.3x to 1.8x, "
                "mode exact 1.0x to 1.35x at 1 to 16 streams, measured on such a CPU); there mode exact "
                "matches mode large only up to bfloat16 rounding, unless --invariant-kernels is on"
            )
        return None
    if on_cpu and dtype == "bfloat16" and native and invariant:
        return None
    inexact = f"in {dtype}, greedy output depends on batching: mode exact matches mode large only up to rounding"
    if on_cpu and dtype == "bfloat16" and not native:
        return (
            "this CPU has no native bfloat16 (AVX512-BF16 or AMX): verification and batched forwards run "
            f"several times slower than in float32; {inexact}"
        )
    return inexact
