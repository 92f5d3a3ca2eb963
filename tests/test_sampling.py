"""Sampling in every mode: the distribution of exact mode, seeds, stop tokens, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from scheduler.request import FinishReason, Mode, Request, SamplingParams
from scheduler.sampling import process
from tests import tiny
from tests.engine_util import make_scheduler, run

EOS = tiny.SPECIALS.index(tiny.EOS)
PROMPT = [7, 99, 213, 45, 8]


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {
        name: AutoModelForCausalLM.from_pretrained(tiny_dirs[name], dtype=torch.float32).eval()
        for name in ("large", "draft", "unrelated")
    }


def chi_square(counts: Counter, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic against expected probabilities, pooling cells expected below 5."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for token, p in enumerate(probs.tolist()):
        expected = p * n
        if expected < 5:
            pooled_obs += counts.get(token, 0)
            pooled_exp += expected
            continue
        stat += (counts.get(token, 0) - expected) ** 2 / expected
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return stat, cells - 1


# Upper 0.1% points of chi-square, by degrees of freedom: a correct sampler fails 1 in 1000 seeds.
CHI2_999 = {
    1: 10.83,
    2: 13.82,
    3: 16.27,
    4: 18.47,
    5: 20.52,
    6: 22.46,
    7: 24.32,
    8: 26.12,
    9: 27.88,
    10: 29.59,
    11: 31.26,
    12: 32.91,
    13: 34.53,
    14: 36.12,
    15: 37.70,
}


@pytest.mark.parametrize("draft", ["draft", "unrelated"])
def test_exact_sampling_is_distributed_as_large_sampling(models, draft):
    """Second and third tokens of N seeded runs against the large model's own distribution there.

    The first token comes from the large model's prefill; the next ones go through drafting and the
    accept/resample rule (fallback threshold 0: every position is drafted). Conditioning on the most
    common prefix gives an exact expected distribution to test against.
    """
    n = 1200
    # Batch-independent: BiLD's own rules, so that every position is drafted whatever the plan would do.
    params = [
        SamplingParams(
            mode=Mode.EXACT,
            max_new_tokens=3,
            temperature=1.0,
            top_k=12,
            seed=s,
            fallback_threshold=0.0,
            ignore_eos=True,
            batch_independent=True,
        )
        for s in range(n)
    ]
    scheduler = make_scheduler(models["large"], models[draft], {EOS}, slots=16, max_len=64)
    outputs, requests = run(scheduler, [PROMPT] * n, params)
    assert sum(r.stats.rollbacks for r in requests) > 10  # the resampling path ran
    assert sum(r.stats.small_tokens for r in requests) > 10  # and so did acceptance
    for depth in (1, 2):
        prefix = Counter(tuple(o[:depth]) for o in outputs).most_common(1)[0][0]
        samples = Counter(o[depth] for o in outputs if tuple(o[:depth]) == prefix)
        m = sum(samples.values())
        with torch.no_grad():
            logits = models["large"](torch.tensor([PROMPT + list(prefix)])).logits[0, -1]
        probs = process(logits[None], params[0], [PROMPT + list(prefix)])[0]
        stat, df = chi_square(samples, probs, m)
        assert m >= 100 and 1 <= df <= 15
        assert stat < CHI2_999[df], (depth, stat, df, m)


def test_the_chi_square_check_can_fail(models):
    """The same check rejects the small model's distribution: it has the power to catch a wrong sampler."""
    n = 1200
    params = [
        SamplingParams(mode=Mode.SMALL, max_new_tokens=2, temperature=1.0, top_k=12, seed=s, ignore_eos=True)
        for s in range(n)
    ]
    outputs, _ = run(
        make_scheduler(models["large"], models["unrelated"], {EOS}, slots=16, max_len=64), [PROMPT] * n, params
    )
    prefix = Counter(o[0] for o in outputs).most_common(1)[0][0]
    samples = Counter(o[1] for o in outputs if o[0] == prefix)
    with torch.no_grad():
        logits = models["large"](torch.tensor([[*PROMPT, prefix]])).logits[0, -1]
    stat, df = chi_square(samples, process(logits[None], params[0], [[*PROMPT, prefix]])[0], sum(samples.values()))
    assert stat > CHI2_999[max(1, min(df, 15))]


