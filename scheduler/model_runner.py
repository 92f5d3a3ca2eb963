"""Runs one model over a batch of sequences, each bringing its own new tokens on top of its cache.

The scheduler decides which sequences take part and which tokens they feed; the runner turns that
into one padded forward with per-sequence positions and an explicit attention mask, and hands back
logits. It knows nothing about BiLD.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from scheduler import cpu_linear, llama_forward, output_vocab
from scheduler.kv_cache import BatchLayout, SlotKVCache


@dataclass(frozen=True)
class ForwardItem:
    """One sequence's part of a batched forward."""

    slot: int
    start: int  # how many context tokens the slot's cache already holds
    tokens: list[int]  # new context tokens, at positions start, start+1, ...


class CausalLMRunner:
    """Batched forwards of a decoder-only Hugging Face model over a SlotKVCache."""

    def __init__(
        self, model: PreTrainedModel, num_slots: int, max_len: int, invariant: bool = False, native: bool = True
    ) -> None:
        """`invariant`: batch-invariant kernels (see llama_forward), for models the stack computes;
        `native`: the stack as one native call where it applies (LlamaForward's `native`)."""
        self.model = model
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        # The slot cache keeps every position; a sliding-window model would need its own mask.
        if window and window < max_len:
            raise ValueError(
                f"{config.model_type} uses sliding-window attention ({window} tokens), "
                f"which bild does not support beyond that window; set the context length at most {window}"
            )
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.vocab_limit = self.vocab_size  # logits beyond this are cut off (see Scheduler)
        # Tokens the model's generation config never lets it produce (Marian's padding, say), as
        # transformers' `generate` enforces them: single-token bad words and suppressed tokens.
        config_gen = model.generation_config
        banned = {words[0] for words in config_gen.bad_words_ids or [] if len(words) == 1}
        banned |= set(config_gen.suppress_tokens or [])
        self.banned = torch.tensor(sorted(banned), device=self.device) if banned else None
        self.cache = SlotKVCache(*self._kv_shape(config), num_slots, max_len, self.dtype, self.device)
        # transformers renamed the forward's cache keyword (`past_key_values` -> `cache`) in 5.2x.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._mask_min = torch.finfo(self.dtype).min
        self.forward_seconds = 0.0  # wall time in model forwards, for the overhead profile
        self.forward_calls = 0
        self.kv_bucket = 128 if self.device.type == "cuda" else 16
        # Products leave the padding out only where CpuLinear runs them (on a CPU: see cpu_linear.install).
        self.pack = cpu_linear.install(model) > 0
        # Llama-family decoders run as a plain layer stack (llama_forward.py), others in transformers.
        self.stack = llama_forward.LlamaForward(model, invariant, native) if llama_forward.supports(model) else None
        self.invariant = self.stack is not None and self.stack.invariant
        # run_as[n]: a forward over n tokens computes this many rows (n, or more where the CPU's
        # kernels happen to be faster at the larger count). Set from the measured cost profile
        # (scheduler/profile.py); empty: n rows.
        self.run_as: list[int] = []

    # Whether the model encodes a source first (Seq2SeqRunner); a decoder-only model's prompt is its context.
    encoder_decoder = False

    @staticmethod
    def _kv_shape(config) -> tuple[int, int, int]:
        """(layers, key/value heads, head size) of the cache."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return config.num_hidden_layers, num_kv_heads, head_dim

    def next_token_logits(self, items: list[ForwardItem]) -> torch.Tensor:
        """Feed each item's tokens; return [B, V] logits of each item's last token (what comes next)."""
        return self._forward(items, all_logits=False)

    def token_logits(self, items: list[ForwardItem]) -> torch.Tensor:
        """Feed each item's tokens; return [N, V] logits of every token, item after item (N tokens in all).

        Row j of an item's block predicts the token after its j-th input token.
        """
        return self._forward(items, all_logits=True)

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Slot `target`'s cache takes the keys and values of slot `source`'s first `length` positions."""
        self.cache.copy(source, target, length)

    @torch.inference_mode()
    def _forward(self, items: list[ForwardItem], all_logits: bool) -> torch.Tensor:
        started = time.perf_counter()
        try:
            if self.stack is not None:
                logits = self._forward_rows(items, all_logits)
            else:
                logits = self._forward_padded(items, all_logits)
        finally:
            self.cache.layout = None
        logits = logits[..., : self.vocab_limit]
        if self.banned is not None:
            logits[..., self.banned[self.banned < logits.shape[-1]]] = self._mask_min
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)  # so the time is the forward's, not the next sync's
        self.forward_seconds += time.perf_counter() - started
        self.forward_calls += 1
        return logits

    def _forward_rows(self, items: list[ForwardItem], all_logits: bool) -> torch.Tensor:
        """The Llama stack's forward (llama_forward.py) over the batch's tokens as rows, item after item."""
        if self.stack.native is not None:
            return self._forward_native(items, all_logits)
        device = self.device
        n_tokens = sum(len(item.tokens) for item in items)
        # A faster row count (see `run_as`): the stack's products compute that many rows, attention
        # and the cache only the tokens' (so the batch's slots stay contiguous: no gather).
        rows = self.run_as[n_tokens] if n_tokens < len(self.run_as) else n_tokens
        lengths = torch.tensor([len(item.tokens) for item in items], device=device)
        starts = torch.tensor([item.start for item in items], device=device)
        slots = torch.tensor([item.slot for item in items], device=device)
        width = int(lengths.max())
        item_of_row = torch.tensor([i for i, item in enumerate(items) for _ in item.tokens], device=device)
        ends = lengths.cumsum(0)
        column = torch.arange(n_tokens, device=device) - (ends - lengths)[item_of_row]  # index within the item
        positions = starts[item_of_row] + column
        kv_len = self._prepare_cache(items, slots, starts + lengths, slots[item_of_row], positions)
        # Query j of an item sees its keys 0..start+j. Queries past an item's own tokens (padding, where
        # items feed different counts) see as many, which are finite, and are never read.
        query_positions = starts[:, None] + torch.arange(width, device=device)[None, :]  # [B, Q]
        batch = llama_forward.Batch(
            input_ids=torch.tensor([t for item in items for t in item.tokens], device=device),
            positions=positions,
            items=len(items),
            width=width,
            query_rows=None if bool((lengths == width).all()) else item_of_row * width + column,
            mask=self._mask(query_positions, kv_len),
        )
        with cpu_linear.active(), output_vocab.restricted():
            hidden = self.stack.hidden(batch, self.cache, rows)
            wanted = hidden if all_logits else hidden[ends - 1]
            return self.stack.rows("head", self.model.get_output_embeddings(), wanted)

    def _forward_native(self, items: list[ForwardItem], all_logits: bool) -> torch.Tensor:
        """_forward_rows as one native call: each token row carries its slot and position, which is all
        that the native stack's attention and cache writes read (no mask, no layout)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        for item in items:
            n = len(item.tokens)
            ids += item.tokens
            positions += range(item.start, item.start + n)
            slots += [item.slot] * n
            last.append(len(ids) - 1)
        rows = torch.tensor([ids, positions, slots], device=self.device)  # [3, N]: one tensor for the three
        with cpu_linear.active(), output_vocab.restricted():
            hidden = self.stack.native_hidden(rows[0], rows[1], rows[2], self.cache)
            wanted = hidden if all_logits else hidden[last]
            return self.stack.rows("head", self.model.get_output_embeddings(), wanted)

    def _forward_padded(self, items: list[ForwardItem], all_logits: bool) -> torch.Tensor:
        """Transformers' forward over a left-padded batch: every row's last token sits in the last
        column, so "last token only" is one slice for the whole batch (the output head then runs
        on one column)."""
        device = self.device
        lengths = torch.tensor([len(item.tokens) for item in items], device=device)
        starts = torch.tensor([item.start for item in items], device=device)
        slots = torch.tensor([item.slot for item in items], device=device)
        n_tokens = int(lengths.sum())
        # Some token counts run faster as a few more rows (see `run_as`); padding provides them.
        rows = self.run_as[n_tokens] if self.pack and n_tokens < len(self.run_as) else n_tokens
        width = max(int(lengths.max()), -(-rows // len(items)))
        pad = width - lengths  # [B] padding columns at the left of each row

        column = torch.arange(width, device=device)
        token_index = column[None, :] - pad[:, None]  # [B, Q]: index into the item's tokens, <0 = padding
        is_token = token_index >= 0
        positions = torch.where(is_token, starts[:, None] + token_index, 0)

        input_ids = torch.zeros((len(items), width), dtype=torch.long, device=device)
        for row, item in enumerate(items):
            input_ids[row, width - len(item.tokens) :] = torch.tensor(item.tokens, device=device)

        write_slots = torch.where(is_token, slots[:, None], self.cache.scratch_slot)
        write_positions = torch.where(is_token, positions, column[None, :])
        kv_len = self._prepare_cache(items, slots, starts + lengths, write_slots, write_positions)
        # Query at position p sees keys 0..p of its own row; a padding query sees key 0 only, which
        # is always written, so no row of the softmax is empty.
        mask = self._mask(positions, kv_len)
        # Leave the padding out of the products (but for the rows `run_as` adds): a row that feeds
        # one token then costs one token, however wide the widest row is.
        token_rows = real = None
        if self.pack and is_token.numel() > n_tokens:
            real = is_token.flatten()
            token_rows = real.nonzero().squeeze(1)
            if rows > n_tokens:
                extra = (~real).nonzero().squeeze(1)[: rows - n_tokens]
                token_rows = torch.cat([token_rows, extra]).sort().values
        # Two switches: CpuLinear's arrangements (and packing), and a restricted output head.
        with cpu_linear.active(token_rows, is_token.numel()), output_vocab.restricted():
            logits = self._run(input_ids, positions, mask, all_logits)
        if not all_logits:
            return logits[:, -1]
        if token_rows is not None and logits.shape[:2] == (1, len(token_rows)):
            logits = logits[0]  # the head computed only the rows it was given
            if len(token_rows) > n_tokens:
                logits = logits[real[token_rows]]
            return logits
        logits = logits.reshape(-1, logits.shape[-1])  # the head saw the padding too: drop it
        return logits[is_token.flatten()] if n_tokens != logits.shape[0] else logits

    def _prepare_cache(
        self,
        items: list[ForwardItem],
        slots: torch.Tensor,
        ends: torch.Tensor,
        write_slots: torch.Tensor,
        write_positions: torch.Tensor,
    ) -> int:
        """Lay the cache out for this batch (see BatchLayout); return how many positions it attends over."""
        # Rounding the attended length up to a bucket keeps the set of shapes small, so CUDA kernels
        # are chosen once per bucket rather than once per token; the extra positions are masked.
        kv_len = min(self.cache.max_len, -(-int(ends.max()) // self.kv_bucket) * self.kv_bucket)
        first = items[0].slot
        contiguous = all(item.slot == first + i for i, item in enumerate(items))
        self.cache.prepare(
            BatchLayout(
                slots=slots,
                write_slots=write_slots,
                write_positions=write_positions,
                kv_len=kv_len,
                contiguous=slice(first, first + len(items)) if contiguous else None,
            )
        )
        return kv_len

    def _mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[B, 1, Q, kv_len] additive mask: the query at position p sees keys 0..p of its own row.

        Additive rather than boolean, as attention would otherwise convert it in every layer."""
        visible = torch.arange(kv_len, device=positions.device)[None, None, :] <= positions[:, :, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=positions.device)
        return mask.masked_fill_(~visible, self._mask_min)[:, None]

    def _run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, all_logits: bool
    ) -> torch.Tensor:
        """The model call itself, on inputs laid out by `_forward` (and the cache's layout); `mask` is [B, 1, Q, K]."""
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{self._cache_kw: self.cache},
        )
        return out.logits
