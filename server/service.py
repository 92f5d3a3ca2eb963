"""The bild.v1.Generator service: translates gRPC requests into engine requests and streams back text."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
from bild import wire
from bild.v1 import bild_pb2, bild_pb2_grpc
from transformers import PreTrainedTokenizerBase

from scheduler.engine import Engine, EngineStopped, QueueFull
from scheduler.request import (
    DEFAULT_MAX_NEW_TOKENS,
    FinishReason,
    Mode,
    RequestStats,
    SamplingParams,
)
from server.metrics import Metrics
from server.responses import ResponseBuilder

log = logging.getLogger(__name__)

MODES = {number: Mode(name) for name, number in wire.MODES.items()}  # the proto's enum -> the scheduler's
MODE_ENUMS = {mode: number for number, mode in MODES.items()}
CHAT_ROLES = ("system", "user", "assistant")
# A prompt this many times the context length in characters cannot fit; refuse it before tokenizing.
MAX_CHARS_PER_TOKEN = 64
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class ServiceConfig:
    default_mode: Mode = Mode.BILD
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_new_tokens_limit: int = 2048
    defaults: SamplingParams = SamplingParams()  # the policy knobs a request leaves unset
    large_name: str = ""
    small_name: str = ""
    device: str = "cpu"
    dtype: str = "float32"


class InvalidRequest(ValueError):
    pass


class CallFailed(Exception):
    """A generation that ends with a status other than OK; each transport reports it its own way."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Unparsable:
    """A request whose bytes are not the message the method takes (invalid UTF-8, wrong wire types);
    `reason` says so for the INVALID_ARGUMENT status that every method answers it with."""

    reason: str


def _source(messages) -> str:
    """An encoder-decoder's input from chat messages, for models without a chat template (T5,
    Marian): one user message, after any system messages (say, T5's "translate English to German:")."""
    roles = [m.role for m in messages]
    if roles[-1] != "user" or set(roles[:-1]) - {"system"}:
        raise InvalidRequest(
            "this encoder-decoder model reads one user message, after optional system messages (a task "
            f"prefix), not the roles {roles}; send the text to translate or summarize as one user message"
        )
    return " ".join(m.content for m in messages)


def _tolerant(message):
    """A deserializer of `message` that hands the handler an Unparsable instead of failing the call
    with UNKNOWN."""

    def deserialize(data: bytes):
        try:
            return message.FromString(data)
        except Exception as error:  # protobuf's DecodeError, whatever the backend raises
            why = str(error) or type(error).__name__
            return Unparsable(f"the request is not a valid {message.DESCRIPTOR.full_name}: {why}")

    return deserialize


