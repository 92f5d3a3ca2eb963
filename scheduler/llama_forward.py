"""A Llama-family decoder stack computed directly over the runner's token rows.

Transformers' forward is general: masks built per call, module hooks, a cache interface, a padded
[B, Q] batch carried through every layer. On a CPU at decoding shapes that generality costs as much
as the arithmetic: a step of SmolLM2-135M took 24 ms in transformers and 16.6 ms as a plain loop
over the same weights and kernels, and the 5-layer draft 2.6 ms against 1.1 ms. So for the models
whose layers are plain Llama layers (Llama, Mistral, Qwen2 without sliding windows), the runner
computes the stack here instead, with the model's own weights:

- every product runs over the batch's tokens only, as one [tokens, hidden] matrix: no padding, and
  nothing to pack or unpack around each layer;
- q/k/v and gate/up each run as one product (one oneDNN copy of the concatenated weights, where
  CpuLinear's kernels apply; the layers' own copies are then dropped, so memory does not grow);
- only attention sees the batch's structure: the queries are laid out [B, heads, Q, head_dim]
  (padded only when sequences feed different counts) over the slot cache's keys and values.

**One native call** (`native.LlamaLayers`, C in scheduler/native) computes the whole stack where
the model's products are a GGUF file's Q4 blocks on the native kernels, or float32 weights of a
draft-sized model: norms, products, rotation, the cache's writes and attention per token row, with
no Python between them: at one token the eager loop below spent more time between its ~30
operations per layer than in them. Each token's row is computed alone, in one order, so its logits
are the same in any batch (bench/results/cpu_kernels.md has the timings).

**Batch-invariant kernels** (`invariant`, bild-server's `--invariant-kernels`). A token's logits
can come out rounded differently by where it was computed: alone or beside other tokens, in a
forward over one row or several. Where two candidate tokens are that close, greedy decoding then
depends on the load, and exact mode, whose checks compute several tokens in one forward, can part
from large mode, which computes one: seldom in float32, often in bfloat16 (62% of positions equal
in a measurement). Most of the stack's kernels already round each row alike at every batch shape
(oneDNN's products, norms, element-wise operations; measured on this torch). With `invariant`,
attention runs as batched products (`_invariant_attention`) instead of SDPA, and a product whose
few-row kernels round differently from its many-row ones (probed at load, every row count up to 33
and a spread to 192 against 256 rows; on one EPYC, SmolLM2's down_proj over one row) computes at
least as many rows as it needs, padded: a token's logits are then the same bit for bit at any load
and in every mode.
Where the probes find kernels that no padding makes round alike, the flag is refused at load
(InvariantKernelsUnavailable) rather than promised and broken. It costs some speed (see README).

Rotary embeddings, norms' epsilons and the output head are the model's own modules and settings, so
rope scaling variants and restricted draft heads work unchanged. tests/test_llama_forward.py holds
the stack to transformers' logits.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from scheduler import cpu_linear, native, output_vocab, quantized
from scheduler.kv_cache import SlotKVCache

log = logging.getLogger(__name__)
MODEL_TYPES = ("llama", "mistral", "qwen2")
# Batch-invariant kernels: below this, CPU products run on other kernels, rounded differently.
MIN_GEMM_ROWS = 4  # rows of each matrix in attention's batched products
# The load-time probe of the layers' products (_rows_to_round_alike): a reference over PROBE_ROWS
# rows, each row count of PROBE_COUNTS against it, and at most MAX_PAD_ROWS rows of padding.
PROBE_ROWS = 256
PROBE_COUNTS = (*range(1, 34), 48, 64, 128, 192)
MAX_PAD_ROWS = 64
# Rotary types whose angles depend on the position alone (not "dynamic" or "longrope", which rescale
# by the sequence's length): the native stack reads them from a table of every position.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Float32 models whose layers hold at most this many bytes run as one native call (a draft: 8 MB).
NATIVE_FLOAT_BYTES = 64 << 20


def supports(model: nn.Module) -> bool:
    """Whether `model` is a decoder whose layers this stack computes exactly as transformers does."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or inner is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    # Only the module layout this stack reads (Qwen3's q/k norms or Gemma's scaled norms would differ).
    wanted = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = {"gate_proj", "up_proj", "down_proj", "act_fn"}
    for layer in inner.layers:
        children = {name for name, _ in layer.named_children()}
        if children != wanted:
            return False
        if {name for name, _ in layer.self_attn.named_children()} != attention:
            return False
        if {name for name, _ in layer.mlp.named_children()} != mlp:
            return False
    return True


