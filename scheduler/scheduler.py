"""Iteration-level continuous batching for Big Little Decoder.

Each call to `step()` is one iteration:
  1. admit waiting requests in arrival order while slots and the token budget allow, and prefill
     up to `max_prefill_tokens` prompt tokens (chunks of long prompts wait for later iterations);
     the large model's prefill already predicts the first token, so it is settled at once;
  2. one batched small-model forward over every sequence that drafts (modes bild, exact, small);
     the fallback policy discards unconfident drafts and sends those sequences to the large model,
     as do sequences that reached `max_small_tokens` drafts, EOS or their length limit;
  3. one batched large-model forward over every sequence sent to it (each with its own number of
     unverified tokens) and every `large`-mode sequence; the rollback policy cuts each draft at
     its first bad token and the large model's token goes there, or after the draft if all stand;
  4. settled tokens are handed out; finished sequences free their slot.

Bookkeeping per sequence, with `context` = prompt + generated tokens (drafts included):
  settled        context[:settled] passed the large model (or needs no check: `small` mode);
  large_cached   the large model's cache holds context[:large_cached]; always settled - 1 after a
                 large forward, since its newest token is predicted but not yet fed;
  small_cached   the same for the small model; a rollback lowers it, nothing is recomputed.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from scheduler.logprobs import TokenLogprob, token_logprobs
from scheduler.model_runner import CausalLMRunner, ForwardItem
from scheduler.policy import Draft, Verdict, VerifyRow, drafts, verify
from scheduler.request import FinishReason, Limits, Mode, Request, SamplingParams, check
from scheduler.sampling import DRAFT, TARGET, pick, process, verify_processed

DRAFTING_MODES = (Mode.BILD, Mode.EXACT, Mode.SMALL)
VERIFIED_MODES = (Mode.BILD, Mode.EXACT)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16  # slots: sequences in the batch at once
    max_num_tokens: int = 16384  # tokens reserved (prompt + max_new_tokens) by running sequences
    max_seq_len: int = 2048  # context length of one sequence
    # Prompt tokens prefilled per iteration: a long prompt is fed in chunks across iterations, so it
    # delays the other streams by one chunk's forward at a time rather than by its whole prefill.
    max_prefill_tokens: int = 512
    # Also check bild-mode and sampled drafts in every large forward that runs anyway: fewer large
    # forwards under load, but such a request's output then depends on which others share its
    # batch. Greedy exact-mode requests always join, since their output cannot change.
    verify_together: bool = False
    # Greedy exact-mode requests stop drafting while more than this many sequences decode (0: no
    # limit): a large batch makes each large forward dearer and drafts pay less, and their output
    # is the large model's either way. With verify_together, bild-mode and sampled requests too.
    draft_batch_limit: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_tokens", "max_seq_len", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.draft_batch_limit < 0:
            raise ValueError(f"draft_batch_limit must be 0 or more, got {self.draft_batch_limit}")


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
    finish: FinishReason | None = None
    stop_reason: str | None = None
    seed: int = 0
    end_tokens: frozenset[int] = frozenset()  # EOS (unless ignored) and the request's stop tokens
    draft_q: list[torch.Tensor] = field(default_factory=list)  # q of each draft, for speculative sampling
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
        return self.prompt_len + self.request.params.max_new_tokens

    @property
    def drafted(self) -> int:
        return len(self.context) - self.settled

    @property
    def output_is_fixed(self) -> bool:
        """Greedy exact mode: the output is the large model's greedy whenever and however drafts are
        checked, so the scheduler may check them at any iteration, or not draft at all."""
        return self.mode is Mode.EXACT and not self.params.sampling


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
    ) -> None:
        self.small = small
        self.large = large
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
        # Outputs of the iteration under way; kept here so a failing forward cannot lose them.
        self._outputs: list[StepOutput] = []

    # ---- requests in and out -------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return Limits(self.config.max_seq_len, self.config.max_num_tokens, self.large.vocab_limit, self.small is not None)

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
        self._drop_cancelled()
        self._admit()
        decoding = [s for s in self.running.values() if s.prefilled == s.prompt_len]
        self._prefill([s for s in self.running.values() if s.prefilled < s.prompt_len])
        self._draft_and_verify(decoding)
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
            need = len(request.prompt) + request.params.max_new_tokens
            if self._reserved_tokens + need > self.config.max_num_tokens:
                break  # strictly in order: a big request is not overtaken by smaller ones
            self.waiting.popleft()
            self._free_slots.sort()
            context = self.large.initial_context(request.prompt)
            n = len(context)
            params = request.params
            seq = Sequence(
                request, self._free_slots.pop(0), context, prompt_len=n, settled=n, emitted=n,
                seed=params.seed if params.seed is not None else random.getrandbits(64),
                end_tokens=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids),
            )
            self._reserved_tokens += seq.reserved
            self.running[request.request_id] = seq
            request.stats.prompt_tokens = len(request.prompt)
            request.stats.queue_seconds = time.monotonic() - request.arrival

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Feed the next chunk of each admitted prompt, oldest first, within the per-iteration budget."""
        budget = self.config.max_prefill_tokens
        chunks: list[tuple[Sequence, ForwardItem]] = []
        for seq in seqs:
            n = min(budget, seq.prompt_len - seq.prefilled)
            if n <= 0:
                break
            chunks.append((seq, ForwardItem(seq.slot, seq.prefilled, seq.context[seq.prefilled : seq.prefilled + n])))
            budget -= n
        small = [(s, item) for s, item in chunks if s.mode in DRAFTING_MODES]
        large = [(s, item) for s, item in chunks if s.mode is not Mode.SMALL]
        if small:
            logits = self.small.start([item for _, item in small])
            for (seq, item), row in zip(small, logits):
                seq.small_cached = item.start + len(item.tokens)
                seq.request.stats.small_forward_steps += 1
                if seq.mode is Mode.SMALL and seq.small_cached == seq.prompt_len:
                    self._append_first(seq, row, DRAFT)
        if large:
            # The large model must read the prompt anyway; its prediction is the first token.
            logits = self.large.start([item for _, item in large])
            for (seq, item), row in zip(large, logits):
                seq.large_cached = item.start + len(item.tokens)
                seq.request.stats.large_forward_calls += 1
                if seq.large_cached == seq.prompt_len:
                    self._append_first(seq, row, TARGET)
        for seq, item in chunks:
            seq.prefilled = item.start + len(item.tokens)
            seq.settled = len(seq.context)

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

    def _draft_and_verify(self, seqs: list[Sequence]) -> None:
        busy = 0 < self.config.draft_batch_limit < len(seqs)

        def large_only(s: Sequence) -> bool:  # this iteration: no draft, the large model's next token
            may_skip = s.output_is_fixed or (self.config.verify_together and s.mode is not Mode.SMALL)
            return s.mode is Mode.LARGE or (busy and may_skip)

        drafting = [s for s in seqs if s.mode in DRAFTING_MODES and not large_only(s)]
        to_large = [s for s in seqs if large_only(s)]
        if drafting:
            items = [ForwardItem(s.slot, s.small_cached, s.context[s.small_cached :]) for s in drafting]
            logits = self.small.forward(items, all_logits=False)[:, -1]
            proposals = drafts(logits)  # greedy drafts of the whole batch at once
            for b, seq in enumerate(drafting):
                if seq.params.processes_logits or (seq.mode is Mode.SMALL and seq.params.logprobs):
                    proposals[b] = self._processed_draft(seq, logits[b])
                if self._take_draft(seq, proposals[b]):
                    to_large.append(seq)
        if to_large:
            # Sequences with pending drafts join the large forward that runs anyway: a few more
            # columns now instead of a forward of their own at a later iteration. Greedy exact-mode
            # output is the large model's wherever drafts are checked, so those always join; the
            # others would then depend on the batch they share, so only when configured.
            to_large += [s for s in drafting if s.mode is not Mode.SMALL and s.drafted
                         and (self.config.verify_together or s.output_is_fixed)
                         and s not in to_large]
            # With large_cached = settled - 1, each sequence feeds its newest settled token and then
            # its drafts; large-mode sequences feed just their newest token.
            items = [ForwardItem(s.slot, s.large_cached, s.context[s.large_cached :]) for s in to_large]
            logits = self.large.forward(items, all_logits=True)
            # Plain-argmax rows share one batched policy call; the others get their own rule below.
            greedy = [b for b, s in enumerate(to_large) if not s.params.processes_logits]
            verdicts: list[Verdict | None] = [None] * len(to_large)
            if greedy:
                rows = [VerifyRow(items[b].tokens, to_large[b].mode, to_large[b].params.rollback_threshold) for b in greedy]
                for b, verdict in zip(greedy, verify(logits if len(greedy) == len(to_large) else logits[greedy], rows)):
                    verdicts[b] = verdict
            width = logits.shape[1]
            for b, (seq, item) in enumerate(zip(to_large, items)):
                own = logits[b, width - len(item.tokens) :]  # this row's columns, without left padding
                if verdicts[b] is None:
                    contexts = [seq.context[: seq.settled + i] for i in range(len(item.tokens))]
                    verdicts[b] = verify_processed(
                        own, item.tokens[1:], contexts, seq.params, seq.seed, seq.settled, seq.draft_q
                    )
                if seq.params.logprobs:
                    kept = item.tokens[1 : verdicts[b].accepted + 1] + [verdicts[b].next_token]
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

    def _take_draft(self, seq: Sequence, proposal: Draft) -> bool:
        """Apply the fallback policy to one small-model step; True if the large model must run now."""
        params, stats = seq.request.params, seq.request.stats
        seq.small_cached = len(seq.context)
        stats.small_forward_steps += 1
        if seq.mode is Mode.SMALL:
            seq.context.append(proposal.token)
            seq.settled = len(seq.context)
            return False
        if proposal.confidence < params.fallback_threshold:
            stats.fallbacks += 1
            return True
        seq.context.append(proposal.token)
        if proposal.q is not None:
            seq.draft_q.append(proposal.q)
        at_limit = len(seq.context) - seq.prompt_len >= params.max_new_tokens
        if seq.drafted >= params.max_small_tokens or proposal.token in seq.end_tokens or at_limit:
            # Forced fallback: too many drafts in a row, or the draft would end the sequence,
            # and every emitted token must pass the rollback check first.
            stats.fallbacks += 1
            return True
        return False

    def _take_verdict(self, seq: Sequence, verdict: Verdict) -> None:
        """Keep the accepted drafts and append the large model's token after them."""
        stats = seq.request.stats
        stats.large_forward_calls += 1
        keep = seq.settled + verdict.accepted
        del seq.context[keep:]
        seq.large_chosen.add(keep)
        seq.context.append(verdict.next_token)
        seq.large_cached = keep
        seq.small_cached = min(seq.small_cached, keep)
        seq.settled = len(seq.context)
        seq.draft_q.clear()
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
        self._free_slots.append(seq.slot)
        self._reserved_tokens -= seq.reserved
