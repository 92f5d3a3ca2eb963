"""A draft's output vocabulary (output_vocab.json): inside bild's forwards it scores only those tokens,
everywhere else it is the unchanged transformers model, and exact mode still equals the large model."""

from __future__ import annotations

import shutil

import pytest
import torch

from scheduler import output_vocab
from scheduler.model_runner import CausalLMRunner, ForwardItem
from scheduler.pair import load_pair
from scheduler.request import Mode
from tests import tiny
from tests.engine_util import greedy_reference, make_scheduler, params, run


@pytest.fixture(scope="module")
def restricted_draft(tiny_dirs, tmp_path_factory) -> tuple[str, list[int]]:
    """The tiny draft, told to predict only the even token ids (and EOS)."""
    path = tmp_path_factory.mktemp("restricted") / "draft"
    shutil.copytree(tiny_dirs["draft"], path)
    eos = tiny.SPECIALS.index(tiny.EOS)
    vocab = load_pair(tiny_dirs["large"], None).large.config.vocab_size
    ids = sorted(set(range(0, vocab, 2)) | {eos})
    output_vocab.save(path, ids, "test: even ids only")
    return str(path), ids


def test_runner_scores_only_the_output_vocab(tiny_dirs, restricted_draft):
    path, ids = restricted_draft
    small = load_pair(tiny_dirs["large"], path).small
    stock = load_pair(tiny_dirs["large"], tiny_dirs["draft"]).small
    prompt = list(range(5, 25))
    with torch.inference_mode():
        reference = stock(torch.tensor([prompt])).logits[0, -1]
        outside_runner = small(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(outside_runner, reference)  # transformers' own calls see the full head

    logits = CausalLMRunner(small, 1, 64).next_token_logits([ForwardItem(0, 0, prompt)])[0]
    inside = torch.zeros_like(logits, dtype=torch.bool)
    inside[ids] = True
    # (the runner's stack sums in its own order: float32's last bits)
    torch.testing.assert_close(logits[inside], reference[inside], rtol=1e-4, atol=1e-4)
    assert (logits[~inside] == torch.finfo(logits.dtype).min).all()
    assert logits.argmax().item() in ids


@pytest.mark.parametrize("rows", [1, 3, 9])  # the int8 kernel up to 6 rows, oneDNN over the int8 values above
def test_the_restricted_head_on_int8_weights_scores_the_same_tokens(tiny_dirs, restricted_draft, rows):
    path, ids = restricted_draft
    pair = load_pair(tiny_dirs["large"], path, weights="auto")  # auto: a restricted draft head on int8
    head = pair.small.get_output_embeddings()
    assert head.int8 is not None
    reference = load_pair(tiny_dirs["large"], path, weights="float").small
    assert reference.get_output_embeddings().int8 is None
    items = [ForwardItem(i, 0, list(range(5 + i, 25))) for i in range(rows)]
    logits = CausalLMRunner(pair.small, rows, 64).next_token_logits(items)
    expected = CausalLMRunner(reference, rows, 64).next_token_logits(items)
    inside = torch.zeros(logits.shape[-1], dtype=torch.bool)
    inside[ids] = True
    assert (logits[:, ~inside] == torch.finfo(logits.dtype).min).all()
    # int8 rows with one scale each, on bfloat16 inputs: within 2% of the largest score.
    error = (logits[:, inside] - expected[:, inside]).abs().max()
    assert error <= 0.02 * expected[:, inside].abs().max()


def test_exact_mode_with_a_restricted_draft_equals_large_greedy(tiny_dirs, restricted_draft):
    path, _ = restricted_draft
    pair = load_pair(tiny_dirs["large"], path)
    prompts = [[3 + i, 9, 14 + 2 * i, 40, 7] for i in range(6)]
    eos = tiny.SPECIALS.index(tiny.EOS)
    outputs, requests = run(
        make_scheduler(pair.large, pair.small, {eos}), prompts, params(Mode.EXACT, 24), join_at=[0, 0, 1, 3, 3, 7]
    )
    for prompt, out in zip(prompts, outputs):
        assert out == greedy_reference(pair.large, prompt, 24, eos)
    drafted = sum(r.stats.small_tokens for r in requests)
    assert drafted > 0, "the restricted draft still drafts"


def test_bad_output_vocab_is_refused(tiny_dirs, tmp_path):
    path = tmp_path / "draft"
    shutil.copytree(tiny_dirs["draft"], path)
    output_vocab.save(path, [1, 10**9], "out of range")
    with pytest.raises(ValueError, match="outside the model's"):
        load_pair(tiny_dirs["large"], str(path))
