"""Smoke test of `bild-align` end to end on a tiny random-weight large model (seconds, not minutes).

Checks: the output directory loads with transformers and stays under the size limit; an
interrupted run resumes from its checkpoint without regenerating data, and ends with the same
weights as a run that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from align import cpu
from align.cli import build_parser, run
from align.model import MAX_OUTPUT_BYTES, directory_bytes
from scheduler import output_vocab
from scheduler.loading import SMOLLM2_ALIAS, load_tokenizer
from tests import tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_large(tmp_path_factory) -> Path:
    """A random Llama with SmolLM2's tokenizer and vocabulary, saved like a real model. Its weights are
    drawn 10x wider than the usual init: at the usual scale it answers every prompt with one token
    repeated, which no small model could disagree with."""
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    config = tiny.smollm2_shaped_config(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_large")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _args(large: Path, work: Path, out: Path):
    return build_parser().parse_args(
        [
            "--smoke",
            "--large",
            str(large),
            "--work-dir",
            str(work),
            "--out",
            str(out),
            "--train-steps",
            "20",
            "--seed",
            "3",
        ]
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_smoke_alignment_resumes_and_loads(tiny_large: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    # A fixed thread count: the load-following governor could change float summation order between
    # runs, and the resumed and uninterrupted runs are compared bit for bit below.
    monkeypatch.setattr(cpu.governor(), "enabled", False)
    work, out = tmp_path / "work", tmp_path / "out"

    # First run, "interrupted" right after the checkpoint at step 10.
    first = run(_args(tiny_large, work, out), stop_after_steps=10)
    assert first == {"step": 10, "interrupted": True}
    checkpoints = list((work / "train").glob("*/checkpoint.pt"))
    assert len(checkpoints) == 1
    assert torch.load(checkpoints[0], weights_only=False)["step"] == 10
    assert (out / "model.safetensors").is_file(), "a checkpoint also ships a usable model"
    shards = sorted((work / "data").glob("*/shard_*.pt"))
    assert shards, "generation wrote its shards"
    mtimes = {p: p.stat().st_mtime_ns for p in shards}

    # Rerun the same command: it must continue, not start over.
    with caplog.at_level(logging.INFO):
        result = run(_args(tiny_large, work, out))
    assert "resuming training" in caplog.text and "at step 10" in caplog.text
    assert result["step"] == 20
    assert {p: p.stat().st_mtime_ns for p in shards} == mtimes, "data was regenerated"

    # The output directory is a standalone transformers model with its tokenizer.
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert directory_bytes(out) <= MAX_OUTPUT_BYTES
    assert (out / "alignment.json").is_file()
    # The tokens it was trained to predict, which bild's runner then scores alone: the large model's
    # choices in the data, and EOS.
    vocab = output_vocab.load(out)
    train_shards = sorted((work / "data").glob("train-*/shard_*.pt"))
    chosen = {int(t) for f in train_shards for r in torch.load(f, weights_only=True) for t in r["topk_ids"][:, 0]}
    assert chosen <= set(vocab) and tokenizer.eos_token_id in vocab and len(vocab) < model.config.vocab_size
    held = result["heldout"]
    assert 0.0 <= held["agreement"]["agreement"] <= 1.0 and held["agreement"]["positions"] > 0
    # Beside it, the hand-written chat prompts of bench/; no Magpie prompts unless asked for (tests/test_magpie.py).
    assert held["chat"]["prompts"] == 48 and 0.0 <= result["chat_agreement"] <= 1.0
    assert "magpie" not in held and not (work / "magpie").exists()
    for where in ("transformers", "bild"):
        assert held["cost"][where]["small_ms"] > 0 and held["cost"][where]["large_ms"] > 0

    # The resumed run ends with the weights of an uninterrupted one (same data, same seed).
    work2, out2 = tmp_path / "work2", tmp_path / "out2"
    shutil.copytree(work / "data", work2 / "data")
    run(_args(tiny_large, work2, out2))
    a, b = _weights(out), _weights(out2)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_labelling_a_continuation_reproduces_what_generation_recorded(tiny_large: Path) -> None:
    # label.py scores continuations the small model wrote; scoring the large model's own continuations
    # must give back the log-probs generation recorded for them, position for position.
    from align.generate import GenSettings, encode_prompts, generate_records, make_scheduler
    from align.label import label_records
    from scheduler.loading import load_model

    large, tokenizer = load_model(str(tiny_large))
    settings = GenSettings(max_new_tokens=12, topk=4, batch_size=4, sampled=True, temperature=1.0)
    ids = encode_prompts(tokenizer, ["Say hello.", "Write a haiku about rain, please.", "2+2?", "Name a colour."])
    scheduler = make_scheduler(large, settings, max(map(len, ids)), tokenizer.eos_token_id)
    generated = generate_records(scheduler, ids, settings, seed=5)
    relabelled = [{"prompt_ids": r["prompt_ids"], "cont_ids": r["cont_ids"]} for r in generated]
    label_records(large, relabelled, settings.topk, batch_tokens=64)  # small batches: padding in play
    assert sum(r["cont_ids"].numel() for r in generated) > 20
    for g, r in zip(generated, relabelled):
        assert r["topk_ids"].shape == g["topk_ids"].shape
        torch.testing.assert_close(r["topk_logp"].float(), g["topk_logp"].float(), atol=2e-3, rtol=0)
        assert (r["topk_ids"][:, 0] == g["topk_ids"][:, 0]).all()


def test_onpolicy_stage_trains_on_continuations_the_small_model_wrote(tiny_large: Path, tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    # Three first-stage steps leave the small model far from the large one, so their continuations differ.
    args = build_parser().parse_args(
        [
            "--smoke",
            "--large",
            str(tiny_large),
            "--work-dir",
            str(work),
            "--out",
            str(out),
            "--train-steps",
            "3",
            "--onpolicy-minutes",
            "5",
            "--retrain-steps",
            "10",
            "--no-cost",
        ]
    )
    result = run(args)
    assert result["final"] and result["step"] == 10 and result["onpolicy_tokens"] > 0
    assert result["train_tokens"] > result["onpolicy_tokens"], "the second stage trains on all the data"
    assert result["history"] and result["history"][-1]["stage"] == 2
    (first,) = [
        c
        for c in (work / "train").glob("*/checkpoint.pt")
        if "after" not in json.loads((c.parent / "signature.json").read_text())
    ]
    assert len(list((work / "train").glob("*/checkpoint.pt"))) == 2

    def load(kind: str) -> dict[tuple, dict]:
        (data_dir,) = (work / "data").glob(f"train-{kind}-*")
        return {
            tuple(r["prompt_ids"].tolist()): r
            for f in sorted(data_dir.glob("shard_*.pt"))
            for r in torch.load(f, weights_only=True)
        }

    greedy, onpolicy = load("greedy"), load("onpolicy")
    assert onpolicy.keys() == greedy.keys(), "the small model continues the same training prompts"
    assert any(onpolicy[p]["cont_ids"].tolist() != greedy[p]["cont_ids"].tolist() for p in greedy)
    # They are the first-stage model's greedy continuations over its output vocabulary.
    writer = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    writer.load_state_dict(torch.load(first, weights_only=False)["model"])
    outside = torch.ones(writer.config.vocab_size, dtype=torch.bool)
    outside[output_vocab.load(out)] = False
    for prompt, record in list(onpolicy.items())[:4]:
        ids = list(prompt)
        for _ in range(record["cont_ids"].numel()):
            logits = writer(input_ids=torch.tensor([ids])).logits[0, -1].masked_fill(outside, float("-inf"))
            ids.append(int(logits.argmax()))
        assert ids[len(prompt) :] == record["cont_ids"].tolist()
        assert record["topk_ids"].shape == (record["cont_ids"].numel(), args.topk)
    # Rerunning the finished command redoes nothing and gives the same model.
    before = _weights(out)
    assert run(args)["step"] == 10
    after = _weights(out)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("batch_vocab", [0, 8])
def test_softmax_columns_keep_every_target_and_top_k_token_of_the_batch(batch_vocab: int) -> None:
    from align.train import SoftmaxColumns

    vocab = torch.arange(0, 200, 2)  # the training vocabulary: even ids of 400
    targets = torch.tensor([4, 10, 4, 198])
    topk = torch.tensor([[4, 6, 7], [10, 11, 12], [4, 0, 399], [198, 196, 3]])  # odd ids lie outside it
    columns = SoftmaxColumns(vocab, 400, batch_vocab=batch_vocab, negatives=5, seed=1)
    batch = {"targets": targets.clone(), "topk_ids": topk.clone()}
    step_columns = columns.for_step(batch, step=7)

    assert (step_columns[batch["targets"]] == targets).all()
    inside = topk % 2 == 0
    assert (step_columns[batch["topk_ids"][inside]] == topk[inside]).all()
    assert (batch["topk_ids"][~inside] == -1).all(), "tokens outside the training vocabulary drop out of the target"
    assert len(set(step_columns[-5:].tolist()) & set(vocab.tolist())) == 0, "the negatives come from outside it"
    if batch_vocab:
        assert step_columns.numel() <= 7 + batch_vocab + 5 < vocab.numel()
    else:
        assert step_columns.numel() == vocab.numel() + 5
    again = {"targets": targets.clone(), "topk_ids": topk.clone()}
    assert torch.equal(columns.for_step(again, step=7), step_columns), "a resumed run draws the same columns"


def test_bfloat16_writes_training_data_of_its_own_beside_float32_evaluation_data(
    tiny_large: Path, tmp_path: Path
) -> None:
    work, out = tmp_path / "work", tmp_path / "out"

    def args(dtype: str):
        return build_parser().parse_args(
            f"--smoke --large {tiny_large} --work-dir {work} --out {out} --train-steps 2 --no-cost "
            f"--gen-dtype {dtype}".split()
        )

    def data_dirs() -> dict[str, set[str]]:
        names = {d.name for d in (work / "data").iterdir()}
        return {
            "train": {n for n in names if n.startswith("train-")},
            "eval": {n for n in names if not n.startswith("train-")},
        }

    run(args("bfloat16"))
    fast = data_dirs()
    assert fast["train"] and fast["eval"]
    run(args("float32"))
    both = data_dirs()
    # The evaluation data is the float32 model's whatever writes the training data: not written again.
    assert both["eval"] == fast["eval"]
    # Training data is keyed by the type it was written in: float32 data is new, bfloat16's stays.
    assert fast["train"] < both["train"] and len(both["train"]) == 2 * len(fast["train"])

    def first_records(name: str) -> list[dict]:
        return torch.load(sorted((work / "data" / name).glob("shard_*.pt"))[0], weights_only=True)

    (bf16,) = fast["train"]
    (fp32,) = both["train"] - fast["train"]
    a, b = first_records(bf16), first_records(fp32)
    assert [r["prompt_ids"].tolist() for r in a] == [r["prompt_ids"].tolist() for r in b]
    assert any(not torch.equal(x["topk_logp"], y["topk_logp"]) for x, y in zip(a, b)), (
        "the bfloat16 data came from a float32 model"
    )


def test_default_flags_keep_the_keys_of_magpie_prompts_already_written() -> None:
    from align.magpie import MagpieSettings

    args = build_parser().parse_args([])
    assert MagpieSettings(batch_size=args.gen_batch_size, shard_attempts=args.shard_prompts) == MagpieSettings()


def test_training_prompts_from_a_file_are_continued_and_trained_on_less_evaluation_repeats(
    tiny_large: Path, tmp_path: Path
) -> None:
    import gzip

    from align.evaluate import CHAT_PROMPTS

    chat = [json.loads(line) for line in Path(CHAT_PROMPTS).read_text().splitlines() if line.strip()]
    ours = [
        {"messages": [{"role": "user", "content": "How do I reset my router without losing settings?"}]},
        {
            "family": "support",
            "messages": [
                {"role": "user", "content": "My order has not arrived."},
                {"role": "assistant", "content": "I am sorry to hear that. What is the order number?"},
                {"role": "user", "content": "It is 81723, placed last Monday."},
            ],
        },
    ]
    lines = [*ours, chat[0], ours[0]]  # an evaluation prompt, and a repeat: both dropped
    path = tmp_path / "traffic.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode()))
    work, out = tmp_path / "work", tmp_path / "out"
    args = build_parser().parse_args(
        f"--smoke --large {tiny_large} --work-dir {work} --out {out} --train-steps 2 --no-cost "
        f"--train-prompts {path}".split()
    )
    result = run(args)
    assert result["step"] == 2
    (data,) = (work / "data").glob("train-file2-*")
    records = [r for f in sorted(data.glob("shard_*.pt")) for r in torch.load(f, weights_only=True)]
    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    prompts = sorted(tokenizer.decode(r["prompt_ids"].tolist()) for r in records)
    assert len(prompts) == 2 and all(r["cont_ids"].numel() > 0 for r in records)
    assert "reset my router" in prompts[0] + prompts[1] and "81723" in prompts[0] + prompts[1]
    assert "What is the order number?" in prompts[0] + prompts[1], "the earlier turns are part of the prompt"
