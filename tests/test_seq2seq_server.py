"""An encoder-decoder pair (tiny random T5s sharing a tokenizer without a chat template) served by a
real bild-server on loopback, through the real client and the OpenAI-compatible HTTP endpoint."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import torch

from client import BildClient
from tests import tiny
from tests.engine_util import greedy_reference
from tests.server_util import fetch, start_http_server

pytestmark = pytest.mark.slow

EOS = tiny.SPECIALS.index(tiny.EOS)


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("t5")
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = None  # T5 and Marian tokenizers have none
    large = tiny.build_t5(seed=1, gated=True)
    return {
        "large": tiny.save(large, tokenizer, root / "large"),
        "draft": tiny.save(tiny.noisy_copy(large, 0.01, seed=2), tokenizer, root / "draft"),
    }


@pytest.fixture(scope="module")
def server(pair_dirs, free_costs):
    proc, base = start_http_server(
        "--large", pair_dirs["large"], "--small", pair_dirs["draft"], "--cost-profile", free_costs
    )
    proc.base = base
    yield proc
    assert proc.stop() == 0


def call(target: str, coro):
    async def go():
        async with BildClient(target) as client:
            return await coro(client)

    return asyncio.run(go())


def reference(directory: str, text: str, n: int) -> list[int]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(directory, dtype=torch.float32).eval()
    return greedy_reference(model, AutoTokenizer.from_pretrained(directory).encode(text), n, EOS)


def test_model_info_says_encoder_decoder(server):
    info = call(server.target, lambda c: c.model_info())
    assert info.encoder_decoder and not info.has_chat_template


@pytest.mark.parametrize("mode", ["exact", "large"])
def test_the_prompt_is_the_source_and_exact_equals_generate(server, pair_dirs, mode):
    text = "Translate to French: good morning, my friend!"
    expected = reference(pair_dirs["large"], text, 20)

    async def many(client):
        # Several at once, joining the batch together, each equal to the large model's own output.
        return await asyncio.gather(*[client.complete(text, max_new_tokens=20, mode=mode) for _ in range(3)])

    for _text, ids, last in call(server.target, many):
        assert ids == expected
        assert last.stats.prompt_tokens == len(tiny.build_tokenizer().encode(text))


def test_a_user_message_is_the_source_without_a_chat_template(server, pair_dirs):
    text = "The quick brown fox jumps over the lazy dog."
    expected = reference(pair_dirs["large"], "Summarize: " + text, 12)
    messages = [{"role": "system", "content": "Summarize:"}, {"role": "user", "content": text}]
    _text, ids, _ = call(server.target, lambda c: c.complete(messages=messages, max_new_tokens=12, mode="exact"))
    assert ids == expected
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again"},
    ]
    late_system = [{"role": "user", "content": "hello"}, {"role": "system", "content": "Summarize:"}]
    for messages in (conversation, late_system):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            call(server.target, lambda c, m=messages: c.complete(messages=m, max_new_tokens=4))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one user message" in error.value.details()


def test_bild_mode_drafts_and_streams(server):
    async def stream(client):
        return [r async for r in client.generate("Big Little Decoder", max_new_tokens=24, mode="bild", ignore_eos=True)]

    responses = call(server.target, stream)
    assert sum(len(r.token_ids) for r in responses) == 24 and responses[-1].stats.small_tokens > 0
    assert len([r for r in responses if r.token_ids]) > 1  # tokens arrive as they settle, not all at the end


def test_openai_chat_completion_on_an_encoder_decoder(server, pair_dirs):
    text = "def add(a, b): return a + b"
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 10, "mode": "exact"}
    status, reply = fetch(server.base + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, reply
    answer = json.loads(reply)["choices"][0]["message"]["content"]
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(pair_dirs["large"]).decode(
        reference(pair_dirs["large"], text, 10), skip_special_tokens=True
    )
    assert answer == expected
