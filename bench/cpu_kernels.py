"""Which CPU kernel computes SmolLM2-135M's products fastest, by the rows a forward computes.

    python bench/cpu_kernels.py [--rows 1 4 16 64 256] [--repeats 5]

ms per pass over the 30 layers' products (q/k/v joined, o, gate/up joined, down: 106M weights, each
layer its own tensors, so that they stream from memory as in a real forward), and over the output
head (49,152 x 576) alone. Random weights of the real shapes; 2 threads. One decoding step at
batch B computes B rows; a check of k drafts per sequence B * (k + 1); a prefill chunk up to 512.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scheduler import cpu_linear, native, precision

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of qkv, o, gate_up, down
HEAD = (49152, 576)


def timed(run: Callable[[], object], repeats: int) -> float:
    run()
    run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats * 1e3


def int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    groups = weight.view(n, k // 32, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).view(n, k)
    scales_zeros = torch.stack([scale.view(n, -1), (low + 8 * scale).view(n, -1)], -1).transpose(0, 1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    return packed, scales_zeros.to(torch.bfloat16).contiguous()


def q4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 blocks as the native kernel takes them: nibbles [N, K/2], d and m [N, K/32]."""
    n, k = weight.shape
    groups = weight.view(n, k // 32, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    d = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((groups - low[..., None]) / d[..., None]).clamp(0, 15).to(torch.uint8)
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2).contiguous()
    return nibbles, d.contiguous(), low.contiguous()


def q8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    groups = weight.view(n, k // 32, 32)
    d = groups.abs().amax(-1) / 127
    return torch.round(groups / d[..., None]).to(torch.int8).view(n, k), d.contiguous()


def int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = weight.abs().amax(1) / 127
    return torch.round(weight / scales[:, None]).to(torch.int8), scales.to(torch.bfloat16)


def kernels(weights: list[torch.Tensor]) -> dict[str, Callable[[dict[int, torch.Tensor]], Callable[[], object]]]:
    """name -> (inputs by feature count -> one pass over `weights`)."""
    reordered = [cpu_linear.onednn_weight(w) for w in weights]
    bf16 = [w.to(torch.bfloat16) for w in weights]
    bf16_reordered = [cpu_linear.onednn_weight(w) for w in bf16]
    int4s, int8s = [int4(w) for w in weights], [int8(w) for w in weights]
    dynamic = []
    for w in weights:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w
        dynamic.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), dtype=torch.qint8)[0])

    table = {
        "float32 (oneDNN, today's default)": lambda xs: (
            lambda: [cpu_linear.product(w, xs[w.shape[1]], r) for w, r in zip(weights, reordered)]
        ),
        "bfloat16 (oneDNN where native, else F.linear)": lambda xs: (
            lambda: [
                cpu_linear.product(w, xs[w.shape[1]].to(torch.bfloat16), r)
                if r is not None
                else F.linear(xs[w.shape[1]].to(torch.bfloat16), w)
                for w, r in zip(bf16, bf16_reordered)
            ]
        ),
        "int8 per row, bfloat16 activations": lambda xs: (
            lambda: [torch.ops.aten._weight_int8pack_mm(xs[q.shape[1]].to(torch.bfloat16), q, s) for q, s in int8s]
        ),
        "int4 groups of 32, bfloat16 activations (--weights int4)": lambda xs: (
            lambda: [
                torch.ops.aten._weight_int4pack_mm_for_cpu(xs[w.shape[1]].to(torch.bfloat16), p, 32, sz)
                for w, (p, sz) in zip(weights, int4s)
            ]
        ),
        "dynamic int8, fbgemm (rounds by batch)": lambda xs: lambda: [m(xs[m.in_features]) for m in dynamic],
    }
    if native.available():  # bild's own kernels (scheduler/native): 8-bit activations, as llama.cpp
        q4s, q8s = [q4_blocks(w) for w in weights], [q8_blocks(w) for w in weights]
        table["Q4_1 blocks, 8-bit activations (native; --weights auto)"] = lambda xs: (
            lambda: [native.q4_linear(xs[w.shape[1]], *q) for w, q in zip(weights, q4s)]
        )
        table["Q8_0 blocks, 8-bit activations (native; the int4 model's head)"] = lambda xs: (
            lambda: [native.q8_linear(xs[w.shape[1]], *q) for w, q in zip(weights, q8s)]
        )
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    layers = [torch.randn(n, k) * 0.02 for _ in range(LAYERS) for n, k in SHAPES]
    head = [torch.randn(*HEAD) * 0.02]
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    print(
        f"{cpu or platform.processor()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"native bfloat16: {precision.native_bfloat16()}; ms per pass; `python bench/cpu_kernels.py`\n"
    )
    for title, weights in (("the 30 layers' products", layers), ("the output head", head)):
        print(f"{title}:\n")
        print("| kernel | " + " | ".join(f"{r} rows" for r in args.rows) + " |")
        print("|---|" + "---|" * len(args.rows))
        for name, make in kernels(weights).items():
            cells = []
            for rows in args.rows:
                xs = {k: torch.randn(rows, k) for k in (576, 1536)}
                cells.append(f"{timed(make(xs), args.repeats):.1f}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        print()


if __name__ == "__main__":
    main()
