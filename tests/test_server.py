"""The gRPC service end to end: a real bild-server subprocess on loopback, the real client."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from bild.v1 import bild_pb2
from transformers import AutoTokenizer

from client import BildClient
from tests.server_util import start_server

pytestmark = pytest.mark.slow

SERVER_ARGS = ["--context-length", "512", "--max-new-tokens-limit", "256", "--fallback-threshold", "0.2"]


@pytest.fixture(scope="module")
def server_args(free_costs) -> list[str]:
    # Tiny models cost the same to run, where drafts never pay: plan as if checking them were free,
    # so that the small model takes part at any load.
    return [*SERVER_ARGS, "--cost-profile", free_costs]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dirs, server_args):
    metrics_port = free_port()
    proc = start_server(
        "--large",
        tiny_dirs["large"],
        "--small",
        tiny_dirs["draft"],
        "--max-batch-size",
        "16",
        "--metrics-port",
        str(metrics_port),
        *server_args,
    )
    proc.metrics_port = metrics_port
    proc.wait_serving()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def narrow_server(tiny_dirs, server_args):
    """One slot only: a request that leaked its slot would block every later one. One request may wait."""
    proc = start_server(
        "--large", tiny_dirs["large"], "--small", tiny_dirs["draft"], "--max-batch-size", "1", "--max-waiting", "1",
        *server_args,
    )  # fmt: skip
    proc.wait_serving()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["large"])


def complete(target: str, prompt=None, **kw):
    async def go():
        async with BildClient(target) as client:
            return await client.complete(prompt, **kw)

    return asyncio.run(go())


def test_stream_settles_tokens_and_ends_with_stats(server, tokenizer):
    async def go():
        async with BildClient(server.target) as client:
            return [r async for r in client.generate("Big Little Decoder", max_new_tokens=40, mode="exact")]

    responses = asyncio.run(go())
    assert len(responses) > 1
    assert all(r.finish_reason == bild_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason in (bild_pb2.FINISH_REASON_EOS, bild_pb2.FINISH_REASON_LENGTH)
    ids = [t for r in responses for t in r.token_ids]
    assert last.stats.generated_tokens == len(ids) and last.stats.prompt_tokens > 0
    assert last.stats.small_tokens + last.stats.large_tokens >= len(ids)
    assert "".join(r.text for r in responses) == tokenizer.decode(ids, skip_special_tokens=True)


def test_concurrent_streams_get_what_they_get_alone(server, tokenizer):
    prompts = [("word " * n).strip() + f" #{n}" for n in range(1, 17)]
    lengths = [8 + 3 * i for i in range(16)]

    async def go():
        async with BildClient(server.target) as client:
            together = await asyncio.gather(
                *[client.complete(p, max_new_tokens=n, mode="exact") for p, n in zip(prompts, lengths)]
            )
            alone = [await client.complete(p, max_new_tokens=n, mode="large") for p, n in zip(prompts, lengths)]
        return together, alone

    together, alone = asyncio.run(go())
    for (text, ids, last), (text_alone, ids_alone, _) in zip(together, alone):
        assert ids == ids_alone and text == text_alone
        assert last.stats.small_tokens > 0  # the draft did contribute


def test_chat_messages_use_the_chat_template(server, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    _, _, last = complete(server.target, messages=messages, max_new_tokens=4, mode="large")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert last.stats.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_model_info(server, tiny_dirs):
    async def go():
        async with BildClient(server.target) as client:
            return await client.model_info()

    info = asyncio.run(go())
    assert info.large_model == tiny_dirs["large"] and info.small_model == tiny_dirs["draft"]
    assert info.context_length == 512 and info.max_new_tokens_limit == 256 and info.max_batch_size == 16
    assert info.default_mode == bild_pb2.DECODING_MODE_BILD and info.has_chat_template
    assert info.vocab_size == 512 and info.device == "cpu" and info.dtype == "float32"


BAD_REQUESTS = [
    (dict(), "no prompt"),
    (dict(prompt=""), "no prompt"),
    (dict(prompt="hi", max_new_tokens=257), "above this server's limit"),
    (dict(prompt="hi", fallback_threshold=1.5), "fallback_threshold"),
    (dict(prompt="hi", rollback_threshold=-1.0), "rollback_threshold"),
    (dict(prompt="hi", rollback_threshold=float("nan")), "rollback_threshold"),
    (dict(prompt="hi", max_small_tokens=0), "max_small_tokens"),
    (dict(prompt="hi", mode=9), "unknown mode"),
    (dict(prompt="word " * 600), "context length"),
    (dict(prompt="x" * 100_000), "longer than the context"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "hi"}]), "not both"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "role"),
]


@pytest.mark.parametrize("kw, message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(server, kw, message):
    prompt = kw.pop("prompt", None)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        complete(server.target, prompt, **kw)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    _text, ids, _last = complete(server.target, "still there?", max_new_tokens=3, mode="large")
    assert len(ids) >= 1


def test_cancel_mid_stream_frees_the_slot(narrow_server):
    async def go():
        async with BildClient(narrow_server.target) as client:
            seen = 0
            async for response in client.generate("a long one", max_new_tokens=250, mode="bild"):
                seen += len(response.token_ids)
                if seen >= 3:
                    break  # leaving the loop cancels the call
            # The only slot must be free again, or this waits until the timeout.
            return await client.complete("next", max_new_tokens=5, mode="large", timeout=60)

    _, ids, _ = asyncio.run(go())
    assert ids


def test_deadline_ends_the_stream_and_frees_the_slot(narrow_server):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        complete(narrow_server.target, "slow", max_new_tokens=250, mode="exact", fallback_threshold=1.0, timeout=0.1)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _, ids, _ = complete(narrow_server.target, "next", max_new_tokens=5, mode="large", timeout=60)
    assert ids


def reflect(target: str, protocol: str, symbol: str):
    """One raw reflection request, as grpcurl and ghz send it."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{protocol}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        (response,) = list(call(iter([request]), timeout=10))
    if response.HasField("error_response"):
        return grpc.StatusCode.NOT_FOUND if response.error_response.error_code == 5 else response.error_response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(b).name
        for b in response.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("protocol", ["v1", "v1alpha"])
