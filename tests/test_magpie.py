"""Prompts the large model writes itself (align/magpie.py): the filters and the deduplication on
hand-written strings, the chat template cut where a user turn begins, and the whole path (writing,
filtering, caching, the evaluation set kept apart, training on them with `bild-align --smoke`) on a
tiny random model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from align import cli, magpie
from align.cli import build_parser, run
from align.generate import GenSettings, render, spent_seconds
from align.magpie import (
    EVAL_SEED,
    OPENINGS,
    MagpieSettings,
    Seen,
    magpie_prompts,
    magpie_sets,
    rejection,
    user_turn_prefix,
)
from align.prompts import Prompt, all_prompts, digest, prefix_digests, read_chat_prompts
from scheduler.loading import SMOLLM2_ALIAS, load_tokenizer
from tests import tiny

pytestmark = pytest.mark.slow

CHAT = Path(__file__).resolve().parent.parent / "bench" / "chat.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SMOLLM2_ALIAS)


@pytest.fixture(scope="module")
def talkative_large(tokenizer, tmp_path_factory) -> Path:
    """A random Llama with SmolLM2's tokenizer that ends its turns after about ten tokens, as a real
    model does (a random one almost never picks eos among 49k tokens): one dimension of the residual
    stream holds a constant (every embedding has 10 there, and no layer writes to it), and eos's
    tied embedding has 16, which lifts eos's logit alone."""
    eos = tokenizer.eos_token_id
    config = tiny.smollm2_shaped_config(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:, 0] = 10.0
        embedding[eos, 0] = 16.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
    path = tmp_path_factory.mktemp("talkative_large")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_rejection_keeps_requests_and_drops_the_rest() -> None:
    for request in [
        "What is the capital of France?",
        "Translate 'thank you' into German.",
        "Write a Python function that checks whether a string is a palindrome.",
        "Surely there is a faster way to sort a list?",  # "Sure" only as a word of its own
        "Fix this: for i in range(10): print(i)",
    ]:
        assert rejection(request) is None, request
    assert rejection("Hello there") == "too short"
    assert rejection("") == "too short"
    assert rejection(" ".join(["word"] * 41)) == "too long"
    assert rejection(" ".join(["word"] * 40)) is None
    assert rejection("1234 5678 #### ()()") == "not text"
    assert rejection("x = [1, 2, 3]; y = {4: 5}") == "not text"
    for answer in [
        "Sure! Here is a poem about the sea.",
        "Certainly, the capital of France is Paris.",
        "As an AI language model, I cannot browse the internet.",
        "Of course. Here you go:",
        "I'm sorry, but I can't help with that.",
        "I'm SmolLM, an assistant trained by Hugging Face.",
    ]:
        assert rejection(answer) == "answer", answer


def test_seen_tells_exact_and_near_repeats_after_the_same_context() -> None:
    seen = Seen([Prompt("chat", "What is the capital of France?")])
    assert seen.repeat(Prompt("question", "  what is the   CAPITAL of France?\n")) == "repeat"
    assert seen.repeat(Prompt("chat", "What is the capital of Spain?")) is None
    assert seen.repeat(Prompt("chat", "What is the capital of France?", (("system", "Be brief."),))) is None

    seen.add(Prompt("code", "Write a Python function that reverses a list of numbers."))
    assert (
        seen.repeat(Prompt("code", "Write a Python function that reverses a list in place, please.")) == "near repeat"
    )
    assert seen.repeat(Prompt("code", "Write a Python program that reverses a list of numbers.")) is None


def test_templates_are_never_kept_again() -> None:
    seen = Seen(all_prompts())
    template = all_prompts()[0].text
    assert seen.repeat(Prompt("chat", template.upper())) == "repeat"


