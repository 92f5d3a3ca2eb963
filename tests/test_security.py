"""TLS, mutual TLS and API keys, against real servers on loopback with certificates made here."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import BildClient
from server.security import SecurityConfig
from tests.server_util import start_server

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, all from that CA."""
    d = tmp_path_factory.mktemp("certs")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=bild test CA",
        cwd=d,
    )
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=bild test {name}",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            *ext,
            cwd=d,
        )
    return {name: str(d / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def generate(target: str, **client_options) -> list[int]:
    async def go():
        async with BildClient(target, **client_options) as client:
            return (await client.complete("secure", max_new_tokens=4, mode="large"))[1]

    return asyncio.run(go())


def bild_client(port: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`bild-client hi` for 3 tokens in mode large, as a user runs it."""
    command = [
        sys.executable,
        "-m",
        "client.cli",
        "hi",
        "--port",
        str(port),
        "--mode",
        "large",
        "--max-new-tokens",
        "3",
    ]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keyed(tiny_dirs, tmp_path_factory):
    """A public address guarded by API keys (the metrics port, which has no keys, stays on loopback)."""
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("# one key per line\nsecond-key\n")
    server = start_server(
        "--host", "0.0.0.0", "--large", tiny_dirs["large"], "--no-small", "--api-key", "first-key",
        "--api-key-file", str(keys), "--metrics-port", str(metrics_port := free_port()),
    )  # fmt: skip
    server.metrics_port = metrics_port
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def tls(tiny_dirs, certs):
    """A public address over TLS, its metrics on the address named for them."""
    server = start_server(
        "--host", "0.0.0.0", "--large", tiny_dirs["large"], "--no-small", "--tls-cert", certs["server.pem"],
        "--tls-key", certs["server.key"], "--metrics-port", str(metrics_port := free_port()),
        "--metrics-host", "0.0.0.0",
    )  # fmt: skip
    server.metrics_port = metrics_port
    yield server
    assert server.stop() == 0


def test_api_keys_guard_the_generator_but_not_health(keyed):
    keyed.wait_serving()  # health needs no key
    for key in (None, "wrong-key", "first-key-but-longer"):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            generate(keyed.target, api_key=key)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in error.value.details()
    assert len(generate(keyed.target, api_key="first-key")) == 4
    assert len(generate(keyed.target, api_key="second-key")) == 4
    out = bild_client(keyed.port, env={**os.environ, "BILD_API_KEY": "second-key"})
    assert out.returncode == 0, out.stderr


def test_tls_and_mutual_tls(tiny_dirs, certs, tls):
    creds = grpc.ssl_channel_credentials(Path(certs["ca.pem"]).read_bytes())
    with grpc.secure_channel(tls.target, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    assert len(generate(tls.target, ca_cert=certs["ca.pem"])) == 4
    with pytest.raises(grpc.aio.AioRpcError) as error:  # plaintext to a TLS port
        generate(tls.target)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    server = start_server(
        "--large",
        tiny_dirs["large"],
        "--no-small",
        "--tls-cert",
        certs["server.pem"],
        "--tls-key",
        certs["server.key"],
        "--tls-client-ca",
        certs["ca.pem"],
    )
    try:
        one_way = dict(ca_cert=certs["ca.pem"])
        mutual = dict(one_way, client_cert=certs["client.pem"], client_key=certs["client.key"])
        for _ in range(600):
            try:
                assert len(generate(server.target, **mutual)) == 4
                break
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or "loading" not in error.details():
                    raise
                time.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as error:  # no client certificate
            generate(server.target, **one_way)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        out = bild_client(
            server.port, "--ca-cert", certs["ca.pem"], "--client-cert", certs["client.pem"],
            "--client-key", certs["client.key"],
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    finally:
        assert server.stop() == 0


PUBLIC = ["--host", "0.0.0.0", "--port", "0", "--no-small", "--large", "/nonexistent-model"]


@pytest.mark.parametrize("extra", [[], ["--tls-cert", "missing.pem"]], ids=["plain", "cert-without-key"])
def test_a_public_address_needs_tls_or_a_key(extra):
    # Refused before anything loads, so bild-server's main runs here; the fixtures above serve public
    # addresses with keys and with TLS.
    from server.cli import main

    with pytest.raises(SystemExit) as refused:
        main([*PUBLIC, *extra])
    message = str(refused.value.code)
    assert message.startswith("bild-server:") and ("refusing to serve" in message or "go together" in message)


def test_insecure_serves_a_public_address_without_tls_or_a_key():
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", *PUBLIC, "--insecure"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0  # it got as far as loading the (missing) model
    assert "refusing" not in out.stderr and "/nonexistent-model" in out.stderr, out.stderr


@pytest.mark.parametrize("origin, ok", [("https://chat.example.com", True), ("*", True), ("chat.example.com", False)])
def test_cors_origins_are_checked(origin, ok):
    config = SecurityConfig(cors_origins=(origin,))
    if ok:
        config.check("127.0.0.1")
    else:
        with pytest.raises(ValueError, match="scheme and host"):
            config.check("127.0.0.1")


def listening_address(port: int) -> str:
    """The IPv4 address a local TCP socket listens on at `port`, from the kernel's own table."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            return ".".join(str(b) for b in reversed(bytes.fromhex(address)))
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads Linux's socket table")
def test_metrics_stay_on_loopback_unless_an_address_is_named(keyed, tls):
    # The metrics port has neither TLS nor keys, so a public --host does not make it public.
    assert listening_address(keyed.metrics_port) == "127.0.0.1"
    assert listening_address(tls.metrics_port) == "0.0.0.0"
