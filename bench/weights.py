"""What `--weights` costs in quality: each choice against float32 on SmolLM2-135M-Instruct.

    python bench/weights.py [--weights float int4] [--max-new-tokens 64] [--out FILE]

- Greedy agreement: float32's greedy answers to the chat prompts of bench/chat.jsonl (written for
  benchmarks, never part of the draft's training) are fed to each model; the share of positions
  where its own top token is float32's token (teacher-forced), and the share of answers it would
  have written identically (free-running greedy, position by position until the end).
- Perplexity of a held-out text: the first tokens of Python's own LICENSE.txt (English prose on every
  Python install, in no training set of bild's).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scheduler.loading import SMOLLM2_ALIAS, load_model
from scheduler.model_runner import CausalLMRunner, ForwardItem

CHAT = Path(__file__).resolve().parent / "chat.jsonl"


def chat_prompts(tokenizer) -> list[list[int]]:
    lines = [json.loads(line) for line in CHAT.read_text().splitlines() if line.strip()]
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template(line["messages"], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        for line in lines
    ]


def held_out_text(tokenizer, tokens: int) -> list[int]:
    candidates = [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"]
    path = next(p for p in candidates if p.is_file())
    return tokenizer.encode(path.read_text(), add_special_tokens=False)[:tokens]


def greedy(runner: CausalLMRunner, prompts: list[list[int]], new: int) -> list[list[int]]:
    outputs: list[list[int]] = [[] for _ in prompts]
    items = [ForwardItem(i, 0, p) for i, p in enumerate(prompts)]
    for step in range(new):
        chosen = runner.next_token_logits(items).argmax(-1).tolist()
        for output, token in zip(outputs, chosen):
            output.append(token)
        items = [ForwardItem(i, len(p) + step, [t]) for i, (p, t) in enumerate(zip(prompts, chosen))]
    return outputs


def teacher_forced(runner: CausalLMRunner, prompts: list[list[int]], answers: list[list[int]]) -> float:
    agree = total = 0
    for prompt, answer in zip(prompts, answers):
        logits = runner.token_logits([ForwardItem(0, 0, prompt + answer)])
        predicted = logits[len(prompt) - 1 : -1].argmax(-1)
        agree += int((predicted == torch.tensor(answer)).sum())
        total += len(answer)
    return agree / total


def perplexity(runner: CausalLMRunner, text: list[int]) -> float:
    logits = runner.token_logits([ForwardItem(0, 0, text)]).float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(text[1:]))
    return math.exp(float(nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", nargs="+", default=["float", "int4"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--text-tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    reference, tokenizer = load_model(SMOLLM2_ALIAS)
    prompts = chat_prompts(tokenizer)
    text = held_out_text(tokenizer, args.text_tokens)
    max_len = max(map(len, prompts)) + args.max_new_tokens + 1
    runner = CausalLMRunner(reference, len(prompts), max(max_len, len(text) + 1))
    answers = greedy(runner, prompts, args.max_new_tokens)
    rows = []
    for weights in args.weights:
        model = reference if weights == "float" else load_model(SMOLLM2_ALIAS, weights=weights)[0]
        runner = CausalLMRunner(model, len(prompts), max(max_len, len(text) + 1))
        own = greedy(runner, prompts, args.max_new_tokens)
        same = sum(a == b for a, b in zip(own, answers)) / len(answers)
        positions = sum(x == y for a, b in zip(own, answers) for x, y in zip(a, b)) / sum(map(len, answers))
        rows.append(
            f"| {weights} | {teacher_forced(runner, prompts, answers):.1%} | {positions:.1%} | {same:.1%} "
            f"| {perplexity(runner, text):.3f} |"
        )
        print(rows[-1], flush=True)
    report = "\n".join(
        [
            f"SmolLM2-135M-Instruct, {len(prompts)} chat prompts of bench/chat.jsonl, {args.max_new_tokens} "
            f"greedy tokens each; perplexity over the first {len(text)} tokens of Python's LICENSE.txt.",
            "`python bench/weights.py`",
            "",
            "| weights | top-1 agreement with float32 (teacher-forced) | same token, free-running "
            "| answers identical | perplexity |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
