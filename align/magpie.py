"""Prompts from the large model's own distribution: user turns it writes itself (Magpie, Xu et al.
2024, arXiv 2406.08464).

An instruct model whose chat template is opened for a user turn, and left there, writes a user turn:
the kind of request its training taught it to expect. For SmolLM2-135M-Instruct that works after its
default system turn (which its template adds): sampled at temperature 1.0, top-p 0.95, it writes
plausible requests; with the user turn alone about half were answers, code or noise. The turn ends
at the template's end-of-turn token, which is the tokenizer's eos.

So that the turns cover what a draft must serve (chat, questions, translation, summarization, code,
continuation), not only what the model asks most often, most of them begin with a few words that
open a family of requests (an `Opening`: "Translate", "Write a Python", ...), and some come after a
system turn of another kind or after an earlier exchange. A filter drops what is no request
(too short, too long, unfinished, mostly not letters, an assistant's answer) and every repeat of a
prompt already kept or of a template prompt (align/prompts.py), exact or sharing its first words.

Writing is cached like alignment data: the raw turns go in shards under work_dir/magpie/<key>,
written atomically, where the key hashes what decides them (model, seed, sampling, openings). How
many prompts are asked for is not in it: a shard is the same for any count, the filter keeps the
first prompts that pass in shard order, so asking for more adds shards and keeps the earlier prompts.

Two sets are drawn: evaluation prompts, with a seed of their own that `--seed` leaves alone, so every
draft is judged on the same prompts whatever it trained on; and training prompts, which skip anything
that repeats one of a fixed pool of evaluation prompts, so the training set stays the same however
many of that pool an evaluation uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align.generate import complete
from align.prompts import Context, Prompt, all_prompts
from scheduler.model_runner import CausalLMRunner
from scheduler.request import Mode, Request, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

# Bump when the openings or the shard format change, so stale shards are not reused.
MAGPIE_VERSION = 1

EVAL_SEED = 1
EVAL_POOL = 400  # evaluation prompts set aside: `--magpie-eval` uses the first of them


@dataclass(frozen=True)
class Opening:
    family: str
    words: str = ""  # what the user turn starts with ("": whatever the model writes)
    context: Context = ()  # (role, content) turns before it


def _exchange(user: str, assistant: str) -> Context:
    return (("user", user), ("assistant", assistant))


# Written for this project; none shares a topic with bench/chat.jsonl, which stays an independent test.
EXCHANGES = [
    _exchange(
        "I want to start running in the mornings.",
        "That's a great goal! How much running have you done before, and how many days a week can you train?",
    ),
    _exchange(
        "Can you suggest a name for my new puppy?",
        "Of course! Here are a few ideas: Biscuit, Luna, Milo, Pepper and Scout. Is your puppy a boy or a girl?",
    ),
    _exchange(
        "What is the capital of Australia?",
        "The capital of Australia is Canberra. Many people think it is Sydney, which is the largest city.",
    ),
    _exchange(
        "Write a Python function that adds two numbers.",
        "Here is a simple function:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n"
        "It takes two numbers and returns their sum.",
    ),
    _exchange("Translate 'good night' into Spanish.", "'Good night' in Spanish is 'buenas noches'."),
    _exchange(
        "Tell me a short story about a dragon.",
        "Once upon a time, a small dragon named Ember was afraid of fire. One cold winter night, the village "
        "children were freezing, and Ember found the courage to light a warm, gentle flame for them.",
    ),
]
SYSTEM_TURNS = [
    "You are a friendly tutor who explains things step by step.",
    "You are a programming assistant. Answer with code when it helps.",
]

# Families as in align/prompts.py, plus questions, other system turns and follow-ups. Attempts take
# the openings in turn; the plain one, the model's own unsteered distribution, comes up four times.
OPENINGS: tuple[Opening, ...] = (
    Opening("chat"),
    Opening("chat", "Can you"),
    Opening("question", "What"),
    Opening("translation", "Translate"),
    Opening("code", "Write a Python"),
    Opening("summarization", "Summarize"),
    Opening("continuation", "Continue the story"),
    *(Opening("multiturn", context=c) for c in EXCHANGES[:3]),
    Opening("chat"),
    Opening("chat", "I need"),
    Opening("question", "How do I"),
    Opening("translation", "How do you say"),
    Opening("code", "Write a function"),
    Opening("summarization", "Give me a short summary of"),
    Opening("continuation", "Complete this sentence:"),
    *(Opening("system", context=(("system", s),)) for s in SYSTEM_TURNS),
    Opening("chat"),
    Opening("chat", "Write a"),
    Opening("question", "Explain"),
    Opening("question", "Why"),
    Opening("code", "How do I fix"),
    Opening("code", "Write a JavaScript"),
    Opening("summarization", "What is the main idea"),
    Opening("continuation", "Write the next paragraph"),
    *(Opening("multiturn", context=c) for c in EXCHANGES[3:]),
    Opening("chat"),
    Opening("chat", "Give me"),
    Opening("chat", "Help me"),
    Opening("question", "Is it"),
    Opening("code", "Explain this code"),
    Opening("continuation", "Continue this text:"),
)


@dataclass(frozen=True)
class MagpieSettings:
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 64  # a turn still going then is dropped as unfinished
    batch_size: int = 32
    shard_attempts: int = 128  # turns per shard file

    def key(self, large_spec: str) -> str:
        blob = json.dumps({"v": MAGPIE_VERSION, "large": large_spec, **asdict(self)}, sort_keys=True)
        return f"seed{self.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# Filters: a user turn of 3 to 40 words (the hand-written chat prompts of bench/ have 6 to 30),
# mostly letters, that does not open the way answers do.
MIN_WORDS, MAX_WORDS = 3, 40
MIN_LETTERS = 0.5  # share of the characters other than spaces
ANSWER_OPENINGS = re.compile(
    r"(sure|certainly|of course|absolutely|as an ai|i'm sorry|i am sorry|i'd be happy to|i would be happy to"
    r"|great question|what a great question|i'm smollm|i am smollm)\b"
)
NEAR_WORDS = 8  # turns that share their first 8 words are near-duplicates


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def rejection(text: str) -> str | None:
    """Why a user turn is no prompt worth keeping, or None when it is one."""
    words = text.split()
    if len(words) < MIN_WORDS:
        return "too short"
    if len(words) > MAX_WORDS:
        return "too long"
    visible = "".join(words)
    if sum(c.isalpha() for c in visible) < MIN_LETTERS * len(visible):
        return "not text"
    if ANSWER_OPENINGS.match(normalized(text)):
        return "answer"
    return None


class Seen:
    """The prompts kept so far, to tell repeats: the same turn (in lower case, with spaces collapsed),
    or one that shares its first NEAR_WORDS words, after the same context."""

    def __init__(self, prompts: Iterable[Prompt] = ()) -> None:
        self.exact: set[tuple[Context, str]] = set()
        self.near: set[tuple[Context, str]] = set()
        for p in prompts:
            self.add(p)

    @staticmethod
    def _keys(prompt: Prompt) -> tuple[tuple[Context, str], tuple[Context, str]]:
        text = normalized(prompt.text)
        return (prompt.context, text), (prompt.context, " ".join(text.split()[:NEAR_WORDS]))

    def repeat(self, prompt: Prompt) -> str | None:
        exact, near = self._keys(prompt)
        return "repeat" if exact in self.exact else "near repeat" if near in self.near else None

    def add(self, prompt: Prompt) -> None:
        exact, near = self._keys(prompt)
        self.exact.add(exact)
        self.near.add(near)


def user_turn_prefix(tokenizer: PreTrainedTokenizerBase, context: Context = ()) -> str:
    """The chat template rendered up to where a user turn's text begins, after `context` (and
    whatever the template adds by itself, such as SmolLM2's default system turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("writing user turns needs the large model's chat template, and its tokenizer has none")
    marker = "MAGPIE-USER-TURN"  # rendered as the user's text, then cut off with everything after it
    messages = [{"role": r, "content": c} for r, c in context] + [{"role": "user", "content": marker}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text[: text.index(marker)]


def shard_path(data_dir: Path, index: int) -> Path:
    return data_dir / f"shard_{index:05d}.json"


def write_shard(
    tokenizer: PreTrainedTokenizerBase,
    scheduler: Scheduler,
    prefixes: list[list[int]],
    settings: MagpieSettings,
    index: int,
) -> list[dict]:
    """The attempts of shard `index`: per attempt its opening, the turn's text and whether it ended
    within max_new_tokens without template markup inside."""
    first = index * settings.shard_attempts
    openings = [OPENINGS[(first + i) % len(OPENINGS)] for i in range(settings.shard_attempts)]
    requests = [
        Request(
            str(i),
            prefixes[(first + i) % len(OPENINGS)],
            SamplingParams(
                mode=Mode.LARGE,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=settings.seed * 1_000_003 + first + i,
            ),
        )
        for i in range(settings.shard_attempts)
    ]
    tokens, _ = complete(scheduler, requests)
    eos, specials = tokenizer.eos_token_id, set(tokenizer.all_special_ids)
    attempts = []
    for opening, r in zip(openings, requests):
        turn = tokens[r.request_id]
        ended = bool(turn) and turn[-1] == eos
        body = turn[:-1] if ended else turn
        attempts.append(
            {
                "family": opening.family,
                "context": opening.context,
                "ended": ended,
                "markup": any(t in specials for t in body),
                "text": (opening.words + tokenizer.decode(body)).strip(),
            }
        )
    return attempts


def attempts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: Path,
    settings: MagpieSettings,
    max_attempts: int,
) -> Iterator[dict]:
    """The attempts in order, shard after shard, writing each shard that is not there yet when it is
    reached (so only as many as the caller reads)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    prefixes = [
        tokenizer(user_turn_prefix(tokenizer, o.context) + o.words, add_special_tokens=False)["input_ids"]
        for o in OPENINGS
    ]
    scheduler = None
    for index in range(-(-max_attempts // settings.shard_attempts)):
        path = shard_path(data_dir, index)
        if not path.is_file():
            if scheduler is None:
                max_len = max(map(len, prefixes)) + settings.max_new_tokens + 1
                config = SchedulerConfig(
                    max_num_seqs=settings.batch_size, max_num_tokens=settings.batch_size * max_len, max_seq_len=max_len
                )
                scheduler = Scheduler(
                    None, CausalLMRunner(model, settings.batch_size, max_len), config, {tokenizer.eos_token_id}
                )
            shard = write_shard(tokenizer, scheduler, prefixes, settings, index)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(shard))
            tmp.rename(path)  # atomic: an interrupted run never leaves half a shard
        yield from json.loads(path.read_text())


def attempt_rejection(attempt: dict) -> str | None:
    if not attempt["ended"]:
        return "unfinished"
    if attempt["markup"]:
        return "markup"
    return rejection(attempt["text"])


def magpie_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    large_spec: str,
    work_dir: Path,
    settings: MagpieSettings,
    count: int,
    exclude: Iterable[Prompt] = (),
    max_attempts_per_prompt: int = 20,
) -> list[Prompt]:
    """The first `count` user turns the large model writes with these settings that pass the
    filters and repeat neither one another, nor a template prompt, nor one of `exclude`. Gives up,
    with fewer, after max_attempts_per_prompt * count attempts (a model that writes no requests)."""
    data_dir = work_dir / "magpie" / settings.key(large_spec)
    seen = Seen([*all_prompts(), *exclude])
    kept: list[Prompt] = []
    dropped: Counter[str] = Counter()
    bar = tqdm(total=count, desc=f"magpie prompts seed {settings.seed}", unit="prompt", dynamic_ncols=True)
    stream = attempts(model, tokenizer, data_dir, settings, max_attempts_per_prompt * count)
    while len(kept) < count and (attempt := next(stream, None)) is not None:
        prompt = Prompt(attempt["family"], attempt["text"], tuple(tuple(turn) for turn in attempt["context"]))
        reason = attempt_rejection(attempt) or seen.repeat(prompt)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(prompt)
        kept.append(prompt)
        bar.update(1)
    bar.close()
    log.info("magpie prompts (%s): kept %d, dropped %s", data_dir.name, len(kept), dict(dropped.most_common()))
    if len(kept) < count:
        log.warning(
            "magpie prompts (%s): only %d of %d asked for after %d attempts",
            data_dir.name,
            len(kept),
            count,
            max_attempts_per_prompt * count,
        )
    return kept


def magpie_sets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    large_spec: str,
    work_dir: Path,
    n_train: int,
    n_eval: int,
    seed: int = 0,
    pool: int = EVAL_POOL,
    settings: MagpieSettings = MagpieSettings(),
    writer: tuple[PreTrainedModel, str, MagpieSettings] | None = None,
) -> tuple[list[Prompt], list[Prompt]]:
    """(training, evaluation) prompts: the first n_eval of the evaluation pool (its own seed, EVAL_SEED),
    and n_train training prompts (`seed`) that repeat none of the whole pool. `writer`: who writes the
    training prompts, when not `model` with `settings`: a model (a faster copy), its spec for the cache
    key, and its settings (a larger batch); the evaluation pool stays the same whatever writes them."""
    if n_eval > pool:
        raise ValueError(f"at most {pool} Magpie evaluation prompts (the pool set aside), not {n_eval}")
    held = replace(settings, seed=EVAL_SEED)
    if not n_train:  # the pool's first prompts do not depend on its size
        return [], magpie_prompts(model, tokenizer, large_spec, work_dir, held, n_eval) if n_eval else []
    evaluation = magpie_prompts(model, tokenizer, large_spec, work_dir, held, pool)
    train_model, train_spec, train_settings = writer or (model, large_spec, settings)
    training = magpie_prompts(
        train_model, tokenizer, train_spec, work_dir, replace(train_settings, seed=seed), n_train, exclude=evaluation
    )
    return training, evaluation[:n_eval]


def write_prompts(path: Path, prompts: list[Prompt]) -> None:
    """JSON lines of {"family", "messages"}: the conversations as the large model continues them."""
    lines = [
        json.dumps(
            {
                "family": p.family,
                "messages": [{"role": r, "content": c} for r, c in p.context] + [{"role": "user", "content": p.text}],
            }
        )
        for p in prompts
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
