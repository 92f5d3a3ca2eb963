"""The BiLD scheduler on random-weight models built from configs: exactness, batching, policies, budget."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from scheduler.request import Mode
from tests import tiny
from tests.engine_util import greedy_reference, make_scheduler, params, run, smollm2_costs

pytestmark = pytest.mark.slow

EOS = tiny.SPECIALS.index(tiny.EOS)
MAX_NEW = 40


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {
        name: AutoModelForCausalLM.from_pretrained(tiny_dirs[name], dtype=torch.float32).eval()
        for name in ("large", "draft", "unrelated")
    }


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 17, 5, 40, 9, 1, 26, 12, 7, 33]
    return [torch.randint(3, tiny.VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def references(models, prompts) -> list[list[int]]:
    return [greedy_reference(models["large"], p, MAX_NEW, EOS) for p in prompts]


JOIN_AT = [0, 0, 1, 3, 3, 4, 8, 9, 15, 16]


@pytest.mark.parametrize("small", ["draft", "unrelated"])
def test_exact_equals_large_greedy_generate(models, prompts, references, small):
    # 10 prompts of different lengths joining at different iterations, 6 slots so some wait.
    scheduler = make_scheduler(models["large"], models[small], {EOS}, slots=6)
    outputs, requests = run(scheduler, prompts, params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2), JOIN_AT)
    assert outputs == references
    stats = [r.stats for r in requests]
    if small == "draft":  # it agrees ~70%: drafts are accepted and rolled back
        assert sum(s.small_tokens for s in stats) > 0.3 * sum(s.generated_tokens for s in stats)
        assert sum(s.rollbacks for s in stats) > 0
    for s, out in zip(stats, outputs):
        assert s.generated_tokens == len(out)
        assert s.large_forward_calls < s.generated_tokens or small == "unrelated"


def test_pending_drafts_ride_along_whenever_the_large_model_runs(models, prompts, references):
    """Whenever the large model runs, every sequence's drafts are checked in it (unless it asked for
    batch-independent output): one large forward serves the whole batch."""
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=4)
    mixed = [
        params(Mode.EXACT, MAX_NEW, fallback_threshold=0.5, ignore_eos=True),
        params(Mode.BILD, MAX_NEW, fallback_threshold=0.5, ignore_eos=True),
        params(Mode.EXACT, MAX_NEW, fallback_threshold=0.5, ignore_eos=True, temperature=1.0, seed=1),
    ] * 2
    outputs, requests = run(scheduler, prompts[:4], mixed[:4])
    assert outputs[0] == greedy_reference(models["large"], prompts[0], MAX_NEW, -1)
    # The longest-running one took part in every large forward (its prefill included).
    assert max(r.stats.large_forward_calls for r in requests) == scheduler.large.forward_calls
    assert scheduler.large.forward_calls < MAX_NEW  # and drafts were accepted
    # A batch-independent request keeps to its own fallbacks, so that it repeats alone and in any batch.
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=4)
    sampled = params(
        Mode.EXACT, MAX_NEW, fallback_threshold=0.5, ignore_eos=True, temperature=1.0, seed=1, batch_independent=True
    )
    _, requests = run(scheduler, prompts[:4], sampled)
    assert max(r.stats.large_forward_calls for r in requests) < scheduler.large.forward_calls


def test_a_busy_batch_decodes_with_the_large_model_alone_where_drafts_cannot_pay(models, prompts):
    """With a real pair's costs (SmolLM2 on a 2-core CPU), drafts pay for one sequence, not for 32."""
    many = (prompts * 4)[:32]
    refs = [greedy_reference(models["large"], p, MAX_NEW, -1) for p in many]
    for mode in (Mode.EXACT, Mode.BILD):
        p = params(mode, MAX_NEW, fallback_threshold=0.2, ignore_eos=True)
        scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=32, costs=smollm2_costs())
        outputs, requests = run(scheduler, many, p)
        if mode is Mode.EXACT:
            assert outputs == refs
        busy = sum(r.stats.small_tokens for r in requests) / sum(len(o) for o in outputs)
        scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=1, costs=smollm2_costs())
        outputs, requests = run(scheduler, many[:3], p)
        alone = sum(r.stats.small_tokens for r in requests) / sum(len(o) for o in outputs)
        if mode is Mode.EXACT:
            assert outputs == refs[:3]
        assert busy < 0.1 < 0.3 < alone, (mode, busy, alone)