def _product(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(linear, cpu_linear.CpuLinear):
        return linear._product(x)
    if isinstance(linear, quantized.Int4Linear):
        return linear(x)
    return F.linear(x, linear.weight, linear.bias)


class InvariantKernelsUnavailable(ValueError):
    """This machine's kernels round a token by how it is batched, in a way the stack cannot work around."""


def _output(product: Callable, x: torch.Tensor) -> torch.Tensor:
    out = product(x)
    return torch.cat(out, dim=-1) if isinstance(out, list) else out


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with its last row repeated up to `rows` rows (padding rows are computed and dropped)."""
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], -1)]) if rows > x.shape[0] else x


def _rows_to_round_alike(product: Callable, features: int, dtype: torch.dtype) -> int | None:
    """The fewest rows `product` (as a runner's forward runs it) must compute for every row to come
    out bit for bit as it does among PROBE_ROWS others, at any place in the batch: 1 where any count
    will do; None where padding to MAX_PAD_ROWS rows is not enough.

    CPU kernels differ by row count: oneDNN runs one row on a GEMV (SmolLM2's down_proj rounds apart
    there), and a CPU with AMX may run few rows on AVX-512 and many on AMX tiles, each rounding in
    its own order. Every count a forward makes up to 33 rows is probed (tails of 16-row tiles
    included), then a spread up to the reference's 256; rows sit at two offsets, as a token's do in
    a batch. In bfloat16 a difference shows in a few rows in a hundred, hence many rows.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, features, generator=generator).to(dtype)
    with torch.inference_mode(), cpu_linear.active(), output_vocab.restricted():
        reference = _output(product, x)

        def alike(count: int, rows: int) -> bool:
            for offset in (0, 5) if count <= 33 else (0,):
                index = (torch.arange(count) + offset) % PROBE_ROWS
                if not torch.equal(_output(product, _padded(x[index], rows))[:count], reference[index]):
                    return False
            return True

        apart = [count for count in PROBE_COUNTS if not alike(count, count)]
        if not apart:
            return 1
        need = max(apart) + 1
        if need > MAX_PAD_ROWS or not all(alike(count, need) for count in range(1, need)):
            return None
        return need


@functools.cache  # a property of the machine's kernels: probed once per process and head size
def _batched_products_round_alike(head_dim: int) -> bool:
    """Whether batched products (attention's, under `invariant`) round each matrix alike whatever
    else the batch holds: fewer matrices beside it (2 at least), fewer of its rows computed
    (MIN_GEMM_ROWS at least) and at another place, more keys that weigh nothing, as forwards of
    different loads and modes lay them out."""
    generator = torch.Generator().manual_seed(0)
    matrices, rows, keys_len, used = 6, 40, 208, 24
    queries = torch.randn(matrices, rows, head_dim, generator=generator)
    keys = torch.randn(matrices, keys_len, head_dim, generator=generator)
    weights, values = torch.rand(matrices, rows, keys_len, generator=generator), torch.randn_like(keys)
    weights[:, :, used:] = 0  # keys a shorter product leaves out weigh nothing
    scores, out = torch.bmm(queries, keys.transpose(1, 2)), torch.bmm(weights, values)
    for n in (2, 3, matrices):
        for count in (*range(MIN_GEMM_ROWS, 34), rows):
            for offset in (0, 3):
                index = (torch.arange(count) + offset) % rows
                for length in (used, 32, 48, 80, 128, keys_len):
                    q, w = queries[:n, index], weights[:n, index, :length]
                    if not torch.equal(torch.bmm(q, keys[:n, :length].transpose(1, 2)), scores[:n, index, :length]):
                        return False
                    if not torch.equal(torch.bmm(w, values[:n, :length]), out[:n, index]):
                        return False
    return True


class _Joined:
    """Several projections of one input, as one product where oneDNN runs them (else one each)."""

    def __init__(self, linears: list[nn.Module]) -> None:
        self.linears = linears
        int4 = quantized.Int4Linear
        self.sizes = [m.out_features if isinstance(m, int4) else m.weight.shape[0] for m in linears]
        self.int4 = None
        self.onednn = None
        self.bias = None
        if all(isinstance(m, int4) for m in linears):
            self.int4 = int4.joined(linears)
        if any(isinstance(m, int4) for m in linears):  # joined above, or mixed (a file's other types): one each
            return
        weights = [linear.weight for linear in linears]
        if all(isinstance(linear, cpu_linear.CpuLinear) for linear in linears):
            self.onednn = cpu_linear.onednn_weight(torch.cat(weights))
        if self.onednn is not None:
            if any(linear.bias is not None for linear in linears):
                biases = [linear.bias for linear in linears]
                self.bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for b, w in zip(biases, weights)])
            for linear in linears:  # this copy replaces theirs: a runner's forward never reads them now
                linear.onednn = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.int4 is not None:
            return list(self.int4(x).split(self.sizes, dim=-1))
        if self.onednn is not None and x.dtype == self.onednn.dtype and x.device.type == "cpu":
            return list(cpu_linear.onednn_product(x, self.onednn, self.bias).split(self.sizes, dim=-1))
        return [_product(linear, x) for linear in self.linears]


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: _Joined
    o_proj: Callable[[torch.Tensor], torch.Tensor]
    post_norm: torch.Tensor
    gate_up: _Joined
    down_proj: Callable[[torch.Tensor], torch.Tensor]
    eps: float


