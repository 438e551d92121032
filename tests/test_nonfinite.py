"""capture(nonfinite="raise"): stop at the first captured value holding a NaN or an Inf."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_hooks

import tensorsnap


class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x * 2  # mul
        b = torch.log(a)  # log: NaN where x < 0
        return b.exp()  # exp


class _Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)  # finite at 0, its gradient is not


def _hooks() -> tuple[int, int]:
    return len(module_hooks._global_forward_hooks), len(module_hooks._global_forward_pre_hooks)


def test_forward_op_stops_the_block_with_the_values_before_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), _Log(), nn.Linear(3, 3))
    x = torch.tensor([[1.0, -1.0, 2.0]])
    before = _hooks()
    ran_after = False
    with (
        pytest.raises(tensorsnap.NonFiniteError, match=r"'1/log' is the first") as info,
        tensorsnap.capture(model, ops=True, inputs=True, nonfinite="raise"),
    ):
        model(x)
        ran_after = True
    assert not ran_after
    err = info.value
    assert isinstance(err, tensorsnap.TensorSnapError)
    assert err.key == "1/log"
    snap = err.snapshot
    assert list(snap) == [":in", "0:in", "0", "1:in", "1/mul", "1/log"]
    # that op's inputs (the module input and the op before it) are there, as they were
    assert torch.equal(snap["1:in"][0], x)
    assert torch.equal(snap["1/mul"], x * 2)
    got = snap["1/log"]
    assert torch.isnan(got[0, 1]) and torch.equal(got[0, ::2], torch.log(x[0, ::2] * 2))
    # the hooks are gone and the model runs as before
    assert _hooks() == before
    assert model(x).shape == (1, 3)


def test_module_output_with_inf_is_named_when_ops_are_not_captured() -> None:
    class Divide(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / x.sum()

    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), Divide(), nn.Linear(2, 1))
    x = torch.tensor([[1.0, -1.0]])
    first = model[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
    expected_tanh = torch.tanh(x)
    assert expected_tanh.sum() == 0  # so Divide divides by zero
    with (
        pytest.raises(tensorsnap.NonFiniteError, match="'2' is the first") as info,
        tensorsnap.capture(model, nonfinite="raise"),
    ):
        model(x)
    assert info.value.key == "2"
    assert list(info.value.snapshot) == ["0", "1", "2"]
    assert torch.equal(info.value.snapshot["1"], expected_tanh)
    assert torch.isinf(info.value.snapshot["2"]).all()


def test_only_captured_values_are_checked() -> None:
    model = nn.Sequential(_Log(), nn.Identity())
    x = torch.tensor([-1.0, 1.0])
    # the op that makes the NaN is not selected: the first captured value with it is "0"
    with (
        pytest.raises(tensorsnap.NonFiniteError) as info,
        tensorsnap.capture(model, ops=True, exclude=["*/log", "*/exp"], nonfinite="raise"),
    ):
        model(x)
    assert info.value.key == "0"
    assert list(info.value.snapshot) == ["0/mul", "0"]
    # ... and nothing selected holds one: no error
    with tensorsnap.capture(model, include="0/mul", ops=True, nonfinite="raise") as snap:
        model(x)
    assert list(snap) == ["0/mul"]


def test_backward_stops_at_the_first_nonfinite_gradient() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 3), _Sqrt(), nn.Linear(3, 2))
    first, last = model[0], model[2]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    with torch.no_grad():
        first.weight.zero_()
        first.bias.copy_(torch.tensor([0.0, 1.0, 4.0]))  # sqrt(0) in the forward
    x = torch.randn(1, 3)
    with pytest.raises(tensorsnap.NonFiniteError, match="'1:grad_in' is the first") as info:  # noqa: SIM117
        with tensorsnap.capture(model, ops=True, grads=True, nonfinite="raise"):
            out = model(x)
            assert torch.isfinite(out).all()
            out.sum().backward()
    snap = info.value.snapshot
    keys = list(snap)
    assert keys[-1] == "1:grad_in" and "0:grad" not in keys
    # the forward was finite and complete; gradients up to the sqrt are there
    assert keys[: keys.index("")] == ["0/linear", "0", "1/sqrt", "1", "2/linear", "2"]
    upstream = last.weight.sum(0).detach()  # d(sum(out)) / d(sqrt output), by hand
    assert torch.equal(snap["1:grad"], upstream.unsqueeze(0))
    assert torch.equal(snap["1/sqrt:grad"], upstream.unsqueeze(0))
    grad_in = snap["1:grad_in"]
    assert isinstance(grad_in, tuple) and torch.isinf(grad_in[0][0, 0])
    assert torch.isfinite(grad_in[0][0, 1:]).all()


def test_finite_run_is_the_same_as_without_the_check() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    snaps = []
    for check in (None, "raise"):
        with tensorsnap.capture(model, ops=True, grads=True, nonfinite=check) as snap:
            model(x).sum().backward()
        snaps.append(snap)
    plain, checked = snaps
    assert list(plain) == list(checked) and len(plain) > 10
    for key in plain:
        a, b = plain[key], checked[key]
        pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
        for x_a, x_b in pairs:
            assert (x_a is None and x_b is None) or torch.equal(x_a, x_b), key


def test_integer_values_and_masks_are_not_float_checks() -> None:
    class Indices(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            big = torch.full((2,), torch.iinfo(torch.int64).max)  # integers: never NaN/Inf
            mask = x > 0  # bool
            return x.argmax(-1) + big[:1] + mask.sum()

    with tensorsnap.capture(Indices(), ops=True, nonfinite="raise") as snap:
        Indices()(torch.randn(2, 3))
    assert list(snap) == []  # a different instance than the one captured: nothing recorded
    model = Indices()
    with tensorsnap.capture(model, ops=True, nonfinite="raise") as snap:
        model(torch.randn(2, 3))
    assert "/full" in snap and "/gt" in snap


def test_inf_in_a_complex_or_half_value_is_found() -> None:
    class Overflow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 1000).half() * 100  # mul, half, mul#1: 1e6 overflows float16

    model = Overflow()
    with pytest.raises(tensorsnap.NonFiniteError) as info:  # noqa: SIM117
        with tensorsnap.capture(model, ops=True, nonfinite="raise"):
            model(torch.tensor([10.0]))
    assert info.value.key == "/mul#1"
    assert list(info.value.snapshot) == ["/mul", "/half", "/mul#1"]

    class Complex(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.complex(x, 1 / x)

    with pytest.raises(tensorsnap.NonFiniteError) as info:  # noqa: SIM117
        with tensorsnap.capture(complex_model := Complex(), nonfinite="raise"):
            complex_model(torch.tensor([0.0, 1.0]))
    assert info.value.key == ""


def test_nonfinite_option_is_validated() -> None:
    with pytest.raises(tensorsnap.TensorSnapError, match="nonfinite='warn'"):
        tensorsnap.capture(nn.Linear(2, 2), nonfinite="warn")


class _Cache:
    """A plain object holding tensors in its attributes, as transformers caches do."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.layers = [values]


class _ReturnsCache(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, _Cache]:
        return x + 1, _Cache(x * 2, torch.log(x))  # log: NaN where x < 0


def test_a_nan_inside_an_objects_attributes_is_found_and_its_bytes_counted() -> None:
    model = _ReturnsCache()
    with tensorsnap.capture(model) as snap:
        model(torch.tensor([1.0, 2.0]))
    # the output tuple: x + 1, and the cache's two tensors, 8 bytes each
    assert snap.records[0].nbytes == 3 * 8
    with (
        pytest.raises(tensorsnap.NonFiniteError, match=r"'' is the first"),
        tensorsnap.capture(model, nonfinite="raise"),
    ):
        model(torch.tensor([1.0, -2.0]))
