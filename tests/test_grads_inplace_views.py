"""P:grad when an in-place op later rewrites a module output that is a view.

``F.linear`` on 3-d input returns a view; ``y += x`` on it rebases the graph onto the view's base,
and hooks registered on the view are silently dropped by autograd. The gradient must still
arrive, equal to the hand-derived one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorsnap


class Residual(nn.Module):
    def __init__(self, unused_view: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.unused_view = unused_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)  # a view of a 2-d addmm result
        if self.unused_view:
            _ = y[..., 0].shape  # a second view of the same base, which no gradient reaches
        y += x
        return y * y


@pytest.mark.parametrize("unused_view", [False, True])
def test_gradient_of_a_view_output_rewritten_in_place(unused_view: bool) -> None:
    torch.manual_seed(0)
    model = Residual(unused_view)
    x = torch.randn(2, 3, 4, requires_grad=True)
    with tensorsnap.capture(model, grads=True, ops=True) as snap:
        model(x).sum().backward()
    with torch.no_grad():
        y_new = model.lin(x) + x
    # d(sum(y_new^2))/d(y_old) = 2 * y_new, since y_new = y_old + x
    assert torch.equal(snap["lin:grad"], 2 * y_new)
    assert torch.equal(snap["lin/linear:grad"], 2 * y_new)
    assert torch.equal(snap["/add_:grad"], 2 * y_new)
    if unused_view:
        assert "/getitem" in snap and "/getitem:grad" not in snap


def test_view_output_without_in_place_keeps_its_own_gradient() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.lin(x) * 3).sum()

    model = Plain()
    x = torch.randn(2, 3, 4)
    with tensorsnap.capture(model, grads=True) as snap:
        model(x).backward()
    assert torch.equal(snap["lin:grad"], torch.full((2, 3, 4), 3.0))
