"""The engine core: loads the models and steps the scheduler on the main thread of its own process.

Why a process of its own: PyTorch's CPU kernels run on an OpenMP team, and libgomp throttles the
spinning of its worker threads whenever a process holds more OpenMP threads than cores. A second
Python thread that runs torch (loading on one thread, stepping on another, as an engine thread in
the server did) owns a second team, and then every small product pays a wake-up: on 2 cores the
same forward took far longer on a second thread than on the main one. Here a single thread does
all model work. The process also keeps the server's Python work (gRPC, the detokenizer) off this
loop's GIL, as vLLM v1's engine core does.

The protocol over one duplex pipe:
  parent -> core  ("add", Request) | ("cancel", request_id) | ("stop",)
  core -> parent  ("ready", EngineInfo, tokenizer) | ("failed", message)   once, after loading
                  ("outputs", [WireOutput, ...], EngineSnapshot)            after each iteration
The core exits when told to stop or when the pipe closes (the parent is gone).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from scheduler import profile
from scheduler.logprobs import TokenLogprob
from scheduler.model_runner import CausalLMRunner
from scheduler.pair import ModelPair
from scheduler.request import FinishReason, Limits, RequestStats
from scheduler.scheduler import Scheduler, SchedulerConfig, StepOutput
from scheduler.seq2seq_runner import Seq2SeqRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """What the loaded engine tells the server once, when it is ready."""

    limits: Limits
    max_num_seqs: int
    eos_token_ids: frozenset[int]


@dataclass(frozen=True)
class EngineSnapshot:
    """How full and how busy the engine is, sent with every batch of outputs (metrics read it)."""

    running: int = 0
    waiting: int = 0
    free_slots: int = 0
    reserved_tokens: int = 0
    iterations: int = 0
    busy_seconds: float = 0.0
    forward_seconds: float = 0.0


@dataclass(frozen=True)
class WireOutput:
    """A StepOutput as it crosses the pipe: the request by id, its statistics by value."""

    request_id: str
    tokens: list[int]
    finish: FinishReason | None
    stop_reason: str | None
    logprobs: list[TokenLogprob] | None
    stats: RequestStats


def build_scheduler(pair: ModelPair, config: SchedulerConfig, cost_profile: str = "") -> Scheduler:
    """`cost_profile`: a JSON file of forward costs to plan with (see `profile.load`) instead of measuring."""
    # The context can be no longer than the models' positions allow.
    config = replace(config, max_seq_len=min(config.max_seq_len, pair.context_length))
    large = runner(pair.large, config)
    small = runner(pair.small, config) if pair.small is not None else None
    for name, model in (("large", large), ("small", small)):
        if not config.invariant_kernels or model is None:
            continue
        if model.invariant:
            padded = ", ".join(f"{k} to {n} rows" for k, n in sorted(model.stack.min_rows.items()) if n > 1) or "none"
            log.info("invariant kernels for the %s model (products padded: %s)", name, padded)
        else:
            log.warning(
                "invariant kernels: the %s model (%s on %s) does not run on bild's Llama stack, so its "
                "logits may still round differently by batch",
                name,
                model.model.config.model_type,
                model.device,
            )
    costs = profile.load(Path(cost_profile)) if cost_profile and small is not None else None
    return Scheduler(small, large, config, pair.eos_token_ids, costs)


def runner(model, config: SchedulerConfig) -> CausalLMRunner:
    """The runner for one model of the pair; an encoder-decoder's sources may be as long as a context."""
    if model.config.is_encoder_decoder:
        return Seq2SeqRunner(model, config.max_num_seqs, config.max_seq_len, config.max_seq_len)
    return CausalLMRunner(model, config.max_num_seqs, config.max_seq_len, config.invariant_kernels)


class _Inbox:
    """Drains the pipe on a thread of its own (no model work there), so the parent never blocks on a send."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._messages: list[tuple] = []
        self._wake = threading.Condition()
        threading.Thread(target=self._read, name="bild-core-inbox", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = ("stop",)  # the parent is gone: nobody is listening any more
            with self._wake:
                self._messages.append(message)
                self._wake.notify()
            if message[0] == "stop":
                return

    def take(self, block: bool) -> list[tuple]:
        with self._wake:
            while block and not self._messages:
                self._wake.wait()
            messages, self._messages = self._messages, []
        return messages


class EngineCore:
    def __init__(self, pair: ModelPair, config: SchedulerConfig, cost_profile: str = "") -> None:
        self.scheduler = build_scheduler(pair, config, cost_profile)
        self.iterations = 0
        self.busy_seconds = 0.0

    @property
    def info(self) -> EngineInfo:
        s = self.scheduler
        return EngineInfo(s.limits, s.config.max_num_seqs, frozenset(s.eos_token_ids))

    def snapshot(self) -> EngineSnapshot:
        s = self.scheduler
        runners = [r for r in (s.small, s.large) if r is not None]
        return EngineSnapshot(
            running=len(s.running),
            waiting=len(s.waiting),
            free_slots=s.free_slots,
            reserved_tokens=s.reserved_tokens,
            iterations=self.iterations,
            busy_seconds=self.busy_seconds,
            forward_seconds=sum(r.forward_seconds for r in runners),
        )

    def serve(self, conn: Connection) -> None:
        inbox = _Inbox(conn)
        scheduler = self.scheduler
        last_sent = None
        stopping = False
        while not stopping:
            outputs: list[StepOutput] = []
            for message in inbox.take(block=not scheduler.has_work()):
                if message[0] == "add":
                    try:
                        scheduler.add(message[1])
                    except ValueError:  # the server checked it already; never let it end this loop
                        log.exception("request %s refused by the scheduler", message[1].request_id)
                        outputs.append(StepOutput(message[1], finish=FinishReason.ERROR))
                elif message[0] == "cancel":
                    scheduler.cancel(message[1])
                elif message[0] == "stop":
                    stopping = True
            if stopping:
                outputs += scheduler.abort_all(FinishReason.CANCELLED)
            elif scheduler.has_work():
                started = time.perf_counter()
                try:
                    outputs += scheduler.step()
                except Exception:
                    # The scheduler contains a fault to the requests that cause it; one outside them
                    # all (in isolation itself) must still not take the server down.
                    log.exception("engine iteration failed; ending the requests in the batch")
                    outputs += scheduler.abort_running(FinishReason.ERROR)
                self.iterations += 1
                self.busy_seconds += time.perf_counter() - started
            snapshot = self.snapshot()
            load = replace(snapshot, iterations=0, busy_seconds=0.0, forward_seconds=0.0)
            if outputs or load != last_sent:  # an idle engine sends nothing
                wire = [
                    WireOutput(o.request.request_id, o.tokens, o.finish, o.stop_reason, o.logprobs, o.request.stats)
                    for o in outputs
                ]
                try:
                    conn.send(("outputs", wire, snapshot))
                except (BrokenPipeError, OSError):
                    return  # the parent is gone
                last_sent = load


def run_engine_core(
    conn: Connection, load: Callable[[], ModelPair], config: SchedulerConfig, cost_profile: str, log_level: int
) -> None:
    """The engine process's entry point."""
    # The server process handles signals and tells the core when to stop: a Ctrl-C that reaches the
    # whole process group, or a service manager that signals every process, must not cut the
    # streams it is draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    try:
        pair = load()
        core = EngineCore(pair, config, cost_profile)
    except Exception as error:
        log.exception("loading the models failed")
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", core.info, pair.tokenizer))
    core.serve(conn)
