"""bild against llama.cpp's llama-server on the same GGUF file, through one OpenAI load generator.

    python bench/peers.py [--streams 1 2 4 8 16 32 64] [--out bench/results/peers.md]

1. Builds llama-server and llama-bench (once, into ~/.cache/bild/llama.cpp) from the source that the
   PyPI sdist llama-cpp-python==0.3.36 vendors (llama.cpp of October 2026), with cmake
   -DLLAMA_CURL=OFF and the instruction sets this CPU lists by name: -DGGML_NATIVE=ON built AMX
   kernels that died with SIGILL on these VMs.
2. Converts bild's shipped draft to GGUF with the vendored convert_hf_to_gguf.py (rope_theta copied
   into config.json, the chat template into tokenizer_config.json: the converter reads them only
   there), for llama.cpp's own speculation.
3. Serves, one after the other: llama.cpp on the file (-t 2 -tb 2 -cb -np 64 --jinja), llama.cpp
   with the draft (--spec-type draft-simple), bild in its defaults (mode bild) and in mode large,
   and each with --weights int4 as well. Every server gets the same load: N clients, each sending
   `POST /v1/chat/completions` (stream false, temperature 0, max_tokens 64) with the chat prompts of
   bench/chat.jsonl (never part of the draft's training) in turn, for --seconds after a warm-up;
   completion tokens per second of wall time. The generator's own CPU time is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scheduler.loading import DEFAULT_SMALL_DIR, cache_dir, smollm2_gguf_path

REPO = Path(__file__).resolve().parent.parent
# llama.cpp's best flags with bild's draft (REFERENCES: the October 2026 build's names)
SPECULATION = ["--spec-type", "draft-simple", "--spec-draft-n-max", "8", "--spec-draft-n-min", "1"]
SPECULATION += ["--spec-draft-p-min", "0.5"]
CHAT = REPO / "bench" / "chat.jsonl"
SDIST = "llama-cpp-python==0.3.36"
# cmake switches for the instruction sets of /proc/cpuinfo's flags (GGML_NATIVE stays off)
ISA = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
    "avx_vnni": "GGML_AVX_VNNI",
}


def cpu() -> tuple[str, set[str]]:
    text = Path("/proc/cpuinfo").read_text()
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    return (name.group(1) if name else "?"), set(flags.group(1).split() if flags else [])


def build_llama_cpp(root: Path) -> Path:
    """The folder holding llama-server and llama-bench, built once."""
    bin_dir = root / "build" / "bin"
    if (bin_dir / "llama-server").is_file() and (bin_dir / "llama-bench").is_file():
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    download = root / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", download],
        check=True,
    )
    archive = next(download.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(download, filter="data")
    source = next(download.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if (root / "src").exists():
        shutil.rmtree(root / "src")
    shutil.copytree(source, root / "src")
    _, flags = cpu()
    switches = [f"-D{switch}={'ON' if flag in flags else 'OFF'}" for flag, switch in ISA.items()]
    configure = ["cmake", "-S", root / "src", "-B", root / "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF"]
    configure += ["-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", *switches]
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["cmake", "--build", root / "build", "-j2", "--target", "llama-server", "llama-bench"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return bin_dir


def draft_gguf(root: Path) -> Path:
    """bild's shipped draft, converted by llama.cpp's own converter (float32)."""
    out = root / "draft-f32.gguf"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "draft"
        shutil.copytree(DEFAULT_SMALL_DIR, folder)
        config = json.loads((folder / "config.json").read_text())
        config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        (folder / "config.json").write_text(json.dumps(config))
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        template = folder / "chat_template.jinja"
        if template.is_file():
            tokenizer_config["chat_template"] = template.read_text()
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        env = {**os.environ, "PYTHONPATH": str(root / "src" / "gguf-py")}
        subprocess.run(
            [sys.executable, root / "src" / "convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", out],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready")


async def load(url: str, streams: int, seconds: float, extra: dict) -> tuple[float, int]:
    """Completion tokens per second with `streams` clients, and how many requests finished."""
    prompts = [json.loads(line)["messages"] for line in CHAT.read_text().splitlines() if line.strip()]
    tokens = finished = 0
    counting = False

    async def client(index: int, session: aiohttp.ClientSession, until: float) -> None:
        nonlocal tokens, finished
        i = index
        while time.monotonic() < until:
            body = {"model": model, "messages": prompts[i % len(prompts)], "max_tokens": 64, "temperature": 0.0}
            async with session.post(url + "/v1/chat/completions", json={**body, **extra}) as response:
                reply = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"{url}: {response.status} {reply}")
            if counting:
                tokens += reply["usage"]["completion_tokens"]
                finished += 1
            i += streams

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(url + "/v1/models") as response:
            model = (await response.json())["data"][0]["id"]  # bild checks the name; llama.cpp names the file
        # Warm-up: every client's first request, not counted.
        await asyncio.gather(*[client(i, session, 0) for i in range(streams)])
        counting = True
        started = time.monotonic()
        await asyncio.gather(*[client(i, session, started + seconds) for i in range(streams)])
        return tokens / (time.monotonic() - started), finished


def serve(command: list, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--seconds", type=float, default=30, help="measured time per server and load")
    ap.add_argument("--servers", nargs="+", default=["llama.cpp", "llama.cpp+draft", "bild", "bild large"])
    ap.add_argument("--bild-args", default="", help="extra bild-server flags for every bild server")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    root = cache_dir() / "llama.cpp"
    bin_dir = build_llama_cpp(root)
    gguf = smollm2_gguf_path()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["-m", gguf, "-t", "2", "-tb", "2", "-cb", "-np", str(max(args.streams)), "-c", "32768", "--jinja"]
    llama = [bin_dir / "llama-server", "--host", "127.0.0.1", "--port", str(port), *common]
    bild = [REPO / ".venv" / "bin" / "bild-server", "--port", "0", "--http-port", str(port)]
    bild += [*args.bild_args.split(), "--max-batch-size", str(max(args.streams))]
    draft = draft_gguf(root) if "llama.cpp+draft" in args.servers else None
    servers = {
        "llama.cpp": (llama, {}),
        "llama.cpp+draft": ([*llama, "-md", draft, *SPECULATION], {}),
        "bild": (bild, {}),
        "bild large": (bild, {"mode": "large"}),
    }
    results: dict[str, dict[int, float]] = {}
    own_cpu = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic()
    for name in args.servers:
        command, extra = servers[name]
        log = root / f"{name.replace(' ', '-')}.log"
        proc = serve([str(part) for part in command], log)
        try:
            asyncio.run(wait_ready(url))
            results[name] = {}
            for streams in args.streams:
                rate, finished = asyncio.run(load(url, streams, args.seconds, extra))
                results[name][streams] = rate
                print(f"{name:>16} {streams:>3} streams: {rate:6.1f} tokens/s ({finished} requests)", flush=True)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(60)
    used = resource.getrusage(resource.RUSAGE_SELF)
    generator_cpu = used.ru_utime + used.ru_stime - own_cpu.ru_utime - own_cpu.ru_stime
    name, flags = cpu()
    isa = ", ".join(flag for flag in ISA if flag in flags)
    lines = [
        f"{name} ({os.cpu_count()} cores; {isa}), SmolLM2-135M-Instruct.Q4_1.gguf. Completion tokens/s, "
        f"{args.seconds:.0f} s per cell after a warm-up, 64 tokens per chat request of bench/chat.jsonl, greedy.",
        f"`python bench/peers.py {' '.join(sys.argv[1:])}`. bild flags: `{args.bild_args or '(defaults)'}`. "
        f"The load generator used {generator_cpu / (time.monotonic() - wall):.1%} of one core.",
        "",
        "| streams | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for streams in args.streams:
        lines.append(f"| {streams} | " + " | ".join(f"{results[n].get(streams, 0):.1f}" for n in results) + " |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
