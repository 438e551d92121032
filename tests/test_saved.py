"""capture(saved=True): the tensors autograd saves for backward, per op and per module call.

References are independent of tensorsnap: a plain ``saved_tensors_hooks`` that clones each
tensor when autograd packs it, and the tensors a Linear and a ReLU are known to save.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import tensorsnap


def _linear_relu() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(5, 4, requires_grad=True)


class _Mixed(nn.Module):
    """Several ops that save inputs, outputs or both, one of them modified in place later."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        a = torch.tanh(h)  # saves its output
        b = a * h  # saves both inputs
        s = torch.softmax(b @ b.transpose(0, 1), dim=-1)
        y = self.norm(s @ b)
        return y.sigmoid() + x.exp()


def _reference_saved(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor autograd packs during ``model(x)``, cloned when packed."""
    return [t for _, t in _reference_saved_by_module(model, x)]


def _reference_saved_by_module(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(innermost module running, clone) for every tensor autograd packs during ``model(x)``."""
    stack: list[str] = []
    packed: list[tuple[str, torch.Tensor]] = []
    handles = []

    def enter(name: str) -> Any:
        return lambda module, args: stack.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append((stack[-1], t.detach().clone()))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return packed


def _assert_same(got: tuple[torch.Tensor, ...], want: list[torch.Tensor] | tuple) -> None:
    assert isinstance(got, tuple)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(g, w)


@pytest.mark.parametrize("ops", [True, False])
def test_linear_relu_saves_input_weight_and_relu_output(ops: bool) -> None:
    model, x = _linear_relu()
    with tensorsnap.capture(model, ops=ops, saved=True) as snap:
        out = model(x)
    lin, relu = ("0/linear:saved", "1/relu:saved") if ops else ("0:saved", "1:saved")
    linear = model[0]
    assert isinstance(linear, nn.Linear)
    weight, bias = linear.weight.detach(), linear.bias.detach()
    # addmm saves the input and the transposed weight; relu saves its result
    _assert_same(snap[lin], (x.detach(), weight.t()))
    _assert_same(snap[relu], (out.detach(),))
    assert torch.equal(snap[relu][0], torch.clamp(x.detach() @ weight.t() + bias, min=0))
    record = snap.records[list(snap).index(relu)]
    assert record.kind == "saved" and record.module == "1"
    assert record.op == ("relu" if ops else None)
    # copies, not the live tensors
    for t in snap[lin] + snap[relu]:
        assert not t.requires_grad
    assert snap[lin][0].data_ptr() != x.data_ptr()


@pytest.mark.parametrize("ops", [True, False])
def test_saved_match_an_independent_pack_hook(ops: bool) -> None:
    torch.manual_seed(1)
    model = _Mixed()
    x = torch.randn(4, 6, requires_grad=True)
    reference = _reference_saved(model, x)
    with tensorsnap.capture(model, ops=ops, saved=True) as snap:
        model(x)
    saved_keys = [r.key for r in snap.records if r.kind == "saved"]
    assert all(k.endswith(":saved") for k in saved_keys)
    if ops:
        # ops are recorded as they run, so the tuples follow autograd's packing order
        flat = [t for k in saved_keys for t in snap[k]]
        _assert_same(tuple(flat), reference)
        # per op: tanh saves its output, the product both factors
        assert torch.equal(snap["/tanh:saved"][0], snap["/tanh"])
        pair = snap["/mul:saved"]
        assert len(pair) == 2
        assert {0, 1} == {
            i for i, t in enumerate(pair) for f in (snap["/tanh"], snap["lin"]) if torch.equal(t, f)
        }
    else:
        assert saved_keys == ["lin:saved", "norm:saved", ":saved"]
        by_module = _reference_saved_by_module(model, x)
        for key in saved_keys:
            name = key.removesuffix(":saved")
            _assert_same(snap[key], [t for n, t in by_module if n == name])


@pytest.mark.parametrize("ops", [True, False])
def test_saved_value_is_taken_when_saved_not_after_later_inplace_ops(ops: bool) -> None:
    class Later(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.sigmoid()  # saves y
            y.mul_(3)  # forward only: nothing complains until backward
            return y

    model = Later()
    x = torch.randn(8, requires_grad=True)
    reference = _reference_saved(model, x)
    with tensorsnap.capture(model, ops=ops, saved=True) as snap:
        model(x)
    key = "/sigmoid:saved" if ops else ":saved"
    _assert_same(snap[key], reference)
    assert torch.equal(snap[key][0], torch.sigmoid(x.detach()))


@pytest.mark.parametrize("ops", [True, False])
def test_inplace_change_of_a_saved_tensor_still_raises_in_backward(ops: bool) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.sigmoid()
            y.mul_(2)  # sigmoid's backward needs the y it saved
            return y

    model = Broken()
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()
    with (
        pytest.raises(RuntimeError, match="modified by an inplace operation"),
        tensorsnap.capture(model, ops=ops, saved=True),
    ):
        model(x).sum().backward()
    assert x.grad is None


def test_legal_inplace_ops_keep_working_with_the_same_gradients() -> None:
    class Illegal(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu_(x * 2)  # saves its own (in-place) result
            y[:1].exp_()  # through a view, changes what relu_ saved
            return y

    class Fine(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = (x * 2).relu_()  # relu_ saves the result it produced in place
            z = (x + 1).sigmoid_()  # sigmoid_ saves its own in-place result
            w = y[1:].mul(3)  # a product with a number saves nothing
            w.add_(1)  # so changing it in place is legal
            return w.exp() + z[1:]

    x = torch.randn(6)
    grads: list[torch.Tensor] = []
    for under_capture in (False, True):
        leaf = x.clone().requires_grad_()
        model = Fine()
        if under_capture:
            with tensorsnap.capture(model, ops=True, saved=True) as snap:
                model(leaf).sum().backward()
            assert "/relu_:saved" in snap and "/sigmoid_:saved" in snap
        else:
            model(leaf).sum().backward()
        assert leaf.grad is not None
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])

    leaf = x.clone().requires_grad_()
    with (
        pytest.raises(RuntimeError, match="modified by an inplace operation"),
        tensorsnap.capture(Illegal(), saved=True),
    ):
        Illegal()(leaf).sum().backward()


@pytest.mark.parametrize("options", [{"ops": True}, {"ops": False}, {"ops": True, "grads": True}])
def test_saved_does_not_change_outputs_or_gradients(options: dict[str, Any]) -> None:
    torch.manual_seed(2)
    model = _Mixed()
    x = torch.randn(4, 6)

    def run(capture: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        if capture:
            with tensorsnap.capture(model, saved=True, **options):
                out = model(leaf)
                out.square().sum().backward()
        else:
            out = model(leaf)
            out.square().sum().backward()
        grads = [leaf.grad] + [p.grad for p in model.parameters()]
        return out.detach(), [g.clone() for g in grads if g is not None]

    plain_out, plain_grads = run(False)
    out, grads = run(True)
    assert torch.equal(plain_out, out)
    assert len(grads) == len(plain_grads) == 1 + len(list(model.parameters()))
    for a, b in zip(plain_grads, grads):
        assert torch.equal(a, b)


def test_no_saved_keys_without_autograd() -> None:
    model, x = _linear_relu()
    with torch.no_grad(), tensorsnap.capture(model, ops=True, saved=True) as snap:
        model(x)
    assert list(snap) == ["0/linear", "0", "1/relu", "1", ""]


def test_saved_respects_include() -> None:
    model, x = _linear_relu()
    with tensorsnap.capture(model, saved=True, include="1:saved") as snap:
        model(x)
    assert list(snap) == ["1:saved"]
