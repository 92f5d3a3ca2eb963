"""Encoder-decoder pairs (T5, mT5-style gated-gelu, Marian, BART) on random-weight models built from configs:
the same guarantees as the decoder-only path, checked against transformers' own `generate`."""

from __future__ import annotations

import pytest
import torch

from scheduler.pair import load_pair
from scheduler.request import FinishReason, Mode, Request
from scheduler.seq2seq_runner import Seq2SeqRunner
from tests import tiny
from tests.engine_util import greedy_reference, make_scheduler, params, run, smollm2_costs

EOS = tiny.SPECIALS.index(tiny.EOS)
MAX_NEW = 24
FAMILIES = ["t5", "mt5", "marian", "bart"]
# Tests of the scheduler's own logic (batching, sampling, planning, faults) run on one family of each
# attention stack: T5's (mt5 differs from it only by a gated feed-forward) and BART's (Marian's differs
# by its sinusoidal positions). Every family runs the tests of exactness, positions and caches.
STACKS = pytest.mark.parametrize("pair", ["t5", "bart"], indirect=True)
JOIN_AT = [0, 0, 1, 3, 3, 4, 8, 9]


def build(family: str, seed: int, **kw):
    if family == "marian":
        return tiny.build_marian(seed, **kw)
    if family == "bart":
        return tiny.build_bart(seed, **kw)
    return tiny.build_t5(seed, gated=family == "mt5", **kw)


def count_encodes(scheduler) -> dict[tuple[str, int], int]:
    """Counts each runner's encodes by (model, source length) from now on."""
    counts: dict[tuple[str, int], int] = {}
    for name in ("large", "small"):
        runner = getattr(scheduler, name)
        original = runner.encode

        def encode(slot, source, name=name, original=original):
            counts[(name, len(source))] = counts.get((name, len(source)), 0) + 1
            return original(slot, source)

        runner.encode = encode
    return counts


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """A large model, a draft that agrees with it often (a noisy copy) and one that rarely does."""
    large = build(request.param, seed=1)
    return {
        "family": request.param,
        "large": large,
        "draft": tiny.noisy_copy(large, 0.01, seed=2),
        "unrelated": build(request.param, seed=3, d_model=32, layers=1),
    }


@pytest.fixture(scope="module")
def sources() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 17, 5, 40, 9, 1, 26, 12]
    return [torch.randint(3, tiny.VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def references(pair, sources) -> list[list[int]]:
    return [greedy_reference(pair["large"], s, MAX_NEW, EOS) for s in sources]


def test_the_references_vary(references):
    """Outputs that depend on the source and on the position, or the tests below prove little."""
    assert len({tuple(r) for r in references}) >= len(references) - 1
    assert sum(len(set(r)) > 2 for r in references) >= len(references) - 2


@pytest.mark.parametrize("small", ["draft", "unrelated"])
def test_exact_equals_large_greedy_generate_under_staggered_joins(pair, sources, references, small):
    scheduler = make_scheduler(pair["large"], pair[small], {EOS}, slots=5)
    assert isinstance(scheduler.large, Seq2SeqRunner) and scheduler.limits.encoder_decoder
    outputs, requests = run(scheduler, sources, params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2), JOIN_AT)
    assert outputs == references
    stats = [r.stats for r in requests]
    if small == "draft":
        assert sum(s.small_tokens for s in stats) > 0.3 * sum(s.generated_tokens for s in stats)
    assert sum(s.rollbacks for s in stats) > 0
    assert all(s.prompt_tokens == len(src) for s, src in zip(stats, sources))


@STACKS
@pytest.mark.parametrize("load", [1, 6])
def test_the_load_adaptive_plan_applies_and_exact_stays_exact(pair, sources, references, load):
    """With a real pair's costs the plan drafts at one sequence; whatever it chooses when busy, exact
    stays the large model's greedy output."""
    scheduler = make_scheduler(pair["large"], pair["draft"], {EOS}, slots=load, costs=smollm2_costs())
    join_at = [i * 3 for i in range(len(sources))]
    outputs, requests = run(scheduler, sources, params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2), join_at)
    assert outputs == references
    if load == 1:
        assert sum(r.stats.small_tokens for r in requests) > 0


def test_large_mode_equals_generate(pair, sources, references):
    outputs, requests = run(make_scheduler(pair["large"], None, {EOS}, slots=3), sources, params(Mode.LARGE, MAX_NEW))
    assert outputs == references
    assert all(r.stats.small_forward_steps == 0 for r in requests)


def test_small_mode_equals_the_drafts_own_generate(pair, sources):
    refs = [greedy_reference(pair["draft"], s, MAX_NEW, EOS) for s in sources]
    scheduler = make_scheduler(pair["large"], pair["draft"], {EOS}, slots=4)
    outputs, requests = run(scheduler, sources, params(Mode.SMALL, MAX_NEW), JOIN_AT)
    assert outputs == refs
    assert all(r.stats.large_forward_calls == 0 for r in requests)