def test_reflection_answers_method_lookups(server, protocol):
    """grpcurl and ghz ask grpc.reflection.v1 first, then v1alpha; both answer member symbols."""
    for symbol in (
        "bild.v1.Generator.Generate",
        "bild.v1.Generator",
        "bild.v1.GenerateRequest.prompt",
        "bild.v1.DecodingMode.DECODING_MODE_EXACT",
        "grpc.health.v1.Health.Check",
    ):
        assert reflect(server.target, protocol, symbol)[0].endswith(".proto"), symbol
    assert "bild/v1/bild.proto" in reflect(server.target, protocol, "bild.v1.Generator.Generate")
    for missing in ("bild.v1.Generator.NoSuchMethod", "bild.v1.Nope", "nope"):
        assert reflect(server.target, protocol, missing) == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "bild.v1.Generator" in services and "grpc.health.v1.Health" in services


def test_client_cli_streams_json_and_stats(server):
    host, port = server.target.split(":")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "client.cli",
            "hello",
            "--host",
            host,
            "--port",
            port,
            "--mode",
            "exact",
            "--max-new-tokens",
            "12",
            "--json",
            "--stats",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[-1]["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")
    assert json.loads(out.stderr)["generated_tokens"] == sum(len(x.get("token_ids", [])) for x in lines)
    bad = subprocess.run(
        [sys.executable, "-m", "client.cli", "", "--host", host, "--port", port],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


def test_resource_exhausted_when_the_queue_is_full(narrow_server):
    async def go():
        async with BildClient(narrow_server.target) as client:
            busy = dict(max_new_tokens=200, mode="exact", fallback_threshold=1.0)
            calls = [client.complete("busy", **busy) for _ in range(4)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(go())
    codes = [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert any(not isinstance(r, Exception) for r in results)


def test_generated_stubs_match_the_proto(tmp_path):
    from pathlib import Path

    from grpc_tools import protoc

    root = Path(__file__).resolve().parent.parent / "proto"
    args = [
        "protoc",
        f"-I{root}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(root / "bild/v1/bild.proto"),
    ]
    assert protoc.main(args) == 0
    for name in ("bild_pb2.py", "bild_pb2.pyi", "bild_pb2_grpc.py"):
        fresh = _without_version_stamps((tmp_path / "bild/v1" / name).read_text())
        committed = _without_version_stamps((root / "bild/v1" / name).read_text())
        assert fresh == committed, f"{name} drifted from bild.proto: run `make proto`"


def _without_version_stamps(code: str) -> str:
    """Generated code less the generator's version, which a patch release of grpcio-tools or protobuf
    changes while the code stays the same (the stubs check the runtime against it at import)."""
    import re

    code = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = ...", code)
    code = re.sub(r"# Protobuf Python Version: \S+", "# Protobuf Python Version: ...", code)
    runtime = r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"
    return re.sub(runtime, r"\1 ...", code)


def test_version_stamps_are_all_that_the_stubs_check_ignores():
    """The comparison above would pass anything if _without_version_stamps ate code."""
    stub = "GRPC_GENERATED_VERSION = '1.85.1'\nclass GeneratorStub:\n"
    assert _without_version_stamps(stub) != _without_version_stamps(stub.replace("Generator", "Other"))
    assert _without_version_stamps(stub) == _without_version_stamps(stub.replace("1.85.1", "1.85.4"))
    pb2 = "_runtime_version.ValidateProtobufRuntimeVersion(\n _runtime_version.Domain.PUBLIC,\n 7,\n 35,\n 1,"
    assert _without_version_stamps(pb2) == _without_version_stamps(pb2.replace("35", "36"))


def test_prometheus_metrics(server):
    import urllib.request

    complete(server.target, "metrics please", max_new_tokens=6, mode="exact")
    with pytest.raises(grpc.aio.AioRpcError):
        complete(server.target, "", max_new_tokens=6)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    finished = sum(
        v
        for k, v in samples.items()
        if k.startswith('bild_requests_total{mode="exact",outcome="') and ("length" in k or "eos" in k)
    )
    assert finished >= 1
    assert (
        sum(v for k, v in samples.items() if 'outcome="invalid_argument"' in k and k.startswith("bild_requests_total"))
        >= 1
    )
    assert samples["bild_engine_free_slots"] == 16 and samples["bild_engine_running"] == 0
    assert samples["bild_engine_iterations_total"] > 0
    assert 0 < samples["bild_engine_forward_seconds_total"] <= samples["bild_engine_busy_seconds_total"]
    assert samples['bild_generated_tokens_total{mode="exact",source="large"}'] >= 1


def test_stop_string_across_tokens_ends_the_stream_before_it(server, tokenizer):
    text, ids, _ = complete(server.target, "stop here", max_new_tokens=40, mode="large", ignore_eos=True)
    pieces = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    # A stop string that starts inside one token and ends inside a later one.
    # (Random weights emit stray bytes; keep clear of the replacement characters they decode to.)
    i = next(
        i
        for i in range(3, len(ids) - 1)
        if len(pieces[i]) - len(pieces[i - 1]) >= 2
        and len(pieces[i + 1]) - len(pieces[i]) >= 1
        and "\ufffd" not in pieces[i + 1][len(pieces[i - 1]) :]
    )
    stop = pieces[i][-2:] + pieces[i + 1][len(pieces[i]) :][:1]
    cut = text.find(stop)

    async def go():
        async with BildClient(server.target) as client:
            return [
                r
                async for r in client.generate(
                    "stop here",
                    max_new_tokens=40,
                    mode="exact",
                    ignore_eos=True,
                    stop=["never-appears", stop],
                    logprobs=True,
                )
            ]

    responses = asyncio.run(go())
    last = responses[-1]
    assert "".join(r.text for r in responses) == text[:cut]
    assert last.finish_reason == bild_pb2.FINISH_REASON_STOP and last.stop_reason == stop
    sent = [t for r in responses for t in r.token_ids]
    assert sent == ids[: len(sent)] and stop in tokenizer.decode(sent) and stop not in tokenizer.decode(sent[:-1])
    assert last.stats.generated_tokens == len(sent)
    assert sum(len(r.logprobs) for r in responses) == len(sent)


def test_sampling_with_a_seed_is_reproducible_over_grpc(server):
    kw = dict(max_new_tokens=30, mode="exact", temperature=1.0, top_p=0.9, seed=7, logprobs=True, top_logprobs=2)
    first = complete(server.target, "sample", **kw)
    second = complete(server.target, "sample", **kw)
    assert first[1] == second[1] and first[0] == second[0]
    other = complete(server.target, "sample", **{**kw, "seed": 8})
    assert other[1] != first[1]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_logprobs=50), "top_logprobs"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop_token_ids=[10**6]), "stop_token_ids"),
        (dict(stop=["x"] * 40), "stop strings"),
        (dict(temperature=1e-40), "temperature"),
        (dict(request_id="x" * 500), "request_id"),
        (dict(request_id="a\nb"), "request_id"),
    ],
)
def test_bad_sampling_requests_are_invalid_argument(server, kw, message):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        complete(server.target, "hi", **kw)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()


