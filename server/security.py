"""Transport security and API keys for bild-server.

TLS comes from grpc's own credentials (`--tls-cert/--tls-key`, and `--tls-client-ca` to require
client certificates). API keys are checked by a server interceptor: a call to the Generator service
must carry `authorization: Bearer <key>` metadata with one of the configured keys. Health checking
and reflection stay open, so that probes and tools such as grpcurl work without a key (reflection
only tells what the public .proto file already says).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

PROTECTED_PREFIX = "/bild.v1.Generator/"


@dataclass(frozen=True)
class SecurityConfig:
    tls_cert: str = ""  # PEM certificate chain of the server
    tls_key: str = ""  # its PEM private key
    tls_client_ca: str = ""  # PEM CA bundle: clients must present a certificate it signed
    api_keys: tuple[str, ...] = field(default_factory=tuple)
    insecure: bool = False  # allow a non-loopback address with neither TLS nor keys
    # Web origins whose pages may call the HTTP API from a browser (CORS); "*" for any.
    cors_origins: tuple[str, ...] = field(default_factory=tuple)

    def check(self, host: str) -> None:
        """Raise ValueError for settings that cannot work or that would expose the server openly."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if path and not Path(path).is_file():
                raise ValueError(f"no such file: {path}")
        for origin in self.cors_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(
                    f"--cors-origin {origin!r}: give a scheme and host, e.g. https://chat.example.com, or *"
                )
        if any(not key or any(c.isspace() for c in key) for key in self.api_keys):
            raise ValueError("an API key must be non-empty and without whitespace")
        if not (self.tls_cert or self.api_keys or self.insecure or is_loopback(host)):
            raise ValueError(
                f"refusing to serve {host} without TLS or an API key: anyone who can reach it could use it; "
                "pass --tls-cert/--tls-key, --api-key or --api-key-file, or --insecure if that is intended"
            )

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls_cert:
            return None
        pair = (Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes())
        ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name other than localhost, or "" (every interface)
        return False


def read_api_keys(values: list[str], files: list[str]) -> tuple[str, ...]:
    """Keys given directly and one per line in files (blank lines and # comments skipped)."""
    keys = list(values)
    for path in files:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return tuple(keys)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for Generator calls without a valid `authorization: Bearer <key>`."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [key.encode() for key in keys]

    def _authorized(self, metadata: tuple) -> bool:
        for name, value in metadata or ():
            if name == "authorization":
                value = value.decode() if isinstance(value, bytes) else value
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer":
                    token = token.strip().encode()
                    # Compare with every key, in constant time, so timing tells nothing about them.
                    return any([hmac.compare_digest(token, key) for key in self._keys])
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if (
            handler is None
            or not details.method.startswith(PROTECTED_PREFIX)
            or self._authorized(details.invocation_metadata)
        ):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "this server needs an API key: send metadata 'authorization: Bearer <key>'"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a server-streaming handler must be

    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(unary, deserializer, serializer)
