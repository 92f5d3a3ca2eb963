"""Every decision BiLD makes, on plain data: the fallback and rollback rules, and each iteration's plan.

No model runs here. The scheduler describes its sequences (`RowState`), asks `plan()` which of them
the small model steps and which the large model checks, runs that, and hands the logits back to
the rules (`drafts`, `verify`, `verify_processed`).

The rules are BiLD's (Kim et al. 2023):
  fallback   the small model's draft is discarded, and the large model must run for its sequence,
             when its top probability is below the request's fallback threshold, or when the
             sequence holds max_small_tokens unchecked drafts;
  rollback   the large model checks every unchecked draft in one forward; the first one it finds
             too unlikely (bild: -log p_large > rollback threshold; exact: not its argmax, or for
             sampling speculative sampling's test) is replaced by the large model's token, and the
             drafts after it are discarded.

The plan is what makes those rules pay at every load. Verifying more tokens costs the large model
little in a forward over one sequence, and ever more as the batch fills (on a 2-core CPU, a forward
over 8 tokens cost 1.2x of one over a single token, over 64 tokens 3x; the forward's cost is
measured at start-up, `CostModel`). So the plan maximises expected settled tokens per second: each
iteration it compares checking every pending draft now, in one large forward that all waiting
sequences share, with letting the most promising sequences draft one more token first (Goodput,
SmartSpec/TurboSpec, arXiv 2406.14066). A draft's promise is the chance that it and every draft
before it stand, estimated from its confidence by acceptance statistics gathered online
(`AcceptanceStats`). Where no draft pays, sequences decode with the large model alone. Sequences
that must not depend on their batch (`RowState.independent`) keep BiLD's per-sequence rules only.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from enum import Enum

import torch

from scheduler.request import Mode, SamplingParams
from scheduler.sampling import TARGET, accept_or_resample, pick, process

# ---- the fallback rule -----------------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    token: int
    confidence: float  # the small model's top probability
    q: torch.Tensor | None = None  # the distribution it was drawn from, kept for speculative sampling


def drafts(last_logits: torch.Tensor) -> list[Draft]:
    """The small model's greedy token and its probability, per row of [B, V] logits (one host sync)."""
    p_max, tokens = torch.softmax(last_logits.float(), dim=-1).max(dim=-1)
    return [Draft(t, p) for t, p in zip(tokens.tolist(), p_max.tolist())]


def falls_back(confidence: float, threshold: float) -> bool:
    """BiLD's fallback test: the small model is not sure enough of its draft to keep it."""
    return confidence < threshold


# ---- the rollback rule -----------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    accepted: int  # how many drafted tokens stand
    next_token: int  # the large model's token at position `accepted`: a replacement, or the next one
    rolled_back: bool


@dataclass(frozen=True)
class VerifyRow:
    inputs: list[int]  # tokens fed to the large model: the last settled token, then the drafts
    mode: Mode
    rollback_threshold: float


def verify(logits: torch.Tensor, rows: list[VerifyRow]) -> list[Verdict]:
    """Rollback policy for greedy rows, from [N, V] logits of all rows' inputs, row after row.

    Input j of a row predicts its input j+1, so each draft is checked against the logits of the
    input before it. In bild mode a draft is discarded when -log p_large(draft) exceeds the
    threshold, unless it is the large model's own argmax (possible when its distribution is flat);
    in exact mode any draft other than the argmax is. The first discarded draft and all after it
    are replaced by the large model's argmax at that position.
    """
    targets = torch.zeros(logits.shape[0], dtype=torch.long)
    offsets, offset = [], 0
    for row in rows:
        offsets.append(offset)
        if len(row.inputs) > 1:
            targets[offset : offset + len(row.inputs) - 1] = torch.tensor(row.inputs[1:])
        offset += len(row.inputs)
    argmax = logits.argmax(dim=-1).tolist()
    nll = None
    if any(row.mode is Mode.BILD and len(row.inputs) > 1 for row in rows):
        logits = logits.float()
        targets = targets.to(logits.device)
        nll = (torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None])[:, 0]).tolist()
    verdicts = []
    for row, start in zip(rows, offsets):
        verdict = Verdict(len(row.inputs) - 1, argmax[start + len(row.inputs) - 1], False)
        for i, token in enumerate(row.inputs[1:]):
            at = start + i
            if argmax[at] != token and (row.mode is not Mode.BILD or nll[at] > row.rollback_threshold):
                verdict = Verdict(i, argmax[at], True)
                break
        verdicts.append(verdict)
    return verdicts


