"""BiLD's rules and the load-adaptive plan, on plain data: no model runs here."""

from __future__ import annotations

import math

import pytest
import torch

from scheduler import policy
from scheduler.policy import AcceptanceStats, CostModel, CostTable, Kind, Plan, RowState, VerifyRow
from scheduler.request import Mode, SamplingParams


def logits_for(rows: list[list[dict[int, float]]], vocab: int = 8) -> torch.Tensor:
    """[N, V] logits, row after row: each position's probabilities as {token: p} (the rest share what is left)."""
    out = []
    for row in rows:
        for probs in row:
            rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
            out.append([math.log(probs.get(t, rest)) for t in range(vocab)])
    return torch.tensor(out)


# ---- the rules ---------------------------------------------------------------------------------


def test_fallback_is_the_small_models_confidence_below_the_threshold() -> None:
    assert policy.falls_back(0.39, 0.4) and not policy.falls_back(0.4, 0.4)
    proposals = policy.drafts(torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]]))
    assert [d.token for d in proposals] == [1, 0]
    assert proposals[0].confidence == pytest.approx(math.exp(3) / (math.exp(3) + 2))
    assert proposals[1].confidence == pytest.approx(1 / 3)


def test_exact_rolls_back_at_the_first_draft_that_is_not_the_argmax() -> None:
    # Inputs: the last settled token, then drafts 3, 4, 5. Position j predicts input j + 1.
    best = [{3: 0.9}, {4: 0.6}, {6: 0.5, 5: 0.45}, {7: 0.9}]
    [verdict] = policy.verify(logits_for([best]), [VerifyRow([1, 3, 4, 5], Mode.EXACT, 0.8)])
    assert verdict == policy.Verdict(accepted=2, next_token=6, rolled_back=True)


def test_bild_keeps_a_draft_the_large_model_finds_likely_enough() -> None:
    best = [{3: 0.9}, {4: 0.6}, {6: 0.5, 5: 0.45}, {7: 0.9}]
    rows = [VerifyRow([1, 3, 4, 5], Mode.BILD, 0.8), VerifyRow([1, 3, 4, 5], Mode.BILD, 0.7)]
    loose, strict = policy.verify(logits_for([best, best]), rows)
    # -log 0.45 = 0.80: within 0.8, so every draft stands and the large model adds its next token.
    assert loose == policy.Verdict(accepted=3, next_token=7, rolled_back=False)
    assert strict == policy.Verdict(accepted=2, next_token=6, rolled_back=True)


def test_rows_of_different_widths_are_checked_each_on_its_own_logits() -> None:
    a = [{2: 0.9}]  # nothing drafted: the large model's next token only
    b = [{5: 0.9}, {6: 0.9}]
    verdicts = policy.verify(logits_for([a, b]), [VerifyRow([1], Mode.EXACT, 0.8), VerifyRow([1, 5], Mode.EXACT, 0.8)])
    assert verdicts == [policy.Verdict(0, 2, False), policy.Verdict(1, 6, False)]


def test_processed_rows_follow_the_requests_rule() -> None:
    best = [{3: 0.9}, {4: 0.2, 5: 0.7}, {6: 0.9}]
    logits = logits_for([best])
    exact = SamplingParams(mode=Mode.EXACT, repetition_penalty=1.0001)
    verdict = policy.verify_processed(logits, [3, 4], [[1], [1, 3], [1, 3, 4]], exact, 0, 10, [])
    assert verdict == policy.Verdict(1, 5, True)
    bild = SamplingParams(mode=Mode.BILD, rollback_threshold=2.0, repetition_penalty=1.0001)
    verdict = policy.verify_processed(logits, [3, 4], [[1], [1, 3], [1, 3, 4]], bild, 0, 10, [])
    assert verdict == policy.Verdict(2, 6, False)  # p(4) = 0.2 > exp(-2)


# ---- acceptance statistics ---------------------------------------------------------------------


def test_acceptance_statistics_learn_what_drafts_of_each_confidence_are_worth() -> None:
    stats = AcceptanceStats()
    optimistic = stats.stands("greedy", 0.3)
    assert optimistic > 0.5  # before evidence: hopeful, so that a new server drafts and learns
    for _ in range(400):
        stats.ruled("greedy", 0.3, stood=False)
        stats.ruled("greedy", 0.95, stood=True)
    assert stats.stands("greedy", 0.3) < 0.05 and stats.stands("greedy", 0.95) > 0.95
    assert stats.stands("sampled", 0.3) == optimistic  # each rule learns on its own
    # Confident drafts come in runs: after a confident one, the next is predicted to stand more often.
    for _ in range(400):
        stats.proposed("greedy", 0.95, previous=0.95)
        stats.proposed("greedy", 0.3, previous=0.3)
    assert stats.next_stands("greedy", 0.95) > 0.9 > 0.1 > stats.next_stands("greedy", 0.3)


