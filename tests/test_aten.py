"""capture(ops="aten"): the ATen ops beneath torch-level calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tensorsnap


def test_aten_keys_and_values_against_hand_computed_references() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.ReLU())
    x = torch.randn(2, 4)
    with torch.no_grad(), tensorsnap.capture(model, ops="aten") as snap:
        out = model(x)
    keys = list(snap)
    # linear decomposes into a transpose and addmm; layer_norm into native_layer_norm
    assert keys[:3] == ["0/aten.t", "0/aten.addmm", "0"]
    assert "1/aten.native_layer_norm" in keys and "2/aten.relu" in keys
    weight, bias = model[0].weight, model[0].bias
    assert torch.equal(snap["0/aten.t"], weight.t())
    assert torch.equal(snap["0/aten.addmm"], torch.addmm(bias, x, weight.t()))
    _normed, mean, rstd = snap["1/aten.native_layer_norm"]  # a tuple-returning ATen op
    h = snap["0"]
    assert torch.allclose(mean.flatten(), h.mean(-1))
    assert torch.allclose(rstd.flatten(), 1 / torch.sqrt(h.var(-1, unbiased=False) + 1e-5))
    assert torch.equal(snap["2/aten.relu"], out)
    # nothing of tensorsnap's own (its clones and detaches) shows up as a model op
    assert not any("clone" in k or "detach" in k for k in keys)


def test_aten_capture_does_not_change_outputs_or_gradients() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 1))
    x = torch.randn(3, 5, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    with tensorsnap.capture(model, ops="aten", grads=True) as snap:
        out = model(x)
        out.sum().backward()
    assert torch.equal(out, expected)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert "1/aten.gelu" in snap and "1:grad" in snap
    # ops outside any module call (the backward pass, the loss) are not the model's
    assert not any(k.startswith("/aten.") for k in snap if k.startswith("/"))


def test_aten_sees_inside_a_python_level_torch_function() -> None:
    class Normalize(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(x, dim=-1)  # Python: a norm, a clamp, a division

    x = torch.randn(3, 4)
    model = Normalize()
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as torch_level:
        model(x)
    with torch.no_grad(), tensorsnap.capture(model, ops="aten") as aten_level:
        model(x)
    assert list(torch_level) == ["/normalize", ""]
    inner = [k for k in aten_level if k.startswith("/aten.")]
    assert "/aten.linalg_vector_norm" in inner and "/aten.div" in inner
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    assert torch.equal(aten_level["/aten.linalg_vector_norm"], norm)


def test_ops_option_is_validated() -> None:
    with pytest.raises(tensorsnap.TensorSnapError, match="ops='dispatch'"):
        tensorsnap.capture(nn.Linear(2, 2), ops="dispatch")


def test_aten_names_do_not_depend_on_an_earlier_torch_level_capture() -> None:
    class Direct(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten.relu.default(x) + 1  # an ATen op called by the model itself

    model = Direct()
    x = torch.randn(3)
    with tensorsnap.capture(model, ops="aten") as before:
        model(x)
    with tensorsnap.capture(model, ops=True) as torch_level:
        model(x)
    with tensorsnap.capture(model, ops="aten") as after:
        model(x)
    assert list(before) == list(after) == ["/aten.relu", "/aten.add", ""]
    assert "/add" in torch_level
