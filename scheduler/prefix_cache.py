"""Prefix caching over the slot cache: a new prompt starts from the longest prefix some slot holds.

Chat front-ends send the whole conversation on every turn, and many requests share one system
prompt. A slot's keys and values stay valid after its sequence ends, so instead of prefilling a
prompt from its first token, a new sequence takes the longest common prefix with what any slot
holds (a free slot's last sequence, or a running sequence's settled part) and prefills only the
rest, as llama.cpp's `cache_prompt` reuses a slot's prefix and vLLM its hashed blocks.

Sequences still run in the lowest free slot, so that a full batch's slots stay contiguous and
attention reads the cache without a gather (kv_cache.py); a prefix held elsewhere is copied into
that slot (a copy of 46 kB per token for SmolLM2's large model, against a forward per chunk). The
entries free slots hold are evicted least recently used first: a new sequence's slot passes its
entry on to the free slot holding the oldest one (or none). So the cache never takes memory
beyond the slots that exist, and a running sequence's reservation is never touched.

Each model has its own valid length: the large model's cache holds `large_cached` tokens of the
context, the small model's `small_cached` (see Scheduler). Positions below those lengths were
written by forwards that returned, so a cancel or a failed forward leaves no half-written entry.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass
class Held:
    """What one slot's caches hold: the keys and values of tokens[:large] and tokens[:small]."""

    tokens: list[int]
    large: int
    small: int
    used: int = 0  # when it was last written or reused (a counter): the least recent is evicted first

    def reusable(self, prompt: list[int]) -> tuple[int, int]:
        """(large, small) tokens of `prompt` this slot's caches hold."""
        n = common_prefix(self.tokens, prompt)
        return min(n, self.large), min(n, self.small)


def _rank(reuse: Reuse, small_only: bool) -> tuple[int, int]:
    return (reuse.small, reuse.large) if small_only else (reuse.large, reuse.small)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix; compared 64 tokens at a time as list slices, in C:
    every new prompt is matched against every slot (a pure Python loop took ~5 ms for 32 slots of
    2,000 tokens sharing a chat template)."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class Reuse:
    """A prefix to start from: `source` slot's first `large` and `small` tokens."""

    source: int
    large: int
    small: int


class PrefixCache:
    """The entries that free slots hold, kept least recently used first (running slots are the
    scheduler's: it passes them in as sources)."""

    def __init__(self) -> None:
        self.free: dict[int, Held] = {}
        self._clock = itertools.count(1)

    def keep(self, slot: int, held: Held) -> None:
        """A sequence left `slot`: its caches stay for whoever shares its prefix."""
        held.used = next(self._clock)
        self.free[slot] = held

    def forget(self, slot: int) -> None:
        self.free.pop(slot, None)

    def best(self, prompt: list[int], running: dict[int, Held], small_only: bool) -> Reuse | None:
        """The slot whose caches hold the longest prefix of `prompt` (the large model's, or the small
        model's for a sequence only the small model runs), leaving its last token to be fed: the
        last prompt position's logits give the first token."""
        limit = len(prompt) - 1
        best: Reuse | None = None
        for slot, held in itertools.chain(self.free.items(), running.items()):
            large, small = (min(n, limit) for n in held.reusable(prompt))
            reuse = Reuse(slot, large, small)
            rank = _rank(reuse, small_only)
            if rank[0] > 0 and (best is None or rank > _rank(best, small_only)):
                best = reuse
        return best

    def evict_for(self, slot: int, keep_from: int | None, free_slots: list[int]) -> int | None:
        """`slot` is about to run a new sequence. Return the free slot its entry should move to (one
        holding nothing, else the one holding the least recently used entry), or None where the
        entry goes: `slot` holds nothing, `keep_from` (the new sequence's source) is `slot`, or
        every other entry is more recent. The caller copies the caches, then calls `moved`."""
        held = self.free.get(slot)
        if held is None or keep_from == slot:
            return None
        others = [s for s in free_slots if s not in (slot, keep_from)]
        empty = [s for s in others if s not in self.free]
        if empty:
            return empty[0]
        if not others:
            return None
        oldest = min(others, key=lambda s: self.free[s].used)
        return oldest if self.free[oldest].used < held.used else None

    def moved(self, source: int, target: int) -> None:
        self.free[target] = self.free.pop(source)
