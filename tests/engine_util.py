"""Drive the scheduler directly, the way the engine thread does, with requests joining at chosen iterations."""

from __future__ import annotations

import torch

from scheduler.model_runner import CausalLMRunner
from scheduler.request import Mode, Request, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig


def make_scheduler(large, small, eos: set[int], slots: int = 8, max_len: int = 512, **config) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=slots, max_num_tokens=config.pop("max_num_tokens", slots * max_len),
                          max_seq_len=max_len, **config)
    return Scheduler(CausalLMRunner(small, slots, max_len) if small is not None else None,
                     CausalLMRunner(large, slots, max_len), cfg, eos)


def run(scheduler: Scheduler, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
        join_at: list[int] | None = None) -> tuple[list[list[int]], list[Request]]:
    """Run to completion; prompt i is submitted before iteration join_at[i]. Returns tokens and requests."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    requests = [Request(str(i), p, q) for i, (p, q) in enumerate(zip(prompts, params))]
    join_at = join_at or [0] * len(prompts)
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished = set()
    iteration = 0
    while len(finished) < len(requests):
        for request, at in zip(requests, join_at):
            if at == iteration:
                scheduler.add(request)
        for out in scheduler.step():
            assert out.request.request_id not in finished, "tokens after the end"
            outputs[out.request.request_id] += out.tokens
            if out.finish is not None:
                finished.add(out.request.request_id)
        iteration += 1
        assert iteration < 10_000
    assert not scheduler.running and scheduler.free_slots == scheduler.config.max_num_seqs
    assert scheduler.reserved_tokens == 0
    return [outputs[r.request_id] for r in requests], requests


def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """The large model's own greedy decoding, by transformers' generate."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def params(mode: Mode, max_new_tokens: int = 32, **kw) -> SamplingParams:
    return SamplingParams(mode=mode, max_new_tokens=max_new_tokens, **kw)
