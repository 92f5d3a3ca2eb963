"""bild side by side with the systems users would pick instead, in one process run, on one model pair.

    python bench/compare.py [--large SPEC] [--small SPEC] [--prompts 16] [--max-new-tokens 64]

1. large-only greedy with transformers `generate`, batch 1 (the reference output);
2. transformers assisted generation (assistant_model = the small model, assistant_confidence_threshold);
3. our engine in modes large, exact and bild, batch 1;
4. a fallback x rollback sweep of bild (quality @ speed-up, and a Pareto plot).

Through the gRPC server, at 1 to 64 streams, see bench/serving.py (`make bench` runs both).

Quality is measured against the large model's own greedy output: token agreement (position by
position), BLEU (sacrebleu) and ROUGE-L (rouge-score). Speed-ups are ratios within this run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from offline import generate  # bench/offline.py, beside this script

from scheduler.loading import DEFAULT_SMALL_DIR, SMOLLM2_ALIAS, shown
from scheduler.model_runner import CausalLMRunner
from scheduler.pair import load_pair
from scheduler.request import Mode, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig

RESULTS = Path(__file__).with_name("results")
PROMPTS = Path(__file__).with_name("chat.jsonl")


class Quality:
    """Agreement, BLEU and ROUGE-L of outputs against the reference outputs."""

    def __init__(self, tokenizer, references: list[list[int]]) -> None:
        from rouge_score import rouge_scorer

        self.tokenizer = tokenizer
        self.references = references
        self.ref_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in references]
        self.rouge = rouge_scorer.RougeScorer(["rougeL"])

    def __call__(self, outputs: list[list[int]]) -> tuple[float, float, float]:
        import sacrebleu

        same = sum(a == b for o, r in zip(outputs, self.references) for a, b in zip(o, r))
        agreement = same / max(1, sum(map(len, self.references)))
        texts = [self.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        bleu = sacrebleu.corpus_bleu(texts, [self.ref_texts]).score
        rouge = sum(self.rouge.score(r, t)["rougeL"].fmeasure for r, t in zip(self.ref_texts, texts)) / len(texts)
        return agreement, bleu, 100 * rouge


def hf_generate(model, prompts, max_new, assistant=None, threshold=0.4) -> tuple[list[list[int]], float]:
    eos = model.generation_config.eos_token_id
    kw = {}
    if assistant is not None:
        assistant.generation_config.assistant_confidence_threshold = threshold
        kw["assistant_model"] = assistant
    outputs, seconds = [], 0.0
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=eos, **kw)
        seconds += time.perf_counter() - start
        outputs.append(out[0, len(p) :].tolist())
    return outputs, seconds


def engine_batch1(pair, prompts, params: SamplingParams) -> tuple[list[list[int]], float]:
    max_len = max(map(len, prompts)) + params.max_new_tokens + 1
    scheduler = Scheduler(
        CausalLMRunner(pair.small, 1, max_len),
        CausalLMRunner(pair.large, 1, max_len),
        SchedulerConfig(max_num_seqs=1, max_num_tokens=max_len, max_seq_len=max_len),
        pair.eos_token_ids,
    )
    outputs, _, seconds = generate(scheduler, prompts, params)
    return outputs, seconds


def chat_ids(tokenizer, rows) -> list[list[int]]:
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )
        for m in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default=SMOLLM2_ALIAS)
    ap.add_argument("--small", default=str(DEFAULT_SMALL_DIR))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--fallback", type=float, nargs="*", default=[0.3, 0.4, 0.6])
    ap.add_argument("--rollback", type=float, nargs="*", default=[0.8, 2.0, 3.0])
    ap.add_argument("--sweep-prompts", type=int, default=8)
    ap.add_argument("--assistant-threshold", type=float, default=0.4)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    pair = load_pair(args.large, args.small)
    rows = [json.loads(line)["messages"] for line in PROMPTS.read_text().splitlines() if line.strip()][: args.prompts]
    prompts = chat_ids(pair.tokenizer, rows)
    n = args.max_new_tokens
    lines = [
        f"# bild compared, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {os.cpu_count()} cores {platform.machine()}, {platform.system()}, torch {torch.__version__}, "
        f"device cpu, float32. Large: `{args.large}`, small: `{shown(args.small)}`. {len(prompts)} chat prompts "
        f"(bench/chat.jsonl), max_new_tokens {n}, greedy. Command: `python {' '.join(sys.argv)}`",
        "",
    ]

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    for line in lines:
        print(line)
    reference, ref_seconds = hf_generate(pair.large, prompts, n)
    quality = Quality(pair.tokenizer, reference)
    base_rate = sum(map(len, reference)) / ref_seconds

    emit("## Batch 1")
    emit()
    emit("| system | tokens/s | speed-up | token agreement | BLEU | ROUGE-L |")
    emit("|---|---|---|---|---|---|")

    def row(name: str, outputs: list[list[int]], seconds: float) -> float:
        rate = sum(map(len, outputs)) / seconds
        agreement, bleu, rouge = quality(outputs)
        emit(f"| {name} | {rate:.1f} | {rate / base_rate:.2f}x | {agreement:.1%} | {bleu:.1f} | {rouge:.1f} |")
        return rate

    row("transformers generate, large only (reference)", reference, ref_seconds)
    row(
        f"transformers assisted generation (threshold {args.assistant_threshold})",
        *hf_generate(pair.large, prompts, n, pair.small, args.assistant_threshold),
    )
    for mode in (Mode.LARGE, Mode.EXACT, Mode.BILD):
        row(
            f"bild engine, mode {mode.value}",
            *engine_batch1(pair, prompts, SamplingParams(mode=mode, max_new_tokens=n)),
        )

    if args.fallback and args.rollback:
        sweep_prompts = prompts[: args.sweep_prompts]
        sweep_quality = Quality(pair.tokenizer, reference[: args.sweep_prompts])
        large_out, large_s = engine_batch1(pair, sweep_prompts, SamplingParams(mode=Mode.LARGE, max_new_tokens=n))
        large_rate = sum(map(len, large_out)) / large_s
        emit()
        emit(f"## bild sweep, batch 1, {len(sweep_prompts)} prompts: quality @ speed-up")
        emit()
        emit("| rollback \\ fallback | " + " | ".join(f"{f:g}" for f in args.fallback) + " |")
        emit("|---|" + "---|" * len(args.fallback))
        points = []
        for rb in args.rollback:
            cells = []
            for fb in args.fallback:
                params = SamplingParams(mode=Mode.BILD, max_new_tokens=n, fallback_threshold=fb, rollback_threshold=rb)
                outputs, seconds = engine_batch1(pair, sweep_prompts, params)
                speed = sum(map(len, outputs)) / seconds / large_rate
                _agreement, bleu, rouge = sweep_quality(outputs)
                points.append((speed, rouge, f"{rb:g},{fb:g}"))
                cells.append(f"ROUGE-L {rouge:.1f}, BLEU {bleu:.1f} @ {speed:.2f}x")
            emit(f"| {rb:g} | " + " | ".join(cells) + " |")
        plot(points, args.out / "sweep_pareto.png")
        emit()
        emit(f"Pareto plot: `{shown(args.out / 'sweep_pareto.png')}` (labels: rollback,fallback).")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")


def plot(points: list[tuple[float, float, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    front = sorted(points, key=lambda p: -p[0])
    best, pareto = -1.0, []
    for p in front:
        if p[1] > best:
            pareto.append(p)
            best = p[1]
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue")
    ax.plot([p[0] for p in pareto], [p[1] for p in pareto], color="tab:orange", label="Pareto front")
    for speed, rouge, label in points:
        ax.annotate(label, (speed, rouge), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("speed-up over large-only (batch 1)")
    ax.set_ylabel("ROUGE-L vs large-only greedy")
    ax.set_title("bild: quality @ speed-up (rollback, fallback)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
