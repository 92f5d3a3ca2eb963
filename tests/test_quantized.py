"""int4 weights (`--weights int4`): a GGUF file's own Q4 blocks on the native kernels (scheduler/native)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from torch.nn import functional as F

from scheduler import cpu_linear, native, quantized
from scheduler.loading import SMOLLM2_ALIAS, load_model
from scheduler.request import Mode
from tests.engine_util import make_scheduler, params, run

REPO = Path(__file__).resolve().parent.parent


def test_native_kernels_build_here():
    """make system-packages installs a C compiler; without one the server would fall back to torch's
    slower kernels, and these tests would not test what users run."""
    assert native.available(), "no native kernels: is a C compiler installed (make system-packages)?"


def test_native_build_says_why_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    why = native._compile(tmp_path / "lib.so")
    assert why is not None and "no-such-compiler" in why


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_blocks_read_as_gguf_reads_them(kind):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 96)).astype(np.float32)
    blocks = quants.quantize(weight, GGMLQuantizationType[kind])
    want = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType[kind]))
    layer = quantized.Int4Linear(*quantized._blocks(blocks, kind))
    assert torch.allclose(layer.dequantized(), want, rtol=0, atol=1e-6)  # the file's values, exactly
    for rows in (5, quantized.INT4_MAX_ROWS + 1):  # the native kernel, and oneDNN over the same weights
        x = torch.randn(rows, 96)
        got, exact = layer(x), F.linear(x, want)
        assert got.dtype == torch.float32 and got.shape == (rows, 48)
        # activations in 8 bits per block of 32, as llama.cpp computes
        assert (got - exact).abs().max() < 0.02 * exact.abs().max()
        assert torch.allclose(got, F.linear(_q8_rounded(x), want), rtol=1e-5, atol=1e-5)


def _q8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the native kernels see it: each block of 32 rounded to 8 bits of its largest over 127."""
    blocks = x.view(x.shape[0], -1, 32)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(scale == 0, 1.0, scale)) * scale).view(x.shape)


def _q4_layer(seed: int, n: int = 64, k: int = 128) -> quantized.Int4Linear:
    rng = np.random.default_rng(seed)
    blocks = quants.quantize(rng.standard_normal((n, k)).astype(np.float32), GGMLQuantizationType.Q4_1)
    return quantized.Int4Linear(*quantized._blocks(blocks, "Q4_1"))


def test_native_rows_come_out_the_same_in_any_batch():
    """Each output element is computed alone, in one order: a row alone, among 3 or among 40 (tiles of
    4 rows, remainders, threads) gives the same bits. This is what makes exact equal large."""
    layer = _q4_layer(3, n=70)  # an odd tail of output columns too
    torch.manual_seed(0)
    x = torch.randn(40, 128)
    together = layer(x)
    assert torch.equal(torch.cat([layer(x[i : i + 1]) for i in range(40)]), together)
    assert torch.equal(layer(x[5:8]), together[5:8])
    head = quantized.Int8Head(torch.nn.Linear(128, 300, bias=False))
    with cpu_linear.active():
        together = head(x)
        assert torch.equal(torch.cat([head(x[i : i + 1]) for i in range(40)]), together)


PORTABLE_CHECK = """
import torch, numpy as np
from gguf import GGMLQuantizationType, quants
from scheduler import native, quantized
assert not native.stack_available()  # the one-call stack needs AVX2: the eager stack runs instead
weight = np.random.default_rng(3).standard_normal((70, 128)).astype(np.float32)
layer = quantized.Int4Linear(*quantized._blocks(quants.quantize(weight, GGMLQuantizationType.Q4_1), "Q4_1"))
head = quantized.Int8Head(torch.nn.Linear(128, 300, bias=False).requires_grad_(False))
x = torch.randn(9, 128, generator=torch.Generator().manual_seed(0))
q4 = layer(x)
q8 = head._product(x)
assert torch.equal(torch.cat([layer(x[i : i + 1]) for i in range(9)]), q4)
torch.save((q4, q8, head.weight), "{out}")
"""