def verify_processed(
    logits: torch.Tensor,
    drafts: list[int],
    contexts: list[list[int]],
    params: SamplingParams,
    seed: int,
    first_position: int,
    draft_q: list[torch.Tensor],
) -> Verdict:
    """The rollback policy for one sequence whose rule is not a plain argmax (sampling, penalties).

    `logits` [k+1, V]: row i predicts drafts[i] (the last row the token after them), with contexts[i]
    the tokens before that position. `draft_q` holds q for each draft (exact mode with sampling).
    """
    p = process(logits, params, contexts)
    for i, token in enumerate(drafts):
        position = first_position + i
        if params.mode is Mode.EXACT and params.sampling:
            replacement = accept_or_resample(p[i], draft_q[i], token, seed, position)
        else:
            best = int(p[i].argmax())
            if params.mode is Mode.EXACT:
                bad = token != best
            else:  # bild: too unlikely under the large model's (processed) distribution
                bad = float(p[i, token]) < math.exp(-params.rollback_threshold) and (params.sampling or token != best)
            replacement = pick(p[i], params, seed, position, TARGET) if bad else None
        if replacement is not None:
            return Verdict(i, replacement, True)
    k = len(drafts)
    return Verdict(k, pick(p[k], params, seed, first_position + k, TARGET), False)


# ---- what drafts are worth: acceptance statistics --------------------------------------------

BINS = 20  # confidence bins of width 0.05
# Confident drafts come in runs: the next draft's confidence depends on the last one's. Proposals
# are counted per bin of the previous proposal's confidence (the last bin: no previous one).
PREVIOUS = (0.2, 0.4, 0.6, 0.8, 0.9)


def _bin(confidence: float) -> int:
    return min(BINS - 1, max(0, int(confidence * BINS)))


def _previous(confidence: float | None) -> int:
    return len(PREVIOUS) + 1 if confidence is None else bisect.bisect_right(PREVIOUS, confidence)


@dataclass
class _Counts:
    proposed: list[list[float]] = field(default_factory=lambda: [[0.0] * BINS for _ in range(len(PREVIOUS) + 2)])
    checked: list[float] = field(default_factory=lambda: [0.0] * BINS)  # drafts the large model ruled on
    accepted: list[float] = field(default_factory=lambda: [0.0] * BINS)


class AcceptanceStats:
    """How often a draft of a given confidence stands, per kind of rule, forgetting slowly.

    Keys separate rules that accept differently (exact: the large model's argmax; bild: within the
    rollback threshold; sampled: speculative sampling's test). The prior is optimistic on purpose,
    worth a few observations: a new server drafts, and so learns what drafts are worth, before the
    evidence tells it where they do not pay. A draft of confidence c is first taken to stand with
    probability (1 + c) / 2, and the small model's drafts to be confident.
    """

    PRIOR = 2.0  # observations per bin
    PRIOR_PROPOSED = (0.9, 1.0)  # (confidence, observations) per previous-confidence bin

    def __init__(self, half_life: float = 2000.0) -> None:
        self._decay = 0.5 ** (1.0 / half_life)  # per observation
        self._kinds: dict[str, _Counts] = {}
        self._next: dict[tuple[str, int], float] = {}  # next_stands, until new evidence comes in

    def _get(self, kind: str) -> _Counts:
        return self._kinds.setdefault(kind, _Counts())

    def proposed(self, kind: str, confidence: float, previous: float | None) -> None:
        """The small model proposed a draft of this confidence after one of confidence `previous`."""
        self._next.clear()
        row = self._get(kind).proposed[_previous(previous)]
        for b in range(BINS):
            row[b] *= self._decay
        row[_bin(confidence)] += 1.0

    def ruled(self, kind: str, confidence: float, stood: bool) -> None:
        self._next.clear()
        c = self._get(kind)
        for b in range(BINS):
            c.checked[b] *= self._decay
            c.accepted[b] *= self._decay
        b = _bin(confidence)
        c.checked[b] += 1.0
        c.accepted[b] += float(stood)

    def stands(self, kind: str, confidence: float) -> float:
        """The chance that a draft of this confidence stands."""
        c = self._get(kind)
        b = _bin(confidence)
        prior = (1.0 + (b + 0.5) / BINS) / 2
        return (c.accepted[b] + self.PRIOR * prior) / (c.checked[b] + self.PRIOR)

    def next_stands(self, kind: str, previous: float | None) -> float:
        """The chance that a draft not made yet stands, after a proposal of confidence `previous`."""
        key = (kind, _previous(previous))
        if key not in self._next:
            weights = list(self._get(kind).proposed[key[1]])
            weights[_bin(self.PRIOR_PROPOSED[0])] += self.PRIOR_PROPOSED[1]
            self._next[key] = sum(w * self.stands(kind, (b + 0.5) / BINS) for b, w in enumerate(weights)) / sum(weights)
        return self._next[key]


