"""The CPU kernels' switch (cpu_linear.active) and the restricted output head's (output_vocab.restricted)
are separate: each changes only what it names."""

from __future__ import annotations

import copy

import torch
from torch import nn

from scheduler import cpu_linear, output_vocab


class HeadOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 50, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def set_output_embeddings(self, head: nn.Module) -> None:
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_each_switch_changes_only_its_own_layers() -> None:
    torch.manual_seed(0)
    model = HeadOnly()
    x = torch.randn(1, 3, 16)
    ids = list(range(0, 50, 5))
    with torch.no_grad():
        full = model(x)
        output_vocab.install(model, ids)
        assert not output_vocab.is_restricted()
        torch.testing.assert_close(model(x), full)
        with cpu_linear.active():
            torch.testing.assert_close(model(x), full)  # the CPU kernels' switch leaves the head whole
        with output_vocab.restricted():
            assert output_vocab.is_restricted() and not cpu_linear.is_active()
            restricted = model(x)
            # A copy rebuilds oneDNN's reordered rows rather than copying them (they have no storage).
            torch.testing.assert_close(copy.deepcopy(model)(x), restricted)
        assert not output_vocab.is_restricted()
    outside = torch.ones(50, dtype=torch.bool)
    outside[ids] = False
    torch.testing.assert_close(restricted[..., ids], full[..., ids], rtol=1e-5, atol=1e-5)
    assert (restricted[..., outside] == torch.finfo(restricted.dtype).min).all()
