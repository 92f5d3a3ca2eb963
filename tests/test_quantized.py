"""int4 weights (`--weights int4`): a GGUF file's own Q4 blocks on torch's int4 CPU kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from torch.nn import functional as F

from scheduler import quantized
from scheduler.loading import SMOLLM2_ALIAS, load_model
from scheduler.request import Mode
from tests.engine_util import make_scheduler, params, run


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_blocks_read_as_gguf_reads_them(kind):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 96)).astype(np.float32)
    blocks = quants.quantize(weight, GGMLQuantizationType[kind])
    want = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType[kind]))
    values = quantized._blocks(blocks, kind)
    assert torch.allclose(quantized._values(*values), want, rtol=0, atol=1e-6)
    layer = quantized.Int4Linear(*values)
    # The kernel computes with those weights, its scales rounded to bfloat16 (and its inputs and outputs).
    assert torch.allclose(layer.dequantized(), want, rtol=0, atol=0.01 * float(want.abs().max()))
    for rows in (5, quantized.INT4_MAX_ROWS + 1):  # the int4 kernel, and oneDNN over the same weights
        x = torch.randn(rows, 96)
        got, exact = layer(x), F.linear(x, want)
        assert got.dtype == torch.float32 and got.shape == (rows, 48)
        assert (got - exact).abs().max() < 0.03 * exact.abs().max()


def test_wide_forwards_compute_what_the_int4_kernel_computes():
    """Over more than INT4_MAX_ROWS rows oneDNN runs the same weights on the same rounded inputs: the
    rows agree with the int4 kernel's to the order of float32 additions, rounded to bfloat16."""
    rng = np.random.default_rng(2)
    blocks = quants.quantize(rng.standard_normal((64, 128)).astype(np.float32), GGMLQuantizationType.Q4_1)
    layer = quantized.Int4Linear(*quantized._blocks(blocks, "Q4_1"))
    assert layer.onednn is not None
    x = torch.randn(quantized.INT4_MAX_ROWS + 4, 128)
    wide = layer(x)
    narrow = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
    assert (wide != narrow).float().mean() < 0.05  # bfloat16's last bit, seldom
    assert torch.allclose(wide, narrow, rtol=1e-2, atol=1e-2)


def test_joined_layers_compute_their_parts_side_by_side():
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((n, 64)).astype(np.float32) for n in (32, 16, 16)]
    blocks = [quants.quantize(w, GGMLQuantizationType.Q4_1) for w in weights]
    parts = [quantized.Int4Linear(*quantized._blocks(b, "Q4_1")) for b in blocks]
    x = torch.randn(3, 64)
    assert torch.equal(quantized.Int4Linear.joined(parts)(x), torch.cat([part(x) for part in parts], dim=-1))


def test_int8_head_runs_on_int8_in_runner_forwards_only():
    from scheduler import cpu_linear

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
