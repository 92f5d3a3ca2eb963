"""The asyncio-facing engine: the engine core runs in a process of its own, results come back as async streams.

Model work never runs in the server's process (see `engine_core` for why). Submissions and
cancellations go to the core over a pipe; a reader thread takes each iteration's settled tokens
back and hands them to the event loops of their streams with `call_soon_threadsafe`. If the core
process dies, every open stream ends with an error and `on_failure` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields

from transformers import PreTrainedTokenizerBase

from scheduler.engine_core import EngineInfo, EngineSnapshot, WireOutput, run_engine_core
from scheduler.pair import ModelPair
from scheduler.request import FinishReason, Request, RequestStats, SamplingParams, check
from scheduler.scheduler import SchedulerConfig, StepOutput

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's waiting queue is at its limit; the client should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down (or has failed) and takes no more requests."""


class EngineFailed(Exception):
    """The engine process could not load its models, or it died."""


@dataclass(frozen=True)
class EngineConfig(SchedulerConfig):
    max_waiting: int = 256  # queued requests beyond the running batch; more are refused
    cost_profile: str = ""  # a JSON file of forward costs to plan with; empty: measure them (cached)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, got {self.max_waiting}")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(**{f.name: getattr(self, f.name) for f in fields(SchedulerConfig)})


class RequestStream:
    """Settled tokens of one request, as an async iterator of StepOutput; the last one has `finish`."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self._engine = engine
        self.request = request
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.finished = False

    @property
    def stats(self) -> RequestStats:
        return self.request.stats

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


def _put_all(items: list[tuple[RequestStream, StepOutput]]) -> None:  # on the streams' event loop
    for stream, output in items:
        stream._queue.put_nowait(output)


class Engine:
    def __init__(self, load: Callable[[], ModelPair], config: EngineConfig = EngineConfig()) -> None:
        """`load` runs in the engine process, so it must pickle: a module-level function or a partial of one."""
        self._load = load
        self.config = config
        self.info: EngineInfo | None = None  # set by start()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.snapshot = EngineSnapshot(free_slots=config.max_num_seqs)
        self.on_failure: Callable[[str], None] | None = None  # called on the reader thread
        self.failure: str | None = None
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()  # guards _streams, _stopping and sends on the pipe
        self._stopping = False
        self._aborted = False  # abort() came, perhaps before start() made the process
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None

    # ---- lifecycle (blocking: call from a worker thread in async code) ----------------------

    def start(self) -> None:
        """Start the engine process and wait until its models are loaded; raises EngineFailed."""
        context = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=run_engine_core,
            name="bild-engine",
            daemon=True,
            args=(
                child,
                self._load,
                self.config.scheduler_config(),
                self.config.cost_profile,
                logging.getLogger().getEffectiveLevel(),
            ),
        )
        with self._lock:
            if self._aborted:
                raise EngineFailed("stopped before the models loaded")
            self._process.start()
        child.close()
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join(5)
            message = ("failed", f"the engine process exited with code {self._process.exitcode}")
        if message[0] == "failed":
            self._process.join(5)
            raise EngineFailed(message[1])
        _, self.info, self.tokenizer = message
        self._reader = threading.Thread(target=self._read, name="bild-engine-reader", daemon=True)
        self._reader.start()

    def abort(self) -> None:
        """Kill the engine process while it is still loading (safe from any thread): start() then
        raises EngineFailed at once rather than after the models load."""
        with self._lock:
            self._aborted = True
            if self._process is not None and self.info is None:
                self._process.kill()

    def stop(self, timeout: float = 60) -> None:
        """End every request (running ones as CANCELLED) and stop the engine process."""
        with self._lock:
            self._stopping = True
            self._send(("stop",))
        if self._reader is not None:
            self._reader.join(timeout)
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()

    # ---- event-loop side ---------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request (call from the event loop); raises ValueError, QueueFull or EngineStopped."""
        if self.info is None:
            raise EngineStopped("the engine has not started")
        request = Request(uuid.uuid4().hex, list(prompt), params, arrival=time.monotonic())
        check(request, self.info.limits)
        stream = RequestStream(self, request)
        with self._lock:
            if self._stopping or self.failure is not None:
                raise EngineStopped("the server is shutting down" if self.failure is None else self.failure)
            # Streams beyond the batch's slots are waiting (or about to take a slot that just freed).
            if len(self._streams) - self.config.max_num_seqs >= self.config.max_waiting:
                raise QueueFull(f"{self.config.max_waiting} requests are already waiting; retry later")
            self._streams[request.request_id] = stream
            self._send(("add", request))
        return stream

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._streams and not self._stopping:
                self._send(("cancel", request_id))

    def _send(self, message: tuple) -> None:  # with self._lock held
        with contextlib.suppress(OSError, ValueError):  # the engine is gone; the reader thread reports it
            self._conn.send(message)

    @property
    def iterations(self) -> int:
        return self.snapshot.iterations

    @property
    def busy_seconds(self) -> float:
        return self.snapshot.busy_seconds

    @property
    def forward_seconds(self) -> float:
        """Wall time in model forwards of both models (the rest of busy_seconds is scheduling)."""
        return self.snapshot.forward_seconds

    def load(self) -> dict[str, int]:
        """A snapshot for metrics and health: how full the engine is."""
        s = self.snapshot
        return {
            "running": s.running,
            "waiting": s.waiting,
            "free_slots": s.free_slots,
            "reserved_tokens": s.reserved_tokens,
        }

    # ---- reader thread -----------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                _kind, outputs, snapshot = self._conn.recv()
            except (EOFError, OSError):
                break
            self.snapshot = snapshot
            self._deliver(outputs)
        self._process.join(5)
        with self._lock:
            stranded = list(self._streams.values())
            stopping = self._stopping
            if not stopping:
                self.failure = f"the engine process died (exit code {self._process.exitcode})"
        if not stopping:
            log.error("%s; ending %d open streams", self.failure, len(stranded))
        finish = FinishReason.CANCELLED if stopping else FinishReason.ERROR
        self._deliver([WireOutput(s.request.request_id, [], finish, None, None, s.stats) for s in stranded])
        if not stopping and self.on_failure is not None:
            self.on_failure(self.failure)

    def _deliver(self, outputs: list[WireOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, StepOutput]]] = defaultdict(list)
        with self._lock:
            for wire in outputs:
                stream = self._streams.get(wire.request_id)
                if stream is None:
                    continue
                if wire.finish is not None:
                    del self._streams[wire.request_id]
                vars(stream.request.stats).update(vars(wire.stats))  # in place: the service holds this object
                output = StepOutput(stream.request, wire.tokens, wire.finish, wire.stop_reason, wire.logprobs)
                by_loop[stream.loop].append((stream, output))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)
