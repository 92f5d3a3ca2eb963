"""Native kernels (blockquant.c), compiled with the machine's C compiler on first use.

A C file needs no Python headers and no torch headers: the library is called through ctypes on
tensors' memory, so it builds in about a second and is cached by its source's hash (under
`$BILD_CACHE_DIR`, default ~/.cache/bild, beside the dequantized models). Where no compiler is
found, `library()` is None and callers keep torch's kernels; the server logs why.

OpenMP: the library links libgomp, and torch's wheel has loaded its own libgomp.so.1 already, so
the dynamic loader gives both the same runtime: one thread pool, sized by torch.set_num_threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # also loads torch's libgomp before ours: one OpenMP runtime

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("blockquant.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]


def _cache_dir() -> Path:
    return Path(os.environ.get("BILD_CACHE_DIR", Path.home() / ".cache" / "bild")) / "native"  # as loading.cache_dir


def _compile(target: Path) -> str | None:
    """Build the library at `target`; None, or why it could not be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return "no C compiler found (install gcc, or set CC)"
    if shutil.which(compiler) is None:
        return f"the C compiler {compiler} is not there (CC)"
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = ""
    for extra in (["-fopenmp"], []):  # without OpenMP: one thread, still the same results
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as scratch:
            pass
        result = subprocess.run(
            [compiler, *FLAGS, *extra, str(SOURCE), "-o", scratch.name, "-lm"], capture_output=True, text=True
        )
        if result.returncode == 0:
            os.replace(scratch.name, target)  # atomic: concurrent builders each rename a whole file
            return None
        os.unlink(scratch.name)
        errors = result.stderr.strip()[-500:]
    return f"{compiler} failed: {errors}"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled library, or None (logged) where it cannot be built or loaded."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"blockquant-{digest}.so"
    if not target.exists():
        try:
            why = _compile(target)
        except OSError as error:
            why = str(error)
        if why is not None:
            log.warning("native block-quantized kernels unavailable: %s; torch's kernels are used instead", why)
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        log.warning("native kernels at %s do not load (%s); torch's kernels are used instead", target, error)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.bild_linear.argtypes = [i64, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i64]
    lib.bild_linear.restype = ctypes.c_int
    return lib


def available() -> bool:
    return library() is not None


def _linear(kind: int, x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    x = x.contiguous()
    rows, n = x.shape[0], q.shape[0]
    y = torch.empty(rows, n, dtype=torch.float32)
    if rows == 0:
        return y
    offsets = None if m is None else m.data_ptr()
    if library().bild_linear(
        kind, x.data_ptr(), rows, x.shape[1], q.data_ptr(), d.data_ptr(), offsets, n, y.data_ptr(), n
    ):
        raise MemoryError("native product: out of memory for its quantized activations")
    return y


def q4_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 @ W.T for W = d * nibble + m per block of 32: q [N, K/2] uint8 in GGUF's
    block order, d and m [N, K/32] float32. [M, N] float32."""
    return _linear(Q4_BLOCKS, x, q, d, m)


def q8_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 @ W.T for W = d * q per block of 32: q [N, K] int8, d [N, K/32] float32."""
    return _linear(Q8_BLOCKS, x, q, d, None)


class _Weights(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int64),
        ("q", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


Q4_BLOCKS, FLOAT32, Q8_BLOCKS = 0, 1, 2  # blockquant.c's kinds of weights
MAX_HEAD_DIM = 512  # bild_llama_layers rotates a head in a buffer of this many floats


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", _Weights),
        ("o", _Weights),
        ("gate_up", _Weights),
        ("down", _Weights),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
    ]


class _Shape(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
        ("max_len", ctypes.c_int64),
        ("num_slots", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("scaling", ctypes.c_float),
    ]


def _weights(product: torch.Tensor | object, bias: torch.Tensor | None) -> _Weights:
    """A float32 [N, K] tensor, or a quantized.Int4Linear on the native kernels; a float32 bias or None."""
    bias_pointer = None if bias is None else bias.data_ptr()
    if isinstance(product, torch.Tensor):
        return _Weights(FLOAT32, product.data_ptr(), None, None, bias_pointer)
    return _Weights(Q4_BLOCKS, product.nibbles.data_ptr(), product.d.data_ptr(), product.m.data_ptr(), bias_pointer)


class LlamaLayers:
    """A Llama decoder stack in one native call (bild_llama_layers): norms, products, rotation, the
    cache's writes and attention, with no Python or dispatch between them. At one token the eager
    stack spent more time between its ~30 operations per layer than in them. Every part computes
    each token's row alone, in one order, so a token's result does not depend on its batch."""

    def __init__(self, layers: list[dict], shape: dict) -> None:
        """layers: per layer, input_norm and post_norm (float32 tensors) and qkv, o, gate_up, down
        (quantized.Int4Linear on native kernels, or float32 [N, K] contiguous tensors) and, where
        they have them, qkv_bias, o_bias, gate_up_bias, down_bias (float32); shape:
        hidden, heads, kv_heads, head_dim, intermediate, eps, scaling."""
        self.tensors = layers  # keeps every pointer's memory alive
        self.layers = (_Layer * len(layers))()
        for entry, layer in zip(self.layers, layers):
            entry.input_norm = layer["input_norm"].data_ptr()
            entry.post_norm = layer["post_norm"].data_ptr()
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(entry, name, _weights(layer[name], layer.get(f"{name}_bias")))
        self.shape = _Shape(**shape, max_len=0, num_slots=0)
        self.cache_pointers: tuple[int, ...] = ()
        lib = library()
        lib.bild_llama_layers.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            *[ctypes.c_void_p] * 1,
            ctypes.c_int64,
            *[ctypes.c_void_p] * 4,
        ]
        lib.bild_llama_layers.restype = ctypes.c_int
        self.call = lib.bild_llama_layers

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """x [N, hidden] float32, contiguous, in place; cos, signed_sin [N, head_dim]; keys and values:
        each layer's [slots, kv_heads, max_len, head_dim] float32 cache; slots, positions [N] int64."""
        pointers = (keys[0].data_ptr(), values[0].data_ptr(), keys[-1].data_ptr())
        if pointers != self.cache_pointers:  # a cache first seen (or made again): point the layers at it
            for entry, k, v in zip(self.layers, keys, values):
                entry.keys, entry.values = k.data_ptr(), v.data_ptr()
            self.shape.num_slots, self.shape.max_len = keys[0].shape[0], keys[0].shape[2]
            self.cache_pointers = pointers
        assert x.dtype == cos.dtype == signed_sin.dtype == torch.float32 and x.is_contiguous()
        assert slots.dtype == positions.dtype == torch.int64 and slots.is_contiguous() and positions.is_contiguous()
        status = self.call(
            ctypes.addressof(self.layers),
            len(self.layers),
            ctypes.addressof(self.shape),
            x.data_ptr(),
            x.shape[0],
            cos.data_ptr(),
            signed_sin.data_ptr(),
            slots.data_ptr(),
            positions.data_ptr(),
        )
        if status == -3:
            raise IndexError("native decoder stack: a token's slot or position lies outside the cache")
        if status == -1:
            raise MemoryError("native decoder stack: out of memory for its scratch buffers")
        if status:
            raise RuntimeError(f"native decoder stack failed (status {status})")


def stack_available() -> bool:
    """Whether LlamaLayers runs here (it needs AVX2 and FMA)."""
    lib = library()
    return lib is not None and bool(lib.bild_native_avx2())