def test_user_turn_prefix_follows_the_chat_template(tokenizer) -> None:
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    system = tokenizer.apply_chat_template([{"role": "system", "content": default}], tokenize=False)
    assert user_turn_prefix(tokenizer) == system + "<|im_start|>user\n"
    exchange = (("user", "Hi!"), ("assistant", "Hello! How can I help?"))
    assert user_turn_prefix(tokenizer, exchange) == (
        system
        + "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\n"
    )
    # A system turn of its own replaces the default one.
    assert (
        user_turn_prefix(tokenizer, (("system", "Be brief."),))
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )
    # What the large model then writes is the user's text, rendered back where it was written.
    rendered = render(tokenizer, "Tell me more.", exchange)
    assert rendered == user_turn_prefix(tokenizer, exchange) + "Tell me more.<|im_end|>\n<|im_start|>assistant\n"


def test_chat_prompts_keep_every_message() -> None:
    prompts = read_chat_prompts(CHAT)
    assert len(prompts) == 48
    families = {f: sum(p.family == f for p in prompts) for f in ("chat", "system", "multiturn")}
    assert families == {"chat": 40, "system": 3, "multiturn": 5}
    rows = [json.loads(line)["messages"] for line in CHAT.read_text().splitlines() if line.strip()]
    for prompt, messages in zip(prompts, rows):
        assert [{"role": r, "content": c} for r, c in prompt.context] == messages[:-1]
        assert messages[-1] == {"role": "user", "content": prompt.text}


def test_openings_cover_every_family() -> None:
    families = {o.family for o in OPENINGS}
    assert {
        "chat",
        "question",
        "translation",
        "summarization",
        "code",
        "continuation",
        "multiturn",
        "system",
    } == families
    assert all(not o.words.endswith(" ") for o in OPENINGS), "a trailing space would split the next word's token"


SMALL = MagpieSettings(batch_size=8, shard_attempts=8)


def test_prompts_are_written_filtered_cached_and_kept_apart(talkative_large: Path, tmp_path: Path, monkeypatch) -> None:
    from scheduler.loading import load_model

    large, tokenizer = load_model(str(talkative_large))
    spec, work = str(talkative_large), tmp_path / "work"

    def sets(**kwargs) -> tuple[list[Prompt], list[Prompt]]:
        return magpie_sets(large, tokenizer, spec, work, settings=SMALL, **kwargs)

    train, evaluation = sets(n_train=12, n_eval=4, pool=6)
    assert len(train) == 12 and len(evaluation) == 4
    raw = [a for f in sorted((work / "magpie").glob("*/shard_*.json")) for a in json.loads(f.read_text())]
    assert any(magpie.attempt_rejection(a) for a in raw), "the filters dropped some of what the model wrote"
    for prompt in train + evaluation:
        assert rejection(prompt.text) is None
        assert prompt.family in {o.family for o in OPENINGS}
    # No repeats within a set, none between them, none of a template prompt.
    seen = Seen(all_prompts())
    for prompt in train + evaluation:
        assert seen.repeat(prompt) is None, prompt
        seen.add(prompt)

    # A rerun finds every shard: it writes none, and gives the same prompts.
    shards = {f: f.stat().st_mtime_ns for f in (work / "magpie").glob("*/shard_*.json")}

    def no_writing(*args, **kwargs):
        raise AssertionError("a shard was written again")

    monkeypatch.setattr(magpie, "write_shard", no_writing)
    assert sets(n_train=12, n_eval=4, pool=6) == (train, evaluation)
    # Fewer prompts are the first of them; an evaluation alone is the pool's first prompts.
    assert sets(n_train=5, n_eval=2, pool=6) == (train[:5], evaluation[:2])
    assert sets(n_train=0, n_eval=3) == ([], evaluation[:3])
    assert {f: f.stat().st_mtime_ns for f in (work / "magpie").glob("*/shard_*.json")} == shards
    monkeypatch.undo()

    # Training with the evaluation pool's own seed: the same turns, so it must skip all of the pool.
    same_seed, pool = sets(n_train=4, n_eval=6, pool=6, seed=EVAL_SEED)
    assert magpie_prompts(large, tokenizer, spec, work, replace(SMALL, seed=EVAL_SEED), 10) == pool + same_seed