@pytest.mark.parametrize("pair", ["t5", "marian", "bart"], indirect=True)  # mt5's caches are t5's
def test_rollback_stress_keeps_caches_intact(pair, sources):
    """Every draft the large model does not rank first rolls back, over long generations."""
    n = 120
    long = sources[:4]
    refs = [greedy_reference(pair["large"], s, n, EOS) for s in long]
    always_rollback = params(Mode.BILD, n, fallback_threshold=0.0, rollback_threshold=0.0, max_small_tokens=6)
    for small in ("draft", "unrelated"):
        scheduler = make_scheduler(pair["large"], pair[small], {EOS}, slots=3)
        outputs, requests = run(scheduler, long, always_rollback, [0, 2, 5, 7])
        assert outputs == refs
        assert sum(r.stats.rollbacks for r in requests) > (5 if small == "unrelated" else 0)


@STACKS
@pytest.mark.parametrize("mode", list(Mode))
def test_batched_equals_alone(pair, sources, mode):
    p = params(mode, MAX_NEW, fallback_threshold=0.3, rollback_threshold=2.0, batch_independent=mode is Mode.BILD)
    alone = [run(make_scheduler(pair["large"], pair["draft"], {EOS}, slots=1), [s], p)[0][0] for s in sources]
    together, _ = run(make_scheduler(pair["large"], pair["draft"], {EOS}, slots=6), sources, p, JOIN_AT)
    assert together == alone


@STACKS
def test_sampling_is_seeded(pair, sources):
    # The distribution itself is the decoder-only path's (tests/test_sampling.py): the same code.
    p = params(Mode.EXACT, MAX_NEW, temperature=0.8, top_p=0.9, seed=7, fallback_threshold=0.3)
    scheduler = make_scheduler(pair["large"], pair["draft"], {EOS}, slots=4)
    first, _ = run(scheduler, sources, p)
    second, _ = run(scheduler, sources, p, JOIN_AT)
    assert first == second  # a seed fixes the output, whatever the batch
    greedy, _ = run(scheduler, sources, params(Mode.EXACT, MAX_NEW, fallback_threshold=0.3))
    assert first != greedy
    assert all(0 <= t < tiny.VOCAB for out in first for t in out)


def test_cancel_frees_the_slot_for_a_new_source(pair, sources, references):
    scheduler = make_scheduler(pair["large"], pair["draft"], {EOS}, slots=2)
    long = params(Mode.BILD, 200, fallback_threshold=0.2, ignore_eos=True)
    first, second = Request("a", sources[3], long), Request("b", sources[1], long)
    scheduler.add(first)
    scheduler.add(second)
    for _ in range(5):
        scheduler.step()
    scheduler.cancel("a")
    outputs = scheduler.step()
    assert [o.finish for o in outputs if o.request is first] == [FinishReason.CANCELLED]
    assert scheduler.free_slots == 1
    # A shorter source in the slot a longer one left: none of the old source's keys show through.
    third = Request("c", sources[5], params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2))
    scheduler.add(third)
    got: list[int] = []
    while "c" in scheduler.running or third in scheduler.waiting or not got:
        got += [t for o in scheduler.step() if o.request is third for t in o.tokens]
    assert got == references[5]
    scheduler.cancel("b")
    scheduler.step()
    assert scheduler.free_slots == 2 and scheduler.reserved_tokens == 0


def test_a_long_source_is_encoded_once_and_refused_beyond_the_context(pair, sources, references):
    scheduler = make_scheduler(pair["large"], pair["draft"], {EOS}, slots=2, max_len=64, max_prefill_tokens=8)
    encoded = count_encodes(scheduler)
    outputs, _ = run(scheduler, [sources[3], sources[0]], params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2))
    assert outputs == [references[3], references[0]]  # a 40-token source over an 8-token prefill budget
    assert encoded == {("large", 40): 1, ("small", 40): 1, ("large", 3): 1, ("small", 3): 1}
    with pytest.raises(ValueError, match="exceeds the context length"):
        scheduler.add(Request("x", list(range(3, 60)), params(Mode.EXACT, 20)))


def test_a_pair_of_mixed_kinds_is_refused(pair):
    with pytest.raises(ValueError, match="encoder-decoder"):
        make_scheduler(pair["large"], tiny.build_llama(seed=4), {EOS})