@pytest.mark.parametrize("load", [1, 3, 8, 24])
def test_exact_equals_large_greedy_at_every_load(models, prompts, load):
    """With a real pair's costs the plan drafts at low load and not at high: exact is lossless throughout."""
    many = (prompts * 3)[: load * 2 if load > 1 else 3]
    refs = [greedy_reference(models["large"], p, MAX_NEW, EOS) for p in many]
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=load, costs=smollm2_costs())
    join_at = [i * 3 for i in range(len(many))]  # the batch fills, stays full, then drains
    outputs, requests = run(scheduler, many, params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2), join_at)
    assert outputs == refs
    if load == 1:
        assert sum(r.stats.small_tokens for r in requests) > 0


def test_batch_independent_requests_draft_by_their_own_rules_at_any_load(models, prompts):
    many = (prompts * 3)[:24]
    p = params(Mode.BILD, MAX_NEW, fallback_threshold=0.2, rollback_threshold=2.0, batch_independent=True)
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=24, costs=smollm2_costs())
    together, requests = run(scheduler, many, p)
    assert sum(r.stats.small_tokens for r in requests) > 0.3 * sum(map(len, together))
    alone = [run(make_scheduler(models["large"], models["draft"], {EOS}, slots=1), [q], p)[0][0] for q in many[:8]]
    assert together[:8] == alone


def test_large_mode_equals_generate(models, prompts, references):
    scheduler = make_scheduler(models["large"], None, {EOS}, slots=4)
    outputs, requests = run(scheduler, prompts, params(Mode.LARGE, MAX_NEW), JOIN_AT)
    assert outputs == references
    assert all(r.stats.small_forward_steps == 0 for r in requests)


@pytest.mark.parametrize("mode", list(Mode))
def test_batched_equals_alone(models, prompts, mode):
    # Greedy exact, large and small outputs never depend on the batch; bild's, when asked not to.
    p = params(mode, MAX_NEW, fallback_threshold=0.3, rollback_threshold=2.0, batch_independent=mode is Mode.BILD)
    alone = [run(make_scheduler(models["large"], models["draft"], {EOS}, slots=2), [q], p)[0][0] for q in prompts]
    together, _ = run(make_scheduler(models["large"], models["draft"], {EOS}, slots=8), prompts, p, JOIN_AT)
    assert together == alone


def test_modes_mix_in_one_batch(models, prompts, references):
    modes = [Mode.EXACT, Mode.LARGE, Mode.BILD, Mode.SMALL] * 3
    ps = [params(m, MAX_NEW, fallback_threshold=0.2) for m in modes[: len(prompts)]]
    outputs, _ = run(make_scheduler(models["large"], models["draft"], {EOS}, slots=8), prompts, ps, JOIN_AT)
    for out, ref, p in zip(outputs, references, ps):
        if p.mode in (Mode.EXACT, Mode.LARGE):
            assert out == ref


