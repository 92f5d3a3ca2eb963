"""A small and a large model that share one tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from scheduler.loading import DTYPES, load_model

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass
class ModelPair:
    large: PreTrainedModel
    small: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: the generation config's (it may list several) and the tokenizer's."""
        ids = self.large.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def context_length(self) -> int:
        lengths = [getattr(m.config, "max_position_embeddings", None) for m in (self.large, self.small) if m]
        return min(n for n in lengths if n) if any(lengths) else 2048


def tokenizer_mismatch(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str | None:
    """Describe how two tokenizers differ in a way that matters for drafting, or None if they agree."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:5]
        only_b = sorted(set(vb) - set(va))[:5]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:5]
        return (
            f"vocabularies differ (large {len(va)} tokens, small {len(vb)}; only in large: {only_a}, "
            f"only in small: {only_b}, different ids: {moved})"
        )
    for name in SPECIAL_TOKENS:
        if getattr(a, name) != getattr(b, name):
            return f"{name} differs (large {getattr(a, name)!r}, small {getattr(b, name)!r})"
    return None


def load_pair(
    large: str, small: str | None, device: str = "cpu", dtype: str = "float32", weights: str = "float"
) -> ModelPair:
    """Load a pair and refuse it if the tokenizers differ; `weights` (see load_model) for both models."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    large_model, tokenizer = load_model(large, device, dtype, weights)
    small_model = None
    if small:
        small_model, small_tokenizer = load_model(small, device, dtype, weights)
        if small_model.config.is_encoder_decoder != large_model.config.is_encoder_decoder:
            kinds = {True: "an encoder-decoder", False: "a decoder-only model"}
            raise ValueError(
                f"the small model {small!r} is {kinds[small_model.config.is_encoder_decoder]} but the large "
                f"model is {kinds[large_model.config.is_encoder_decoder]}: a pair must be of one kind"
            )
        problem = tokenizer_mismatch(tokenizer, small_tokenizer)
        if problem:
            raise ValueError(f"the small model {small!r} does not share the large model's tokenizer: {problem}")
    return ModelPair(large_model, small_model, tokenizer)
