"""The OpenAI-compatible HTTP API (--http-port) end to end, through the official `openai` client.

A real bild-server subprocess on tiny models: the same engine serves gRPC and HTTP, so greedy
output over HTTP equals gRPC's for the same request, and HTTP errors carry OpenAI's shape and status.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from bild.v1 import bild_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from client import BildClient
from server.openai_api import UNSUPPORTED, OpenAIError, translate
from tests.server_util import fetch, scrape, start_http_server

pytestmark = pytest.mark.slow

KEY = "test-key-1"
SERVER_ARGS = ["--context-length", "1024", "--max-new-tokens-limit", "1000", "--fallback-threshold", "0.2"]


ORIGIN = "https://chat.example.com"


@pytest.fixture(scope="module")
def http(tiny_dirs, free_costs):
    """One KV slot and no queue: a request that leaked its slot makes the next one fail with 429."""
    server, base = start_http_server(
        "--large", tiny_dirs["large"], "--small", tiny_dirs["draft"], "--max-batch-size", "1", "--max-waiting", "0",
        "--metrics-port", "0", "--api-key", KEY, "--drain-delay", "0", "--cost-profile", free_costs,
        "--cors-origin", ORIGIN, *SERVER_ARGS,
    )  # fmt: skip
    server.base = base
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(http):
    with openai.OpenAI(base_url=http.base + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    (card,) = client.models.list().data
    return card.id


def grpc_text(target: str, **kw) -> tuple[str, bild_pb2.GenerateResponse]:
    async def go():
        async with BildClient(target, api_key=KEY) as c:
            text, _ids, last = await c.complete(**kw)
            return text, last

    return asyncio.run(go())


def metrics(http) -> dict[str, float]:
    return scrape(http.base, KEY)


def test_models_and_health(http, client, model, tiny_dirs):
    assert model == tiny_dirs["large"]
    card = client.models.retrieve(model)
    assert card.id == model and card.bild["small_model"] == tiny_dirs["draft"]
    status, body = fetch(http.base + "/health")  # no key needed
    assert status == 200 and json.loads(body) == {"status": "serving"}


def test_chat_equals_grpc_and_carries_usage_and_bild_stats(http, client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, extra_body={"mode": "exact", "ignore_eos": True}
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert answer.usage.completion_tokens == 24 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 24
    stats = answer.bild
    assert stats["generated_tokens"] == 24 and stats["small_tokens"] + stats["large_tokens"] >= 24
    text, last = grpc_text(
        http.target, messages=messages, max_new_tokens=24, mode="exact", ignore_eos=True
    )  # the same engine path
    assert choice.message.content == text
    assert last.stats.prompt_tokens == answer.usage.prompt_tokens
    # The second time, the prompt came from the prefix cache (all but its last token, fed for the first
    # token's logits), and the metrics count the hit.
    assert last.stats.cached_prompt_tokens == answer.usage.prompt_tokens - 1
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=2, extra_body={"mode": "large"})
    assert again.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens - 1
    samples = metrics(http)
    assert samples['bild_prefix_cache_lookups_total{result="hit"}'] >= 2
    assert samples['bild_prefix_cache_tokens_total{kind="cached"}'] >= 2 * (answer.usage.prompt_tokens - 1)


def test_chat_stream_gives_the_same_text_and_ends_with_usage(client, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "Tell me more."}], max_completion_tokens=30)
    whole = client.chat.completions.create(**kw, extra_body={"mode": "large"})
    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}, extra_body={"mode": "large"}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finish[0].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].bild["generated_tokens"] == whole.usage.completion_tokens
    # Every chunk tells how many tokens so far came from each model (the page shows it live).
    live = [c.bild for c in chunks[1:-2]]
    assert all("small_tokens" in b and "large_tokens" in b for b in live)
    assert [b["generated_tokens"] for b in live] == sorted(b["generated_tokens"] for b in live)


def test_completions_stream_and_not_with_logprobs(client, model):
    kw = dict(model=model, prompt="Big Little Decoder", max_tokens=12, seed=7, temperature=0.8, logprobs=2)
    extra = {"mode": "exact", "ignore_eos": True}
    whole = client.completions.create(**kw, extra_body=extra)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert all(len(top) <= 2 for top in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    # A seeded request repeats its output: streamed, it is the same text.
    chunks = list(client.completions.create(**kw, stream=True, extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12


def test_chat_logprobs_and_stop_strings(client, model):
    messages = [{"role": "user", "content": "Write something long."}]
    base = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, logprobs=True, top_logprobs=3, extra_body={"mode": "large"}
    )
    content = base.choices[0].logprobs.content
    assert len(content) == base.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob for entry in content)
    text = base.choices[0].message.content
    stop = text[len(text) // 2 :][:3]  # three characters from the middle of the greedy text
    cut = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, stop=[stop], extra_body={"mode": "large"}
    )
    assert cut.choices[0].finish_reason == "stop" and cut.bild["stop_reason"] == stop
    assert cut.choices[0].message.content == text[: text.index(stop)]


def cors_request(url: str, method: str, origin: str, headers: dict[str, str] | None = None, data=None):
    request = urllib.request.Request(url, data, {"Origin": origin, **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.headers


def test_pages_of_an_allowed_origin_may_call_the_api_from_a_browser(http, model):
    url = http.base + "/v1/chat/completions"
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    # A browser's preflight carries no key, and must not need one.
    status, headers = cors_request(url, "OPTIONS", ORIGIN, preflight)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "AUTHORIZATION" in headers["Access-Control-Allow-Headers"].upper()
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, headers = cors_request(url, "POST", ORIGIN, auth, body)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    # Another origin gets no permission; the request itself still needs its key.
    status, headers = cors_request(url, "OPTIONS", "https://elsewhere.example", preflight)
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers = cors_request(url, "POST", "https://elsewhere.example", auth, body)
    assert "Access-Control-Allow-Origin" not in headers
    assert cors_request(url, "POST", ORIGIN, {"Content-Type": "application/json"}, body)[0] == 401


def test_errors_have_openai_shape_and_status(http, client, model):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=messages, n=2)
    assert error.value.status_code == 400 and "n=2" in error.value.message and error.value.param == "n"
    with pytest.raises(openai.BadRequestError) as error:  # the service's own validation, shared with gRPC
        client.chat.completions.create(model=model, messages=messages, max_tokens=5000)
    assert "above this server's limit" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "beep"}])
    assert "role" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=messages, extra_body={"fallback_threshold": 2})
    assert "fallback_threshold" in error.value.message
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert error.value.code == "model_not_found"
    with openai.OpenAI(base_url=http.base + "/v1", api_key="wrong", max_retries=0) as intruder:
        with pytest.raises(openai.AuthenticationError) as error:
            intruder.chat.completions.create(model=model, messages=messages)
        assert error.value.status_code == 401 and "API key" in error.value.message
        with pytest.raises(openai.AuthenticationError):
            intruder.models.list()
    status, body = fetch(http.base + "/v1/chat/completions", b"{not json", KEY)
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert fetch(http.base + "/metrics")[0] == 401  # metrics need the key too


def wait_for_a_free_slot(http, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (gauges := metrics(http))["bild_engine_running"] or gauges["bild_engine_free_slots"] != 1:
        assert time.monotonic() < deadline, f"a finished or dropped request still holds its slot: {gauges}"
        time.sleep(0.05)


def test_a_full_engine_answers_429_and_a_dropped_stream_frees_its_slot(http, client, model):
    wait_for_a_free_slot(http)  # a request ended by a stop string is cancelled in the engine just after
    cancelled = 'bild_requests_total{mode="bild",outcome="cancelled"}'
    before = metrics(http).get(cancelled, 0)
    long = dict(model=model, messages=[{"role": "user", "content": "go on"}], max_tokens=900)
    stream = client.chat.completions.create(**long, stream=True, extra_body={"ignore_eos": True, "mode": "bild"})
    pieces = []
    for chunk in stream:
        pieces.append(chunk)
        if len(pieces) == 3:
            break
    # The only slot is taken and nothing may wait: the next request is turned away.
    with pytest.raises(openai.RateLimitError) as error:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "me too"}], max_tokens=2)
    assert error.value.status_code == 429
    assert metrics(http)["bild_engine_running"] == 1
    stream.close()  # the client disconnects mid-stream
    wait_for_a_free_slot(http)
    assert metrics(http)[cancelled] == before + 1  # cancelled, not run to its end
    again = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "free?"}], max_tokens=3)
    assert again.usage.completion_tokens >= 1


def test_draining_reports_503_on_health_and_still_serves_calls(tiny_dirs):
    server, base = start_http_server("--large", tiny_dirs["large"], "--no-small", "--drain-delay", "3", "--grace", "30")
    try:
        with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30) as c:
            model = c.models.list().data[0].id
            stream = c.completions.create(
                model=model, prompt="drain me", max_tokens=150, stream=True, extra_body={"ignore_eos": True}
            )
            first = next(iter(stream))
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert fetch(base + "/health") == (503, '{"status": "draining"}')
            # Within the drain delay a new call is served in full (load balancers move away by health).
            during = c.completions.create(
                model=model, prompt="a new call", max_tokens=4, extra_body={"ignore_eos": True}
            )
            assert during.usage.completion_tokens == 4
            rest = list(stream)  # the stream in flight finishes within the grace period
        assert rest[-1].choices[0].finish_reason == "length" and rest[-1].usage.completion_tokens == 150
        assert first.id == rest[-1].id
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_an_engine_failure_mid_stream_arrives_as_an_error_event(tiny_dirs):
    from tests.test_lifecycle import children

    server, base = start_http_server("--large", tiny_dirs["large"], "--no-small", "--drain-delay", "0")
    try:
        cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children(server.proc.pid)}
        engine = next(pid for pid, cmdline in cmdlines.items() if b"spawn_main" in cmdline)
        with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30) as c:
            model = c.models.list().data[0].id
            stream = c.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "doomed"}],
                max_tokens=900,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            next(iter(stream))
            os.kill(engine, signal.SIGKILL)
            with pytest.raises(openai.APIError) as error:  # the client raises on an `error` event
                list(stream)
        assert "engine process died" in error.value.message
        assert server.proc.wait(60) == 1
    finally:
        server.stop()


# ---- the translation alone -------------------------------------------------------------------


def test_translation_maps_openai_fields_onto_a_generate_request():
    call = translate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
            "stop": "END",
            "logprobs": True,
            "top_logprobs": 2,
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "mode": "exact",
            "fallback_threshold": 0.3,
            "rollback_threshold": 2,
            "user": "ignored",
        },
        chat=True,
    )
    r = call.request
    assert [(m.role, m.content) for m in r.messages] == [("system", "Be brief."), ("user", "Hi there")]
    assert r.max_new_tokens == 20 and r.seed == 3 and list(r.stop) == ["END"]
    assert r.temperature == pytest.approx(0.5) and r.top_p == pytest.approx(0.9)
    assert r.mode == bild_pb2.DECODING_MODE_EXACT
    assert r.fallback_threshold == pytest.approx(0.3) and r.rollback_threshold == 2
    assert r.logprobs and r.top_logprobs == 2 and call.stream and call.include_usage
    completion = translate({"prompt": ["Once"], "logprobs": 0, "max_tokens": 5}, chat=False)
    assert completion.request.prompt == "Once" and completion.request.logprobs and completion.logprobs
    assert not translate({"prompt": "x"}, chat=False).request.HasField("temperature")  # unset: greedy


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}, "logit_bias"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed"),
        ({"messages": [{"role": "user", "content": "x"}], "mode": "fast"}, "mode"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
    ],
)
def test_translation_refuses_what_it_cannot_honour(body, param):
    with pytest.raises(OpenAIError) as error:
        translate(body, chat=True)
    assert error.value.status == 400 and error.value.param == param


def test_completions_refuse_echo_best_of_and_token_prompts():
    for body in ({"prompt": "x", "echo": True}, {"prompt": "x", "best_of": 2}, {"prompt": [1, 2, 3]}):
        with pytest.raises(OpenAIError):
            translate(body, chat=False)


def test_grpc_status_codes_map_to_http():
    for code, status in [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.INTERNAL, 500),
    ]:
        error = OpenAIError.from_status(code, "m")
        assert error.status == status and error.body()["error"]["message"] == "m"


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(categories=["L", "N", "P", "Zs", "Cs"]), max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)
OPENAI_FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p"]
OPENAI_FIELDS += ["seed", "stop", "logprobs", "top_logprobs", "stream", "stream_options", "user", *UNSUPPORTED]
BILD_FIELDS = ["mode", "fallback_threshold", "top_k", "stop_token_ids", "ignore_eos", "batch_independent"]
FIELDS = st.sampled_from(OPENAI_FIELDS + BILD_FIELDS)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", 3]), "content": JSON | st.text()})


@given(st.dictionaries(FIELDS, JSON, max_size=8), st.lists(MESSAGE, max_size=3), st.booleans())
@settings(max_examples=400, deadline=None)
def test_any_json_translates_to_a_request_or_a_400(body, messages, chat):
    if messages and chat:
        body = {**body, "messages": messages}
    try:
        call = translate(body, chat=chat)
    except OpenAIError as error:
        assert error.status == 400 and error.body()["error"]["message"]
    else:
        bild_pb2.GenerateRequest.FromString(call.request.SerializeToString())
