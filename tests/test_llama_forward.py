"""The runner's Llama stack (scheduler/llama_forward.py) against transformers' own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from scheduler import cpu_linear, llama_forward
from scheduler.model_runner import CausalLMRunner, ForwardItem

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.3,
)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    # Biases on q/k/v and a scaled rope: the parts of the family that differ from plain Llama.
    "llama-bias-rope3": lambda: LlamaForCausalLM(
        LlamaConfig(
            **SHAPE,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    ),
    # One key/value head: attention's batched products hold one matrix per sequence.
    "llama-mqa": lambda: LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_key_value_heads": 1})),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=False)),
}


def _pair(family: str, dtype: torch.dtype = torch.float32):
    """A model for the runner and an untouched copy that transformers runs alone."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval().to(dtype)
    return model, copy.deepcopy(model)


def _reference(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("path", ["native", "sdpa", "invariant"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_stack_computes_transformers_logits(family, path):
    model, stock = _pair(family)
    invariant = path == "invariant"
    runner = CausalLMRunner(model, num_slots=4, max_len=64, invariant=invariant, native=path == "native")
    assert runner.stack is not None and runner.invariant == invariant
    assert (runner.stack.native is not None) == (path == "native")
    torch.manual_seed(1)
    seqs = [torch.randint(0, 300, (n,)).tolist() for n in (9, 4, 14)]
    slots = [3, 0, 1]  # not contiguous: attention gathers the live rows
    cut = [6, 1, 10]
    # A prefill of different lengths, every row's logits.
    got = runner.token_logits([ForwardItem(slot, 0, seq[:c]) for slot, seq, c in zip(slots, seqs, cut)])
    want = torch.cat([_reference(stock, seq[:c]) for seq, c in zip(seqs, cut)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Each sequence goes on by a different count over its cache: the last row's logits.
    got = runner.next_token_logits([ForwardItem(slot, c, seq[c:]) for slot, seq, c in zip(slots, seqs, cut)])
    want = torch.stack([_reference(stock, seq)[-1] for seq in seqs])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # One token each, contiguous slots (a view of the cache), with run_as adding rows.
    runner.run_as = [0, 1, 4, 4, 4]
    items = [ForwardItem(0, len(seqs[1]), [7]), ForwardItem(1, len(seqs[2]), [8])]
    got = runner.next_token_logits(items)
    want = torch.stack([_reference(stock, seqs[1] + [7])[-1], _reference(stock, seqs[2] + [8])[-1]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # One sequence alone, two tokens.
    runner.run_as = []
    got = runner.token_logits([ForwardItem(3, len(seqs[0]), [9, 10])])
    torch.testing.assert_close(got, _reference(stock, seqs[0] + [9, 10])[-2:], rtol=1e-4, atol=1e-4)


def test_a_bfloat16_stack_stays_near_transformers():
    model, stock = _pair("llama", torch.bfloat16)
    runner = CausalLMRunner(model, num_slots=2, max_len=64)
    assert runner.stack is not None
    torch.manual_seed(2)
    seq = torch.randint(0, 300, (12,)).tolist()
    runner.next_token_logits([ForwardItem(1, 0, seq[:8])])
    got = runner.next_token_logits([ForwardItem(1, 8, seq[8:])])[0].float()
    want = _reference(stock, seq)[-1]
    # bfloat16 keeps 8 bits of mantissa: a few units of its last place over the logits' range.
    # (Random weights leave near ties, so argmaxes may differ.)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_the_joined_products_replace_the_layers_own_onednn_copies():
    model, _ = _pair("llama")
    runner = CausalLMRunner(model, num_slots=1, max_len=32, native=False)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    layer, attention = runner.stack.layers[0], model.model.layers[0].self_attn
    assert layer.qkv.onednn is not None and layer.gate_up.onednn is not None
    assert attention.q_proj.onednn is None and model.model.layers[0].mlp.up_proj.onednn is None
    assert attention.o_proj.onednn is not None  # products of their own keep their copies


def test_only_plain_llama_layers_take_the_stack():
    assert llama_forward.supports(FAMILIES["qwen2"]())
    # Qwen3 normalises queries and keys: a module the stack does not compute.
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16))
    assert not llama_forward.supports(qwen3)
    assert CausalLMRunner(qwen3, num_slots=1, max_len=32).stack is None


def _logits_by_batching(model, invariant: bool, native: bool = False) -> list[torch.Tensor]:
    """The same 8 tokens' logits after one prompt, computed one at a time, all at once, beside
    another sequence's tokens, and four at a time."""
    runner = CausalLMRunner(model, num_slots=5, max_len=128, invariant=invariant, native=native)
    assert (runner.stack.native is not None) == native
    torch.manual_seed(4)
    prompt, other, fed = (torch.randint(0, 300, (n,)).tolist() for n in (37, 50, 8))
    for slot in range(4):
        runner.next_token_logits([ForwardItem(slot, 0, prompt)])
    runner.next_token_logits([ForwardItem(4, 0, other)])
    start = len(prompt)
    one = torch.stack([runner.next_token_logits([ForwardItem(0, start + i, [t])])[0] for i, t in enumerate(fed)])
    together = runner.token_logits([ForwardItem(1, start, fed)])
    beside = runner.token_logits([ForwardItem(4, len(other), [5, 6, 7]), ForwardItem(2, start, fed)])[3:]
    halves = [runner.token_logits([ForwardItem(3, start + i, fed[i : i + 4])]) for i in (0, 4)]
    return [one, together, beside, torch.cat(halves)]


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_kernels_give_a_token_the_same_logits_however_it_is_batched(dtype, kv_heads):
    if not cpu_linear.reorders(dtype):
        pytest.skip(f"oneDNN does not run {dtype} here: its products are not batch-invariant")
    shape = dict(SHAPE, hidden_size=192, intermediate_size=1536, num_attention_heads=6, num_key_value_heads=kv_heads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval().to(dtype)
    assert llama_forward._batched_products_round_alike(16)  # what attention's invariance rests on
    try:
        one, *others = _logits_by_batching(model, invariant=True)
    except llama_forward.InvariantKernelsUnavailable as refused:  # the load-time probe's verdict
        pytest.skip(f"the flag is refused on this CPU: {refused}")
    for other in others:
        assert torch.equal(one, other)
    if dtype == torch.float32:
        # Without them the same comparisons differ. (In bfloat16 the output's rounding hides most of
        # that at this model's size; tests/test_smollm2.py shows it on SmolLM2.)
        one, *others = _logits_by_batching(model, invariant=False)
        assert not all(torch.equal(one, other) for other in others)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_the_native_stack_gives_a_token_the_same_logits_however_it_is_batched(kv_heads):
    """Without --invariant-kernels: the native call computes every row alone, in one order."""
    shape = dict(SHAPE, hidden_size=192, intermediate_size=1536, num_attention_heads=6, num_key_value_heads=kv_heads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    one, *others = _logits_by_batching(model, invariant=False, native=True)
    for other in others:
        assert torch.equal(one, other)


def _rounding_by_rows(differs) -> callable:
    """A product that rounds a row differently where differs(row count) holds, as CPU kernels do."""
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))

    def product(x: torch.Tensor) -> torch.Tensor:
        out = (x[:, None, :] * weight).sum(-1)  # each row on its own (a BLAS product rounds by row count)
        return out + 1e-3 if differs(x.shape[0]) else out

    return product


def test_the_probe_pads_products_whose_few_row_kernels_round_apart():
    assert llama_forward._rows_to_round_alike(_rounding_by_rows(lambda rows: False), 64, torch.float32) == 1
    # oneDNN's one-row GEMV, or AVX-512 below a 16-row AMX tile:
    assert llama_forward._rows_to_round_alike(_rounding_by_rows(lambda rows: rows == 1), 64, torch.float32) == 2
    assert llama_forward._rows_to_round_alike(_rounding_by_rows(lambda rows: rows < 16), 64, torch.float32) == 16
    # A tail kernel for the rows past a multiple of 16: only padding to a whole tile fixes the few-row case,
    # and counts past it still round apart, so no padding will do.
    assert llama_forward._rows_to_round_alike(_rounding_by_rows(lambda rows: rows % 16 != 0), 64, torch.float32) is None
    assert llama_forward._rows_to_round_alike(_rounding_by_rows(lambda rows: rows > 100), 64, torch.float32) is None


def test_padded_products_return_only_the_rows_asked_for():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    stack = llama_forward.LlamaForward(model, invariant=True)
    stack.min_rows = {"o": 5}
    x = torch.randn(2, SHAPE["hidden_size"])
    seen = []

    def product(rows):
        seen.append(rows.shape[0])
        return rows * 2

    assert torch.equal(stack.rows("o", product, x), x * 2) and seen == [5]
    assert torch.equal(stack.rows("qkv", product, x), x * 2) and seen == [5, 2]


@pytest.mark.parametrize("family", ["llama", "llama-bias-rope3"])
def test_the_native_stacks_rotary_table_holds_the_modules_own_values(family):
    """Rows of the table of every position are bit for bit what the rotary module computes per call."""
    model, _ = _pair(family)
    stack = CausalLMRunner(model, num_slots=1, max_len=64).stack
    positions = torch.tensor([0, 5, 63, 17])
    x = torch.zeros(4, model.config.hidden_size)
    cos, signed_sin = stack._rotation(positions, 64, x)
    want_cos, want_sin = model.model.rotary_emb(x, positions[None])
    assert torch.equal(cos, want_cos[0]) and torch.equal(signed_sin, llama_forward._signed_sin(want_sin[0]))