@STACKS
def test_a_source_whose_encoding_fails_ends_only_its_request(pair, sources, references):
    scheduler = make_scheduler(pair["large"], pair["draft"], {EOS}, slots=3)
    original = scheduler.large.encode

    def encode(slot, source):
        if source == sources[2]:
            raise RuntimeError("injected fault in the encoder")
        return original(slot, source)

    scheduler.large.encode = encode
    outputs, requests = run(scheduler, sources[:4], params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2), [0, 0, 1, 2])
    assert requests[2].stats.generated_tokens == 0 and outputs[2] == []
    assert [outputs[i] for i in (0, 1, 3)] == [references[i] for i in (0, 1, 3)]


def test_a_slot_serves_requests_of_every_mode_in_turn(pair, sources, references):
    """One slot: a large-mode request leaves the small model's cross-attention for it unwritten, a
    small-mode one the large model's; the next request in the slot must not see either."""
    scheduler = make_scheduler(pair["large"], pair["draft"], {EOS}, slots=1)
    modes = [Mode.LARGE, Mode.EXACT, Mode.SMALL, Mode.EXACT, Mode.BILD, Mode.EXACT]
    picks = [3, 0, 1, 5, 6, 2]
    outputs, _ = run(
        scheduler, [sources[i] for i in picks], [params(m, MAX_NEW, fallback_threshold=0.2) for m in modes]
    )
    for mode, i, out in zip(modes, picks, outputs):
        if mode in (Mode.LARGE, Mode.EXACT):
            assert out == references[i]


def test_the_generation_config_bans_and_forced_first_token_are_honoured(sources):
    """As `generate` applies them: a banned token (Marian bans its padding) is never produced, and a
    forced first token (mBART's target language) starts every reply, unstreamed."""
    large = tiny.build_bart(seed=1)
    plain = [greedy_reference(large, s, MAX_NEW, EOS) for s in sources]
    commonest = max(set(t for r in plain for t in r), key=lambda t: sum(r.count(t) for r in plain))
    large.generation_config.bad_words_ids = [[commonest]]
    large.generation_config.forced_bos_token_id = 5
    draft = tiny.noisy_copy(large, 0.01, seed=2)
    refs = [greedy_reference(large, s, MAX_NEW + 1, EOS) for s in sources]
    assert all(r[0] == 5 and commonest not in r for r in refs)
    scheduler = make_scheduler(large, draft, {EOS}, slots=4)
    outputs, _ = run(scheduler, sources, params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2), JOIN_AT)
    assert outputs == [r[1:] for r in refs]
    draft.generation_config.forced_bos_token_id = 6
    with pytest.raises(ValueError, match="a draft must start where the large model does"):
        make_scheduler(large, tiny.noisy_copy(draft, 0.0, seed=3), {EOS})


def test_families_bild_cannot_place_positions_for_are_refused():
    from transformers import UMT5Config, UMT5ForConditionalGeneration

    config = UMT5Config(vocab_size=tiny.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match=r"bild serves the encoder-decoder families .* not umt5"):
        make_scheduler(UMT5ForConditionalGeneration(config).eval(), None, {EOS})


def test_loading_a_pair_of_mixed_kinds_is_refused_with_a_message(tmp_path):
    tokenizer = tiny.build_tokenizer()
    t5 = tiny.save(tiny.build_t5(seed=1), tokenizer, tmp_path / "t5")
    llama = tiny.save(tiny.build_llama(seed=1), tokenizer, tmp_path / "llama")
    with pytest.raises(ValueError, match="a pair must be of one kind"):
        load_pair(t5, llama)


def test_encoding_runs_the_cpu_products_like_decoding(pair, sources, monkeypatch):
    """The encoder and the cross-attention projections run on CpuLinear's kernels (oneDNN's where
    the build has them), not stock F.linear, which was 2.5x slower over a source."""
    from scheduler import cpu_linear

    runner = Seq2SeqRunner(pair["large"], num_slots=2, max_len=64, max_source_len=64)
    calls = []
    original = cpu_linear.CpuLinear._product
    monkeypatch.setattr(cpu_linear.CpuLinear, "_product", lambda self, flat: calls.append(1) or original(self, flat))
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: pytest.fail("a stock F.linear ran"))
    runner.encode(1, sources[3])
    layers = sum(isinstance(m, cpu_linear.CpuLinear) for m in pair["large"].get_encoder().modules())
    assert len(calls) >= layers > 0


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_an_identical_source_reuses_its_encoding(pair, sources, references, prefix_cache):
    scheduler = make_scheduler(pair["large"], pair["draft"], {EOS}, slots=3, prefix_cache=prefix_cache)
    exact = params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2)
    first, _ = run(scheduler, [sources[3]], exact)
    # The same source again (a retry), twice at once, beside another one.
    again, requests = run(scheduler, [sources[3], sources[6], sources[3]], exact)
    assert first == [references[3]] and again == [references[3], references[6], references[3]]
    cached = [r.stats.cached_prompt_tokens for r in requests]
    assert cached == ([len(sources[3]), 0, len(sources[3])] if prefix_cache else [0, 0, 0])
