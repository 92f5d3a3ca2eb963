"""Alignment data: the large model's own continuations of the prompt set, with its top-k log-probs.

Generation is the slow part of alignment (about 80 tokens/s for SmolLM2-135M on 2 CPU cores), so
it is cut into shards that are written atomically as they finish; a rerun skips the shards that
exist, which is how an interrupted run resumes. The shard contents depend only on the settings
hashed into the data directory name, so asking for more prompts later just adds shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from align.cpu import governor
from align.prompts import Prompt

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

    def key(self, large_spec: str, split: str) -> str:
        blob = json.dumps({"v": DATA_VERSION, "large": large_spec, "split": split, **asdict(self)}, sort_keys=True)
        kind = "sampled" if self.sampled else "greedy"
        return f"{split}-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def render(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """A user turn in the tokenizer's chat template, ready for the assistant's answer."""
    messages = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + "\n"  # a tokenizer without a template (test fixtures): plain text


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return [tokenizer(render(tokenizer, t), add_special_tokens=False)["input_ids"] for t in texts]


class _GovernThreads(StoppingCriteria):
    """Never stops generation: it is the per-step hook that re-checks the machine's load."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        governor().poll()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel, prompt_ids: list[list[int]], settings: GenSettings, eos_id: int, pad_id: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Continue each prompt; return per prompt its ids, continuation ids (ending at eos if reached)
    and the large model's top-k log-probs at every continuation position."""
    width = max(len(p) for p in prompt_ids)
    # Left padding keeps every sequence's last prompt token in the same column.
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    torch.manual_seed(seed)
    sample_args = {"do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": 1.0} if settings.sampled else {"do_sample": False}
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        output_logits=True,  # raw logits: the large model's distribution, before any sampling warper
        return_dict_in_generate=True,
        stopping_criteria=StoppingCriteriaList([_GovernThreads()]),
        **sample_args,
    )
    new = out.sequences[:, width:]
    logits = torch.stack(out.logits, dim=1).float()  # batch x steps x vocab
    records = []
    for b, prompt in enumerate(prompt_ids):
        ids = new[b]
        ends = (ids == eos_id).nonzero()
        length = int(ends[0]) + 1 if len(ends) else ids.numel()  # keep the eos: the draft must learn to stop
        logp = torch.log_softmax(logits[b, :length], dim=-1)
        top_logp, top_ids = logp.topk(settings.topk, dim=-1)
        records.append(
            {
                "prompt_ids": torch.tensor(prompt, dtype=torch.int32),
                "cont_ids": ids[:length].to(torch.int32).clone(),
                "topk_ids": top_ids.to(torch.int32),
                "topk_logp": top_logp.to(torch.float16),
            }
        )
    return records


def shard_path(data_dir: Path, index: int) -> Path:
    return data_dir / f"shard_{index:05d}.pt"


def generate_shards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    data_dir: Path,
    settings: GenSettings,
    budget_s: float | None = None,
    desc: str = "generate",
) -> int:
    """Write the shards for `prompts` that are not there yet, stopping once `budget_s` seconds of
    generation have been spent in this data directory over all runs (kept in spent.json, so a
    resumed run honours what the interrupted one already used and ends with the same data).

    Returns the number of complete shards (a prefix of the prompt list)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    spent_file = data_dir / "spent.json"
    spent = json.loads(spent_file.read_text())["seconds"] if spent_file.is_file() else 0.0
    (data_dir / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    n_shards = (len(prompts) + settings.shard_prompts - 1) // settings.shard_prompts
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    done = sum(shard_path(data_dir, i).is_file() for i in range(n_shards))
    bar = tqdm(total=n_shards, initial=done, desc=desc, unit="shard", dynamic_ncols=True)
    tokens, started = 0, time.time()
    for index in range(n_shards):
        path = shard_path(data_dir, index)
        if path.is_file():
            continue
        if budget_s is not None and spent >= budget_s:
            log.info("%s: generation budget of %.0f s spent after %d shards", desc, budget_s, index)
            break
        shard_started = time.time()
        chunk = prompts[index * settings.shard_prompts : (index + 1) * settings.shard_prompts]
        ids = encode_prompts(tokenizer, [p.text for p in chunk])
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
        records: list[dict | None] = [None] * len(ids)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            seed = settings.seed * 1_000_003 + index * 1009 + start
            governor().poll()  # adjusts torch's thread count to the cores free now
            for i, rec in zip(batch, generate_batch(model, [ids[i] for i in batch], settings, eos_id, pad_id, seed)):
                rec["family"] = chunk[i].family
                records[i] = rec
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
