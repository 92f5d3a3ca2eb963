"""What the choice of floating-point type costs on the serving device, said once at start-up.

On a CPU, bfloat16 streams half the bytes of float32's weights, but only a CPU that computes it
natively (AVX512-BF16 or AMX) turns that into speed, and float32 has kernels of its own here: its
linear layers run on oneDNN over weights reordered once (cpu_linear.py), with q/k/v and gate/up
joined, inside bild's Llama stack (llama_forward.py). On a 2-core EPYC with AVX512-BF16, through
the server, bfloat16's mode `large` gave 0.88x (1 stream), 0.93x (4) and 0.78x (16) of float32's
tokens/s (it gave 1.3x to 1.6x before float32 had those). Without native support bfloat16 is
emulated, and forwards over several tokens, which verification and full batches make, run several
times slower than in float32.

Its other price is exactness. A kernel rounds a sequence's activations differently in a forward over one
token than in one over several, or beside other sequences; a float32 difference of that kind moves
logits by about 1e-4 and seldom decides a greedy choice, a bfloat16 one by up to 0.7 and often
does. So in bfloat16, greedy output depends on how tokens were batched: mode `exact` equals mode
`large` only up to rounding (in that measurement, at 75% of the positions of 64-token chat answers
at one stream), and `large` itself varies with the load. float32 stays the default.
"""

from __future__ import annotations

import torch

EXACT_IN = "float32"


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 products natively (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def advice(device: str, dtype: str, native: bool | None = None) -> str | None:
    """A line for the log when `dtype` on `device` is slow or inexact; else None.

    `native`: whether the CPU computes bfloat16 natively (detected when None).
    """
    on_cpu = device == "cpu"
    if on_cpu and native is None:
        native = native_bfloat16()
    if dtype == EXACT_IN:
        return None
    inexact = f"in {dtype}, greedy output depends on batching: mode exact matches mode large only up to rounding"
    if on_cpu and dtype == "bfloat16" and not native:
        return (
            "this CPU has no native bfloat16 (AVX512-BF16 or AMX): verification and batched forwards run "
            f"several times slower than in float32; {inexact}"
        )
    if on_cpu and dtype == "bfloat16":
        return (
            "bfloat16 served no faster than float32 on a CPU with AVX512-BF16 (0.78x to 0.93x at 1 to 16 "
            f"streams), where float32 runs on oneDNN's kernels and bild's Llama stack; {inexact}"
        )
    return inexact
