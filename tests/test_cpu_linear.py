"""CpuLinear: the same products as nn.Linear at every row count, only inside a runner's forward, and
no transposed copy of an output head above the size cap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scheduler import cpu_linear


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(24, 40)
        self.head = nn.Linear(40, 300, bias=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("cap", [cpu_linear.TRANSPOSED_COPY_MAX_BYTES, 0])
def test_same_products_at_every_row_count(monkeypatch, cap: int) -> None:
    monkeypatch.setattr(cpu_linear, "TRANSPOSED_COPY_MAX_BYTES", cap)
    torch.manual_seed(0)
    model = TwoLayers()
    inputs = {rows: torch.randn(1, rows, 24) for rows in (1, 2, 3, 4, 8, 80)}
    with torch.no_grad():
        expected = {rows: model(x) for rows, x in inputs.items()}
        cpu_linear.install(model)
        assert isinstance(model.head, cpu_linear.CpuLinear) and isinstance(model.body, cpu_linear.CpuLinear)
        assert (model.head.weight_t is not None) == (cap > 0), "the head's one-row copy follows the size cap"
        assert model.body.weight_t is None
        for rows, x in inputs.items():
            assert torch.equal(model(x), expected[rows]), "outside a runner's forward the stock kernel runs"
            with cpu_linear.active():
                assert cpu_linear.is_active()
                torch.testing.assert_close(model(x), expected[rows], rtol=1e-5, atol=1e-5)
        assert not cpu_linear.is_active()