# ---- what forwards cost: the cost model ------------------------------------------------------


@dataclass
class CostTable:
    """Measured seconds of one model's forward over `tokens[i]` new tokens in all (spread over up to
    as many sequences as the batch holds).

    A forward's cost follows its token count in steps, not smoothly: CPU kernels are fast at some
    row counts and slow in between (see cpu_linear), so a count costs what the next measured one
    does. Beyond the last, the cost grows along the last two points (it never shrinks).
    """

    tokens: list[int]  # ascending
    seconds: list[float]

    def __post_init__(self) -> None:
        # A forward over n tokens can run as any measured count m >= n (the runner adds padding
        # rows), so it costs the cheapest of those.
        self._best = list(range(len(self.tokens)))
        for i in range(len(self.tokens) - 2, -1, -1):
            later = self._best[i + 1]
            if self.seconds[later] < self.seconds[i]:
                self._best[i] = later

    def __call__(self, rows: int, tokens: float) -> float:
        """Seconds for a forward over `rows` sequences feeding `tokens` tokens in all."""
        if rows <= 0 or tokens <= 0:
            return 0.0
        i = bisect.bisect_left(self.tokens, tokens)
        if i < len(self.tokens):
            return self.seconds[self._best[i]]
        if len(self.tokens) == 1:
            return self.seconds[0]
        (x0, x1), (y0, y1) = self.tokens[-2:], self.seconds[-2:]
        return y1 + max(0.0, y1 - y0) * (tokens - x1) / (x1 - x0)

    def run_as(self) -> list[int]:
        """For each token count n up to the last measured one, the count its forward should run as."""
        return [0] + [
            self.tokens[self._best[bisect.bisect_left(self.tokens, n)]] for n in range(1, self.tokens[-1] + 1)
        ]


@dataclass
class CostModel:
    """Both models' forward costs, each scaled by how the latest forwards compared with the table."""

    large_table: CostTable
    small_table: CostTable
    large_scale: float = 1.0
    small_scale: float = 1.0
    step: float = 0.0  # seconds of an iteration besides its forwards (bookkeeping), a moving average
    adapt: bool = True  # follow measured forwards (off: the tables are taken as they are)

    def large(self, rows: int, tokens: int) -> float:
        return self.large_scale * self.large_table(rows, tokens)

    def small(self, rows: int, tokens: int) -> float:
        return self.small_scale * self.small_table(rows, tokens)

    def observed(self, model: str, rows: int, tokens: int, seconds: float) -> None:
        """Track drift (a busy machine, a long cache) with a moving ratio of measured to predicted."""
        table = self.large_table if model == "large" else self.small_table
        predicted = table(rows, tokens)
        if predicted <= 0 or not self.adapt:
            return
        name = f"{model}_scale"
        ratio = min(3.0, max(0.33, seconds / predicted))
        setattr(self, name, 0.9 * getattr(self, name) + 0.1 * ratio)

    def observed_step(self, seconds: float) -> None:
        """An iteration's time outside model forwards: a round that drafts once more pays it once more."""
        if self.adapt:
            self.step = 0.9 * self.step + 0.1 * min(seconds, 0.1)


# ---- the plan --------------------------------------------------------------------------------


