"""Alignment data: the large model's own continuations of the prompt set, with its top-k log-probs.

Generation is the slow part of alignment (one large-model forward per token), so it is cut into
shards that are written atomically as they finish; a rerun skips the shards that exist, which is
how an interrupted run resumes. The shard contents depend only on the settings hashed into the data
directory name, so asking for more prompts later just adds shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from align.cpu import governor
from align.label import label_records
from align.prompts import Context, Prompt
from scheduler.logprobs import TokenLogprob
from scheduler.model_runner import CausalLMRunner
from scheduler.request import Mode, Request, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

# Bump when the shard format or the prompt set changes, so stale caches are not reused.
DATA_VERSION = 1


@dataclass(frozen=True)
class GenSettings:
    max_new_tokens: int = 96
    topk: int = 16  # log-probs kept per position for distillation
    batch_size: int = 32
    shard_prompts: int = 128  # prompts per shard file (several batches, sorted by length)
    sampled: bool = False  # False: greedy continuations; True: sampled ones
    temperature: float = 0.8
    seed: int = 0
    # Who writes the continuations: "" for the large model itself; else an identity of the small
    # model that writes them (bild-align uses the key of the training run that made it), while the
    # large model only labels them (label.py).
    writer: str = ""

    def key(self, large_spec: str, split: str) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "writer" or v}  # keys from before `writer` stay valid
        blob = json.dumps({"v": DATA_VERSION, "large": large_spec, "split": split, **fields}, sort_keys=True)
        kind = "onpolicy" if self.writer else "sampled" if self.sampled else "greedy"
        return f"{split}-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def render(tokenizer: PreTrainedTokenizerBase, text: str, context: Context = ()) -> str:
    """A user turn, after the (role, content) turns of `context`, in the tokenizer's chat template,
    ready for the assistant's answer."""
    messages = [{"role": role, "content": content} for role, content in context] + [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(m["content"] + "\n" for m in messages)  # a tokenizer without a template (test fixtures): plain text


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return [tokenizer(render(tokenizer, t), add_special_tokens=False)["input_ids"] for t in texts]


def encode_conversations(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]) -> list[list[int]]:
    return [tokenizer(render(tokenizer, p.text, p.context), add_special_tokens=False)["input_ids"] for p in prompts]


def make_scheduler(model: PreTrainedModel, settings: GenSettings, max_prompt: int, eos_id: int) -> Scheduler:
    """bild's own scheduler in large-only mode: continuous batching and the CPU-tuned runner make it
    faster than transformers' `generate` at the same batch size, with the same tokens."""
    max_len = max_prompt + settings.max_new_tokens + 1
    config = SchedulerConfig(
        max_num_seqs=settings.batch_size, max_num_tokens=settings.batch_size * max_len, max_seq_len=max_len
    )
    return Scheduler(None, CausalLMRunner(model, settings.batch_size, max_len), config, {eos_id})


