"""The asyncio-facing engine: streams, cancellation, and the event loop staying free during model work."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest

from scheduler.engine import Engine, EngineConfig, EngineStopped, QueueFull
from scheduler.pair import load_pair
from scheduler.request import FinishReason, Mode, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    """The engine process loads the pair itself: this is how."""
    return functools.partial(load_pair, tiny_dirs["large"], tiny_dirs["draft"])


def with_engine(pair, coro_fn, **config):
    engine = Engine(pair, EngineConfig(max_num_seqs=2, max_seq_len=512, **config))
    engine.start()
    try:
        return asyncio.run(coro_fn(engine))
    finally:
        engine.stop()


def test_stream_cancel_frees_the_slot(pair):
    long = SamplingParams(mode=Mode.EXACT, max_new_tokens=400, fallback_threshold=1.0)

    async def scenario(engine: Engine):
        streams = [engine.submit([5, 6, 7], long), engine.submit([8, 9], long)]
        got = 0
        async for out in streams[0]:
            got += len(out.tokens)
            if got >= 5:
                break  # leaving the iterator cancels the request
        deadline = time.monotonic() + 30
        while engine.load()["free_slots"] != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.load() == {"running": 1, "waiting": 0, "free_slots": 1, "reserved_tokens": 2 + 400}
        streams[1].cancel()
        outs = [out async for out in streams[1]]
        assert outs[-1].finish is FinishReason.CANCELLED
        assert engine.load()["free_slots"] == 2 and engine.load()["reserved_tokens"] == 0

    with_engine(pair, scenario)


def test_model_work_never_blocks_the_event_loop(pair):
    async def scenario(engine: Engine):
        gaps = []

        async def ticker():
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.001)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        tick_task = asyncio.create_task(ticker())
        started = time.monotonic()
        params = SamplingParams(mode=Mode.EXACT, max_new_tokens=500, fallback_threshold=1.0)
        outs = [out async for out in engine.submit([5, 6, 7], params)]
        total = time.monotonic() - started
        tick_task.cancel()
        assert sum(len(o.tokens) for o in outs) > 1
        return max(gaps), total, len(gaps)

    max_gap, total, ticks = with_engine(pair, scenario)
    assert ticks > 20 and max_gap < total / 4


def test_submit_refuses_impossible_requests_and_a_full_queue(pair):
    async def scenario(engine: Engine):
        with pytest.raises(ValueError, match="context length"):
            engine.submit([1] * 500, SamplingParams(max_new_tokens=100))
        busy = SamplingParams(mode=Mode.LARGE, max_new_tokens=300)
        streams = [engine.submit([5], busy) for _ in range(3)]  # 2 run, 1 waits
        await asyncio.sleep(0.2)
        with pytest.raises(QueueFull):
            for _ in range(3):
                streams.append(engine.submit([5], busy))
        for s in streams:
            s.cancel()

    with_engine(pair, scenario, max_waiting=1)


def test_a_stopped_engine_ends_queued_requests_and_refuses_new_ones(pair):
    async def scenario():
        engine = Engine(pair, EngineConfig(max_num_seqs=1, max_seq_len=512))
        engine.start()
        busy = SamplingParams(mode=Mode.LARGE, max_new_tokens=400)
        streams = [engine.submit([5], busy) for _ in range(3)]
        await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.stop)
        finishes = []
        for stream in streams:
            finishes.append([o.finish async for o in stream][-1])
        with pytest.raises(EngineStopped):
            engine.submit([5], busy)
        return finishes

    finishes = asyncio.run(scenario())
    assert set(finishes) <= {FinishReason.CANCELLED, FinishReason.LENGTH} and FinishReason.CANCELLED in finishes
