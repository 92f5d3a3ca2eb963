"""The OpenAI HTTP API's requests and answers in terms of bild.v1's GenerateRequest and GenerateResponse.

The HTTP front-end (`server/openai_http.py`) turns an OpenAI request into a GenerateRequest here and
sends it through `GeneratorService.generate`, the same path as a gRPC call: one validation, one set
of limits and defaults, one engine call. What comes back is turned into OpenAI's objects here too.

Fields that change what OpenAI would generate but that bild cannot honour (n > 1, penalties, tools,
logit_bias, JSON response formats, echo, suffix) are refused with a 400 naming the field rather than
ignored; fields that only describe the caller (user, metadata, store, ...) and unknown fields are
ignored, as OpenAI-compatible servers usually do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from bild import wire
from bild.v1 import bild_pb2
from transformers import PreTrainedTokenizerBase

from scheduler.request import RequestStats

# The proto's finish reasons as OpenAI names them.
OPENAI_FINISH_REASONS = {
    bild_pb2.FINISH_REASON_EOS: "stop",
    bild_pb2.FINISH_REASON_STOP: "stop",
    bild_pb2.FINISH_REASON_LENGTH: "length",
}
# gRPC status of a failed generation -> HTTP status, OpenAI error type, OpenAI error code.
HTTP_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "service_unavailable"),
    grpc.StatusCode.INTERNAL: (500, "server_error", None),
}
# Refused unless null or a value that means "not used": bild cannot do what they ask.
UNSUPPORTED = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
}
U32, U64 = 2**32, 2**64


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None, param=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    @classmethod
    def from_status(cls, code: grpc.StatusCode, message: str) -> OpenAIError:
        status, kind, error_code = HTTP_ERRORS.get(code, (500, "server_error", None))
        return cls(status, message, kind, error_code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


# ---- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """An OpenAI request, translated: the engine request and how to answer."""

    request: bild_pb2.GenerateRequest
    chat: bool
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage and no choices
    logprobs: bool = False
    top_logprobs: int = 0


def _get(body: dict, name: str) -> Any:
    return body.get(name)  # null is the same as absent, as in OpenAI's API


def _number(body: dict, name: str) -> float | None:
    value = _get(body, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"{name} must be a number", name)
    return float(value)


def _integer(body: dict, name: str, low: int = 0, high: int = U32) -> int | None:
    value = _get(body, name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer", name)
    if not low <= value < high:
        raise invalid(f"{name} must be within [{low}, {high})", name)
    return value


def _boolean(body: dict, name: str) -> bool | None:
    value = _get(body, name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"{name} must be true or false", name)
    return value


def _strings(body: dict, name: str) -> list[str]:
    value = _get(body, name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid(f"{name} must be a string or an array of strings", name)
    return value


def _refuse_unsupported(body: dict) -> None:
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value not in allowed:
            raise invalid(f"{name}={value!r} is not supported by this server", name)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise invalid("response_format: only {'type': 'text'} is supported by this server", "response_format")


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"messages[{i}].content must be a string or an array of text parts", "messages")


def _messages(body: dict) -> list[bild_pb2.ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a role and content", "messages")
        role = "system" if message["role"] == "developer" else message["role"]  # OpenAI's newer name
        # Roles other than system, user and assistant are refused by the service, as over gRPC.
        out.append(bild_pb2.ChatMessage(role=role, content=_content(message, i)))
    return out


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt must be a string (one prompt per request; token ids are not supported)", "prompt")
    return prompt


def translate(body: Any, *, chat: bool) -> Call:
    """An OpenAI chat completion (chat=True) or completion request as a GenerateRequest.

    Only shapes are checked here; values (ranges, limits, roles, lengths) are checked by the
    service for every transport alike.
    """
    try:
        return _translate(body, chat)
    except UnicodeEncodeError:  # JSON's \ud800 escapes decode to lone surrogates, which protobuf refuses
        raise invalid("the request holds text that is not valid Unicode (a lone surrogate)") from None


def _translate(body: Any, chat: bool) -> Call:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    _refuse_unsupported(body)
    request = bild_pb2.GenerateRequest()
    if chat:
        request.messages.extend(_messages(body))
    else:
        request.prompt = _prompt(body)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is not None:
        request.max_new_tokens = max_tokens
    for name in ("temperature", "top_p", "fallback_threshold", "rollback_threshold", "repetition_penalty"):
        value = _number(body, name)
        if value is not None:
            setattr(request, name, value)
    for name in ("max_small_tokens", "top_k"):
        value = _integer(body, name)
        if value is not None:
            setattr(request, name, value)
    seed = _integer(body, "seed", 0, U64)
    if seed is not None:
        request.seed = seed
    request.stop.extend(_strings(body, "stop"))
    stop_ids = _get(body, "stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and 0 <= t < U32 for t in stop_ids):
        raise invalid("stop_token_ids must be an array of token ids", "stop_token_ids")
    request.stop_token_ids.extend(stop_ids)
    request.ignore_eos = bool(_boolean(body, "ignore_eos"))
    batch_independent = _boolean(body, "batch_independent")
    if batch_independent is not None:
        request.batch_independent = batch_independent
    mode = _get(body, "mode")
    if mode is not None:
        if not isinstance(mode, str) or mode not in wire.MODES:
            raise invalid(f"mode must be one of {sorted(wire.MODES)}", "mode")
        request.mode = wire.MODES[mode]
    if chat:
        logprobs = bool(_boolean(body, "logprobs"))
        top = _integer(body, "top_logprobs") or 0
    else:  # completions: logprobs is the number of alternatives, and asks for logprobs when set
        top = _integer(body, "logprobs")
        logprobs, top = top is not None, top or 0
    request.logprobs, request.top_logprobs = logprobs or top > 0, top
    stream = bool(_boolean(body, "stream"))
    options = _get(body, "stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    include_usage = bool(_boolean(options or {}, "include_usage"))
    return Call(request, chat, stream, include_usage, logprobs or top > 0, top)


# ---- answers ---------------------------------------------------------------------------------


def stats_dict(stats: bild_pb2.GenerationStats) -> dict[str, float | int]:
    return {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}


def live_stats(stats: RequestStats | None, sent_tokens: int) -> dict[str, int]:
    """What a chunk in the middle of a stream says of its request so far (the last one says all)."""
    if stats is None:
        return {"generated_tokens": sent_tokens}
    return {"generated_tokens": sent_tokens, "small_tokens": stats.small_tokens, "large_tokens": stats.large_tokens}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character a byte-level BPE token spells it with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class TokenText:
    """The text and bytes of single tokens, for log-probabilities."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._byte_level = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
            self._byte_level = {c: b for b, c in _bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            data = None
            if self._byte_level is not None:
                piece = self._tokenizer.convert_ids_to_tokens(token)
                if isinstance(piece, str) and all(c in self._byte_level for c in piece):
                    data = bytes(self._byte_level[c] for c in piece)
            if data is None:
                data = self._tokenizer.decode([token]).encode()
            self._cache[token] = (data.decode("utf-8", errors="replace"), list(data))
        return self._cache[token]


@dataclass
class Answer:
    """Builds OpenAI's answer to one call from its GenerateResponses: stream chunks, or the whole object."""

    call: Call
    model: str
    token_text: TokenText
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""
    text: list[str] = field(default_factory=list)
    logprob_entries: list = field(default_factory=list)
    text_offset: int = 0
    sent_tokens: int = 0
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    stats: dict[str, float | int] | None = None
    started: bool = False

    @property
    def object(self) -> str:
        if self.call.chat:
            return "chat.completion.chunk" if self.call.stream else "chat.completion"
        return "text_completion"

    def _logprobs(self, response: bild_pb2.GenerateResponse) -> Any:
        """This response's tokens in OpenAI's logprobs shape (chat's content list, or completions' arrays)."""
        if self.call.chat:
            content = []
            for lp in response.logprobs:
                token, data = self.token_text(lp.token_id)
                top = [
                    dict(zip(("token", "bytes"), self.token_text(t.token_id)), logprob=t.logprob)
                    for t in lp.top[: self.call.top_logprobs]
                ]
                content.append({"token": token, "logprob": lp.logprob, "bytes": data, "top_logprobs": top})
            return content
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in response.logprobs:
            token = self.token_text(lp.token_id)[0]
            out["tokens"].append(token)
            out["token_logprobs"].append(lp.logprob)
            top = {self.token_text(t.token_id)[0]: t.logprob for t in lp.top[: self.call.top_logprobs]}
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.text_offset)
            self.text_offset += len(token)
        return out

    def add(self, response: bild_pb2.GenerateResponse) -> None:
        """Take one response into the whole answer (no streaming)."""
        self.id = self.id or response.request_id
        self.text.append(response.text)
        if self.call.logprobs:
            lps = self._logprobs(response)
            if self.call.chat:
                self.logprob_entries.extend(lps)
            else:
                self.logprob_entries.append(lps)
        self._finish(response)

    def _finish(self, response: bild_pb2.GenerateResponse) -> None:
        self.sent_tokens += len(response.token_ids)
        if response.finish_reason != bild_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = OPENAI_FINISH_REASONS.get(response.finish_reason, "stop")
            stats = response.stats
            self.usage = {
                "prompt_tokens": stats.prompt_tokens,
                "completion_tokens": stats.generated_tokens,
                "total_tokens": stats.prompt_tokens + stats.generated_tokens,
                "prompt_tokens_details": {"cached_tokens": stats.cached_prompt_tokens},
            }
            self.stats = {**stats_dict(stats), "stop_reason": response.stop_reason}

    def _envelope(self, choices: list[dict]) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.call.chat else "cmpl-"
        return {
            "id": prefix + self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def whole(self) -> dict[str, Any]:
        """The answer to a call without streaming."""
        text = "".join(self.text)
        logprobs = None
        if self.call.logprobs and self.call.chat:
            logprobs = {"content": self.logprob_entries, "refusal": None}
        elif self.call.logprobs:
            logprobs = {k: [v for part in self.logprob_entries for v in part[k]] for k in self.logprob_entries[0]}
        if self.call.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=logprobs, finish_reason=self.finish_reason)
        return {**self._envelope([choice]), "usage": self.usage, "bild": self.stats}

    def chunks(self, response: bild_pb2.GenerateResponse, stats: RequestStats | None) -> Iterable[dict[str, Any]]:
        """The stream's chunks for one response: its text (chat opens with the assistant's role), then,
        at the end, a chunk with finish_reason, usage and BiLD's statistics. Every chunk carries
        `bild`: the request's statistics so far (tokens sent, and from the small and large models)."""
        self.id = self.id or response.request_id
        logprobs = self._logprobs(response) if self.call.logprobs else None
        self._finish(response)
        live = live_stats(stats, self.sent_tokens)
        if self.call.chat and not self.started:
            delta = {"role": "assistant", "content": ""}
            yield {**self._envelope([self._choice(delta, None, None)]), "bild": live}
        self.started = True
        if response.text or response.token_ids:
            content = {"content": response.text} if self.call.chat else response.text
            if self.call.chat and logprobs is not None:
                logprobs = {"content": logprobs, "refusal": None}
            yield {**self._envelope([self._choice(content, logprobs, None)]), "bild": live}
        if self.finish_reason is not None:
            last = {} if self.call.chat else ""
            yield {
                **self._envelope([self._choice(last, None, self.finish_reason)]),
                "usage": self.usage,
                "bild": self.stats,
            }
            if self.call.include_usage:  # OpenAI's own: one more chunk, no choices, the usage
                yield {**self._envelope([]), "usage": self.usage, "bild": self.stats}

    def _choice(self, content: Any, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        if self.call.chat:
            return {"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": 0, "text": content, "logprobs": logprobs, "finish_reason": finish_reason}