def complete(
    scheduler: Scheduler, requests: list[Request]
) -> tuple[dict[str, list[int]], dict[str, list[TokenLogprob]]]:
    """Run the requests to their end; per request id, the tokens and (where asked for) log-probs."""
    for r in requests:
        scheduler.add(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    logprobs: dict[str, list[TokenLogprob]] = {r.request_id: [] for r in requests}
    while scheduler.has_work():
        governor().poll()  # adjusts torch's thread count to the cores free now
        for out in scheduler.step():
            tokens[out.request.request_id] += out.tokens
            logprobs[out.request.request_id] += out.logprobs or []
    return tokens, logprobs


def generate_records(
    scheduler: Scheduler,
    prompt_ids: list[list[int]],
    settings: GenSettings,
    seed: int,
    labeller: PreTrainedModel | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Continue each prompt; return per prompt its ids, continuation ids (ending at eos if reached)
    and the large model's top-k log-probs at every continuation position (raw, before sampling):
    recorded while generating, or, when another model writes (`labeller` is then the large one),
    computed afterwards by label.py."""
    requests = []
    for i, prompt in enumerate(prompt_ids):
        params = SamplingParams(
            mode=Mode.LARGE,
            max_new_tokens=settings.max_new_tokens,
            logprobs=labeller is None,
            top_logprobs=settings.topk if labeller is None else 0,
            temperature=settings.temperature if settings.sampled else 0.0,
            seed=seed + i,
        )
        requests.append(Request(str(i), prompt, params))
    tokens, logprobs = complete(scheduler, requests)
    if labeller is not None:
        records = [
            {
                "prompt_ids": torch.tensor(r.prompt, dtype=torch.int32),
                "cont_ids": torch.tensor(tokens[r.request_id], dtype=torch.int32),
            }
            for r in requests
        ]
        label_records(labeller, records, settings.topk)
        return records
    records = []
    for r in requests:
        top = logprobs[r.request_id]  # the eos, when reached, is the last token: the draft must learn to stop
        records.append(
            {
                "prompt_ids": torch.tensor(r.prompt, dtype=torch.int32),
                "cont_ids": torch.tensor(tokens[r.request_id], dtype=torch.int32),
                "topk_ids": torch.tensor([[t for t, _ in lp.top] for lp in top], dtype=torch.int32),
                "topk_logp": torch.tensor([[v for _, v in lp.top] for lp in top], dtype=torch.float16),
            }
        )
    return records


def shard_path(data_dir: Path, index: int) -> Path:
    return data_dir / f"shard_{index:05d}.pt"


def spent_seconds(data_dir: Path) -> float:
    """Generation time already spent on one data set over all runs (0 when none was written)."""
    f = data_dir / "spent.json"
    return json.loads(f.read_text())["seconds"] if f.is_file() else 0.0


def adopt_shards(data_dir: Path, source: Path, count: int) -> int:
    """Give `data_dir` the first `count` shards of `source`, a data set whose first prompts are the
    same and were continued with the same settings, where it lacks them: hard links (a copy where
    links fail), so no answer is written or stored twice. Each shard's share of the source's
    generation time comes along in spent.json, so a budget counts it as if it were written here.
    (The answers can differ from this set's own in a float's last bits: a scheduler's cache is sized
    by its set's longest prompt.)

    Returns the number of shards adopted."""
    data_dir.mkdir(parents=True, exist_ok=True)
    written = len(list(source.glob("shard_*.pt")))
    adopted = 0
    for index in range(count):
        src, dst = shard_path(source, index), shard_path(data_dir, index)
        if not src.is_file() or dst.exists():
            continue
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        # Time first, then the shard: an interruption between them may count a shard's time that was
        # never adopted (it is then written, and counted, again), never the reverse.
        seconds = spent_seconds(data_dir) + spent_seconds(source) / written
        (data_dir / "spent.json").write_text(json.dumps({"seconds": seconds}))
        tmp.rename(dst)  # atomic, as generate_shards writes them
        adopted += 1
    return adopted


def generate_shards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    data_dir: Path,
    settings: GenSettings,
    budget_s: float | None = None,
    desc: str = "generate",
    labeller: PreTrainedModel | None = None,
) -> int:
    """Write the shards for `prompts` that are not there yet, stopping once `budget_s` seconds of
    generation have been spent in this data directory over all runs (kept in spent.json, so a
    resumed run honours what the interrupted one already used and ends with the same data).

    Returns the number of complete shards (a prefix of the prompt list)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    spent_file = data_dir / "spent.json"
    spent = spent_seconds(data_dir)
    (data_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    n_shards = (len(prompts) + settings.shard_prompts - 1) // settings.shard_prompts
    done = sum(shard_path(data_dir, i).is_file() for i in range(n_shards))
    bar = tqdm(total=n_shards, initial=done, desc=desc, unit="shard", dynamic_ncols=True)
    if done == n_shards:
        bar.close()
        return n_shards
    ids = encode_conversations(tokenizer, prompts)
    scheduler = make_scheduler(model, settings, max(map(len, ids)), tokenizer.eos_token_id)
    tokens, started = 0, time.time()
    for index in range(n_shards):
        path = shard_path(data_dir, index)
        if path.is_file():
            continue
        if budget_s is not None and spent >= budget_s:
            log.info("%s: generation budget of %.0f s spent after %d shards", desc, budget_s, index)
            break
        shard_started = time.time()
        first = index * settings.shard_prompts
        chunk = prompts[first : first + settings.shard_prompts]
        records = generate_records(
            scheduler,
            ids[first : first + len(chunk)],
            settings,
            seed=settings.seed * 1_000_003 + first,
            labeller=labeller,
        )
        for prompt, rec in zip(chunk, records):
            rec["family"] = prompt.family
            tokens += rec["cont_ids"].numel()
        bar.set_postfix(tok_s=f"{tokens / (time.time() - started):.0f}", threads=torch.get_num_threads())
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(records, tmp)
        tmp.rename(path)  # atomic: an interrupted run never leaves half a shard
        spent += time.time() - shard_started
        spent_file.write_text(json.dumps({"seconds": spent}))
        bar.update(1)
    bar.close()
    complete = 0
    while complete < n_shards and shard_path(data_dir, complete).is_file():
        complete += 1
    return complete


def load_shards(data_dir: Path, count: int | None = None) -> list[dict]:
    """All records of the first `count` shards (all complete ones when None)."""
    records: list[dict] = []
    index = 0
    while (count is None or index < count) and shard_path(data_dir, index).is_file():
        records += torch.load(shard_path(data_dir, index), weights_only=True)
        index += 1
    return records
