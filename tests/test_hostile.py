"""Hostile input at scale: random GenerateRequests, well-formed and not, against a running server.

Every request gets an answer (tokens, or a clear status that is the client's to fix), the server
keeps serving others meanwhile, and no prompt text reaches its log at INFO.
"""

from __future__ import annotations

import math

import grpc
import pytest
from bild.v1 import bild_pb2
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_util import start_server

pytestmark = pytest.mark.slow

# What a client may be told about its own bad request; anything else (UNKNOWN, INTERNAL, a timeout)
# is the server's fault.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
UINT32, UINT64 = 2**32 - 1, 2**64 - 1

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1e-30, 0.5, 1.0, 1e30, math.nan, math.inf, -math.inf]),
)
counts = st.one_of(st.integers(0, 12), st.sampled_from([20, 21, 255, 256, 257, 10_000, UINT32]))
# Protobuf strings are UTF-8: surrogates cannot be sent, everything else can (control characters too).
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
message = st.builds(
    bild_pb2.ChatMessage, role=st.one_of(st.sampled_from(["user", "assistant", "system"]), text), content=text
)


@st.composite
def requests(draw) -> bild_pb2.GenerateRequest:
    request = bild_pb2.GenerateRequest(
        max_new_tokens=draw(st.one_of(st.integers(0, 6), st.sampled_from([64, 65, UINT32]))),
        mode=draw(st.integers(-3, 8)),  # unknown enum values too
        request_id=draw(st.one_of(st.just(""), text)),
        top_k=draw(counts),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.booleans()),
        top_logprobs=draw(counts),
    )
    # Exactly one of prompt and messages is valid; send neither and both as well.
    shape = draw(st.sampled_from(["prompt", "messages", "neither", "both"]))
    if shape in ("prompt", "both"):
        request.prompt = draw(text)
    if shape in ("messages", "both"):
        request.messages.extend(draw(st.lists(message, max_size=4)))
    for name in ("fallback_threshold", "rollback_threshold", "temperature", "top_p", "repetition_penalty"):
        if draw(st.booleans()):
            setattr(request, name, draw(floats))
    if draw(st.booleans()):
        request.max_small_tokens = draw(counts)
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, UINT64))
    if draw(st.booleans()):
        request.batch_independent = draw(st.booleans())
    request.stop.extend(draw(st.lists(text, max_size=20)))
    request.stop_token_ids.extend(draw(st.lists(st.integers(0, UINT32), max_size=20)))
    return request


@pytest.fixture(scope="module")
def server(tiny_dirs, free_costs):
    proc = start_server(
        "--large",
        tiny_dirs["large"],
        "--small",
        tiny_dirs["draft"],
        "--context-length",
        "256",
        "--max-new-tokens",
        "8",
        "--max-new-tokens-limit",
        "64",
        "--cost-profile",
        free_costs,
    )
    proc.wait_serving()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def call(channel: grpc.Channel, raw: bytes) -> grpc.StatusCode:
    generate = channel.unary_stream(
        "/bild.v1.Generator/Generate",
        request_serializer=lambda b: b,
        response_deserializer=bild_pb2.GenerateResponse.FromString,
    )
    try:
        responses = list(generate(raw, timeout=60))
    except grpc.RpcError as error:
        assert error.code() in CLIENT_ERRORS, (error.code(), error.details())
        assert error.details(), "a status without a message"
        return error.code()
    assert responses and responses[-1].finish_reason != bild_pb2.FINISH_REASON_UNSPECIFIED
    return grpc.StatusCode.OK


SEEN_PROMPTS: list[str] = []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests())
def test_random_requests_get_an_answer(channel, request):
    if len(request.prompt) >= 24:
        SEEN_PROMPTS.append(request.prompt)
    call(channel, request.SerializeToString())


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_random_bytes_get_an_answer(channel, raw):
    assert call(channel, raw) in {grpc.StatusCode.OK, *CLIENT_ERRORS}


def test_the_server_is_unharmed_and_logs_no_prompt(server, channel):
    marker = "a private note about zebra-quartz-17"
    ok = bild_pb2.GenerateRequest(prompt=marker, max_new_tokens=3)
    assert call(channel, ok.SerializeToString()) == grpc.StatusCode.OK
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    log = "".join(server.log)
    assert marker not in log
    assert not [p for p in SEEN_PROMPTS if p in log]
    assert "Traceback" not in log, log[-3000:]
