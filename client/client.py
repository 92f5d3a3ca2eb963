"""An asyncio client for bild.v1.Generator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from bild import wire
from bild.v1 import bild_pb2, bild_pb2_grpc

Mode = bild_pb2.DecodingMode  # Mode.Value("DECODING_MODE_EXACT"), or the constants in bild_pb2
MODE_NAMES = wire.MODES  # "bild", "exact", "large", "small" -> DecodingMode


# A call refused with UNAVAILABLE (a draining replica, one behind a proxy) is tried again, where a
# balancer may send it elsewhere: gRPC retries only a call that has received nothing yet, so no
# stream is ever replayed after tokens arrived.
RETRY = {
    "methodConfig": [
        {
            "name": [{"service": "bild.v1.Generator"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
# Several replicas: round robin over those whose health is SERVING.
BALANCED = {**RETRY, "loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}


def _address_list(addresses: list[str]) -> str:
    """`ipv4:a:1,b:2` (or `ipv6:[::1]:1,...`): one channel over several literal addresses."""
    addresses = [a.strip() for a in addresses if a.strip()]
    scheme = "ipv6" if all(a.startswith("[") for a in addresses) else "ipv4"
    return f"{scheme}:{','.join(addresses)}"


class BildClient:
    """`async with BildClient("127.0.0.1:50051") as c: async for piece in c.generate("Hi"): ...`

    Several replicas: a list of `ip:port` addresses (or a comma-separated string of them), or, with
    `balance=True`, one name that resolves to several (`dns:///bild.default.svc:50051`, Kubernetes'
    headless Service). Calls are then spread round-robin over the replicas that report SERVING on grpc.health.v1, and
    a call turned away with UNAVAILABLE before it streamed anything (a draining replica) is retried
    on another.

    `tls=True` (implied by any of the PEM files) connects over TLS, trusting the system's roots or
    `ca_cert`; `client_cert`/`client_key` answer a server that asks for client certificates;
    `api_key` is sent as `authorization: Bearer <key>` with every call.
    """

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:50051",
        *,
        tls: bool = False,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        api_key: str | None = None,
        options: list[tuple[str, object]] | None = None,
        balance: bool | None = None,
    ) -> None:
        addresses = target.split(",") if isinstance(target, str) else list(target)
        target = addresses[0] if len(addresses) == 1 else _address_list(addresses)
        self.target = target
        balanced = balance or (balance is None and len(addresses) > 1)
        config = json.dumps(BALANCED if balanced else RETRY)
        options = [("grpc.service_config", config), ("grpc.enable_retries", 1), *(options or [])]
        if tls or ca_cert or client_cert:
            credentials = grpc.ssl_channel_credentials(
                *(Path(p).read_bytes() if p else None for p in (ca_cert, client_key, client_cert))
            )
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._stub = bild_pb2_grpc.GeneratorStub(self._channel)

    async def __aenter__(self) -> BildClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        max_new_tokens: int = 0,
        mode: str | int = 0,
        fallback_threshold: float | None = None,
        rollback_threshold: float | None = None,
        max_small_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        logprobs: bool = False,
        top_logprobs: int = 0,
        batch_independent: bool | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[bild_pb2.GenerateResponse]:
        """Yield the streamed responses; the last has finish_reason and stats. Raises grpc.aio.AioRpcError."""
        request = bild_pb2.GenerateRequest(
            prompt=prompt or "",
            messages=[bild_pb2.ChatMessage(**m) for m in messages or []],
            max_new_tokens=max_new_tokens,
            mode=MODE_NAMES[mode] if isinstance(mode, str) else mode,
            request_id=request_id,
            top_k=top_k,
            stop=stop or [],
            stop_token_ids=stop_token_ids or [],
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        for field, value in (
            ("fallback_threshold", fallback_threshold),
            ("rollback_threshold", rollback_threshold),
            ("max_small_tokens", max_small_tokens),
            ("temperature", temperature),
            ("top_p", top_p),
            ("repetition_penalty", repetition_penalty),
            ("seed", seed),
            ("batch_independent", batch_independent),
        ):
            if value is not None:
                setattr(request, field, value)
        call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()  # a no-op once finished; frees the server's slot if the caller stops early

    async def complete(self, prompt: str | None = None, **kwargs) -> tuple[str, list[int], bild_pb2.GenerateResponse]:
        """The whole generation: (text, token ids, last response)."""
        text, ids, last = [], [], None
        async for response in self.generate(prompt, **kwargs):
            text.append(response.text)
            ids.extend(response.token_ids)
            last = response
        return "".join(text), ids, last

    async def model_info(self, timeout: float | None = None) -> bild_pb2.ModelInfo:
        return await self._stub.GetModelInfo(bild_pb2.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def load(self, timeout: float | None = None) -> bild_pb2.Load:
        """How busy the server (with several targets: the replica this call lands on) is."""
        return await self._stub.GetLoad(bild_pb2.GetLoadRequest(), timeout=timeout, metadata=self._metadata)


async def least_loaded(targets: Sequence[str], timeout: float = 2.0, **client_options) -> str:
    """The target among `targets` that is serving and has the lowest utilization (GetLoad): for a
    client that picks a replica per conversation rather than balancing call by call."""

    async def ask(target: str) -> tuple[float, str] | None:
        try:
            async with BildClient(target, balance=False, **client_options) as client:
                load = await client.load(timeout=timeout)
        except grpc.aio.AioRpcError:
            return None
        return (load.utilization, target) if load.serving else None

    answers = [a for a in await asyncio.gather(*(ask(t) for t in targets)) if a is not None]
    if not answers:
        raise ConnectionError(f"no replica is serving among {list(targets)}")
    return min(answers)[1]