def test_bild_align_trains_on_magpie_prompts(talkative_large: Path, tokenizer, tmp_path: Path, monkeypatch) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    argv = [
        "--smoke",
        "--large",
        str(talkative_large),
        "--work-dir",
        str(work),
        "--out",
        str(out),
        "--magpie",
        "8",
        "--magpie-eval",
        "4",
        "--train-steps",
        "10",
        "--no-cost",
    ]

    written = run(build_parser().parse_args([*argv, "--prompts-only"]))["magpie_prompts"]
    assert {k: v["prompts"] for k, v in written.items()} == {"train": 8, "eval": 4}
    lines = [json.loads(line) for line in Path(written["train"]["file"]).read_text().splitlines()]
    assert len(lines) == 8 and all(line["messages"][-1]["role"] == "user" for line in lines)
    assert not (work / "data").exists() and not (work / "train").exists(), "--prompts-only stops there"
    shards = {f: f.stat().st_mtime_ns for f in (work / "magpie").glob("*/shard_*.json")}

    result = run(build_parser().parse_args(argv))
    assert result["final"] and result["step"] == 10
    assert result["magpie_train_prompts"] == 8 and result["magpie_eval_prompts"] == 4
    assert {f: f.stat().st_mtime_ns for f in (work / "magpie").glob("*/shard_*.json")} == shards, (
        "prompts written again"
    )
    # The Magpie prompts have continuations of their own, and training read them beside the template prompts'.
    (magpie_dir,) = (work / "data").glob("train-magpie8-*-greedy-*")
    continued = [r for f in sorted(magpie_dir.glob("shard_*.pt")) for r in torch.load(f, weights_only=True)]
    assert all(r["cont_ids"].numel() > 0 for r in continued)
    asked = [tokenizer.decode(r["prompt_ids"]).rsplit("<|im_start|>user\n", 1)[1] for r in continued]
    assert sorted(asked) == sorted(
        line["messages"][-1]["content"] + "<|im_end|>\n<|im_start|>assistant\n" for line in lines
    )
    (signature,) = [json.loads(f.read_text()) for f in (work / "train").glob("*/signature.json")]
    # Magpie's first: what people ask is written before a tight budget runs out on the templates.
    assert [key.split("-")[1] for key, _ in signature["data"]] == ["magpie8", "greedy"]
    assert result["train_continuations"] == 16 + 8  # --smoke's 16 template prompts, greedy only
    # The figures: held-out template prompts, the Magpie evaluation set and the chat prompts, per family.
    figures = result["heldout"]
    assert figures["magpie"]["prompts"] == 4 and figures["chat"]["prompts"] == 48
    assert set(figures["chat"]["per_family"]) == {"chat", "system", "multiturn"}
    assert 0.0 <= result["magpie_agreement"] <= 1.0 and 0.0 <= result["chat_agreement"] <= 1.0
    assert {"heldout_agreement", "magpie_agreement", "chat_agreement"} <= set(result["history"][-1])

    # The same command again redoes nothing.
    data = {f: f.stat().st_mtime_ns for f in (work / "data").glob("*/shard_*.pt")}
    assert run(build_parser().parse_args(argv))["step"] == 10
    assert {f: f.stat().st_mtime_ns for f in (work / "data").glob("*/shard_*.pt")} == data

    # --gen-minutes is this run's budget: generation spent on other prompt sets (an earlier run's
    # Magpie prompts here, however long it took) is not charged to it.
    other = work / "data" / "train-magpie999-0000-greedy-000000000000"
    other.mkdir()
    (other / "spent.json").write_text(json.dumps({"seconds": 1e6}))
    more = run(build_parser().parse_args([*argv, "--magpie", "12", "--gen-minutes", "5"]))
    assert more["magpie_train_prompts"] == 12 and more["train_continuations"] == 16 + 12

    # In blocks: a later stage with more prompts (the first 8 the same) continues only the new ones.
    monkeypatch.setattr(cli, "MAGPIE_BLOCK", 8)
    grown = run(build_parser().parse_args([*argv, "--magpie", "12"]))
    assert grown["magpie_train_prompts"] == 12 and grown["train_continuations"] == 16 + 12
    assert {f: f.stat().st_mtime_ns for f in magpie_dir.glob("shard_*.pt")} == {
        f: t for f, t in data.items() if f.parent == magpie_dir
    }, "the first block continued again"
    (signature,) = [
        s for f in (work / "train").glob("*/signature.json") if len((s := json.loads(f.read_text()))["data"]) == 3
    ]
    assert [key.split("-")[1] for key, _ in signature["data"]] == ["magpie8", "magpie4", "greedy"]

    # A block that an earlier stage's shorter one begins (the 12 prompts of --magpie 12 in one block,
    # above) takes its complete shard rather than continuing those prompts again.
    monkeypatch.setattr(cli, "MAGPIE_BLOCK", 16)
    assert run(build_parser().parse_args([*argv, "--magpie", "16"]))["magpie_train_prompts"] == 16
    (twelve,) = (work / "data").glob("train-magpie12-*-greedy-*")
    (sixteen,) = (work / "data").glob("train-magpie16-*-greedy-*")
    assert (sixteen / "shard_00000.pt").samefile(twelve / "shard_00000.pt")
    assert len(list(sixteen.glob("shard_*.pt"))) == 2


