"""The start-up measurement of forward costs, on a busy machine: what it measures and what it keeps."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

import pytest

from scheduler import cpu_linear, profile
from scheduler.engine_core import runner
from scheduler.scheduler import SchedulerConfig
from tests import tiny

CONFIG = SchedulerConfig(max_num_seqs=2, max_num_tokens=2 * 256, max_seq_len=256)


@pytest.fixture(scope="module")
def runners():
    return runner(tiny.build_llama(seed=3, hidden=32, layers=1), CONFIG), runner(tiny.build_llama(seed=1), CONFIG)


def test_a_burst_of_other_work_slows_one_pass_not_the_table(runners) -> None:
    small, _ = runners
    counts = profile._token_counts(CONFIG.max_num_seqs)
    plain = small.token_logits
    calls = 0

    def interrupted(items):  # the first measured pass over every count loses half a second to someone else
        nonlocal calls
        calls += 1
        if len(counts) < calls <= 2 * len(counts):
            time.sleep(0.5)
        return plain(items)

    small.token_logits = interrupted
    try:
        table = profile._table(small, counts, CONFIG.max_num_seqs)
    finally:
        del small.token_logits
    assert calls == (1 + profile.REPEATS) * len(counts)  # a warm-up pass, then the measured ones
    assert max(table.seconds) < 0.5, table.seconds  # a tiny forward: about a millisecond


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_profile_measured_while_other_processes_hold_the_cores_is_not_kept(
    runners, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("BILD_CACHE_DIR", str(tmp_path))
    cores = len(os.sched_getaffinity(0))
    hogs = [multiprocessing.get_context("spawn").Process(target=_spin, args=(60.0,)) for _ in range(2 * cores)]
    for hog in hogs:
        hog.start()
    try:
        time.sleep(1.0)  # the hogs are spinning before the measurement starts
        with caplog.at_level(logging.WARNING, logger="scheduler.profile"):
            model = profile.cost_model(*runners, CONFIG.max_num_seqs)
    finally:
        for hog in hogs:
            hog.kill()
            hog.join()
    assert model.large(1, 1) > 0  # planned with for this run...
    assert not list(tmp_path.rglob("*.json"))  # ...but not kept for the next
    assert "not keeping them" in caplog.text


def test_waiting_share() -> None:
    assert profile.waiting_share((10.0, 1.0), (12.0, 1.0)) == 0.0
    assert profile.waiting_share((10.0, 1.0), (11.0, 4.0)) == 0.75
    assert profile.waiting_share(None, (11.0, 4.0)) is None
    assert profile.waiting_share((10.0, 1.0), (10.0, 1.0)) is None
    reading = profile._scheduling()
    assert reading is not None and reading[0] > 0  # this process has run (Linux)


def test_the_machine_key_tells_cpus_of_one_name_apart_by_their_flags() -> None:
    """Cloud VMs report names as vague as "AMD EPYC" for generations with and without AVX512-BF16,
    whose kernels run at different speeds: a profile kept on one must not be planned with on the other."""
    zen3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f\n"
    zen4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    shuffled = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: avx512f fpu avx2\n"
    assert cpu_linear.machine_key(zen3) != cpu_linear.machine_key(zen4)
    assert cpu_linear.machine_key(zen3) == cpu_linear.machine_key(shuffled)
    assert cpu_linear.machine_key(zen3) != cpu_linear.machine_key(zen3.replace("AMD EPYC", "Intel Xeon"))
    graviton2 = "processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    graviton3 = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    assert cpu_linear.machine_key(graviton2) != cpu_linear.machine_key(graviton3)
    assert cpu_linear.machine_key(graviton2) != cpu_linear.machine_key(
        graviton2.replace(" bf16", "").replace("0xd0c", "0xd40")
    )
    assert cpu_linear.machine_key("flags\nmodel name\n") == cpu_linear.machine_key("")  # odd lines: still a key
