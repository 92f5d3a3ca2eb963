"""A slot-based KV cache that lets one batched forward serve sequences of different lengths.

Every sequence owns a slot: one row of a preallocated [slots, kv_heads, max_len, head_dim] tensor per
layer. A sequence's cache length is plain bookkeeping held by the scheduler, so a rollback is
"length = p" and a sequence that leaves frees its row for the next one without touching any other
sequence's memory. Nothing is re-padded or shifted when sequences join, leave or roll back.

The object is handed to a Hugging Face model as its cache: the attention layers call `update()`,
which writes the new keys and values in place at each sequence's own positions and returns the
keys and values the batch attends over. A batch whose slots are contiguous gets a view; any other
batch gets one gather of its live rows (the same bytes attention reads next). On CUDA a paged
varlen attention kernel could read the rows in place; SDPA on CPU cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchLayout:
    """Where the current forward's tokens go: set by the model runner before each forward."""

    slots: torch.Tensor  # [B] slot of each batch row
    # Where each input token's key is written: [B, Q] for a padded batch (padding -> scratch slot), or
    # [N] for a batch of token rows.
    write_slots: torch.Tensor
    write_positions: torch.Tensor
    kv_len: int  # how many positions the batch attends over
    contiguous: slice | None  # slots as a slice when they are consecutive, for a copy-free view


class SlotKVCache:
    """Keys and values of one model for `num_slots` sequences of at most `max_len` tokens."""

    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        # One extra row takes the writes of padding tokens, so they never land in a live sequence.
        self.scratch_slot = num_slots
        shape = (num_slots + 1, num_kv_heads, max_len, head_dim)
        # torch.empty leaves pages untouched, so memory is only committed as positions get used.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # Positions below this are finite in every row. Masked positions must still hold finite
        # numbers, since softmax weight 0 times NaN is NaN.
        self._zeroed_upto = 0
        self.layout: BatchLayout | None = None
        # transformers reads these per layer (sliding-window, linear-attention and placeholder layers).
        self.is_sliding = [False] * num_layers
        self.is_linear = [False] * num_layers
        self.is_dummy = [False] * num_layers

    def prepare(self, layout: BatchLayout) -> None:
        if layout.kv_len > self._zeroed_upto:
            # Grow the zeroed region in chunks so this stays rare.
            upto = min(self.max_len, max(layout.kv_len, 2 * self._zeroed_upto, 256))
            for tensor in self.keys + self.values:
                tensor[:, :, self._zeroed_upto : upto].zero_()
            self._zeroed_upto = upto
        self.layout = layout

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, H, Q, D] new keys/values in place; return [B, H, kv_len, D] to attend over."""
        self.write(layer_idx, key_states.transpose(1, 2), value_states.transpose(1, 2))
        return self.read(layer_idx)

    def write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write new keys/values, token-major ([*index, H, D], where the layout's write indices have
        shape `index`), at the layout's slots and positions."""
        layout = self.layout
        assert layout is not None, "SlotKVCache.prepare() must run before a forward"
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # Advanced indices on dims 0 and 2 put the index dims first: [*index, H, D].
        keys[layout.write_slots, :, layout.write_positions] = key_states.to(keys.dtype)
        values[layout.write_slots, :, layout.write_positions] = value_states.to(values.dtype)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The [B, H, kv_len, D] keys and values of the batch's slots."""
        layout = self.layout
        assert layout is not None, "SlotKVCache.prepare() must run before a forward"
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if layout.contiguous is not None:
            return keys[layout.contiguous, :, : layout.kv_len], values[layout.contiguous, :, : layout.kv_len]
        live_keys = keys[:, :, : layout.kv_len].index_select(0, layout.slots)
        live_values = values[:, :, : layout.kv_len].index_select(0, layout.slots)
        return live_keys, live_values

    def copy(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target` (a cached prefix)."""
        if length > 0 and source != target:
            for tensor in self.keys + self.values:
                tensor[target, :, :length] = tensor[source, :, :length]

    # The parts of transformers' Cache interface that model code may consult.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.layout is None else self.layout.kv_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return (0 if self.layout is None else self.layout.kv_len), 0

    def __len__(self) -> int:
        return len(self.keys)
