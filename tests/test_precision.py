"""The start-up note on the floating-point type: what each choice costs on the serving device."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler import precision


def _cpu_flags() -> set[str] | None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_native_bfloat16_matches_the_cpu_flags() -> None:
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags here")
    assert precision.native_bfloat16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_float32_is_silent_unless_bfloat16_would_be_faster() -> None:
    assert precision.advice("cpu", "float32", native=False) is None
    assert precision.advice("cuda", "float32") is None
    note = precision.advice("cpu", "float32", native=True)
    assert note is not None and "--dtype bfloat16" in note and "exact" in note


def test_bfloat16_notes_say_what_it_costs() -> None:
    slow = precision.advice("cpu", "bfloat16", native=False)
    assert slow is not None and "slower than in float32" in slow and "exact" in slow
    fast = precision.advice("cpu", "bfloat16", native=True)
    assert fast is not None and "slower" not in fast and "exact" in fast
    for device, dtype in (("cuda", "bfloat16"), ("cuda", "float16"), ("cpu", "float16")):
        note = precision.advice(device, dtype, native=True)
        assert note is not None and "up to rounding" in note


def test_invariant_kernels_make_bfloat16_exact_only_where_the_cpu_computes_it() -> None:
    assert precision.advice("cpu", "bfloat16", native=True, invariant=True) is None
    assert "--invariant-kernels" in precision.advice("cpu", "float32", native=True)
    for device, native in (("cpu", False), ("cuda", True)):  # emulated, or not the stack's CPU kernels
        note = precision.advice(device, "bfloat16", native=native, invariant=True)
        assert note is not None and "up to rounding" in note
