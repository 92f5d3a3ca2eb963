"""Small random-weight models and a tiny tokenizer, built from configs, for fast real-model tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

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


def noisy_copy(model: PreTrainedModel, scale: float, seed: int) -> PreTrainedModel:
    """A draft that agrees with `model` often but not always (about 70% at scale 0.02)."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale * p.std())
    return draft


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> str:
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


def build_t5(seed: int, gated: bool = False, d_model: int = 64, layers: int = 2) -> T5ForConditionalGeneration:
    """A T5 (relu) or mT5-style (gated-gelu, untied head) encoder-decoder over the tiny tokenizer;
    a large init factor keeps its answers varied and its argmax gaps wide."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=24,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        initializer_factor=8.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=SPECIALS.index(EOS),
    )
    return T5ForConditionalGeneration(config).eval()


def _bart_family_shape(d_model: int, layers: int) -> dict:
    """The sizes Marian's and BART's configs share (the same config fields)."""
    return dict(
        vocab_size=VOCAB,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_position_embeddings=512,
    )


def build_marian(seed: int, d_model: int = 64, layers: int = 2) -> MarianMTModel:
    """A Marian translation model (sinusoidal positions, final logits bias) over the tiny tokenizer."""
    torch.manual_seed(seed)
    config = MarianConfig(
        **_bart_family_shape(d_model, layers),
        init_std=0.1,  # with unscaled, untied embeddings: the widest spread of answers among the inits tried
        scale_embedding=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=SPECIALS.index(EOS),
        forced_eos_token_id=None,
    )
    return MarianMTModel(config).eval()


def build_bart(seed: int, d_model: int = 64, layers: int = 2) -> BartForConditionalGeneration:
    """A BART (learned position table two rows in, embedding layer norm) over the tiny tokenizer."""
    torch.manual_seed(seed)
    config = BartConfig(
        **_bart_family_shape(d_model, layers),
        init_std=0.15,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=SPECIALS.index(EOS),
        forced_bos_token_id=None,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config).eval()
