"""Chat turns with and without the prefix cache, and against llama.cpp's `cache_prompt`.

    python bench/prefix.py [--conversations 8] [--turns 10] [--out bench/results/prefix.md]

A scripted chat, as a front-end sends it: every turn posts the whole conversation (a ~200-token
system prompt, every earlier message, and a new user message of ~100 tokens) to
`/v1/chat/completions` with `stream: true`, greedy, 64 tokens per answer; the answer joins the
conversation. N conversations run at once. For each server: the median time to first token at each
turn (first content chunk after the request was sent), and completion tokens per second over the
whole run. Servers, one after the other: bild in its defaults (prefix cache on), bild with
--no-prefix-cache, and llama.cpp's llama-server on the same GGUF file (its slots reuse a prompt's
longest common prefix: `cache_prompt`, on by default), built as bench/peers.py builds it. The user
messages come from bench/chat.jsonl, which no draft training prompt came from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers import CHAT, REPO, build_llama_cpp, cpu, free_port, serve, wait_ready
from scheduler.loading import cache_dir, smollm2_gguf_path

SYSTEM_WORDS = 150  # about 200 tokens
USER_WORDS = 75  # about 100 tokens


def _texts() -> list[str]:
    texts = []
    for line in CHAT.read_text().splitlines():
        if line.strip():
            texts += [m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
    return texts


def _words(texts: list[str], start: int, count: int) -> str:
    """`count` words taken from the texts in turn, from text `start` on."""
    words: list[str] = []
    i = start
    while len(words) < count:
        words += texts[i % len(texts)].split()
        i += 1
    return " ".join(words[:count])


def script(conversations: int, turns: int) -> tuple[str, list[list[str]]]:
    texts = _texts()
    system = "You are a helpful assistant for a support desk. Follow these notes: " + _words(texts, 0, SYSTEM_WORDS)
    users = [[_words(texts, 7 * c + 3 * t + 1, USER_WORDS) for t in range(turns)] for c in range(conversations)]
    return system, users


async def chat(url: str, system: str, users: list[list[str]], extra: dict) -> tuple[list[list[float]], int, float]:
    """Run the conversations at once: time to first token [conversation][turn], completion tokens, seconds."""
    timeout = aiohttp.ClientTimeout(total=1800)
    tokens = 0

    async def conversation(session: aiohttp.ClientSession, model: str, messages_in: list[str]) -> list[float]:
        nonlocal tokens
        messages = [{"role": "system", "content": system}]
        firsts = []
        for user in messages_in:
            messages.append({"role": "user", "content": user})
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": 64,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
                **extra,
            }
            sent = time.monotonic()
            first = None
            answer = []
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"{url}: {response.status} {await response.text()}")
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            first = first or time.monotonic()
                            answer.append(text)
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            firsts.append((first or time.monotonic()) - sent)
            messages.append({"role": "assistant", "content": "".join(answer)})
        return firsts

    # A connection per request: llama-server closes a connection after a streamed response, and a
    # request sent on it then fails.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async with session.get(url + "/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        started = time.monotonic()
        firsts = await asyncio.gather(*[conversation(session, model, u) for u in users])
        return list(firsts), tokens, time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--servers", nargs="+", default=["bild", "bild --no-prefix-cache", "llama.cpp"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    system, users = script(args.conversations, args.turns)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bild = [REPO / ".venv" / "bin" / "bild-server", "--port", "0", "--http-port", str(port)]
    root = cache_dir() / "llama.cpp"
    servers = {"bild": bild, "bild --no-prefix-cache": [*bild, "--no-prefix-cache"]}
    if "llama.cpp" in args.servers:
        llama = build_llama_cpp(root) / "llama-server"
        # 4096 tokens of context per slot (bild's default context is 2048).
        servers["llama.cpp"] = [llama, "--host", "127.0.0.1", "--port", str(port), "-m", smollm2_gguf_path()]
        servers["llama.cpp"] += ["-t", "2", "-tb", "2", "-cb", "-np", str(args.conversations)]
        servers["llama.cpp"] += ["-c", str(4096 * args.conversations), "--jinja"]
    rows: dict[str, tuple[list[float], float]] = {}
    own_cpu = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic()
    for name in args.servers:
        root.mkdir(parents=True, exist_ok=True)
        proc = serve([str(part) for part in servers[name]], root / f"prefix-{name.replace(' ', '')}.log")
        try:
            asyncio.run(wait_ready(url))
            firsts, tokens, seconds = asyncio.run(chat(url, system, users, {}))
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(60)
        medians = [statistics.median(c[t] for c in firsts) for t in range(args.turns)]
        rows[name] = (medians, tokens / seconds)
        shown = " ".join(f"{m:.2f}" for m in medians)
        print(f"{name:>24}: {shown} s; {tokens / seconds:.1f} tokens/s", flush=True)
    used = resource.getrusage(resource.RUSAGE_SELF)
    generator = (used.ru_utime + used.ru_stime - own_cpu.ru_utime - own_cpu.ru_stime) / (time.monotonic() - wall)
    cpu_name, _ = cpu()
    lines = [
        f"{cpu_name} ({os.cpu_count()} cores), SmolLM2-135M-Instruct.Q4_1.gguf, each server in its defaults. "
        f"{args.conversations} conversations at once, {args.turns} turns each: a ~200-token system prompt, "
        "~100-token user messages, 64-token greedy answers, streamed over `/v1/chat/completions`.",
        f"`python bench/prefix.py {' '.join(sys.argv[1:])}`. The load generator used {generator:.1%} of one core.",
        "",
        "Median time to first token (s) by turn, and completion tokens/s over the whole run:",
        "",
        "| server | "
        + " | ".join(f"turn {t + 1}" for t in range(args.turns))
        + f" | turn {args.turns} / turn 1 | tokens/s |",
        "|---|" + "---|" * (args.turns + 2),
    ]
    for name, (medians, rate) in rows.items():
        ratio = medians[-1] / medians[0]
        lines.append(f"| {name} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {ratio:.2f} | {rate:.1f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
