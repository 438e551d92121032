"""nonfinite="raise" on accelerators: checks queued on the device, read once at boundaries.

A CUDA machine is not needed to test the logic: setting ``_finite._DEFER_CPU`` sends CPU values
down the deferred path, so every test of ``test_nonfinite`` runs again here that way (they must
name the same key and leave the same snapshot), and the tests below pin what deferral adds.
``benchmarks/gpu_check.py`` runs the same checks on CUDA.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from test_nonfinite import (  # each runs again here, down the deferred path
    test_a_nan_inside_an_objects_attributes_is_found_and_its_bytes_counted,
    test_backward_stops_at_the_first_nonfinite_gradient,
    test_finite_run_is_the_same_as_without_the_check,
    test_forward_op_stops_the_block_with_the_values_before_it,
    test_inf_in_a_complex_or_half_value_is_found,
    test_integer_values_and_masks_are_not_float_checks,
    test_module_output_with_inf_is_named_when_ops_are_not_captured,
    test_only_captured_values_are_checked,
)
from torch import nn

import tensorsnap
from tensorsnap import _finite

__all__ = [
    "test_a_nan_inside_an_objects_attributes_is_found_and_its_bytes_counted",
    "test_backward_stops_at_the_first_nonfinite_gradient",
    "test_finite_run_is_the_same_as_without_the_check",
    "test_forward_op_stops_the_block_with_the_values_before_it",
    "test_inf_in_a_complex_or_half_value_is_found",
    "test_integer_values_and_masks_are_not_float_checks",
    "test_module_output_with_inf_is_named_when_ops_are_not_captured",
    "test_only_captured_values_are_checked",
]


@pytest.fixture(autouse=True)
def deferred(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every value takes the deferred path; yields a list that counts the reads (the syncs)."""
    monkeypatch.setattr(_finite, "_DEFER_CPU", True)
    reads: list[int] = []
    real = _finite._sync_allowed

    @contextmanager
    def counted(device: torch.device) -> Iterator[None]:
        reads.append(1)
        with real(device):
            yield

    def never(t: torch.Tensor) -> bool:
        raise AssertionError("a per-value read on the deferred path")

    monkeypatch.setattr(_finite, "_sync_allowed", counted)
    monkeypatch.setattr(_finite, "_finite_now", never)
    yield reads


class _Block(nn.Module):
    """fc, then log (-inf where the fc output is 0), then a module and an op after it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.after = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.log(self.fc(x))
        return self.after(y * 2)


def _deep() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.ReLU(), _Block()), nn.Linear(2, 1))
    block = model[1][1]
    assert isinstance(block, _Block)
    with torch.no_grad():
        block.fc.weight.copy_(torch.eye(2))
        block.fc.bias.zero_()
    return model


def _keys_immediately(model: nn.Module, x: torch.Tensor, **options: Any) -> tuple[str, list[str]]:
    """The key and snapshot keys the immediate (CPU) check gives: the reference."""
    with (
        pytest.MonkeyPatch.context() as patch,
        pytest.raises(tensorsnap.NonFiniteError) as info,
    ):
        patch.setattr(_finite, "_DEFER_CPU", False)
        patch.setattr(_finite, "_finite_now", _reference_finite)
        with tensorsnap.capture(model, nonfinite="raise", **options):
            model(x)
    return info.value.key, list(info.value.snapshot)


def _reference_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())


@pytest.mark.parametrize(
    "options",
    [{"ops": True}, {"ops": True, "inputs": True}, {}, {"include": "1.1.*"}],
    ids=["ops", "ops+inputs", "outputs", "include"],
)
def test_nested_calls_name_the_same_first_key_with_one_read(
    options: dict[str, Any], deferred: list[int]
) -> None:
    model = _deep()
    x = torch.tensor([[0.0, 3.0]])  # fc is the identity: log(0) = -inf
    key, keys = _keys_immediately(model, x, **options)
    assert key == ("1.1/log" if options.get("ops") else "1.1.after")
    assert key in keys and keys[-1] == key
    deferred.clear()
    ran_after = False
    with (
        pytest.raises(tensorsnap.NonFiniteError, match=rf"^{key!r} is the first") as info,
        tensorsnap.capture(model, nonfinite="raise", **options) as snap,
    ):
        model(x)
        ran_after = True  # the model's call is the boundary: the block stops when it returns
    assert not ran_after
    assert info.value.key == key and info.value.snapshot is snap
    assert list(snap) == keys  # what came after the first bad value is gone
    assert deferred == [1]  # one read for the whole forward
    # the snapshot stays readable, with the values as they were produced
    block = model[1][1]
    assert isinstance(block, _Block)
    fc_out = block.fc(torch.relu(x)).detach()
    if "1.1.fc" in snap:
        assert torch.equal(snap["1.1.fc"], fc_out)
    if "1.1/log" in snap:
        assert torch.equal(snap["1.1/log"], torch.log(fc_out))


def test_a_clean_forward_reads_once_and_a_later_bad_call_is_named_with_its_number(
    deferred: list[int],
) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid())
    good, bad = torch.ones(1, 2), torch.tensor([[float("inf"), 0.0]])
    with (
        pytest.raises(tensorsnap.NonFiniteError, match=r"^'0#1' is the first"),
        tensorsnap.capture(model, nonfinite="raise") as snap,
    ):
        model(good)
        assert deferred == [1] and list(snap) == ["0", "1", ""]
        model(bad)
    assert list(snap) == ["0", "1", "", "0#1"]
    assert deferred == [1, 1]


def test_values_captured_outside_a_model_call_are_read_when_the_block_ends(
    deferred: list[int],
) -> None:
    model = _deep()
    inner = model[1]
    x = torch.tensor([[0.0, 3.0]])
    with (
        pytest.raises(tensorsnap.NonFiniteError, match=r"^'1.1/log' is the first"),
        tensorsnap.capture(model, ops=True, nonfinite="raise") as snap,
    ):
        inner(x)  # a submodule called on its own: no model-call boundary inside the block
        assert "1.1" in snap  # not read yet: the block goes on
        inner(torch.ones(1, 2))
    assert list(snap)[-1] == "1.1/log" and "1#1" not in snap
    assert deferred == [1]


def test_another_exception_from_the_block_is_not_masked_but_annotated() -> None:
    model = _deep()
    inner = model[1]
    with pytest.raises(KeyError, match="mine") as info:  # noqa: SIM117
        with tensorsnap.capture(model, ops=True, nonfinite="raise") as snap:
            inner(torch.tensor([[0.0, 3.0]]))
            raise KeyError("mine")
    if sys.version_info >= (3, 11):  # exceptions carry notes from 3.11 on
        assert info.value.__notes__ == [
            "tensorsnap: '1.1/log' was the first value with a NaN or Inf"
        ]
    assert list(snap)[-1] == "1"  # nothing dropped: the block's own error is the story


def test_a_cpu_value_found_bad_first_reads_the_queued_device_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CPU values are queued until the model's inner call is done, then checked at once
    monkeypatch.setattr(_finite, "_finite_now", _reference_finite)
    model = _deep()
    x = torch.tensor([[0.0, 3.0]])

    class Mixed(nn.Module):
        """Returns a later bad value on the 'immediate' path after an earlier queued one."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)  # holds the -inf of 1.1/log, queued
            monkeypatch.setattr(_finite, "_DEFER_CPU", False)
            return y / 0.0  # checked at once: bad, but not the first

    mixed = Mixed()
    with (
        pytest.raises(tensorsnap.NonFiniteError, match=r"^'inner.1.1/log' is the first"),
        tensorsnap.capture(mixed, ops=True, nonfinite="raise") as snap,
    ):
        mixed(x)
    assert list(snap)[-1] == "inner.1.1/log"


