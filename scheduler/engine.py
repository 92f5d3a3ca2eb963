"""The asyncio-facing engine: the scheduler runs on its own thread, results come back as async streams.

Model work never runs on the event loop. Submissions and cancellations cross into the engine
thread through a lock-protected inbox; settled tokens cross back with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import torch

from scheduler.model_runner import CausalLMRunner
from scheduler.pair import ModelPair
from scheduler.request import FinishReason, Request, RequestStats, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig, StepOutput

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's waiting queue is at its limit; the client should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no more requests."""


@dataclass(frozen=True)
class EngineConfig(SchedulerConfig):
    max_waiting: int = 256  # queued requests beyond the running batch; more are refused

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, got {self.max_waiting}")


class RequestStream:
    """Settled tokens of one request, as an async iterator of StepOutput; the last one has `finish`."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self._engine = engine
        self.request = request
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.finished = False

    @property
    def stats(self) -> RequestStats:
        return self.request.stats

    def _deliver(self, output: StepOutput) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, output)
        except RuntimeError:
            pass  # the consumer's event loop is closed: nobody is listening any more

    def cancel(self) -> None:
        if not self.finished:
            self._engine._cancel(self.request.request_id)

    async def __aiter__(self) -> AsyncIterator[StepOutput]:
        try:
            while not self.finished:
                output = await self._queue.get()
                self.finished = output.finish is not None
                yield output
        finally:
            # The consumer stopped early (client gone, deadline, error): free the slot.
            self.cancel()


class Engine:
    def __init__(self, pair: ModelPair, config: EngineConfig = EngineConfig()) -> None:
        self.pair = pair
        # The context can be no longer than the models' positions allow.
        self.config = config = replace(config, max_seq_len=min(config.max_seq_len, pair.context_length))
        large = CausalLMRunner(pair.large, config.max_num_seqs, config.max_seq_len)
        small = CausalLMRunner(pair.small, config.max_num_seqs, config.max_seq_len) if pair.small is not None else None
        self.scheduler = Scheduler(small, large, config, pair.eos_token_ids)
        self._streams: dict[str, RequestStream] = {}
        self._inbox: list[Request] = []
        self._cancels: list[str] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.iterations = 0
        self.busy_seconds = 0.0

    # ---- event-loop side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bild-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request (call from the event loop); raises ValueError or QueueFull."""
        request = Request(uuid.uuid4().hex, list(prompt), params, arrival=time.monotonic())
        self.scheduler.check(request)
        stream = RequestStream(self, request)
        with self._wake:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            # Requests in the inbox may still take a free slot; only the rest count as waiting.
            pending = len(self._inbox) + len(self.scheduler.waiting) - self.scheduler.free_slots
            if pending >= self.config.max_waiting:
                raise QueueFull(f"{self.config.max_waiting} requests are already waiting; retry later")
            self._streams[request.request_id] = stream
            self._inbox.append(request)
            self._wake.notify()
        return stream

    def _cancel(self, request_id: str) -> None:
        with self._wake:
            self._cancels.append(request_id)
            self._wake.notify()

    @property
    def forward_seconds(self) -> float:
        """Wall time in model forwards of both models (the rest of busy_seconds is scheduling)."""
        runners = (self.scheduler.small, self.scheduler.large)
        return sum(r.forward_seconds for r in runners if r is not None)

    def load(self) -> dict[str, int]:
        """A snapshot for metrics and health: how full the engine is."""
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self._inbox),
            "free_slots": self.scheduler.free_slots,
            "reserved_tokens": self.scheduler.reserved_tokens,
        }

    # ---- engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self._cancels or self.scheduler.has_work()):
                    self._wake.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            rejected = []
            for request in inbox:
                try:
                    self.scheduler.add(request)
                except ValueError:  # checked at submit already; never let it stop this thread
                    log.exception("request %s refused by the scheduler", request.request_id)
                    rejected.append(StepOutput(request, finish=FinishReason.ERROR))
            for request_id in cancels:
                self.scheduler.cancel(request_id)
            started = time.perf_counter()
            try:
                outputs = rejected + self.scheduler.step()
            except Exception:
                # A failed forward must not take the server down: end what was in the batch, go on.
                log.exception("engine iteration failed; ending the requests in the batch")
                outputs = rejected + self.scheduler.abort_running(FinishReason.ERROR)
            self.iterations += 1
            self.busy_seconds += time.perf_counter() - started
            self._deliver(outputs)
        with self._wake:
            inbox, self._inbox = self._inbox, []
        stranded = [StepOutput(request, finish=FinishReason.CANCELLED) for request in inbox]
        self._deliver(stranded + self.scheduler.abort_all(FinishReason.CANCELLED))

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for output in outputs:
            request_id = output.request.request_id
            stream = self._streams.get(request_id)
            if output.finish is not None:
                self._streams.pop(request_id, None)
            if stream is not None:
                stream._deliver(output)
