"""Runs the decoder of an encoder-decoder model (T5, mT5, Marian, BART) over a batch of sequences.

Each sequence runs the encoder once, alone, when it is admitted (`encode`); the decoder's
cross-attention keys and values for it are computed then and kept in its slot, as its
self-attention keys and values are. Decoder forwards then look like a decoder-only model's: the
scheduler feeds each sequence's new decoder tokens on top of its cache, and a rollback shortens
only the self-attention cache (the source does not change).

Two things a batched decoder step needs that transformers' own code does not do per row:
  * positions: each sequence sits at its own decoder position. T5-family models encode it as a
    relative position bias built in their attention layers from one shared offset; Marian and
    BART add position embeddings from one shared offset. During a forward both are given the
    batch's per-row positions, computed by the model's own bias module or embedding table.
  * cross-attention over sources of different lengths: each row's padding beyond its own source
    is masked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers import EncoderDecoderCache, PreTrainedModel

from scheduler import cpu_linear
from scheduler.kv_cache import BatchLayout, SlotKVCache
from scheduler.model_runner import CausalLMRunner

# The families whose decoders bild gives per-row positions, each checked against transformers'
# greedy `generate`: T5's relative position bias (T5, mT5), or a position table (the rest). Others
# that look alike differ where it matters (UMT5's bias buckets, FSMT's and M2M100's position
# numbering), so they are refused rather than guessed at.
RELATIVE_BIAS = ("t5", "mt5")
POSITION_TABLE = ("marian", "bart", "mbart", "pegasus", "blenderbot-small")


def decoder_shape(config) -> tuple[int, int, int]:
    """(layers, heads, head size) of the decoder's attention."""
    if config.model_type in RELATIVE_BIAS:
        return config.num_decoder_layers or config.num_layers, config.num_heads, config.d_kv
    return config.decoder_layers, config.decoder_attention_heads, config.d_model // config.decoder_attention_heads


def unsupported(model: PreTrainedModel) -> str | None:
    """Why bild cannot serve this encoder-decoder, or None if it can."""
    kind = model.config.model_type
    if kind not in RELATIVE_BIAS + POSITION_TABLE:
        return (
            f"bild serves the encoder-decoder families {', '.join(RELATIVE_BIAS + POSITION_TABLE)}, not {kind}: "
            "each sequence needs its own decoder position, which bild sets per family"
        )
    if _cross_projections(model.get_decoder()) is None:
        return f"{kind}: its decoder layers have no cross-attention key/value projections bild knows"
    return None


def _relative_bias_modules(decoder: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in decoder.modules()
        if getattr(m, "has_relative_attention_bias", False) and hasattr(m, "relative_attention_bias")
    ]


class SlotEncoderDecoderCache(EncoderDecoderCache):
    """The pair of slot caches as transformers' encoder-decoder attention layers consult them: every
    cross-attention layer reads the batch's keys and values from the slot cache (`layers[i].keys`),
    which `encode` filled, instead of projecting encoder states."""

    def __init__(self, self_attention: SlotKVCache, cross_attention: SlotKVCache) -> None:
        # Not EncoderDecoderCache.__init__: it wants two DynamicCaches. Its methods read only these.
        self.self_attention_cache = self_attention
        self.cross_attention_cache = _CrossAttention(cross_attention)
        self.is_updated = dict.fromkeys(range(len(cross_attention)), True)


class _CrossAttention:
    """A slot cache seen as transformers' cross-attention cache."""

    class _Layer:
        def __init__(self, cache: SlotKVCache, index: int) -> None:
            self._cache, self._index = cache, index
            self._values: torch.Tensor | None = None

        @property
        def keys(self) -> torch.Tensor:  # attention reads keys, then values: one gather for both
            keys, self._values = self._cache.read(self._index)
            return keys

        @property
        def values(self) -> torch.Tensor:
            values, self._values = self._values, None
            return values if values is not None else self._cache.read(self._index)[1]

    def __init__(self, cache: SlotKVCache) -> None:
        self._cache = cache
        self.layers = [self._Layer(cache, i) for i in range(len(cache))]


