"""Small random-weight models and a tiny tokenizer, built from configs, for fast real-model tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 512
EOS = "<|im_end|>"
SPECIALS = ["<|endoftext|>", "<|im_start|>", EOS]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Big Little Decoder lets a small model write and a large model check. ",
    "The quick brown fox jumps over the lazy dog. Translate to French: good morning, my friend! ",
    "def add(a, b):\n    return a + b\n# Summarize: streaming tokens settle once verified. ",
    "Héllo wörld, ça va? 日本語のテキスト, emoji 🙂 and numbers 12345. ",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB tokens: every string encodes, multi-byte characters span tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)
    fast.chat_template = CHATML
    return fast


def build_llama(seed: int, hidden: int = 64, layers: int = 2, init: float = 0.5) -> LlamaForCausalLM:
    """Peaky random weights (large init) keep argmax gaps far above float32 noise."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=init,
        tie_word_embeddings=True,
        eos_token_id=SPECIALS.index(EOS),
        pad_token_id=SPECIALS.index(EOS),
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def noisy_copy(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A draft that agrees with `model` often but not always (about 70% at scale 0.02)."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale * p.std())
    return draft


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def smollm2_shaped_config(tokenizer) -> LlamaConfig:
    """A tiny Llama over SmolLM2's real tokenizer (its vocabulary and special tokens), drawn 10x
    wider than the usual init (0.2 against 0.02): the align tests need a model whose answers vary."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