def test_forced_fallback_and_rollback_keep_caches_intact(models, prompts):
    """Long generations where every step falls back, or every disagreeing draft rolls back."""
    long_prompts = prompts[:4]
    n = 300
    refs = [greedy_reference(models["large"], p, n, EOS) for p in long_prompts]
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=4)
    # BiLD's own rules discard every draft that falls back (the load-adaptive plan checks it instead).
    always_fallback = params(Mode.BILD, n, fallback_threshold=1.0, batch_independent=True)
    outputs, requests = run(scheduler, long_prompts, always_fallback, [0, 2, 5, 7])
    assert outputs == refs  # the small model never gets a token in: this is the large model's greedy
    assert all(r.stats.small_tokens == 0 for r in requests)
    # Rollback threshold 0 rejects every draft the large model does not rank first: that is exact mode.
    always_rollback = params(Mode.BILD, n, fallback_threshold=0.0, rollback_threshold=0.0, max_small_tokens=7)
    outputs, requests = run(scheduler, long_prompts, always_rollback, [0, 2, 5, 7])
    assert outputs == refs
    assert sum(r.stats.rollbacks for r in requests) > 10
    # An unrelated draft is confidently wrong nearly always: rollbacks at almost every check.
    scheduler = make_scheduler(models["large"], models["unrelated"], {EOS}, slots=4)
    outputs, requests = run(scheduler, long_prompts, always_rollback, [0, 2, 5, 7])
    assert outputs == refs


def test_bild_takes_drafts_the_large_model_would_not(models, prompts, references):
    """With a loose rollback threshold, bild keeps plausible drafts: lossy by design, and faster."""
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=8)
    loose = params(Mode.BILD, MAX_NEW, fallback_threshold=0.2, rollback_threshold=20.0)
    outputs, requests = run(scheduler, prompts, loose)
    assert outputs != references
    _exact, exact_requests = run(scheduler, prompts, params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2))
    assert sum(r.stats.large_forward_calls for r in requests) < sum(r.stats.large_forward_calls for r in exact_requests)


def test_eos_and_max_new_tokens(models, prompts):
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=4)
    for mode in Mode:
        for max_new in (1, 2, 11):
            outputs, requests = run(scheduler, prompts[:4], params(mode, max_new, fallback_threshold=0.2))
            for out, r in zip(outputs, requests):
                assert r.stats.small_tokens + r.stats.large_tokens == r.stats.generated_tokens == len(out)
                assert 1 <= len(out) <= max_new
                assert EOS not in out[:-1]
                assert len(out) == max_new or out[-1] == EOS


def test_waiting_requests_are_admitted_in_order_within_budget(models, prompts):
    # 2 slots and a token budget that fits one long request at a time.
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=2, max_num_tokens=100)
    p = params(Mode.EXACT, 40, fallback_threshold=0.2)
    for i, prompt in enumerate(prompts[:5]):
        scheduler.add(__import__("scheduler.request", fromlist=["Request"]).Request(str(i), prompt, p))
    admitted = []
    while scheduler.has_work():
        scheduler.step()
        assert scheduler.reserved_tokens <= 100 and len(scheduler.running) <= 2
        for rid in scheduler.running:
            if rid not in admitted:
                admitted.append(rid)
    assert admitted == ["0", "1", "2", "3", "4"]


def test_cancel_frees_the_slot(models, prompts):
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=2)
    from scheduler.request import FinishReason, Request

    long = params(Mode.BILD, 400, fallback_threshold=0.2)
    first, second = Request("a", prompts[0], long), Request("b", prompts[1], long)
    scheduler.add(first)
    scheduler.add(second)
    for _ in range(5):
        scheduler.step()
    assert scheduler.free_slots == 0
    scheduler.cancel("a")
    outputs = scheduler.step()
    assert [o.finish for o in outputs if o.request is first] == [FinishReason.CANCELLED]
    assert scheduler.free_slots == 1 and "a" not in scheduler.running
    # The freed slot serves a new request whose output is what it would be alone.
    alone, _ = run(
        make_scheduler(models["large"], models["draft"], {EOS}, slots=1),
        [prompts[2]],
        params(Mode.EXACT, 30, fallback_threshold=0.2),
    )
    third = Request("c", prompts[2], params(Mode.EXACT, 30, fallback_threshold=0.2))
    scheduler.add(third)
    got = []
    while "c" in scheduler.running or third in scheduler.waiting or not got:
        got += [t for o in scheduler.step() if o.request is third for t in o.tokens]
    assert got == alone[0]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(fallback_threshold=1.5), "fallback_threshold"),
        (dict(rollback_threshold=-1.0), "rollback_threshold"),
        (dict(rollback_threshold=float("nan")), "rollback_threshold"),
        (dict(max_small_tokens=0), "max_small_tokens"),
        (dict(max_new_tokens=600), "context length"),
    ],
)
def test_impossible_requests_are_refused(models, kw, message):
    from scheduler.request import Request, SamplingParams

    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=2, max_len=512)
    with pytest.raises(ValueError, match=message):
        scheduler.add(Request("x", [5, 6, 7], SamplingParams(**kw)))
    with pytest.raises(ValueError, match="token ids"):
        scheduler.add(Request("x", [5, tiny.VOCAB], SamplingParams()))
    assert not scheduler.has_work()


