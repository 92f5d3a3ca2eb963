"""How well drafts serve each kind of prompt: agreement with SmolLM2, the share of emitted tokens
from the draft at default thresholds, and the engine's speed-up at batch 1, per prompt family.

    python bench/draft_families.py --small models/smollm2-135m-draft [other drafts...] \
        [--work-dir align-work] [--per-family 6] [--max-new-tokens 64]

The prompts are bild-align's evaluation sets, cached under --work-dir by `bild-align --magpie-eval N`
(SmolLM2's greedy continuations of them are there too, for agreement): the Magpie evaluation
prompts (written with a seed that training never uses, deduplicated against training), the
hand-written chat prompts of bench/chat.jsonl, and the old held-out template prompts.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from engine_speed import table  # bench/engine_speed.py, beside this script

from align.evaluate import agreement
from align.generate import load_shards
from scheduler.loading import SMOLLM2_ALIAS, shown
from scheduler.pair import load_pair

SETS = {"magpie": "magpie-eval*", "chat": "chat*", "heldout": "heldout*"}


def records(work_dir: Path) -> dict[str, list[dict]]:
    found = {}
    for name, pattern in SETS.items():
        dirs = sorted((work_dir / "data").glob(f"{pattern}-greedy-*"))
        if dirs:
            found[name] = load_shards(dirs[-1])
    if not found:
        raise SystemExit(f"no evaluation sets under {work_dir}/data: run bild-align --magpie-eval 300 first")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", nargs="+", required=True)
    ap.add_argument("--large", default=SMOLLM2_ALIAS)
    ap.add_argument("--work-dir", type=Path, default=Path("align-work"))
    ap.add_argument("--per-family", type=int, default=6, help="prompts per family for the speed runs")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    sets = records(args.work_dir)
    lines = [
        f"`python bench/draft_families.py --small {' '.join(map(shown, args.small))} "
        f"--per-family {args.per_family} --max-new-tokens {args.max_new_tokens}`",
        "",
        "| draft | set | family | agreement | prompts timed | bild small-token share | exact speed-up "
        "| bild speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for small in args.small:
        pair = load_pair(args.large, small)
        for set_name, recs in sets.items():
            whole = agreement(pair.small, recs)
            families = defaultdict(list)
            for rec in recs:
                families[rec.get("family", "all")].append(rec)
            rows = [("all", whole["agreement"], recs)]
            if len(families) > 1:
                rows += [(f, whole["per_family"].get(f, float("nan")), r) for f, r in sorted(families.items())]
            for family, agreed, fam_recs in rows:
                if family == "all" and len(families) > 1:
                    timed = "-"
                    share = exact = bild = "-"
                else:
                    prompts = [r["prompt_ids"].tolist() for r in fam_recs[: args.per_family]]
                    result = table(pair, prompts, [1], args.max_new_tokens, 1, {})
                    cells = {line.split("|")[2].strip(): line.split("|") for line in result[2:]}
                    timed = str(len(prompts))
                    share = cells["bild"][6].strip()
                    exact, bild = cells["exact"][4].strip(), cells["bild"][4].strip()
                line = (
                    f"| {shown(small)} | {set_name} | {family} | {agreed:.1%} | {timed} | {share} | {exact} | {bild} |"
                )
                lines.append(line)
                print(line, file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
