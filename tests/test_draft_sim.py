"""bench/draft_sim.py's model of BiLD's exact mode at batch 1, on tracks whose outcome is known by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from draft_sim import Track, simulate


def test_a_draft_that_always_agrees_settles_max_small_plus_one_per_large_forward():
    track = Track("chat", [1.0] * 10, [True] * 10)
    out = simulate([track], fallback=0.4, ratio=0.1, max_small=4)
    # Two rounds of 4 drafts and the large model's own token: 10 tokens for 2 large forwards, 8 draft steps.
    assert out.large_per_token == pytest.approx(0.2)
    assert out.draft_share == pytest.approx(0.8)
    assert out.speedup == pytest.approx(10 / (2 + 0.1 * 8))


def test_drafts_below_the_fallback_threshold_end_the_round_and_are_checked():
    # Confident and right, then unsure but right (checked, stands), then wrong: the large model replaces it.
    track = Track("chat", [0.9, 0.3, 0.9, 0.9], [True, True, False, True])
    out = simulate([track], fallback=0.4, ratio=0.0, max_small=10)
    # Round 1: drafts 0 and 1 (1 is unsure, so checked at once), both stand, the large model adds 2.
    # Round 2: draft 3 stands (the track ends there).
    assert out.large_per_token == pytest.approx(2 / 4)
    assert out.draft_share == pytest.approx(3 / 4)


def test_a_draft_that_never_agrees_is_slower_than_the_large_model():
    track = Track("chat", [0.9] * 6, [False] * 6)
    out = simulate([track], fallback=0.4, ratio=0.1, max_small=3)
    assert out.large_per_token == 1.0 and out.draft_share == 0.0
    # Each round drafts 3 (fewer near the end: 3, 3, 3, 3, 2, 1) and settles only the large model's token.
    assert out.speedup == pytest.approx(6 / (6 + 0.1 * 15))
    assert out.speedup < 1.0