def test_chunked_prefill_keeps_others_decoding_and_stays_exact(models, prompts, references):
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=6, max_prefill_tokens=7)
    outputs, _ = run(scheduler, prompts, params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2), JOIN_AT)
    assert outputs == references
    # A 40-token prompt joining a running sequence: the running one gets tokens in every iteration.
    from scheduler.request import Request

    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=2, max_prefill_tokens=7)
    running = Request("running", prompts[0], params(Mode.LARGE, 30))
    scheduler.add(running)
    scheduler.step()
    scheduler.add(Request("long", prompts[3], params(Mode.LARGE, 30)))
    for _ in range(5):  # 40 prompt tokens take 6 iterations of 7
        outs = scheduler.step()
        assert [o.request.request_id for o in outs if o.tokens] == ["running"]
    assert scheduler.running["long"].prefilled == 35


def test_models_with_padded_vocabularies_of_different_sizes_work_together(models, prompts):
    """Like Qwen2.5 0.5B/7B: one tokenizer, output layers padded to different sizes."""
    from scheduler.request import SamplingParams

    wide = tiny.build_llama(seed=1)
    wide.resize_token_embeddings(tiny.VOCAB + 64)
    scheduler = make_scheduler(wide, models["draft"], {EOS}, slots=4)
    for kw in (dict(), dict(temperature=1.0, seed=3)):
        outputs, _ = run(scheduler, prompts[:4], SamplingParams(mode=Mode.EXACT, max_new_tokens=20, **kw))
        assert all(0 <= t < tiny.VOCAB for out in outputs for t in out)


@pytest.mark.parametrize("where", ["prefill", "draft", "verify"])
def test_a_forward_that_fails_for_one_request_ends_only_that_request(models, prompts, references, where):
    """Fault injection: a forward raises whenever one request (the victim) is in it, from its 3rd
    call on. The victim ends with ERROR; every other request still gets the large model's output."""
    from scheduler.request import FinishReason

    # A 16-token prefill budget: the victim's 40-token prompt takes three iterations to read.
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=4, max_prefill_tokens=16)
    runner = scheduler.small if where == "draft" else scheduler.large
    method = "next_token_logits" if where in ("prefill", "draft") else "token_logits"
    victim = "3"
    calls = {"n": 0}
    real = getattr(runner, method)

    def faulty(items):
        seq = scheduler.running.get(victim)
        if seq is not None and seq.slot in {item.slot for item in items}:
            calls["n"] += 1
            if calls["n"] >= (1 if where == "prefill" else 3):
                raise RuntimeError(f"injected fault in the {where} forward")
        return real(items)

    setattr(runner, method, faulty)
    finishes = {}
    step = scheduler.step

    def recording_step():
        outs = step()
        finishes.update((o.request.request_id, o.finish) for o in outs if o.finish is not None)
        return outs

    scheduler.step = recording_step
    outputs, requests = run(scheduler, prompts, params(Mode.EXACT, MAX_NEW, fallback_threshold=0.2), JOIN_AT)
    assert calls["n"] > 0
    for request, out, ref in zip(requests, outputs, references):
        if request.request_id == victim:
            continue
        assert out == ref, request.request_id
    assert finishes.pop(victim) is FinishReason.ERROR
    assert set(finishes.values()) <= {FinishReason.EOS, FinishReason.LENGTH}