@dataclass(frozen=True)
class Batch:
    """The token rows of one forward and how attention groups them, from the runner."""

    input_ids: torch.Tensor  # [N] the tokens, item after item
    positions: torch.Tensor  # [N] each token's position in its sequence
    items: int  # B sequences
    width: int  # Q: the most tokens one item feeds
    query_rows: torch.Tensor | None  # [N] row of each token in the [B * Q] query layout; None: all items feed Q
    mask: torch.Tensor  # [B, 1, Q, kv_len] additive: 0 where a query sees a key, the dtype's minimum elsewhere


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, scaled in the model's dtype."""
    if x.dtype == torch.float32:  # the same arithmetic as one kernel
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == x.roll(half) * _signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin, bit for bit (negating commutes with the product),
    in 4 operations instead of 7: a layer's rotation was 50 us of a decoding step, this is 20."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class LlamaForward:
    """The decoder stack of one model (see the module's docstring); the model keeps its weights."""

    def __init__(self, model: nn.Module, invariant: bool = False, native: bool = True) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a plain Llama-family decoder")
        self.model = model
        self.invariant = invariant and next(model.parameters()).device.type == "cpu"
        inner = model.model
        attention = inner.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight,
                qkv=_Joined([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                o_proj=partial(_product, layer.self_attn.o_proj),
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=_Joined([layer.mlp.gate_proj, layer.mlp.up_proj]),
                down_proj=partial(_product, layer.mlp.down_proj),
                eps=layer.input_layernorm.variance_epsilon,
            )
            for layer in inner.layers
        ]
        # Rows each product must compute to round a token as it does in any other forward (all
        # layers share the first one's shapes): under `invariant`, fewer are padded up to that.
        self.min_rows: dict[str, int] = {}
        if self.invariant:
            self.min_rows = self._probe(model)
        self.native = self._native_layers(model) if native else None
        self._rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None  # see _rotation

    def _native_layers(self, model: nn.Module) -> native.LlamaLayers | None:
        """The whole stack as one native call, for a float32 model on this CPU whose products are all
        Q4 blocks on the native kernels (a GGUF file's int4 weights), or all float32 weights of a
        model small enough (NATIVE_FLOAT_BYTES) that its forward costs more between operations than
        in them: a draft. Bigger float models keep oneDNN's GEMMs, faster over many rows."""
        weight = next(model.parameters())
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not native.stack_available():
            return None
        if self.num_heads % self.num_kv_heads or len({layer.eps for layer in self.layers}) != 1:
            return None
        if self.head_dim > native.MAX_HEAD_DIM:
            return None
        products = [
            [*layer.qkv.linears, layer.o_proj.args[0], *layer.gate_up.linears, layer.down_proj.args[0]]
            for layer in self.layers
        ]
        linears = [linear for layer in products for linear in layer]
        if all(isinstance(linear, quantized.Int4Linear) and linear.native for linear in linears):
            if any(getattr(linear, "bias", None) is not None for linear in linears):
                return None  # GGUF's Q4 layers that the loader replaces have none
            if any(layer.qkv.int4 is None or layer.gate_up.int4 is None for layer in self.layers):
                return None
            joined = [
                (layer.qkv.int4, layer.o_proj.args[0], layer.gate_up.int4, layer.down_proj.args[0])
                for layer in self.layers
            ]
        elif all(isinstance(linear, (nn.Linear, cpu_linear.CpuLinear)) for linear in linears):
            if sum(linear.weight.numel() * 4 for linear in linears) > NATIVE_FLOAT_BYTES:
                return None

            def floats(parts: list[nn.Module]) -> torch.Tensor:
                return torch.cat([part.weight.detach().float() for part in parts]).contiguous()

            joined = [
                (
                    floats(layer.qkv.linears),
                    floats([layer.o_proj.args[0]]),
                    floats(layer.gate_up.linears),
                    floats([layer.down_proj.args[0]]),
                )
                for layer in self.layers
            ]
        else:
            return None
        layers = []
        for layer, parts, (qkv, o, gate_up, down) in zip(self.layers, products, joined):
            entry = {
                "input_norm": layer.input_norm.detach().float().contiguous(),
                "post_norm": layer.post_norm.detach().float().contiguous(),
                "qkv": qkv,
                "o": o,
                "gate_up": gate_up,
                "down": down,
            }
            groups = {"qkv": parts[:3], "o": parts[3:4], "gate_up": parts[4:6], "down": parts[6:]}
            for name, group in groups.items():
                biases = [getattr(linear, "bias", None) for linear in group]
                if any(b is not None for b in biases):
                    sizes = [linear.weight.shape[0] for linear in group]
                    entry[f"{name}_bias"] = torch.cat(
                        [torch.zeros(n) if b is None else b.detach().float() for b, n in zip(biases, sizes)]
                    ).contiguous()
            layers.append(entry)
        config = model.config
        shape = {
            "hidden": config.hidden_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate": config.intermediate_size,
            "eps": self.layers[0].eps,
            "scaling": self.scaling,
        }
        return native.LlamaLayers(layers, shape)

    def _probe(self, model: nn.Module) -> dict[str, int]:
        """min_rows for each product, or InvariantKernelsUnavailable where no padding makes it round alike."""
        config, first = model.config, self.layers[0]
        products = {
            "qkv": (first.qkv, config.hidden_size),
            "o": (first.o_proj, self.num_heads * self.head_dim),
            "gate_up": (first.gate_up, config.hidden_size),
            "down": (first.down_proj, config.intermediate_size),
            "head": (model.get_output_embeddings(), config.hidden_size),
        }
        dtype = next(model.parameters()).dtype
        min_rows = {}
        for name, (product, features) in products.items():
            rows = _rows_to_round_alike(product, features, dtype)
            if rows is None:
                raise InvariantKernelsUnavailable(
                    f"--invariant-kernels: this CPU's kernels round the {name} product ({features} features, "
                    f"{dtype}) differently by how many rows a forward computes, even padded to {MAX_PAD_ROWS} "
                    "rows, so greedy output would still depend on the load; run without the flag "
                    "(or in float32, where exact and large part far more seldom)"
                )
            min_rows[name] = rows
        if not _batched_products_round_alike(self.head_dim):
            raise InvariantKernelsUnavailable(
                "--invariant-kernels: this CPU's batched products (attention's) round a matrix differently "
                "by what else the batch holds, so greedy output would still depend on the load; run without the flag"
            )
        return min_rows

    def rows(self, name: str, product: Callable, x: torch.Tensor):
        """product(x), computed over at least min_rows[name] rows (the last one repeated), so that
        each row rounds as in any other forward."""
        need = self.min_rows.get(name, 1)
        if x.shape[0] >= need:
            return product(x)
        n = x.shape[0]
        out = product(_padded(x, need))
        return [o[:n] for o in out] if isinstance(out, list) else out[:n]

    def hidden(self, batch: Batch, cache: SlotKVCache, rows: int = 0) -> torch.Tensor:
        """[N, hidden] final-normed hidden states of every token; writes their keys and values to
        `cache`, whose layout the runner prepared (write_slots/write_positions: [N]).

        `rows` > N: the products compute that many rows (the last token's repeated), where the
        kernels run faster so; attention and the cache see only the N tokens."""
        inner = self.model.model
        x = inner.embed_tokens(batch.input_ids)
        cos, sin = inner.rotary_emb(x, batch.positions[None])
        n, d = x.shape[0], self.head_dim
        cos, sin = cos[0, :, None], _signed_sin(sin[0, :, None])  # [N, 1, head_dim]: one per token, shared by heads
        q_size = self.num_heads * d
        padded = rows > n
        if padded:
            x = _padded(x, rows)
        if self.invariant:
            batch = self._invariant_layout(batch)
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, layer.eps)
            q, k, v = self.rows("qkv", layer.qkv, h)
            if padded:
                q, k, v = q[:n], k[:n], v[:n]
            # Queries and keys turn together: one rotation for both.
            qk = _rotate(torch.cat((q, k), dim=-1).view(n, -1, d), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            cache.write(index, k, v.view(n, self.num_kv_heads, d))
            keys, values = cache.read(index)
            attended = self._attention(q, keys, values, batch).reshape(n, q_size)
            if padded:
                attended = _padded(attended, rows)
            x = x + self.rows("o", layer.o_proj, attended)
            h = _rms_norm(x, layer.post_norm, layer.eps)
            gate, up = self.rows("gate_up", layer.gate_up, h)
            x = x + self.rows("down", layer.down_proj, F.silu(gate) * up)
        return inner.norm(x[:n] if padded else x)

    def native_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: SlotKVCache
    ) -> torch.Tensor:
        """hidden() as one native call (self.native): [N] tokens at `positions` of `slots` -> [N, hidden]."""
        inner = self.model.model
        x = inner.embed_tokens(input_ids).contiguous()
        cos, signed_sin = self._rotation(positions, cache.max_len, x)
        self.native(x, cos, signed_sin, cache.keys, cache.values, slots, positions)
        return inner.norm(x)

    def _rotation(self, positions: torch.Tensor, max_len: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [N, head_dim] at each position: rows of a table of every position, where
        the model's rotary angles depend on the position alone (the module computes each element
        alone, so the rows are its own per-call results); else the module's call."""
        inner = self.model.model
        if self._rotary_table is None or self._rotary_table[0].shape[0] < max_len:
            parameters = getattr(self.model.config, "rope_parameters", None) or {}
            if parameters.get("rope_type", "default") not in STATIC_ROPE_TYPES:
                cos, sin = inner.rotary_emb(x, positions[None])
                return cos[0].contiguous(), _signed_sin(sin[0]).contiguous()
            every = torch.arange(max_len, device=positions.device)[None]
            cos, sin = inner.rotary_emb(x, every)
            self._rotary_table = (cos[0].contiguous(), _signed_sin(sin[0]).contiguous())
        cos, signed_sin = self._rotary_table
        return cos.index_select(0, positions), signed_sin.index_select(0, positions)

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: Batch) -> torch.Tensor:
        """[N, heads, head_dim] queries over [B, kv_heads, kv_len, head_dim] keys/values -> [N, heads, head_dim]."""
        if self.invariant:
            return self._invariant_attention(q, keys, values, batch)
        return self._sdpa(q, keys, values, batch)

    def _invariant_layout(self, batch: Batch) -> Batch:
        """The batch as _invariant_attention lays it out, once for every layer: each item's queries
        padded to `rows` (MIN_GEMM_ROWS or more per matrix), `query_rows` into that layout, and the
        mask [B, 1, rows, 1, kv_len] in float32 (padding rows repeat the last one)."""
        width, group = batch.width, self.num_heads // self.num_kv_heads
        rows = max(width, -(-MIN_GEMM_ROWS // group))
        index = batch.query_rows
        if index is None:
            index = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        mask = batch.mask.float()
        if rows > width:
            mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, rows - width, -1)], dim=2)
        return replace(batch, width=rows, query_rows=(index // width) * rows + index % width, mask=mask[:, :, :, None])

    def _invariant_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        """Attention as two batched products per sequence and key head, in float32.

        SDPA's CPU kernel divides its work by the shape of the whole batch (in float32 a query came
        out 3e-7 apart alone and among 8), where a batch of products rounds each of its matrices the
        same whatever else the batch holds, if every matrix has MIN_GEMM_ROWS rows or more and there
        are two matrices at least (fewer run on other kernels). `batch` is laid out by _invariant_layout.
        """
        b, rows, heads, d = batch.items, batch.width, self.num_heads, self.head_dim
        kv_heads, kv_len, dtype = keys.shape[1], keys.shape[2], q.dtype
        group = heads // kv_heads
        padded = q.new_zeros(b * rows, heads, d, dtype=torch.float32)
        padded.index_copy_(0, batch.query_rows, q.float() * self.scaling)
        # [b, rows, kv_heads, group, d] -> [b * kv_heads, rows * group, d]: one matrix per sequence and key head.
        queries = padded.view(b, rows, kv_heads, group, d).transpose(1, 2).reshape(b * kv_heads, rows * group, d)
        keys = keys.float().reshape(b * kv_heads, kv_len, d)
        values = values.float().reshape(b * kv_heads, kv_len, d)
        twice = b * kv_heads == 1
        if twice:
            queries, keys, values = torch.cat([queries, queries]), torch.cat([keys, keys]), torch.cat([values, values])
        scores = torch.bmm(queries, keys.transpose(1, 2))[: b * kv_heads].view(b, kv_heads, rows, group, kv_len)
        weights = torch.softmax(scores + batch.mask, dim=-1).view(b * kv_heads, rows * group, kv_len)
        if twice:
            weights = torch.cat([weights, weights])
        out = torch.bmm(weights, values)[: b * kv_heads].view(b, kv_heads, rows, group, d)
        return out.transpose(1, 2).reshape(b * rows, heads, d).index_select(0, batch.query_rows).to(dtype)

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: Batch) -> torch.Tensor:
        b, width, heads, d = batch.items, batch.width, self.num_heads, self.head_dim
        dtype, mask = q.dtype, batch.mask
        if q.device.type == "cpu" and dtype != torch.float32:
            # The CPU's bfloat16 attention kernel ran 2x to 5x slower than float32's (16 sequences
            # over 112 keys: 692 against 136 us, casts included), so attention runs in float32.
            q, keys, values, mask = q.float(), keys.float(), values.float(), mask.float()
        if batch.query_rows is not None:  # items feed different counts: lay them out padded
            padded = q.new_zeros(b * width, heads, d)
            padded.index_copy_(0, batch.query_rows, q)
            q = padded
        queries = q.view(b, width, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=heads != keys.shape[1]
        )
        out = out.transpose(1, 2).reshape(b * width, heads, d)
        if batch.query_rows is not None:
            out = out.index_select(0, batch.query_rows)
        return out.to(dtype)
