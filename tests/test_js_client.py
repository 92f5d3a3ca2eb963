"""A client in another language (Node.js, @grpc/grpc-js) that knows bild only through server reflection."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from client import BildClient
from tests.server_util import start_server

JS = Path(__file__).with_name("js")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("npm") is None, reason="needs Node.js and npm")]


@pytest.fixture(scope="module")
def node_modules():
    if not (JS / "node_modules" / "grpc-js-reflection-client").is_dir():
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=600)


def test_node_client_finds_generate_by_reflection_and_streams(tiny_dirs, node_modules):
    server = start_server(
        "--large",
        tiny_dirs["large"],
        "--small",
        tiny_dirs["draft"],
        "--context-length",
        "512",
        "--fallback-threshold",
        "0.2",
    )
    try:
        server.wait_serving()
        out = subprocess.run(
            ["node", "generate.js", server.target, "Hello from Node", "24"],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])

        async def python_side():
            async with BildClient(server.target) as client:
                return await client.complete("Hello from Node", max_new_tokens=24, mode="large")

        text, ids, _ = asyncio.run(python_side())
        assert "bild.v1.Generator" in result["services"]
        assert result["token_ids"] == ids and result["text"] == text
        assert result["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")
    finally:
        assert server.stop() == 0