def _cross_projections(decoder: nn.Module) -> list[tuple[nn.Module, nn.Module]] | None:
    """Each decoder layer's cross-attention key and value projections (T5's `EncDecAttention.k/v`,
    BART-style `encoder_attn.k_proj/v_proj`), or None where a layer has neither."""
    pairs = []
    for layer in getattr(decoder, "block", None) or getattr(decoder, "layers", None) or []:
        attention = getattr(layer, "encoder_attn", None)
        if attention is not None and hasattr(attention, "k_proj"):
            pairs.append((attention.k_proj, attention.v_proj))
            continue
        parts = getattr(layer, "layer", None)
        attention = getattr(parts[1], "EncDecAttention", None) if parts is not None and len(parts) > 1 else None
        if attention is None or not hasattr(attention, "k"):
            return None
        pairs.append((attention.k, attention.v))
    return pairs or None


class Seq2SeqRunner(CausalLMRunner):
    """Batched decoder forwards of a Hugging Face encoder-decoder model over slot caches.

    The decoder's context of a sequence is its decoder start token and what it generated; the
    source (the encoder's input) is given once to `encode`.
    """

    encoder_decoder = True

    def __init__(self, model: PreTrainedModel, num_slots: int, max_len: int, max_source_len: int) -> None:
        problem = unsupported(model)
        if problem:
            raise ValueError(problem)
        super().__init__(model, num_slots, max_len)
        self.cross = SlotKVCache(*self._kv_shape(model.config), num_slots, max_source_len, self.dtype, self.device)
        self.max_source_len = max_source_len
        # A slot never encoded still attends over one (zeroed) source position, so no softmax row is
        # empty; such rows are only the cost profile's and padding's.
        self.source_len = torch.ones(num_slots, dtype=torch.long, device=self.device)
        # The source whose cross-attention keys and values each slot holds: an identical source (a
        # retried request, a front-end's repeated text) copies them instead of encoding again.
        self.encoded: dict[int, tuple[int, ...]] = {}
        self.reuse_encodings = True
        decoder = model.get_decoder()
        if model.config.model_type in RELATIVE_BIAS:
            self._bias_modules, self._table = _relative_bias_modules(decoder), None
        else:
            self._bias_modules, self._table = [], decoder.embed_positions
        self._d_model = model.config.d_model
        self._cross_projections = _cross_projections(decoder)  # `unsupported` refused models without them
        gen = model.generation_config
        start = (
            gen.decoder_start_token_id
            if gen.decoder_start_token_id is not None
            else model.config.decoder_start_token_id
        )
        if start is None:
            raise ValueError(f"{model.config.model_type}: no decoder_start_token_id in its configuration")
        # What every decoder context starts with: the start token, and the token `generate` would
        # force first (mBART's target language, BART-CNN's BOS), which is then not streamed.
        forced = gen.forced_bos_token_id
        self.decoder_prompt = [start] if forced is None else [start, forced]

    @staticmethod
    def _kv_shape(config) -> tuple[int, int, int]:
        return decoder_shape(config)

    @torch.inference_mode()
    def encode(self, slot: int, source: list[int]) -> bool:
        """Run the encoder on one sequence's source, alone (so its states never depend on the batch),
        and keep the decoder's cross-attention keys and values for it in `slot`. Return True where
        a slot already held them for the same source and they were copied, bit for bit the same."""
        if len(source) > self.max_source_len:
            raise ValueError(f"the source has {len(source)} tokens; at most {self.max_source_len} fit")
        started = time.perf_counter()
        device, n = self.device, len(source)
        held = tuple(source)
        if self.reuse_encodings:
            other = (
                slot
                if self.encoded.get(slot) == held
                else next((s for s, h in self.encoded.items() if h == held), None)
            )
            if other is not None:
                self.cross.copy(other, slot, n)
                self.source_len[slot] = n
                self.encoded[slot] = held
                return True
        self.encoded.pop(slot, None)  # from here on the slot's cross cache is being rewritten
        ids = torch.tensor([source], device=device)
        # The encoder's products get the CPU's fast kernels too (cpu_linear): stock F.linear took 106
        # ms over a 64-token source for flan-t5-base's shape, against 41 ms.
        with cpu_linear.active():
            states = self.model.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        one = torch.tensor([slot], device=device)
        self.cross.prepare(
            BatchLayout(one, one[:, None].expand(1, n), torch.arange(n, device=device)[None], n, slice(slot, slot + 1))
        )
        # Each cross-attention layer's keys and values: its projections of the encoder states.
        _, heads, head_dim = decoder_shape(self.model.config)
        try:
            with cpu_linear.active():
                for index, (keys, values) in enumerate(self._cross_projections):
                    self.cross.write(
                        index, keys(states).view(1, n, heads, head_dim), values(states).view(1, n, heads, head_dim)
                    )
        finally:
            self.cross.layout = None
        self.source_len[slot] = n
        self.encoded[slot] = held
        self.forward_seconds += time.perf_counter() - started  # the policy counts it as model time
        return False

    def _run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, all_logits: bool
    ) -> torch.Tensor:
        batch, width = input_ids.shape
        layout = self.cache.layout  # the decoder's: its rows read the same slots' sources
        source_len = self.source_len[layout.slots]
        kv_len = min(self.max_source_len, -(-int(source_len.max()) // self.kv_bucket) * self.kv_bucket)
        no_writes = torch.zeros((batch, 0), dtype=torch.long, device=self.device)
        self.cross.prepare(BatchLayout(layout.slots, no_writes, no_writes, kv_len, layout.contiguous))
        beyond = torch.arange(kv_len, device=self.device)[None, :] >= source_len[:, None]  # [B, S]
        source_mask = torch.zeros((batch, 1, width, kv_len), dtype=self.dtype, device=self.device)
        source_mask.masked_fill_(beyond[:, None, None, :], self._mask_min)
        # The cross-attention layers read their keys from the cache; the encoder states are only
        # consulted for their shape, so a broadcast zero stands in for them.
        states = torch.zeros((1, 1, self._d_model), dtype=self.dtype, device=self.device).expand(batch, kv_len, -1)
        try:
            with ExitStack() as stack:
                stack.enter_context(self._per_row_positions(positions))
                if not all_logits:
                    # The seq2seq heads have no `logits_to_keep`. Rows are left-padded, so every row's
                    # last token is in the last column: only that column reaches the output head.
                    head = self.model.get_output_embeddings()
                    stack.enter_context(head.register_forward_pre_hook(lambda _, args: (args[0][:, -1:],)))
                out = self.model(
                    decoder_input_ids=input_ids,
                    decoder_attention_mask=mask,
                    attention_mask=source_mask,
                    encoder_outputs=(states,),
                    use_cache=True,
                    **{self._cache_kw: SlotEncoderDecoderCache(self.cache, self.cross)},
                )
        finally:
            self.cross.layout = None
        return out.logits

    @contextmanager
    def _per_row_positions(self, positions: torch.Tensor) -> Iterator[None]:
        """During one forward, the decoder places row b's query j at positions[b, j] (its own)."""
        with ExitStack() as stack:
            for module in self._bias_modules:
                stack.enter_context(_patched(module, "compute_bias", _relative_bias(module, positions)))
            table = self._table
            if table is not None:
                offset = getattr(table, "offset", 0)  # BART's learned table starts 2 rows in

                def embed(*args, **kwargs) -> torch.Tensor:
                    return nn.Embedding.forward(table, positions + offset)

                stack.enter_context(_patched(table, "forward", embed))
            yield


def _relative_bias(module: nn.Module, positions: torch.Tensor):
    """A `compute_bias` for a T5-style attention module that biases row b's queries by their own
    positions (T5's shares one offset across the batch): the module's own bucketing and table."""

    def compute_bias(query_length: int, key_length: int, *args, **kwargs) -> torch.Tensor:
        memory = torch.arange(key_length, device=positions.device)
        relative = memory[None, None, :] - positions[:, :query_length, None]  # [B, Q, K]
        buckets = module._relative_position_bucket(
            relative,
            bidirectional=not module.is_decoder,
            num_buckets=module.relative_attention_num_buckets,
            max_distance=module.relative_attention_max_distance,
        )
        return module.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # [B, H, Q, K]

    return compute_bias


@contextmanager
def _patched(module: nn.Module, name: str, replacement) -> Iterator[None]:
    setattr(module, name, replacement)  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        delattr(module, name)
