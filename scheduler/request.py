"""What a client asks for, and what the engine reports back about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Mode(enum.Enum):
    BILD = "bild"  # small model drafts, large model falls back and rolls back by thresholds (lossy)
    EXACT = "exact"  # like bild, but any disagreement with the large model's argmax rolls back (lossless)
    LARGE = "large"  # large model only: the baseline
    SMALL = "small"  # small model only


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop token id (here) or a stop string (found by the server, which ends the request)
    CANCELLED = "cancelled"
    ERROR = "error"


# Defaults. BiLD's code uses fallback 0.6, rollback 2 to 5 and 10 small tokens, for T5 pairs whose
# small model agrees far better than a draft aligned in hours on a CPU can. With such a draft, a
# loose rollback threshold keeps many small tokens the large model finds unlikely, and the output
# drifts far from large-only greedy output. Rollback 0.8 keeps a small token only where the large
# model gives it at least exp(-0.8), about 45%, i.e. where the large model itself hesitates: the
# output stays close to large-only greedy output, at no cost in speed (measured, see
# bench/results/engine_speed.md). That criterion depends on the large model alone, so it carries
# over to other pairs. Fallback 0.4 checks fewer drafts the small model is only half sure of.
DEFAULT_FALLBACK_THRESHOLD = 0.4
DEFAULT_ROLLBACK_THRESHOLD = 0.8
DEFAULT_MAX_SMALL_TOKENS = 10
DEFAULT_MAX_NEW_TOKENS = 256
MAX_SMALL_TOKENS_LIMIT = 32  # it also bounds the width of the verification forward
MAX_TOP_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64


@dataclass(frozen=True)
class SamplingParams:
    mode: Mode = Mode.BILD
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD
    rollback_threshold: float = DEFAULT_ROLLBACK_THRESHOLD
    max_small_tokens: int = DEFAULT_MAX_SMALL_TOKENS
    # Sampling; temperature 0 is greedy decoding, and the other knobs then do nothing.
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    repetition_penalty: float = 1.0  # transformers' rule: logits of tokens already in the context shrink
    seed: int | None = None  # None: a fresh seed per request
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # Draft and check by BiLD's per-sequence rules only, so that the output does not depend on which
    # requests share the batch (greedy exact output never does). Off: the load-adaptive plan may
    # check drafts earlier, or not draft, where that settles more tokens per second.
    batch_independent: bool = False

    @property
    def sampling(self) -> bool:
        return self.temperature > 0.0

    @property
    def processes_logits(self) -> bool:
        """Whether the token rule is more than a plain argmax of the raw logits."""
        return self.sampling or self.repetition_penalty != 1.0

    def validate(self) -> None:
        """Raise ValueError with a message meant for the person who sent the request."""
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not 0.0 <= self.fallback_threshold <= 1.0:
            raise ValueError(f"fallback_threshold must be within [0, 1], got {self.fallback_threshold}")
        if not self.rollback_threshold >= 0.0:  # also rejects NaN
            raise ValueError(f"rollback_threshold must be 0 or more, got {self.rollback_threshold}")
        if not 1 <= self.max_small_tokens <= MAX_SMALL_TOKENS_LIMIT:
            raise ValueError(
                f"max_small_tokens must be within [1, {MAX_SMALL_TOKENS_LIMIT}], got {self.max_small_tokens}"
            )
        if not (self.temperature == 0.0 or 0.01 <= self.temperature <= 100.0):
            # Below 0.01 the scaled logits overflow; such a temperature is greedy decoding anyway.
            raise ValueError(f"temperature must be 0 (greedy) or within [0.01, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be within (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (no limit) or more, got {self.top_k}")
        if not 0.01 <= self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be within [0.01, 10], got {self.repetition_penalty}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be within [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError("seed must be within [0, 2**64)")


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    generated_tokens: int = 0
    small_forward_steps: int = 0  # small-model forwards this request took part in (prefill included)
    large_forward_calls: int = 0  # large-model forwards this request took part in (prefill included)
    fallbacks: int = 0
    rollbacks: int = 0
    small_tokens: int = 0  # emitted tokens that the small model proposed
    large_tokens: int = 0  # emitted tokens that the large model chose
    queue_seconds: float = 0.0
    first_token_seconds: float = 0.0  # from submission to the first settled token

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = 0.0  # time.monotonic(), which every process on the machine shares
    stats: RequestStats = field(default_factory=RequestStats)


@dataclass(frozen=True)
class Limits:
    """What a loaded engine can take: enough to refuse a request before it reaches the engine."""

    max_seq_len: int  # prompt + generation
    max_num_tokens: int  # tokens all running sequences may reserve together
    vocab_limit: int  # token ids must be below this
    has_small: bool
    # The prompt is the encoder's input (T5, Marian, ...), not the start of the generated text.
    encoder_decoder: bool = False


def check(request: Request, limits: Limits) -> None:
    """Raise ValueError, with a message for the person who sent it, if the request can never run."""
    params = request.params
    params.validate()
    if params.mode in (Mode.BILD, Mode.EXACT, Mode.SMALL) and not limits.has_small:
        raise ValueError(f"mode {params.mode.value} needs a small model, and none is loaded")
    if not request.prompt:
        raise ValueError("the prompt is empty")
    total = len(request.prompt) + params.max_new_tokens
    if total > limits.max_seq_len:
        raise ValueError(
            f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
            f"exceeds the context length of {limits.max_seq_len} tokens"
        )
    if total > limits.max_num_tokens:
        raise ValueError(
            f"prompt + max_new_tokens = {total} tokens exceeds the server's token budget of {limits.max_num_tokens}"
        )
    tokens = request.prompt + list(params.stop_token_ids)
    if max(tokens) >= limits.vocab_limit or min(tokens) < 0:
        raise ValueError(f"token ids (prompt and stop_token_ids) must be within [0, {limits.vocab_limit})")
