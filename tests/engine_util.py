"""Drive the scheduler directly, the way the engine thread does, with requests joining at chosen iterations."""

from __future__ import annotations

import torch

from scheduler.engine_core import runner
from scheduler.policy import CostModel, CostTable
from scheduler.request import Mode, Request, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig


def smollm2_costs() -> CostModel:
    """Forward costs as measured for SmolLM2-135M and its draft on the 2-core build machine.

    Tiny test models cost about the same for both models, where drafting never pays; these are
    the costs of a real pair, where drafts pay at one sequence and cost more than they give at 32.
    """
    tokens = [1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 48, 64, 80, 96, 112, 128, 192, 256]
    large = [53, 45, 49, 52, 60, 66, 71, 80, 86, 117, 160, 200, 240, 280, 320, 360, 500, 620]
    small = [3.4, 3.6, 3.9, 4.1, 4.5, 5, 5.5, 6.5, 7, 9, 12, 14, 17, 19, 22, 24, 32, 40]
    return CostModel(
        CostTable(tokens, [x / 1000 for x in large]), CostTable(tokens, [x / 1000 for x in small]), adapt=False
    )


def free_verification() -> CostModel:
    """A large model whose forward costs the same however many tokens it checks: drafts always pay."""
    return CostModel(CostTable([1], [0.05]), CostTable([1], [0.001]), adapt=False)


def make_scheduler(
    large, small, eos: set[int], slots: int = 8, max_len: int = 512, costs: CostModel | None = None, **config
) -> Scheduler:
    """By default with forward costs where drafting always pays (`free_verification`), so that the
    small model takes part; `costs="measured"` measures the models given."""
    cfg = SchedulerConfig(
        max_num_seqs=slots, max_num_tokens=config.pop("max_num_tokens", slots * max_len), max_seq_len=max_len, **config
    )
    if small is not None and costs is None:
        costs = free_verification()
    return Scheduler(
        runner(small, cfg) if small is not None else None,
        runner(large, cfg),
        cfg,
        eos,
        None if costs == "measured" else costs,
    )


def run(
    scheduler: Scheduler,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    join_at: list[int] | None = None,
) -> tuple[list[list[int]], list[Request]]:
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
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
    # An encoder-decoder's output starts with its decoder start token, not the prompt.
    return out[0, 1 if model.config.is_encoder_decoder else len(prompt) :].tolist()


def params(mode: Mode, max_new_tokens: int = 32, **kw) -> SamplingParams:
    return SamplingParams(mode=mode, max_new_tokens=max_new_tokens, **kw)