@pytest.mark.parametrize("mode", list(Mode))
def test_a_seed_reproduces_a_request_alone_and_in_a_busy_batch(models, mode):
    p = SamplingParams(
        mode=mode,
        max_new_tokens=30,
        temperature=0.9,
        top_p=0.95,
        seed=1234,
        fallback_threshold=0.1,
        repetition_penalty=1.2,
    )
    alone, _ = run(make_scheduler(models["large"], models["draft"], {EOS}, slots=1), [PROMPT], p)
    others = [
        SamplingParams(mode=m, max_new_tokens=25, temperature=t, seed=s)
        for m, t, s in zip([Mode.BILD, Mode.EXACT, Mode.LARGE, Mode.SMALL] * 2, [0.0, 1.0, 0.5, 1.3] * 2, range(8))
    ]
    prompts = [[5 + i, 17, 3 * i + 4] for i in range(8)]
    busy, _ = run(
        make_scheduler(models["large"], models["draft"], {EOS}, slots=6),
        [*prompts[:3], PROMPT, *prompts[3:]],
        [*others[:3], p, *others[3:]],
        join_at=[0, 0, 1, 2, 2, 3, 5, 6, 6],
    )
    assert busy[3] == alone[0]
    different, _ = run(
        make_scheduler(models["large"], models["draft"], {EOS}, slots=1),
        [PROMPT],
        SamplingParams(**{**p.__dict__, "seed": 99}),
    )
    assert different[0] != alone[0]


def test_logprobs_in_exact_mode_are_the_large_models_own(models):
    p = SamplingParams(mode=Mode.EXACT, max_new_tokens=20, fallback_threshold=0.2, logprobs=True, top_logprobs=3)
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=2)
    request = Request("r", PROMPT, p)
    scheduler.add(request)
    tokens, logprobs = [], []
    while scheduler.has_work():
        for out in scheduler.step():
            tokens += out.tokens
            logprobs += out.logprobs
    assert request.stats.small_tokens > 0  # some tokens were drafts the large model accepted
    with torch.no_grad():
        full = torch.log_softmax(models["large"](torch.tensor([PROMPT + tokens])).logits[0].float(), -1)
    for i, (token, lp) in enumerate(zip(tokens, logprobs)):
        row = full[len(PROMPT) - 1 + i]
        assert lp.token == token and math.isclose(lp.logprob, float(row[token]), abs_tol=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert all(math.isclose(v, w, abs_tol=1e-4) for (_, v), w in zip(lp.top, top.values.tolist()))


def test_stop_token_ids_and_ignore_eos(models):
    scheduler = make_scheduler(models["large"], models["draft"], {EOS}, slots=2)
    free, _ = run(
        scheduler, [PROMPT], SamplingParams(mode=Mode.EXACT, max_new_tokens=30, ignore_eos=True, fallback_threshold=0.2)
    )
    stop_at = free[0][5]
    request = Request(
        "r",
        PROMPT,
        SamplingParams(
            mode=Mode.BILD, max_new_tokens=30, stop_token_ids=(stop_at,), fallback_threshold=0.2, rollback_threshold=0.0
        ),
    )
    scheduler.add(request)
    tokens, finish = [], []
    while scheduler.has_work():
        for out in scheduler.step():
            tokens += out.tokens
            finish.append((out.finish, out.stop_reason))
    assert tokens == free[0][: free[0].index(stop_at) + 1]
    assert finish[-1] == (FinishReason.STOP, str(stop_at))