def test_backward_stops_when_it_ends_with_the_first_gradient_named(
    deferred: list[int],
) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    x = torch.randn(2, 3)
    with tensorsnap.capture(model, grads=True, ops=True, nonfinite="raise") as clean:
        model(x).sum().backward()
    first_grad = next(k for k in clean if k.endswith(":grad"))  # backward's first, by hand
    assert first_grad == "2/linear:grad"
    deferred.clear()
    stepped = False
    with pytest.raises(tensorsnap.NonFiniteError) as info:  # noqa: SIM117
        with tensorsnap.capture(model, grads=True, ops=True, nonfinite="raise") as snap:
            out = model(x)
            assert deferred == [1]
            (out.sum() * float("inf")).backward()  # every gradient is non-finite
            stepped = True  # an optimizer step here would use them: backward() must raise
    assert not stepped
    assert info.value.key == first_grad
    assert list(snap) == [*list(clean)[: list(clean).index(first_grad)], first_grad]
    assert deferred == [1, 1]  # the forward's read, and the backward pass's


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.float8_e5m2,
    ],
)
def test_the_device_check_agrees_with_isfinite(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    cases = []
    for size in (1, 7, 1000, 4097):
        for poison in (None, "nan", "inf", "-inf"):
            t = (torch.randn(size) * 4).to(dtype)
            if poison is not None:
                t[int(torch.randint(size, ()))] = float(poison)
            cases.append(t)
    if dtype == torch.float16:  # finite, but a float16 sum of it overflows
        cases.append(torch.full((4, 1000), 60000.0, dtype=dtype))
    cases.append(torch.randn(6, 5).to(dtype).t())  # not contiguous
    for i, t in enumerate(cases):
        low, high = _finite._extremes(t)
        got = bool(low.isfinite() and high.isfinite())
        assert got == _reference_finite(torch.view_as_real(t) if t.is_complex() else t), i


def test_a_float8_value_is_checked_on_the_cpu_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real immediate path, with the real per-value check

    class Cast(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 1e6).to(torch.float8_e5m2)  # 1e6 is beyond float8_e5m2: inf

    model = Cast()
    with tensorsnap.capture(model, nonfinite="raise") as snap:
        model(torch.tensor([1e-3, 2e-3]))
    assert snap[""].dtype == torch.float8_e5m2
    with (
        pytest.raises(tensorsnap.NonFiniteError, match=r"^'' is the first"),
        tensorsnap.capture(model, nonfinite="raise"),
    ):
        model(torch.tensor([1.0, 2.0]))


def test_a_live_value_gets_no_graph_node_and_lazy_capture_is_checked_too() -> None:
    x = torch.randn(3, requires_grad=True) * 2  # a live non-leaf, as lazy=True keeps it
    low, high = _finite._extremes(x)
    assert low.grad_fn is None and high.grad_fn is None
    model = _deep()
    with (
        pytest.raises(tensorsnap.NonFiniteError, match=r"^'1.1/log' is the first"),
        tensorsnap.capture(model, ops=True, lazy=True, nonfinite="raise") as snap,
    ):
        model(torch.tensor([[0.0, 3.0]], requires_grad=True))
    assert list(snap)[-1] == "1.1/log"
    assert torch.equal(snap["1.1.fc"], torch.tensor([[0.0, 3.0]]))