def test_the_portable_kernels_compute_what_the_avx2_ones_do(tmp_path):
    """BILD_NATIVE_PORTABLE=1 runs the C fallback (for CPUs without AVX2) here too: the same products
    as the AVX2 kernels, summed in another order, and each row alike in any batch."""
    out = tmp_path / "portable.pt"
    env = {**os.environ, "BILD_NATIVE_PORTABLE": "1"}
    subprocess.run([sys.executable, "-c", PORTABLE_CHECK.format(out=out)], env=env, check=True, cwd=REPO)
    q4, q8, weight = torch.load(out)
    blocks = quants.quantize(
        np.random.default_rng(3).standard_normal((70, 128)).astype(np.float32), GGMLQuantizationType.Q4_1
    )
    layer = quantized.Int4Linear(*quantized._blocks(blocks, "Q4_1"))
    linear = torch.nn.Linear(128, 300, bias=False).requires_grad_(False)
    linear.weight.copy_(weight)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q4, layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q8, quantized.Int8Head(linear)._product(x), rtol=1e-5, atol=1e-5)


def test_without_a_compiler_torchs_kernels_compute_the_same_weights(monkeypatch):
    """The fallback: torch's int4 kernel over few rows, oneDNN over the same weights on the same
    bfloat16-rounded inputs over many; rows agree to the order of float32 additions."""
    monkeypatch.setattr(native, "available", lambda: False)
    layer = _q4_layer(2)
    assert not layer.native and layer.onednn is not None
    x = torch.randn(quantized.INT4_MAX_ROWS + 4, 128)
    wide = layer(x)
    narrow = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
    assert (wide != narrow).float().mean() < 0.05  # bfloat16's last bit, seldom
    assert torch.allclose(wide, narrow, rtol=1e-2, atol=1e-2)
    want = F.linear(x, layer.dequantized())
    assert (wide - want).abs().max() < 0.02 * want.abs().max()


def test_joined_layers_compute_their_parts_side_by_side():
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((n, 64)).astype(np.float32) for n in (32, 16, 16)]
    blocks = [quants.quantize(w, GGMLQuantizationType.Q4_1) for w in weights]
    parts = [quantized.Int4Linear(*quantized._blocks(b, "Q4_1")) for b in blocks]
    x = torch.randn(3, 64)
    assert torch.equal(quantized.Int4Linear.joined(parts)(x), torch.cat([part(x) for part in parts], dim=-1))


def test_int8_head_runs_on_int8_in_runner_forwards_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 300, bias=False)
    head = quantized.Int8Head(linear)
    assert head.weight is linear.weight  # still tied to whatever the float weight is tied to
    x = torch.randn(1, 3, 64)
    exact = F.linear(x, linear.weight)
    assert torch.equal(head(x), exact)
    with cpu_linear.active():
        got = head(x)
    assert got.shape == exact.shape and not torch.equal(got, exact)
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()


def test_unpermute_undoes_the_converters_rotary_order():
    heads, dim = 3, 8
    rows = torch.arange(heads * dim)
    # llama.cpp's convert_hf_to_gguf permute, as its source writes it
    permuted = rows.reshape(heads, 2, dim // 2).swapaxes(1, 2).reshape(-1)
    assert torch.equal(quantized._unpermute(permuted, heads), rows)


@pytest.fixture(scope="module")
def smollm2_int4():
    return load_model(SMOLLM2_ALIAS, weights="int4")  # checks every layer against the loader's float weights


def test_smollm2_computes_on_the_files_4_bit_weights(smollm2_int4):
    model, _ = smollm2_int4
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, quantized.Int4Linear)
    assert isinstance(layer.mlp.down_proj, quantized.Int4Linear)
    assert sum(isinstance(m, quantized.Int4Linear) for m in model.modules()) == 7 * len(model.model.layers)
    assert isinstance(model.get_output_embeddings(), quantized.Int8Head)


def test_int4_exact_equals_int4_large_at_any_load(smollm2_int4):
    """Both modes compute on the same 4-bit weights, so exact's checks of drafts give large's tokens."""
    from tests.test_smollm2 import QUESTIONS, first_layers

    model, tokenizer = smollm2_int4
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for q in QUESTIONS[:4]
    ]
    eos = {tokenizer.eos_token_id}
    alone = make_scheduler(model, None, eos, slots=1, max_len=256)
    references = [run(alone, [p], params(Mode.LARGE, 20))[0][0] for p in prompts]
    batched = make_scheduler(model, first_layers(model, 6), eos, slots=4, max_len=256)
    outputs, requests = run(batched, prompts, params(Mode.EXACT, 20, fallback_threshold=0.3), [0, 0, 1, 3])
    assert outputs == references
    assert sum(r.stats.rollbacks for r in requests) > 3
