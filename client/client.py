"""An asyncio client for bild.v1.Generator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from bild.v1 import bild_pb2, bild_pb2_grpc

Mode = bild_pb2.DecodingMode  # Mode.Value("DECODING_MODE_EXACT"), or the constants in bild_pb2
MODE_NAMES = {"bild": bild_pb2.DECODING_MODE_BILD, "exact": bild_pb2.DECODING_MODE_EXACT,
              "large": bild_pb2.DECODING_MODE_LARGE, "small": bild_pb2.DECODING_MODE_SMALL}


class BildClient:
    """`async with BildClient("127.0.0.1:50051") as c: async for piece in c.generate("Hi"): ...`

    `tls=True` (implied by any of the PEM files) connects over TLS, trusting the system's roots or
    `ca_cert`; `client_cert`/`client_key` answer a server that asks for client certificates;
    `api_key` is sent as `authorization: Bearer <key>` with every call.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        tls: bool = False,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        api_key: str | None = None,
        options: list[tuple[str, object]] | None = None,
    ) -> None:
        self.target = target
        if tls or ca_cert or client_cert:
            read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
            credentials = grpc.ssl_channel_credentials(read(ca_cert), read(client_key), read(client_cert))
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