# ---- costs -------------------------------------------------------------------------------------


def test_a_forward_costs_the_cheapest_measured_count_at_or_above_its_tokens() -> None:
    table = CostTable([1, 2, 3, 4, 8, 16], [0.030, 0.030, 0.045, 0.043, 0.065, 0.060])
    assert table(1, 3) == 0.043  # 3 tokens run as 4, which is faster
    assert table(1, 9) == table(1, 5) == 0.060
    assert table(4, 32) == 0.060  # beyond the last count the cost grows along the last two, never shrinks
    assert CostTable([8, 16], [0.06, 0.10])(4, 32) == pytest.approx(0.18)
    assert table.run_as()[:9] == [0, 1, 2, 4, 4, 16, 16, 16, 16]
    assert table(0, 0) == 0.0


def test_the_cost_model_follows_measured_forwards() -> None:
    costs = CostModel(CostTable([1], [0.050]), CostTable([1], [0.005]))
    for _ in range(50):
        costs.observed("large", 1, 1, 0.100)
    assert costs.large(1, 1) == pytest.approx(0.100, rel=0.02) and costs.small(1, 1) == 0.005


# ---- the plan ----------------------------------------------------------------------------------

CHEAP_CHECKS = CostModel(CostTable([1, 64], [0.050, 0.052]), CostTable([1, 64], [0.002, 0.003]), adapt=False)
DEAR_CHECKS = CostModel(CostTable([1, 32, 64], [0.050, 0.130, 0.230]), CostTable([1, 64], [0.004, 0.013]), adapt=False)


def drafting(pending=(), stands=0.8, **kw) -> RowState:
    return RowState(Kind.DRAFTS, pending=tuple(pending), can_draft=True, next_stands=stands, **kw)


def test_with_cheap_checks_every_sequence_drafts() -> None:
    assert policy.plan([drafting(), drafting()], CHEAP_CHECKS, 0.0) == Plan([0, 1], [])


def test_a_full_batch_of_dear_checks_decodes_with_the_large_model_alone() -> None:
    rows = [drafting(stands=0.7) for _ in range(32)]
    assert policy.plan(rows, DEAR_CHECKS, 0.0) == Plan([], list(range(32)))


def test_the_round_ends_when_another_draft_is_worth_less_than_checking_now() -> None:
    row = drafting(pending=[0.9, 0.8, 0.6], stands=0.5)
    assert policy.plan([row], CHEAP_CHECKS, 0.006) == Plan([0], [])  # verifying longer drafts is free here
    costly = CostModel(CostTable([1, 4, 5], [0.030, 0.030, 0.060]), CostTable([1], [0.003]), adapt=False)
    assert policy.plan([row], costly, 0.009) == Plan([], [0])  # a fifth token doubles the check


def test_sequences_that_fell_back_wait_for_one_check_that_serves_all() -> None:
    blocked = RowState(Kind.DRAFTS, pending=(0.9,), can_draft=False)
    plan = policy.plan([blocked, drafting(pending=[0.95], stands=0.9)], CHEAP_CHECKS, 0.002)
    assert plan == Plan([1], [])  # the other one drafts on; the first waits for the same forward
    plan = policy.plan([blocked, RowState(Kind.DRAFTS, pending=(0.95,), can_draft=False)], CHEAP_CHECKS, 0.004)
    assert plan == Plan([], [0, 1])


def test_large_and_small_mode_sequences_and_independent_ones() -> None:
    rows = [
        RowState(Kind.LARGE),
        RowState(Kind.SMALL),
        RowState(Kind.DRAFTS, can_draft=True, next_stands=0.0, independent=True),
        RowState(Kind.DRAFTS, pending=(0.5,), can_draft=False, independent=True),
    ]
    # The small-mode row and the independent row that may draft always step; the large-mode row
    # and the independent row that fell back are checked now.
    assert policy.plan(rows, DEAR_CHECKS, 0.0) == Plan([1, 2], [0, 3])


def test_a_stale_small_cache_makes_drafting_dearer() -> None:
    costs = CostModel(
        CostTable([1, 2, 8], [0.030, 0.030, 0.040]), CostTable([1, 64, 512], [0.003, 0.010, 0.080]), adapt=False
    )
    assert policy.plan([drafting(stands=0.5)], costs, 0.0) == Plan([0], [])
    assert policy.plan([drafting(stands=0.5, catch_up=500)], costs, 0.0) == Plan([], [0])


def test_whether_drafting_pays_at_a_batch_size() -> None:
    assert policy.drafting_pays(1, CHEAP_CHECKS, 0.5)
    assert not policy.drafting_pays(32, DEAR_CHECKS, 0.5)
    assert not policy.drafting_pays(1, CHEAP_CHECKS, 0.0)
