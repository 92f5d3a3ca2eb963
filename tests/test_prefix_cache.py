"""Prefix caching: a prompt starts from the longest prefix a slot's caches hold, and the output is
the one a full prefill gives, token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from scheduler.prefix_cache import Held, PrefixCache, common_prefix
from scheduler.request import Mode, Request
from tests import tiny
from tests.engine_util import make_scheduler, params, run

EOS = tiny.SPECIALS.index(tiny.EOS)
MAX_NEW = 24


# ---- the cache's own decisions, on plain data ------------------------------------------------


def test_best_takes_the_longest_prefix_and_leaves_the_last_prompt_token_to_feed():
    cache = PrefixCache()
    cache.keep(3, Held([1, 2, 3, 4, 5], large=4, small=5))
    cache.keep(5, Held([1, 2, 9], large=3, small=3))
    running = {0: Held([1, 2, 3, 7], large=3, small=1)}
    reuse = cache.best([1, 2, 3, 4, 5, 6], running, small_only=False)
    assert (reuse.source, reuse.large, reuse.small) == (3, 4, 5)
    # The whole prompt held: its last token is fed again, for the first token's logits.
    reuse = cache.best([1, 2, 3, 4], running, small_only=False)
    assert (reuse.source, reuse.large) == (3, 3)
    assert cache.best([1, 2, 3, 7, 8], running, small_only=True).source == 3  # small caches: 3 vs 1
    assert cache.best([8, 1, 2], running, small_only=False) is None


def test_eviction_moves_an_entry_to_an_empty_slot_else_over_the_least_recently_used():
    cache = PrefixCache()
    for slot in (0, 1, 2):
        cache.keep(slot, Held([slot], large=1, small=1))
    assert cache.evict_for(0, keep_from=None, free_slots=[0, 1, 2, 3]) == 3  # slot 3 holds nothing
    assert cache.evict_for(1, keep_from=None, free_slots=[0, 1, 2]) == 0  # 0 is the oldest
    assert cache.evict_for(0, keep_from=None, free_slots=[0, 1, 2]) is None  # nothing older than 0's
    assert cache.evict_for(1, keep_from=1, free_slots=[0, 1, 2]) is None  # the new sequence reuses it
    assert cache.evict_for(1, keep_from=0, free_slots=[0, 1]) is None  # the only other is its source
    cache.moved(1, 0)
    assert cache.free[0].tokens == [1] and 1 not in cache.free


# ---- the scheduler on tiny random-weight models ------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {
        name: AutoModelForCausalLM.from_pretrained(tiny_dirs[name], dtype=torch.float32).eval()
        for name in ("large", "draft")
    }


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, tiny.VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _scheduler(models, slots: int = 4, **config):
    # Batch-invariant kernels: a token's keys and values are the same bit for bit whichever forward
    # computed them (a prefill chunk, a verification, a draft step), so cached prefixes change nothing.
    return make_scheduler(models["large"], models["draft"], {EOS}, slots=slots, invariant_kernels=True, **config)


def _conversation(scheduler, mode: Mode, turns: int = 4) -> tuple[list[list[int]], list[Request]]:
    """A chat: each turn's prompt is the previous prompt, its answer and a new user message."""
    prompt, outputs, requests = _prompt(0, 30), [], []
    for turn in range(turns):
        out, reqs = run(scheduler, [prompt], params(mode, MAX_NEW, ignore_eos=True))
        outputs.append(out[0])
        requests += reqs
        prompt = prompt + out[0] + _prompt(turn + 1, 12)
    return outputs, requests


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.LARGE, Mode.EXACT, Mode.BILD, Mode.SMALL])
def test_a_chat_reuses_its_earlier_turns_and_answers_as_a_full_prefill_does(models, mode):
    cached, requests = _conversation(_scheduler(models), mode)
    full, _ = _conversation(_scheduler(models, prefix_cache=False), mode)
    assert cached == full
    # Every later turn starts from the whole earlier conversation, but maybe its last answer token,
    # which the large model predicted and no forward fed.
    previous = 0
    for turn, request in enumerate(requests):
        stats = request.stats
        if turn == 0:
            assert stats.cached_prompt_tokens == 0
        else:
            assert previous - 1 <= stats.cached_prompt_tokens <= previous, turn
        previous = stats.prompt_tokens + stats.generated_tokens


@pytest.mark.slow
def test_requests_sharing_a_system_prompt_at_once_prefill_it_once(models):
    system = _prompt(7, 60)
    prompts = [system + _prompt(10 + i, 5 + i) for i in range(4)]
    # 16 prompt tokens per iteration: the first request's prefix takes 4 iterations, and the others wait for it.
    scheduler = _scheduler(models, max_prefill_tokens=16)
    outputs, requests = run(scheduler, prompts, params(Mode.EXACT, MAX_NEW))
    uncached = _scheduler(models, prefix_cache=False, max_prefill_tokens=16)
    reference, _ = run(uncached, prompts, params(Mode.EXACT, MAX_NEW))
    assert outputs == reference
    assert [r.stats.cached_prompt_tokens for r in requests] == [0, 60, 60, 60]


@pytest.mark.slow
def test_least_recently_used_entries_are_evicted_and_slots_stay_the_budget(models):
    scheduler = _scheduler(models, slots=3)
    a, b, c, d = (_prompt(20 + i, 40) for i in range(4))
    for prompt in (a, b, c, d):  # one at a time: each runs in slot 0, its predecessor moves aside
        run(scheduler, [prompt], params(Mode.LARGE, 4))
    assert len(scheduler.prefix.free) == 3  # no more entries than slots: a's was evicted
    _, (again_b,) = run(scheduler, [[*b, 5]], params(Mode.LARGE, 4))
    _, (again_a,) = run(scheduler, [[*a, 5]], params(Mode.LARGE, 4))
    assert again_b.stats.cached_prompt_tokens == 40
    assert again_a.stats.cached_prompt_tokens == 0


@pytest.mark.slow
def test_a_cancel_in_mid_prefill_leaves_only_what_was_computed(models):
    scheduler = _scheduler(models, max_prefill_tokens=8)
    prompt = _prompt(30, 50)
    request = Request("cancelled", prompt, params(Mode.EXACT, MAX_NEW))
    scheduler.add(request)
    scheduler.step()
    scheduler.step()
    scheduler.cancel("cancelled")
    scheduler.step()
    assert not scheduler.running
    outputs, (again,) = run(scheduler, [prompt], params(Mode.EXACT, MAX_NEW))
    reference, _ = run(_scheduler(models, prefix_cache=False), [prompt], params(Mode.EXACT, MAX_NEW))
    assert again.stats.cached_prompt_tokens == 16  # two chunks of 8 were fed
    assert outputs == reference


@pytest.mark.slow
def test_without_the_prefix_cache_every_prompt_is_prefilled(models):
    scheduler = _scheduler(models, prefix_cache=False)
    _, requests = _conversation(scheduler, Mode.LARGE, turns=2)
    assert scheduler.prefix is None
    assert [r.stats.cached_prompt_tokens for r in requests] == [0, 0]


def test_common_prefix_at_every_length():
    base = list(range(300))
    for n in (0, 1, 63, 64, 65, 128, 200, 299):
        other = [*base[:n], -1, *base[n + 1 :]]
        assert common_prefix(base, other) == n
    assert common_prefix(base, base[:130]) == 130 and common_prefix([], base) == 0