def test_load_generator_prints_a_summary(server):
    out = subprocess.run(
        [
            sys.executable,
            "bench/load.py",
            "--target",
            server.target,
            "-c",
            "4",
            "-n",
            "8",
            "--max-new-tokens",
            "8",
            "--mode",
            "exact",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Count:        8" in out.stdout and "[OK]  8 responses" in out.stdout
    assert "| first token |" in out.stdout


def test_default_max_new_tokens_is_cut_to_the_room_left(server, tokenizer):
    # 512-token context, default 256 new tokens: a long prompt still gets an answer without asking.
    prompt = "word "
    while len(tokenizer.encode(prompt + "word ")) < 480:
        prompt += "word "
    _text, ids, last = complete(server.target, prompt, mode="large", ignore_eos=True)
    assert last.stats.prompt_tokens >= 470 and len(ids) == 512 - last.stats.prompt_tokens


@pytest.mark.parametrize(
    "raw, what",
    [
        (b"\x0a\x02\xff\xfe", "invalid UTF-8 in prompt"),
        (b"\x0a\x05ab", "a length past the end"),
        (b"\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "a varint of 11 bytes"),
    ],
)
def test_a_request_that_does_not_parse_gets_invalid_argument(server, raw, what):
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_stream(
            "/bild.v1.Generator/Generate",
            request_serializer=lambda b: b,
            response_deserializer=bild_pb2.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as error:
            list(call(raw, timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert "not a valid bild.v1.GenerateRequest" in error.value.details()
        # GetModelInfoRequest has no fields: a string field 1 is an unknown field it keeps, not an error.
        if what != "invalid UTF-8 in prompt":
            info = channel.unary_unary(
                "/bild.v1.Generator/GetModelInfo",
                request_serializer=lambda b: b,
                response_deserializer=bild_pb2.ModelInfo.FromString,
            )
            with pytest.raises(grpc.RpcError) as error:
                info(raw, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server is unharmed.
    assert complete(server.target, "still here", max_new_tokens=4)[1]


def test_invariant_kernels_reach_the_engine(tiny_dirs, server_args):
    proc = start_server(
        "--large", tiny_dirs["large"], "--small", tiny_dirs["draft"], "--invariant-kernels", *server_args
    )
    try:
        proc.wait_serving()
        _, large, _ = complete(proc.target, "the same tokens", max_new_tokens=12, mode="large", ignore_eos=True)
        _, exact, last = complete(proc.target, "the same tokens", max_new_tokens=12, mode="exact", ignore_eos=True)
        assert exact == large and last.stats.small_tokens > 0
        assert any("invariant kernels for the large model" in line for line in proc.log)
    finally:
        assert proc.stop() == 0


# ---- a client in another language (Node.js, @grpc/grpc-js) that knows bild only through reflection ----

JS = Path(__file__).with_name("js")


@pytest.fixture(scope="module")
def node_modules():
    if not (JS / "node_modules" / "grpc-js-reflection-client").is_dir():
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=600)


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs Node.js and npm")
def test_node_client_finds_generate_by_reflection_and_streams(server, node_modules):
    out = subprocess.run(
        ["node", "generate.js", server.target, "Hello from Node", "24"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    text, ids, _ = complete(server.target, "Hello from Node", max_new_tokens=24, mode="large")
    assert "bild.v1.Generator" in result["services"]
    assert result["token_ids"] == ids and result["text"] == text
    assert result["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")
