"""Iteration-level continuous batching for Big Little Decoder.

Each call to `step()` is one iteration:
  1. admit waiting requests in arrival order while slots and the token budget allow, and prefill
     up to `max_prefill_tokens` prompt tokens (chunks of long prompts wait for later iterations);
     the large model's prefill already predicts the first token, so it is settled at once;
  2. the policy plans the iteration (`policy.plan`): which sequences draft one more token, and
     whether the large model now checks every sequence that waits for it;
  3. draft: one batched small-model forward; the fallback rule discards unconfident drafts, and
     those sequences, like sequences at `max_small_tokens` drafts, EOS or their length limit, wait
     for the large model;
  4. verify: one batched large-model forward over the waiting sequences (each with its own number
     of unchecked tokens) and every `large`-mode sequence; the rollback rule cuts each draft at
     its first bad token and the large model's token goes there, or after the drafts if all stand;
  5. settled tokens are handed out; finished sequences free their slot.
An encoder-decoder pair (T5, Marian) runs a request's encoders once, when its prompt (the source)
is first fed; its decoder context starts with the start token, and everything above applies to
the decoders.
An iteration that raises is retried one sequence at a time, so a fault ends only the requests it
follows (`_isolate`).

Bookkeeping per sequence, with `context` = prompt + generated tokens (drafts included):
  settled        context[:settled] passed the large model (or needs no check: `small` mode);
  large_cached   the large model's cache holds context[:large_cached]; always settled - 1 after a
                 large forward, since its newest token is predicted but not yet fed;
  small_cached   the same for the small model; a rollback lowers it, nothing is recomputed. In a
                 batch where drafts do not pay the small model skips the prompt; if the sequence
                 drafts later, it first catches up on what it has not read.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from scheduler import policy
from scheduler.logprobs import TokenLogprob, token_logprobs
from scheduler.model_runner import CausalLMRunner, ForwardItem
from scheduler.policy import AcceptanceStats, CostModel, Draft, Kind, RowState, Verdict, VerifyRow
from scheduler.prefix_cache import Held, PrefixCache, common_prefix
from scheduler.request import FinishReason, Limits, Mode, Request, SamplingParams, check
from scheduler.sampling import DRAFT, TARGET, pick, process

log = logging.getLogger(__name__)

# A draft step feeds the small model up to this many tokens it has not read besides the newest;
# a sequence further behind catches up in a forward of its own first.
CATCH_UP_IN_STEP = 8


@dataclass(frozen=True)
class SchedulerConfig:
    # These defaults are bild-server's (its flags read them).
    max_num_seqs: int = 32  # slots: sequences in the batch at once
    max_num_tokens: int = 32768  # tokens reserved (prompt + max_new_tokens) by running sequences
    max_seq_len: int = 2048  # context length of one sequence
    # Prompt tokens prefilled per iteration: a long prompt is fed in chunks across iterations, so it
    # delays the other streams by one chunk's forward at a time rather than by its whole prefill.
    max_prefill_tokens: int = 512
    # Kernels whose rounding of a token does not depend on the batch around it (llama_forward.py):
    # greedy output is then the same at any load, and exact equals large bit for bit.
    invariant_kernels: bool = False
    # A new prompt starts from the longest prefix a slot's caches hold (prefix_cache.py).
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_tokens", "max_seq_len", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def reservation(request: Request) -> int:
    """Tokens a request holds of the budget while it runs: its prompt (an encoder-decoder's source)
    and all it may generate."""
    return len(request.prompt) + request.params.max_new_tokens


@dataclass(eq=False)  # compared by identity
class Sequence:
    request: Request
    slot: int
    context: list[int]
    prompt_len: int
    settled: int = 0
    emitted: int = 0
    small_cached: int = 0
    large_cached: int = 0
    prefilled: int = 0  # prompt tokens both models have read
    looked_up: bool = False  # its prompt was matched against the prefix cache (its slot is its own since)
    source: list[int] | None = None  # an encoder-decoder pair's encoder input, until it is encoded
    finish: FinishReason | None = None
    stop_reason: str | None = None
    seed: int = 0
    end_tokens: frozenset[int] = frozenset()  # EOS (unless ignored) and the request's stop tokens
    draft_q: list[torch.Tensor] = field(default_factory=list)  # q of each draft, for speculative sampling
    draft_confidence: list[float] = field(default_factory=list)  # the small model's top probability at each draft
    blocked: bool = False  # it fell back (or reached a cap): no more drafts until the large model checks them
    last_confidence: float | None = None  # of the small model's latest proposal
    large_chosen: set[int] = field(default_factory=set)  # context positions whose token the large model chose
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # by context position

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def mode(self) -> Mode:
        return self.request.params.mode

    @property
    def reserved(self) -> int:
        return reservation(self.request)

    @property
    def drafted(self) -> int:
        return len(self.context) - self.settled

    @property
    def rule(self) -> str:
        """Which acceptance statistics its drafts feed. Bild's rule keeps a few drafts that exact's
        rejects; they share statistics all the same, so that both learn from every draft checked."""
        return "sampled" if self.params.sampling else "greedy"

    @property
    def independent(self) -> bool:
        """Its output must not depend on the batch: it drafts and is checked by BiLD's own rules only.

        Greedy exact output is the large model's however drafts are checked, so it never needs this.
        """
        return self.params.batch_independent and not (self.mode is Mode.EXACT and not self.params.sampling)


@dataclass
class StepOutput:
    """What one iteration produced for one request."""

    request: Request
    tokens: list[int] = field(default_factory=list)  # newly settled tokens, in order
    finish: FinishReason | None = None
    stop_reason: str | None = None  # the stop token id that ended it, when finish is STOP
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them


class Scheduler:
    def __init__(
        self,
        small: CausalLMRunner | None,
        large: CausalLMRunner,
        config: SchedulerConfig,
        eos_token_ids: set[int],
        costs: CostModel | None = None,
    ) -> None:
        """`costs` defaults to the pair's measured cost model (see `profile`)."""
        self.small = small
        self.large = large
        self.encoder_decoder = large.encoder_decoder
        if small is not None and small.encoder_decoder != self.encoder_decoder:
            raise ValueError("one model of the pair is an encoder-decoder and the other is not")
        if self.encoder_decoder and small is not None and small.decoder_prompt != large.decoder_prompt:
            raise ValueError(
                f"the small decoder starts from {small.decoder_prompt} but the large one from {large.decoder_prompt} "
                "(decoder_start_token_id, forced_bos_token_id): a draft must start where the large model does"
            )
        if small is not None and costs is None:
            from scheduler.profile import cost_model  # it measures with runners: not needed without a draft

            costs = cost_model(small, large, config.max_num_seqs)
        self.costs = costs
        if costs is not None:
            large.run_as, small.run_as = costs.large_table.run_as(), costs.small_table.run_as()
        self.acceptance = AcceptanceStats()
        self._round_seconds = 0.0  # small steps since the last large forward
        if small is not None:
            # Pairs such as Qwen2.5 0.5B/7B pad their output layers differently; both models score
            # the tokens they share, and the padding ids (no tokenizer entry) are never produced.
            small.vocab_limit = large.vocab_limit = min(small.vocab_size, large.vocab_size)
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Sequence] = {}
        # Lowest slot first keeps a full batch's slots contiguous, so the cache needs no gather.
        self._free_slots = list(range(config.max_num_seqs))
        self._reserved_tokens = 0
        self._cancelled: set[str] = set()
        # An encoder-decoder's prompt is its source: its runners keep the encoders' output by source
        # instead (seq2seq_runner.py), and a decoder's prefix is only its start token.
        self.prefix = PrefixCache() if config.prefix_cache and not self.encoder_decoder else None
        if self.encoder_decoder:
            for runner in (large, small):
                if runner is not None:
                    runner.reuse_encodings = config.prefix_cache
        # Outputs of the iteration under way; kept here so a failing forward cannot lose them.
        self._outputs: list[StepOutput] = []

    # ---- requests in and out -------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return Limits(
            self.config.max_seq_len,
            self.config.max_num_tokens,
            self.large.vocab_limit,
            self.small is not None,
            self.encoder_decoder,
        )

    def add(self, request: Request) -> None:
        check(request, self.limits)
        self.waiting.append(request)

    def cancel(self, request_id: str) -> None:
        """Takes effect at the start of the next iteration."""
        self._cancelled.add(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._cancelled)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def reserved_tokens(self) -> int:
        return self._reserved_tokens

    # ---- one iteration -------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One iteration. If it raises, each sequence of the batch is stepped alone once, so that only
        the requests that fail on their own end (with ERROR) and the others go on."""
        started = time.perf_counter()
        forwards = self.large.forward_seconds + (self.small.forward_seconds if self.small is not None else 0.0)
        try:
            outputs = self._step()
        except Exception:
            log.exception("an iteration over %d sequences failed; stepping each alone", len(self.running))
            return self._isolate()
        if self.costs is not None:
            forwards = self.large.forward_seconds + self.small.forward_seconds - forwards
            self.costs.observed_step(time.perf_counter() - started - forwards)
        return outputs

    def _isolate(self) -> list[StepOutput]:
        # A sequence's state changes only after a forward it took part in returned (drafts wait for
        # their check, caches past *_cached are rewritten), so a failed iteration leaves every
        # sequence able to go on; what it did settle is kept in self._outputs.
        outputs = self._take_outputs()
        survivors = dict(self.running)  # in order: the oldest prompt is fed first
        for request_id, seq in list(survivors.items()):
            self.running = {request_id: seq}
            try:
                outputs += self._step(admit=False)
            except Exception:
                log.exception("request %s fails on its own: ending it", request_id)
                seq.finish = FinishReason.ERROR
                self._outputs.append(StepOutput(seq.request, finish=FinishReason.ERROR))
                self._release(seq)
            if request_id not in self.running:  # ended (by its step, or here)
                del survivors[request_id]
        self.running = survivors
        return outputs + self._take_outputs()

    def _step(self, admit: bool = True) -> list[StepOutput]:
        if admit:
            self._drop_cancelled()
            self._admit()
        decoding = [s for s in self.running.values() if s.prefilled == s.prompt_len]
        self._prefill([s for s in self.running.values() if s.prefilled < s.prompt_len])
        if decoding:
            plan = policy.plan([self._row_state(s) for s in decoding], self.costs, self._round_seconds)
            self._draft([decoding[i] for i in plan.draft])
            self._verify([decoding[i] for i in plan.verify])
        now = time.monotonic()
        for seq in list(self.running.values()):
            out = self._settle(seq, now)
            if out is not None:
                self._outputs.append(out)
        return self._take_outputs()

    def _take_outputs(self) -> list[StepOutput]:
        outputs, self._outputs = self._outputs, []
        return outputs

    def abort_running(self, reason: FinishReason) -> list[StepOutput]:
        """End the requests in the batch, e.g. after a failed forward; waiting ones stay queued."""
        for seq in list(self.running.values()):
            seq.finish = reason
            self._outputs.append(StepOutput(seq.request, finish=reason))
            self._release(seq)
        return self._take_outputs()

    def abort_all(self, reason: FinishReason) -> list[StepOutput]:
        """End every request, running and waiting (the engine is stopping)."""
        self._outputs.extend(StepOutput(request, finish=reason) for request in self.waiting)
        self.waiting.clear()
        return self.abort_running(reason)

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        for request in [r for r in self.waiting if r.request_id in self._cancelled]:
            self.waiting.remove(request)
            self._outputs.append(StepOutput(request, finish=FinishReason.CANCELLED))
        for seq in [s for s in self.running.values() if s.request.request_id in self._cancelled]:
            seq.finish = FinishReason.CANCELLED
            self._outputs.append(StepOutput(seq.request, finish=FinishReason.CANCELLED))
            self._release(seq)
        self._cancelled.clear()

    def _admit(self) -> None:
        while self.waiting and self._free_slots:
            request = self.waiting[0]
            need = reservation(request)
            if self._reserved_tokens + need > self.config.max_num_tokens:
                break  # strictly in order: a big request is not overtaken by smaller ones
            self.waiting.popleft()
            self._free_slots.sort()
            # An encoder-decoder's decoder starts from its start token; the prompt is the source.
            context = list(self.large.decoder_prompt) if self.encoder_decoder else list(request.prompt)
            n = len(context)
            params = request.params
            seq = Sequence(
                request,
                self._free_slots.pop(0),
                context,
                prompt_len=n,
                settled=n,
                emitted=n,
                source=list(request.prompt) if self.encoder_decoder else None,
                seed=params.seed if params.seed is not None else random.getrandbits(64),
                end_tokens=frozenset(params.stop_token_ids)
                | (frozenset() if params.ignore_eos else self.eos_token_ids),
            )
            self._reserved_tokens += seq.reserved
            self.running[request.request_id] = seq
            request.stats.prompt_tokens = len(request.prompt)
            request.stats.queue_seconds = time.monotonic() - request.arrival

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Feed the next chunk of each admitted prompt, oldest first, within the per-iteration budget."""
        budget = self.config.max_prefill_tokens
        if self.encoder_decoder:
            seqs, budget = self._encode(seqs, budget)
        seqs = [s for s in seqs if s.looked_up or self._look_up(s)]
        chunks: list[tuple[Sequence, ForwardItem]] = []
        for seq in seqs:
            n = min(budget, seq.prompt_len - seq.prefilled)
            if n <= 0:
                break
            chunks.append((seq, ForwardItem(seq.slot, seq.prefilled, seq.context[seq.prefilled : seq.prefilled + n])))
            budget -= n
        # In a batch where drafts do not pay, the small model reads a bild or exact prompt only if
        # the plan later has the sequence draft (`_catch_up`), so that a busy server spends nothing on it.
        eager = self.costs is not None and policy.drafting_pays(
            len(self.running), self.costs, self.acceptance.next_stands("greedy", None)
        )
        small = [
            (s, item)
            for s, item in chunks
            if s.mode is Mode.SMALL or (eager and s.mode is not Mode.LARGE and s.small_cached == item.start)
        ]
        large = [(s, item) for s, item in chunks if s.mode is not Mode.SMALL]
        if small:
            logits = self.small.next_token_logits([item for _, item in small])
            for (seq, item), row in zip(small, logits):
                seq.small_cached = item.start + len(item.tokens)
                seq.request.stats.small_forward_steps += 1
                if seq.mode is Mode.SMALL and seq.small_cached == seq.prompt_len:
                    self._append_first(seq, row, DRAFT)
        if large:
            # The large model must read the prompt anyway; its prediction is the first token.
            logits = self.large.next_token_logits([item for _, item in large])
            for (seq, item), row in zip(large, logits):
                seq.large_cached = item.start + len(item.tokens)
                seq.request.stats.large_forward_calls += 1
                if seq.large_cached == seq.prompt_len:
                    self._append_first(seq, row, TARGET)
        for seq, item in chunks:
            seq.prefilled = item.start + len(item.tokens)
            seq.settled = len(seq.context)

    def _look_up(self, seq: Sequence) -> bool:
        """Start `seq` from the longest prefix of its prompt that a slot's caches hold (copied into its
        own slot); False where it should wait an iteration: an older sequence still prefilling
        shares more of the prompt than any cache holds yet, so the prefix is computed once."""
        uses_large, uses_small = seq.mode is not Mode.SMALL, self.small is not None and seq.mode is not Mode.LARGE
        if self.prefix is None:
            seq.looked_up = True
            return True
        prompt = seq.context[: seq.prompt_len]
        others = [s for s in self.running.values() if s.looked_up and s is not seq]
        running = {s.slot: Held(s.context, s.large_cached, s.small_cached) for s in others}
        reuse = self.prefix.best(prompt, running, small_only=not uses_large)
        have = 0 if reuse is None else (reuse.large if uses_large else reuse.small)
        for other in others:
            if uses_large and other.mode is not Mode.SMALL and other.prefilled < other.prompt_len:
                shared = min(common_prefix(other.context[: other.prompt_len], prompt), seq.prompt_len - 1)
                if shared > have:
                    return False
        seq.looked_up = True
        target = self.prefix.evict_for(seq.slot, reuse.source if reuse else None, self._free_slots)
        if target is not None:  # the slot's entry moves to the free slot of the oldest one
            held = self.prefix.free[seq.slot]
            self._copy(seq.slot, target, held.large, held.small)
            self.prefix.moved(seq.slot, target)
        self.prefix.forget(seq.slot)
        if reuse is None:
            return True
        large = reuse.large if uses_large else 0
        small = min(reuse.small, large) if uses_large and uses_small else reuse.small if uses_small else 0
        self._copy(reuse.source, seq.slot, large, small)
        seq.large_cached, seq.small_cached = large, small
        seq.prefilled = large if uses_large else small
        seq.request.stats.cached_prompt_tokens = seq.prefilled
        return True

    def _copy(self, source: int, target: int, large: int, small: int) -> None:
        self.large.copy_prefix(source, target, large)
        if self.small is not None:
            self.small.copy_prefix(source, target, small)

    def _encode(self, seqs: list[Sequence], budget: int) -> tuple[list[Sequence], int]:
        """Run the encoders of the sequences not yet encoded, oldest first, within the prefill budget
        (the first always, however long its source); return those ready to prefill and the budget left."""
        ready = []
        for seq in seqs:
            if seq.source is not None:
                n = len(seq.source)
                if n > budget and budget < self.config.max_prefill_tokens:
                    break
                # Each model encodes what it will decode: `small` mode never needs the large encoder.
                reused = []
                if seq.mode is not Mode.SMALL:
                    reused.append(self.large.encode(seq.slot, seq.source))
                if self.small is not None and seq.mode is not Mode.LARGE:
                    reused.append(self.small.encode(seq.slot, seq.source))
                if all(reused):
                    seq.request.stats.cached_prompt_tokens = n
                seq.source = None
                budget = max(budget - n, 0)
            ready.append(seq)
        return ready, budget

    def _append_first(self, seq: Sequence, logits: torch.Tensor, purpose: int) -> None:
        """The first generated token, from the last prompt position's [V] logits."""
        params = seq.params
        probs = process(logits[None], params, [seq.context])[0]
        token = pick(probs, params, seq.seed, len(seq.context), purpose)
        if params.logprobs:
            seq.logprobs[len(seq.context)] = token_logprobs(logits[None], [token], params.top_logprobs)[0]
        if purpose == TARGET:
            seq.large_chosen.add(len(seq.context))
        seq.context.append(token)

    def _row_state(self, seq: Sequence) -> RowState:
        if seq.mode is Mode.LARGE:
            return RowState(Kind.LARGE)
        if seq.mode is Mode.SMALL:
            return RowState(Kind.SMALL)
        stands = self.acceptance.stands
        stands_next = 0.0 if seq.blocked else self.acceptance.next_stands(seq.rule, seq.last_confidence)
        return RowState(
            Kind.DRAFTS,
            pending=tuple(stands(seq.rule, c) for c in seq.draft_confidence),
            can_draft=not seq.blocked,
            next_stands=stands_next,
            independent=seq.independent,
            catch_up=len(seq.context) - 1 - seq.small_cached,
        )

    def _catch_up(self, seqs: list[Sequence]) -> list[Sequence]:
        """Feed the small model what it has not read (a prompt, tokens settled while it did not draft)
        in chunks within the prefill budget; return the sequences ready for a draft step now.

        Apart from their draft step, so that one long catch-up does not pad every row of it.
        """
        lagging = [s for s in seqs if len(s.context) - 1 - s.small_cached > CATCH_UP_IN_STEP]
        if not lagging:
            return seqs
        budget = self.config.max_prefill_tokens
        items = []
        for seq in lagging:
            n = min(budget, len(seq.context) - 1 - seq.small_cached)
            if n <= 0:
                break
            items.append(ForwardItem(seq.slot, seq.small_cached, seq.context[seq.small_cached : seq.small_cached + n]))
            budget -= n
        before = self.small.forward_seconds
        self.small.next_token_logits(items)
        self._round_seconds += self.small.forward_seconds - before
        for seq, item in zip(lagging, items):
            seq.small_cached = item.start + len(item.tokens)
        return [s for s in seqs if len(s.context) - 1 - s.small_cached <= CATCH_UP_IN_STEP]

    def _draft(self, seqs: list[Sequence]) -> None:
        """One small-model step for each sequence; the fallback rule decides which drafts stay."""
        seqs = self._catch_up(seqs)
        if not seqs:
            return
        items = [ForwardItem(s.slot, s.small_cached, s.context[s.small_cached :]) for s in seqs]
        before = self.small.forward_seconds
        logits = self.small.next_token_logits(items)
        proposals = policy.drafts(logits)  # greedy drafts of the whole batch at once
        seconds = self.small.forward_seconds - before
        self._round_seconds += seconds
        self.costs.observed("small", len(items), sum(len(i.tokens) for i in items), seconds)
        for b, seq in enumerate(seqs):
            if seq.params.processes_logits or (seq.mode is Mode.SMALL and seq.params.logprobs):
                proposals[b] = self._processed_draft(seq, logits[b])
            self._take_draft(seq, proposals[b])

    def _verify(self, seqs: list[Sequence]) -> None:
        """One large-model forward over each sequence's newest settled token and its drafts; the rollback rule."""
        if not seqs:
            return
        # With large_cached = settled - 1, each sequence feeds its newest settled token and then its
        # drafts; large-mode sequences feed just their newest token.
        items = [ForwardItem(s.slot, s.large_cached, s.context[s.large_cached :]) for s in seqs]
        before = self.large.forward_seconds
        logits = self.large.token_logits(items)  # [tokens, V], item after item
        tokens = logits.shape[0]
        self._round_seconds = 0.0
        if self.costs is not None:
            self.costs.observed("large", len(items), tokens, self.large.forward_seconds - before)
        offsets = [0]
        for item in items[:-1]:
            offsets.append(offsets[-1] + len(item.tokens))
        # Plain-argmax rows share one batched rule call; the others get their own rule below.
        greedy = [b for b, s in enumerate(seqs) if not s.params.processes_logits]
        verdicts: list[Verdict | None] = [None] * len(seqs)
        if greedy:
            rows = [VerifyRow(items[b].tokens, seqs[b].mode, seqs[b].params.rollback_threshold) for b in greedy]
            own = logits
            if len(greedy) < len(seqs):
                own = logits[torch.cat([torch.arange(offsets[b], offsets[b] + len(items[b].tokens)) for b in greedy])]
            for b, verdict in zip(greedy, policy.verify(own, rows)):
                verdicts[b] = verdict
        for b, (seq, item) in enumerate(zip(seqs, items)):
            own = logits[offsets[b] : offsets[b] + len(item.tokens)]  # this row's logits
            if verdicts[b] is None:
                contexts = [seq.context[: seq.settled + i] for i in range(len(item.tokens))]
                verdicts[b] = policy.verify_processed(
                    own, item.tokens[1:], contexts, seq.params, seq.seed, seq.settled, seq.draft_q
                )
            if seq.params.logprobs:
                kept = [*item.tokens[1 : verdicts[b].accepted + 1], verdicts[b].next_token]
                for i, lp in enumerate(token_logprobs(own[: len(kept)], kept, seq.params.top_logprobs)):
                    seq.logprobs[seq.settled + i] = lp
            self._take_verdict(seq, verdicts[b])

    def _processed_draft(self, seq: Sequence, logits: torch.Tensor) -> Draft:
        """A draft under the request's rule (sampling, penalties), keeping q for speculative sampling."""
        params, position = seq.params, len(seq.context)
        q = process(logits[None], params, [seq.context])[0]
        token = pick(q, params, seq.seed, position, DRAFT)
        if seq.mode is Mode.SMALL and params.logprobs:
            seq.logprobs[position] = token_logprobs(logits[None], [token], params.top_logprobs)[0]
        return Draft(token, float(q.max()), q if params.sampling and seq.mode is Mode.EXACT else None)

    def _take_draft(self, seq: Sequence, proposal: Draft) -> None:
        """Apply the fallback rule to one small-model step: keep the draft, or wait for the large model."""
        params, stats = seq.request.params, seq.request.stats
        seq.small_cached = len(seq.context)
        stats.small_forward_steps += 1
        if seq.mode is Mode.SMALL:
            seq.context.append(proposal.token)
            seq.settled = len(seq.context)
            return
        self.acceptance.proposed(seq.rule, proposal.confidence, seq.last_confidence)
        seq.last_confidence = proposal.confidence
        if policy.falls_back(proposal.confidence, params.fallback_threshold):
            stats.fallbacks += 1
            seq.blocked = True
            if seq.independent:
                return  # BiLD's own rule: the unconfident draft is discarded
            # The large model checks this sequence next anyway: the guess rides along for one more
            # token in that forward, and the rollback rule judges it like any other draft.
        seq.context.append(proposal.token)
        seq.draft_confidence.append(proposal.confidence)
        if proposal.q is not None:
            seq.draft_q.append(proposal.q)
        at_limit = len(seq.context) - seq.prompt_len >= params.max_new_tokens
        if seq.drafted >= params.max_small_tokens or proposal.token in seq.end_tokens or at_limit:
            # Forced fallback: too many drafts in a row, or the draft would end the sequence,
            # and every emitted token must pass the rollback check first.
            stats.fallbacks += int(not seq.blocked)
            seq.blocked = True

    def _take_verdict(self, seq: Sequence, verdict: Verdict) -> None:
        """Keep the accepted drafts and append the large model's token after them."""
        stats = seq.request.stats
        stats.large_forward_calls += 1
        for i, confidence in enumerate(seq.draft_confidence[: verdict.accepted + 1]):
            self.acceptance.ruled(seq.rule, confidence, stood=i < verdict.accepted)
        keep = seq.settled + verdict.accepted
        del seq.context[keep:]
        seq.large_chosen.add(keep)
        seq.context.append(verdict.next_token)
        seq.large_cached = keep
        seq.small_cached = min(seq.small_cached, keep)
        seq.settled = len(seq.context)
        seq.draft_q.clear()
        seq.draft_confidence.clear()
        seq.blocked = False
        stats.rollbacks += int(verdict.rolled_back)

    def _settle(self, seq: Sequence, now: float) -> StepOutput | None:
        """Hand out newly settled tokens; end the sequence at EOS, a stop token or its length limit."""
        limit = seq.prompt_len + seq.params.max_new_tokens
        end = min(seq.settled, limit)
        new = seq.context[seq.emitted : end]
        for i, token in enumerate(new):
            if token in seq.end_tokens:
                new = new[: i + 1]
                if token in seq.params.stop_token_ids:
                    seq.finish, seq.stop_reason = FinishReason.STOP, str(token)
                else:
                    seq.finish = FinishReason.EOS
                break
        if seq.finish is None and end >= limit:
            seq.finish = FinishReason.LENGTH
        if not new and seq.finish is None:
            return None
        stats = seq.request.stats
        if new and seq.emitted == seq.prompt_len:
            stats.first_token_seconds = now - seq.request.arrival
        logprobs = None
        if seq.params.logprobs:
            logprobs = [seq.logprobs.pop(seq.emitted + i) for i in range(len(new))]
        from_large = sum(seq.emitted + i in seq.large_chosen for i in range(len(new)))
        stats.large_tokens += from_large
        stats.small_tokens += len(new) - from_large
        seq.emitted += len(new)
        stats.generated_tokens = seq.emitted - seq.prompt_len
        if seq.finish is not None:
            self._release(seq)
        return StepOutput(seq.request, new, seq.finish, seq.stop_reason, logprobs)

    def _release(self, seq: Sequence) -> None:
        del self.running[seq.request.request_id]
        # Its caches stay for a later prompt that shares their prefix (not after a fault, to be safe).
        if self.prefix is not None and seq.looked_up and seq.finish is not FinishReason.ERROR:
            held = max(seq.large_cached, seq.small_cached)
            self.prefix.keep(seq.slot, Held(seq.context[:held], seq.large_cached, seq.small_cached))
        self._free_slots.append(seq.slot)
        self._reserved_tokens -= seq.reserved
