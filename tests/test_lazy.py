"""capture(lazy=True): deferred copies must give the values an eager capture gives, or refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorsnap


class Traps(nn.Module):
    """Every way a later write can hit a value captured earlier."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("cache", torch.zeros(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        y += 1  # add_ on the Linear output
        z = self.act(y)  # relu with inplace=True on it again
        z[0] = 5.0  # setitem
        self.cache.index_copy_(0, torch.tensor([1]), z[:1])  # a KV-cache style write
        torch.mul(z, 3, out=z)  # out=
        w = F.relu(z - 20, True)  # inplace passed positionally
        return w + self.cache.sum()


def _pair(model: nn.Module, x: torch.Tensor, **options: object) -> tuple[object, object]:
    with torch.no_grad():
        with tensorsnap.capture(model, ops=True, **options) as eager:  # type: ignore[arg-type]
            model(x)
        with tensorsnap.capture(model, ops=True, lazy=True, **options) as lazy:  # type: ignore[arg-type]
            model(x)
    return eager, lazy


def test_lazy_values_equal_eager_values_through_every_tracked_write() -> None:
    torch.manual_seed(0)
    model = Traps()
    x = torch.randn(3, 4)
    eager, lazy = _pair(model, x)
    assert list(eager) == list(lazy)  # type: ignore[call-overload]
    for key in eager:  # type: ignore[attr-defined]
        assert torch.equal(eager[key], lazy[key]), key  # type: ignore[index]
    # the Linear output kept its value from before `y += 1` (computed by hand here)
    assert torch.equal(lazy["fc"], F.linear(x, model.fc.weight, model.fc.bias))  # type: ignore[index]


def test_values_still_reachable_after_the_block_are_copied_at_the_end() -> None:
    class Keeps(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.kept = x * 2  # reachable after the block through the module
            return self.kept + 1

    model = Keeps()
    with torch.no_grad(), tensorsnap.capture(model, ops=True, lazy=True) as snap:
        out = model(torch.ones(2))
    model.kept.fill_(-1)  # fill_ after the block: no mode sees it any more
    out.fill_(-1)
    assert snap["/mul"].tolist() == [2.0, 2.0]
    assert snap[""].tolist() == [3.0, 3.0]


def test_values_nobody_else_can_reach_are_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    clones: list[int] = []
    real_clone = torch.Tensor.clone

    def counting_clone(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        clones.append(self.numel())
        return real_clone(self, *args, **kwargs)  # type: ignore[arg-type]

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    with torch.no_grad(), tensorsnap.capture(model, ops=True, lazy=True) as snap:
        model(x)
        # the intermediate results are freed by the model; only the final output lives on
    out_copies = len(clones)
    monkeypatch.setattr(torch.Tensor, "clone", real_clone)
    # the root output (still referenced by nobody but us here: the result was discarded) and
    # every intermediate: nothing had to be copied
    assert out_copies == 0
    with torch.no_grad():
        h = torch.tanh(model[0](x))
    assert torch.equal(snap["1"], h)


def test_a_write_the_mode_cannot_see_is_refused_not_returned_wrong() -> None:
    class Hidden(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            with torch._C.DisableTorchFunction():  # a write no function mode sees
                y.add_(1)
            return y.sum()

    model = Hidden()
    with (
        pytest.raises(tensorsnap.TensorSnapError, match=r"'/mul' .*overwritten by writes"),
        torch.no_grad(),
        tensorsnap.capture(model, ops=True, lazy=True) as snap,
    ):
        model(torch.ones(3))
    assert "/mul" not in snap  # dropped, never served with the wrong value
    assert snap[""].item() == 9.0


def test_lazy_matches_eager_on_gpt2(gpt2_model: nn.Module) -> None:
    ids = torch.randint(0, 100, (1, 12))
    eager, lazy = _pair(gpt2_model.eval(), ids)
    assert list(eager) == list(lazy)  # type: ignore[call-overload]
    leaves = 0
    for key in eager:  # type: ignore[attr-defined]
        a, b = eager[key], lazy[key]  # type: ignore[index]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
            leaves += 1
    assert leaves > 50


def test_lazy_with_gradients_keeps_gradients_bitwise() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            y += x
            return self.act(y) * 3

    torch.manual_seed(1)
    model = Residual()
    x = torch.randn(3, 4, requires_grad=True)
    model(x).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    with tensorsnap.capture(model, ops=True, lazy=True, grads=True) as snap:
        model(x).sum().backward()
    assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), reference))
    with torch.no_grad():
        expected = model.fc(x)
    assert torch.equal(snap["fc"], expected)  # taken before `y += x`, copied before the add_
    assert torch.equal(snap["/add_"], expected + x)


def test_lazy_and_aten_level_ops_do_not_mix() -> None:
    with pytest.raises(tensorsnap.TensorSnapError, match=r"lazy=True .* not ops='aten'"):
        tensorsnap.capture(nn.Linear(2, 2), ops="aten", lazy=True)
