"""Create the small model, and save it as a directory transformers loads on its own."""

from __future__ import annotations

import json
import logging
import shutil
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from scheduler import output_vocab

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 25_000_000  # the shipped directory must stay under 25 MB


@dataclass(frozen=True)
class SmallArch:
    hidden_size: int = 192
    num_layers: int = 5
    num_heads: int = 3
    num_kv_heads: int = 1
    intermediate_size: int = 512


def create_small(large: PreTrainedModel, arch: SmallArch, seed: int) -> LlamaForCausalLM:
    """A Llama-shaped small model with the large model's vocabulary and special tokens.

    Its tied embedding starts as a PCA of the large model's embedding: the small model then begins
    with the large model's notion of which tokens are alike, which a 192-wide random start lacks.
    """
    lc = large.config
    head_dim = arch.hidden_size // arch.num_heads
    rope = getattr(lc, "rope_parameters", None) or {
        "rope_type": "default",
        "rope_theta": getattr(lc, "rope_theta", 10000.0),
    }
    config = LlamaConfig(
        vocab_size=lc.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=lc.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope),
        tie_word_embeddings=True,
        bos_token_id=lc.bos_token_id,
        eos_token_id=lc.eos_token_id,
        pad_token_id=getattr(lc, "pad_token_id", None),
    )
    torch.manual_seed(seed)
    small = LlamaForCausalLM(config)
    with torch.no_grad():
        big = large.get_input_embeddings().weight.detach().float()
        if arch.hidden_size <= big.shape[1]:  # a wider small model keeps its random embedding
            projected = big @ pca_basis(big, arch.hidden_size)
            # Keep the directions but not the scale: SmolLM2's projected rows have norm ~2.7, which
            # against a unit-RMS hidden state gives initial logits of +-40 and a first loss of 34
            # nats (uniform is 10.8); scaled to the usual init std, training starts sanely.
            projected *= config.initializer_range / projected.std()
            small.get_input_embeddings().weight.copy_(projected)
    small.tie_weights()
    return small


def pca_basis(matrix: torch.Tensor, dims: int) -> torch.Tensor:
    """The top `dims` principal directions (columns) of the rows of `matrix`."""
    centered = matrix - matrix.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    return vh[:dims].T.contiguous()


def _compact_tokenizer_json(directory: Path) -> None:
    """tokenizer.json is pretty-printed (3.5 MB for SmolLM2); the same JSON without indentation is
    1.6 MB and loads the same, which keeps the directory under its size limit."""
    path = directory / "tokenizer.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def save_small(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    dtype: torch.dtype = torch.bfloat16,
    info: dict | None = None,
    max_bytes: int = MAX_OUTPUT_BYTES,
    vocab_ids: list[int] | None = None,
) -> int:
    """Save model (as `dtype` safetensors), tokenizer and generation config into `out`, replacing it
    only once the new copy is complete. Returns the directory's size in bytes.

    `vocab_ids`: the tokens the model was trained to predict, which bild's runner then scores
    alone (see scheduler/output_vocab.py)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy = deepcopy(model).to(dtype)  # the caller keeps training its float32 model
    copy.config.dtype = str(dtype).removeprefix("torch.")
    copy.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    copy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _compact_tokenizer_json(tmp)
    if vocab_ids is not None:
        output_vocab.save(
            tmp, vocab_ids, "the large model's choices in the alignment data: bild's runner scores only these tokens"
        )
    if info is not None:
        (tmp / "alignment.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    size = directory_bytes(tmp)
    if size > max_bytes:
        raise ValueError(
            f"small model directory is {size} bytes, over the {max_bytes} limit: choose a smaller architecture"
        )
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return size