MARGIN = 0.02


class Kind(Enum):
    LARGE = "large"  # decodes with the large model only: one token per large forward
    SMALL = "small"  # decodes with the small model only: one token per small step
    DRAFTS = "drafts"  # bild or exact: drafts, and the large model checks them


@dataclass(frozen=True)
class RowState:
    """One decoding sequence, as the plan sees it."""

    kind: Kind
    pending: tuple[float, ...] = ()  # chance that each unchecked draft stands, in order
    can_draft: bool = False  # not fallen back, below max_small_tokens, no end token drafted
    next_stands: float = 0.0  # chance that its next draft stands (one that fails the fallback test is checked too)
    catch_up: int = 0  # tokens the small model has not read yet besides the newest (it was not drafting)
    independent: bool = False  # its output must not depend on the batch: BiLD's own rules only

    @property
    def expected_tokens(self) -> float:
        """Tokens that checking it now settles, on average: the drafts that stand, then one of the large model's."""
        total, chance = 1.0, 1.0
        for p in self.pending:
            chance *= p
            total += chance
        return total

    @property
    def all_stand(self) -> float:
        return math.prod(self.pending)


@dataclass(frozen=True)
class Plan:
    draft: list[int]  # indices of the rows the small model steps now
    verify: list[int]  # indices of the rows the large model checks (or decodes, kind LARGE) next


def plan(rows: list[RowState], costs: CostModel, round_seconds: float) -> Plan:
    """This iteration's plan: the most expected settled tokens per second over the current round.

    A round runs from one large forward to the next; `round_seconds` is what its small steps have
    cost so far. Continuing it lets the chosen rows draft one more token; ending it checks every row
    that waits for the large model in one forward.
    """
    always = [
        i
        for i, r in enumerate(rows)
        if r.kind is Kind.SMALL or (r.kind is Kind.DRAFTS and r.independent and r.can_draft)
    ]
    waiting = [
        i
        for i, r in enumerate(rows)
        if r.kind is Kind.LARGE or (r.kind is Kind.DRAFTS and not (r.independent and r.can_draft))
    ]
    optional = [i for i in waiting if rows[i].kind is Kind.DRAFTS and rows[i].can_draft]
    if not optional:  # nobody may draft: check whoever waits
        return Plan(always, waiting)

    def small_cost(chosen: list[int]) -> float:
        return costs.small(len(chosen), sum(1 + rows[i].catch_up for i in chosen))

    base_small = small_cost(always)
    width = sum(1 + len(rows[i].pending) for i in waiting)
    tokens_now = sum(rows[i].expected_tokens for i in waiting)
    seconds_now = round_seconds + costs.step + costs.large(len(waiting), width)
    # Another draft step must beat checking now by a margin: the costs and chances it relies on are
    # estimates, and at the break-even point a wrong guess only loses.
    best_rate, best = tokens_now / seconds_now * (1 + MARGIN), []
    # One more draft from the most promising rows first; each prefix of that order is a candidate.
    gain = {i: rows[i].all_stand * rows[i].next_stands for i in optional}
    order = sorted((i for i in optional if gain[i] > 0), key=lambda i: -gain[i])
    tokens, chosen = tokens_now, []
    for i in order:
        chosen.append(i)
        tokens += gain[i]
        seconds = (
            seconds_now
            + costs.step
            + small_cost(always + chosen)
            - base_small
            + costs.large(len(waiting), width + len(chosen))
            - costs.large(len(waiting), width)
        )
        if tokens / seconds > best_rate:
            best_rate, best = tokens / seconds, list(chosen)
    if best:
        return Plan(sorted(always + best), [])
    return Plan(always, waiting)


def drafting_pays(rows: int, costs: CostModel, stands: float) -> bool:
    """Whether, at this many decoding sequences, one draft each would beat the large model alone.

    A sequence joining such a batch has the small model read its prompt at once, so that it can
    draft from its first round; in a batch where drafts do not pay it waits until they do.
    """
    alone = rows / (costs.large(rows, rows) + costs.step)
    drafted = rows * (1 + stands) / (costs.small(rows, rows) + costs.large(rows, 2 * rows) + 2 * costs.step)
    return drafted > alone * (1 + MARGIN)