def add_to_server(service: GeneratorService, server: grpc.aio.Server) -> None:
    """Register the Generator service as the generated code does, with requests that may not parse."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate,
            request_deserializer=_tolerant(bild_pb2.GenerateRequest),
            response_serializer=bild_pb2.GenerateResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo,
            request_deserializer=_tolerant(bild_pb2.GetModelInfoRequest),
            response_serializer=bild_pb2.ModelInfo.SerializeToString,
        ),
        "GetLoad": grpc.unary_unary_rpc_method_handler(
            service.GetLoad,
            request_deserializer=_tolerant(bild_pb2.GetLoadRequest),
            response_serializer=bild_pb2.Load.SerializeToString,
        ),
    }
    name = bild_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


@dataclass
class CallRecord:
    """What one Generate call came to, for metrics and the log."""

    mode: str = "unknown"
    outcome: str | None = None  # None at the end: the client went away or its deadline passed
    stats: RequestStats | None = None


class GeneratorService(bild_pb2_grpc.GeneratorServicer):
    def __init__(self, config: ServiceConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.engine: Engine | None = None  # set once the models have loaded
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._attached = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Shutting down: health says NOT_SERVING, while calls, new ones too, are served until the ports close.
        self.draining = False

    def attach(self, engine: Engine, tokenizer: PreTrainedTokenizerBase) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self._attached.set()

    async def _loaded(self) -> None:
        """Until the models have loaded. A call that arrives while they load waits for them (its
        deadline bounds the wait) rather than failing: a proxy without health checks, nginx's
        grpc_pass, sends calls to a replica as soon as its port takes connections."""
        await self._attached.wait()

    async def wait_idle(self) -> None:
        """Until no Generate stream is in flight (draining waits for these, not for health watchers)."""
        await self._idle.wait()

    # ---- request translation -----------------------------------------------------------

    def _params(self, request: bild_pb2.GenerateRequest) -> SamplingParams:
        config = self.config
        if len(request.request_id) > MAX_REQUEST_ID or not request.request_id.isprintable():
            raise InvalidRequest(f"request_id must be at most {MAX_REQUEST_ID} printable characters")
        if request.mode == bild_pb2.DECODING_MODE_UNSPECIFIED:
            mode = config.default_mode
        elif request.mode in MODES:
            mode = MODES[request.mode]
        else:
            raise InvalidRequest(f"unknown mode {request.mode}; use one of {sorted(MODES)} (DecodingMode)")
        max_new = request.max_new_tokens or config.default_max_new_tokens
        if max_new > config.max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens {max_new} is above this server's limit of {config.max_new_tokens_limit}"
            )
        params = replace(
            config.defaults,
            mode=mode,
            max_new_tokens=max_new,
            fallback_threshold=(
                request.fallback_threshold
                if request.HasField("fallback_threshold")
                else config.defaults.fallback_threshold
            ),
            rollback_threshold=(
                request.rollback_threshold
                if request.HasField("rollback_threshold")
                else config.defaults.rollback_threshold
            ),
            max_small_tokens=(
                request.max_small_tokens if request.HasField("max_small_tokens") else config.defaults.max_small_tokens
            ),
            temperature=request.temperature if request.HasField("temperature") else 0.0,
            top_p=request.top_p if request.HasField("top_p") else 1.0,
            top_k=request.top_k,
            repetition_penalty=request.repetition_penalty if request.HasField("repetition_penalty") else 1.0,
            seed=request.seed if request.HasField("seed") else None,
            stop_token_ids=tuple(request.stop_token_ids),
            ignore_eos=request.ignore_eos,
            logprobs=request.logprobs or request.top_logprobs > 0,
            top_logprobs=request.top_logprobs,
            # A request that fixes its seed wants its output to repeat: unless it says otherwise,
            # it is decoded by BiLD's own rules, which the rest of the batch cannot change.
            batch_independent=(
                request.batch_independent
                if request.HasField("batch_independent")
                else config.defaults.batch_independent or request.HasField("seed")
            ),
        )
        if len(request.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in request.stop):
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters")
        try:
            params.validate()
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        return params

    def _prompt_ids(self, request: bild_pb2.GenerateRequest) -> list[int]:
        """Tokenize the prompt or render the chat; runs in a worker thread (long inputs take time)."""
        tokenizer = self.tokenizer
        if request.prompt and request.messages:
            raise InvalidRequest("give either prompt or messages, not both")
        max_chars = self.engine.info.limits.max_seq_len * MAX_CHARS_PER_TOKEN
        if request.messages:
            for i, message in enumerate(request.messages):
                if message.role not in CHAT_ROLES:
                    raise InvalidRequest(f"messages[{i}].role is {message.role!r}; use one of {list(CHAT_ROLES)}")
            if sum(len(m.content) for m in request.messages) > max_chars:
                raise InvalidRequest("the messages are far longer than the context length")
            if not tokenizer.chat_template and self.engine.info.limits.encoder_decoder:
                return tokenizer.encode(_source(request.messages))
            if not tokenizer.chat_template:
                raise InvalidRequest("this model has no chat template; send a plain prompt instead")
            chat = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            except Exception as error:  # the template's own checks (e.g. role order) raise here
                raise InvalidRequest(f"the chat template rejected the messages: {error}") from None
            return tokenizer.encode(text, add_special_tokens=False)
        if not request.prompt:
            raise InvalidRequest("the request has no prompt: set prompt (text) or messages (chat turns)")
        if len(request.prompt) > max_chars:
            raise InvalidRequest("the prompt is far longer than the context length")
        return tokenizer.encode(request.prompt)

    # ---- RPCs --------------------------------------------------------------------------

    async def Generate(self, request: bild_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async with contextlib.aclosing(self.generate(request)) as responses:
                async for response in responses:
                    yield response
        except CallFailed as error:
            await context.abort(error.code, error.message)

    async def generate(
        self, request: bild_pb2.GenerateRequest, record: CallRecord | None = None
    ) -> AsyncIterator[bild_pb2.GenerateResponse]:
        """One generation for any transport (gRPC, HTTP): its responses, or CallFailed.

        Validation, limits, metrics and draining are the same whoever calls; closing the iterator
        early (client gone) cancels the engine request. `record.stats` follows the request live.
        """
        self._in_flight += 1
        self._idle.clear()
        started = time.monotonic()
        record = record if record is not None else CallRecord()
        try:
            async with contextlib.aclosing(self._generate(request, record)) as responses:
                async for response in responses:
                    yield response
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
            if self.metrics is not None:
                self.metrics.observe(
                    record.mode, record.outcome or "cancelled", record.stats, time.monotonic() - started
                )

    def _abort(self, record: CallRecord, code: grpc.StatusCode, message: str) -> CallFailed:
        record.outcome = code.name.lower()
        return CallFailed(code, message)

    async def _generate(self, request: bild_pb2.GenerateRequest, record: CallRecord):
        if isinstance(request, Unparsable):
            raise self._abort(record, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        await self._loaded()
        started = time.monotonic()
        request_id = request.request_id
        try:
            params = self._params(request)
            record.mode = params.mode.value
            prompt = await asyncio.to_thread(self._prompt_ids, request)
            if not request.max_new_tokens:
                # The server's default never asks for more than the context has room for.
                room = self.engine.info.limits.max_seq_len - len(prompt)
                params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens, room)))
            stream = self.engine.submit(prompt, params)
        except ValueError as error:  # InvalidRequest, and the engine's own checks
            raise self._abort(record, grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except QueueFull as error:
            raise self._abort(record, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)) from None
        except EngineStopped as error:
            raise self._abort(record, grpc.StatusCode.UNAVAILABLE, str(error)) from None
        record.stats = stream.stats
        request_id = request_id or stream.request.request_id
        builder = ResponseBuilder(self.tokenizer, list(request.stop), request_id)
        # aclosing: if this handler is cancelled, the engine request is cancelled now, not at GC time.
        async with contextlib.aclosing(stream.__aiter__()) as outputs:
            async for output in outputs:
                if output.finish is FinishReason.ERROR:  # a failed forward, or the engine died
                    reason = self.engine.failure or "a model forward failed on this request (see the server log)"
                    raise self._abort(record, grpc.StatusCode.INTERNAL, f"generation failed: {reason}")
                if output.finish is FinishReason.CANCELLED:  # only the server cancels this way: shutting down
                    raise self._abort(
                        record,
                        grpc.StatusCode.UNAVAILABLE,
                        "generation ended by the server: it is shutting down; retry on another replica",
                    )
                response = builder.build(output, stream.stats, time.monotonic() - started)
                if response is not None:
                    yield response
                if builder.finish is not None:
                    stream.cancel()  # a stop string: the engine may still be generating
                    break
        stats = stream.stats
        record.outcome = builder.finish.value if builder.finish else None
        log.info(
            "request %s mode=%s prompt=%d generated=%d small=%d large=%d rollbacks=%d %.2fs",
            request_id,
            params.mode.value,
            stats.prompt_tokens,
            builder.sent_tokens,
            stats.small_tokens,
            stats.large_tokens,
            stats.rollbacks,
            time.monotonic() - started,
        )

    async def GetModelInfo(self, request: bild_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        if isinstance(request, Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        await self._loaded()
        config, engine = self.config, self.engine
        return bild_pb2.ModelInfo(
            large_model=config.large_name,
            small_model=config.small_name,
            dtype=config.dtype,
            device=config.device,
            vocab_size=engine.info.limits.vocab_limit,
            context_length=engine.info.limits.max_seq_len,
            max_new_tokens_limit=config.max_new_tokens_limit,
            default_max_new_tokens=config.default_max_new_tokens,
            default_mode=MODE_ENUMS[config.default_mode],
            default_fallback_threshold=config.defaults.fallback_threshold,
            default_rollback_threshold=config.defaults.rollback_threshold,
            default_max_small_tokens=config.defaults.max_small_tokens,
            max_batch_size=engine.config.max_num_seqs,
            has_chat_template=bool(self.tokenizer.chat_template),
            encoder_decoder=engine.info.limits.encoder_decoder,
        )

    async def GetLoad(self, request: bild_pb2.GetLoadRequest, context: grpc.aio.ServicerContext):
        if isinstance(request, Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        if self.engine is None:
            return bild_pb2.Load(serving=False)
        load, slots = self.engine.load(), self.engine.config.max_num_seqs
        return bild_pb2.Load(
            serving=not self.draining,
            running=load["running"],
            waiting=load["waiting"],
            free_slots=load["free_slots"],
            max_batch_size=slots,
            reserved_tokens=load["reserved_tokens"],
            utilization=(load["running"] + load["waiting"]) / slots,
        )
