"""Loading a pair: by directory and GGUF file, and refusing tokenizers that differ."""

from __future__ import annotations

import pytest
import torch

from scheduler.loading import SMOLLM2_ALIAS, resolve_source, smollm2_gguf_path
from scheduler.pair import load_pair
from tests import tiny


def test_pair_loads_from_directories(tiny_dirs):
    pair = load_pair(tiny_dirs["large"], tiny_dirs["draft"], dtype="bfloat16")
    assert pair.large.dtype == torch.bfloat16 and pair.small.dtype == torch.bfloat16
    assert pair.eos_token_ids == {tiny.SPECIALS.index(tiny.EOS)}


def test_pair_with_different_vocabularies_is_refused(tiny_dirs, tmp_path):
    other = tiny.build_tokenizer()
    other.add_tokens(["<extra_token>"])
    path = tiny.save(tiny.build_llama(seed=4, hidden=32, layers=1), other, tmp_path / "other")
    with pytest.raises(ValueError, match=r"vocabularies differ.*only in small: \['<extra_token>'\]"):
        load_pair(tiny_dirs["large"], path)


def test_pair_with_different_special_tokens_is_refused(tiny_dirs, tmp_path):
    other = tiny.build_tokenizer()
    other.eos_token = "<|endoftext|>"
    path = tiny.save(tiny.build_llama(seed=4, hidden=32, layers=1), other, tmp_path / "other")
    with pytest.raises(ValueError, match="eos_token differs"):
        load_pair(tiny_dirs["large"], path)


def test_gguf_sources_resolve():
    assert resolve_source(SMOLLM2_ALIAS).gguf_file == smollm2_gguf_path().name
    source = resolve_source(str(smollm2_gguf_path()))
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(FileNotFoundError):
        resolve_source("/nonexistent/model.gguf")


def test_unknown_dtype_is_refused(tiny_dirs):
    with pytest.raises(ValueError, match="dtype"):
        load_pair(tiny_dirs["large"], None, dtype="int3")