def test_a_block_adopts_the_answers_an_earlier_stage_wrote_to_its_first_prompts(tmp_path) -> None:
    """A stage that ended mid-block (20,000 prompts: blocks of 8,000, 8,000 and 4,000) answered the
    first prompts of the next stage's third block under that shorter block's key."""
    block = [Prompt("chat", f"What is {i} times {i}?", (("system", "Be brief."),)) for i in range(8)]
    assert prefix_digests(block) == [digest(block[:k]) for k in range(1, 9)]
    kind, data = GenSettings(shard_prompts=2), tmp_path / "data"

    def earlier(length: int, shards: int, seconds: float) -> Path:
        path = data / kind.key("large", f"train-magpie{length}-{digest(block[:length])}")
        path.mkdir(parents=True)
        for index in range(shards):
            torch.save([{"length": length, "shard": index}], path / f"shard_{index:05d}.pt")
        (path / "spent.json").write_text(json.dumps({"seconds": seconds}))
        return path

    five = earlier(5, 3, 30.0)  # two full shards, and one of the fifth prompt alone
    seven = earlier(7, 1, 10.0)  # a run whose budget ran out after one shard

    cli.adopt_earlier_block(data, replace(kind, batch_size=8), "large", block)  # other settings: other answers
    cli.adopt_earlier_block(data, kind, "large", block[1:])  # other prompts first
    assert sorted(p.name for p in data.iterdir()) == sorted([five.name, seven.name])

    cli.adopt_earlier_block(data, kind, "large", block)
    target = data / kind.key("large", cli.magpie_split(block))
    assert sorted(f.name for f in target.glob("shard_*.pt")) == ["shard_00000.pt", "shard_00001.pt"]
    assert torch.load(target / "shard_00000.pt", weights_only=True) == [{"length": 7, "shard": 0}]
    assert torch.load(target / "shard_00001.pt", weights_only=True) == [{"length": 5, "shard": 1}]
    assert not list(target.glob("*.tmp*"))
    assert spent_seconds(target) == 10.0 + 10.0  # each shard's share of its block's time: the budget counts them
    cli.adopt_earlier_block(data, kind, "large", block)  # again: nothing to adopt, nothing counted twice
    assert spent_seconds(target) == 20.0
