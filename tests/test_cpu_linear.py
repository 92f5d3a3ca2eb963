"""CpuLinear: the same products as nn.Linear at every row count, only inside a runner's forward, and
packed forwards that compute only the rows they are given."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from scheduler import cpu_linear, precision


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(24, 40)
        self.head = nn.Linear(40, 300, bias=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("kernel", ["onednn", "fallback"])
def test_same_products_at_every_row_count(kernel: str) -> None:
    torch.manual_seed(0)
    model = TwoLayers()
    inputs = {rows: torch.randn(1, rows, 24) for rows in (1, 2, 3, 4, 8, 80, 300)}
    with torch.no_grad():
        expected = {rows: model(x) for rows, x in inputs.items()}
        assert cpu_linear.install(model) == 2
        assert isinstance(model.head, cpu_linear.CpuLinear) and model.head.is_head and not model.body.is_head
        for layer in (model.body, model.head):
            if kernel == "fallback":  # as on a torch build without oneDNN
                layer.onednn = None
            elif torch.backends.mkldnn.is_available():  # x86 builds, CI's among them
                assert layer.onednn is not None, "oneDNN's kernel was not taken up"
        for rows, x in inputs.items():
            assert torch.equal(model(x), expected[rows]), "outside a runner's forward the stock kernel runs"
            with cpu_linear.active():
                assert cpu_linear.is_active()
                out = model(x)
                assert out.is_contiguous()
                torch.testing.assert_close(out, expected[rows], rtol=1e-5, atol=1e-5)
        assert not cpu_linear.is_active()


def test_a_packed_forward_computes_only_the_rows_it_is_given() -> None:
    torch.manual_seed(0)
    model = TwoLayers()
    x = torch.randn(3, 4, 24)  # a padded batch: 3 sequences, 4 columns
    rows = torch.tensor([3, 6, 7, 8, 9, 10, 11])  # the token positions of the flattened [12] rows
    with torch.no_grad():
        expected = model(x).reshape(12, -1)[rows]
        cpu_linear.install(model)
        with cpu_linear.active(rows, 12):
            body = model.body(x).reshape(12, -1)
            out = model(x)
    assert torch.count_nonzero(body[[0, 1, 2, 4, 5]]) == 0, "the padding's rows are left out"
    assert out.shape == (1, 7, 300), "the head returns only the given rows"
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_float32_and_native_bfloat16_weights_are_reordered() -> None:
    torch.manual_seed(0)
    weight = torch.randn(40, 24)
    assert cpu_linear.onednn_weight(weight.double()) is None
    assert cpu_linear.onednn_weight(weight.half()) is None
    if not torch.backends.mkldnn.is_available():
        return
    assert cpu_linear.reorders(torch.bfloat16) == precision.native_bfloat16()
    reordered = cpu_linear.onednn_weight(weight)
    assert reordered is not None
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    # Input of another dtype takes the other kernel rather than failing in oneDNN's.
    out = cpu_linear.product(weight.bfloat16(), x, reordered)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 40)
    reordered16 = cpu_linear.onednn_weight(weight.bfloat16())
    assert (reordered16 is not None) == precision.native_bfloat16()
    if reordered16 is not None:
        out = cpu_linear.product(weight.bfloat16(), x, reordered16)
        want = x.float() @ weight.bfloat16().float().T
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_a_copied_model_reorders_its_own_weights() -> None:
    """oneDNN's reordered weights have no storage: deepcopy and pickle must rebuild them, not copy them."""
    torch.manual_seed(0)
    model = TwoLayers()
    cpu_linear.install(model)
    x = torch.randn(1, 3, 24)
    with torch.no_grad(), cpu_linear.active():
        expected = model(x)
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(copied(x), expected, rtol=1e-6, atol=1e-6)
            for mine, theirs in ((copied.body, model.body), (copied.head, model.head)):
                assert (mine.onednn is None) == (theirs.onednn is None)
                assert mine.onednn is None or mine.onednn is not theirs.onednn
