"""Module names follow the model's tree from block to block.

A capture names modules from a walk of the model, and reuses its last walk while every module
has the same class and the same children; these tests change the tree between blocks and
check each block's keys against ``named_modules()`` read afresh.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

import tensorsnap


class _Chain(nn.Module):
    """Calls its children in order, whatever they are now."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self._modules.values():  # (children() would skip a module met again)
            x = child(x)  # type: ignore[misc]
        return x


class _Equal(nn.Linear):
    """A module class whose instances all compare equal."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Equal)

    __hash__ = nn.Linear.__hash__


class _Unhashable(_Chain):
    def __eq__(self, other: object) -> bool:
        return other is self

    __hash__ = None  # type: ignore[assignment]


def _keys(model: nn.Module) -> list[str]:
    with torch.no_grad(), tensorsnap.capture(model) as snap:
        model(torch.ones(1, 4))
    return list(snap)


def _expected(model: nn.Module) -> list[str]:
    """Module output keys in the order modules return: children before their parent."""

    def order(module: nn.Module, name: str) -> list[str]:
        inner = [
            key
            for child_name, child in module.named_children()
            for key in order(child, f"{name}.{child_name}" if name else child_name)
        ]
        return [*inner, name]

    return order(model, "")


def test_names_follow_modules_replaced_renamed_added_and_removed() -> None:
    model = _Chain()
    model.a, model.b = nn.Linear(4, 4), nn.ReLU()
    assert _keys(model) == ["a", "b", ""] == _expected(model)
    model.b = nn.Tanh()  # replaced: a new module under the old name
    assert _keys(model) == ["a", "b", ""]
    model.add_module("c", model.b)  # the same module under a new name, the old one removed
    del model.b
    assert _keys(model) == ["a", "c", ""] == _expected(model)
    model.a = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # a subtree where a leaf was
    assert _keys(model) == ["a.0", "a.1", "a", "c", ""] == _expected(model)
    model.a[1] = nn.Sigmoid()  # replaced deeper down
    snap_keys = _keys(model)
    assert snap_keys == _expected(model)
    del model.a
    assert _keys(model) == ["c", ""] == _expected(model)


def test_a_replaced_module_is_named_even_where_modules_compare_equal() -> None:
    model = _Chain()
    model.a = _Equal(4, 4)
    assert _keys(model) == ["a", ""]
    model.a = _Equal(4, 4)  # == the old one, and another module
    with torch.no_grad(), tensorsnap.capture(model) as snap:
        out = model(torch.ones(1, 4))
    assert list(snap) == ["a", ""]
    assert torch.equal(snap["a"], model.a(torch.ones(1, 4)).detach())
    assert torch.equal(snap[""], out)


def test_an_unhashable_model_is_named_each_time() -> None:
    model = _Unhashable()
    model.a = nn.Linear(4, 4)
    assert _keys(model) == ["a", ""]
    model.b = nn.ReLU()
    assert _keys(model) == ["a", "b", ""]


def test_a_module_registered_twice_keeps_its_first_name() -> None:
    model = _Chain()
    shared = nn.Linear(4, 4)
    model.a, model.b = shared, nn.ReLU()
    model.add_module("c", shared)  # a's module, called again after b
    assert _keys(model) == ["a", "b", "a#1", ""]
    model.c = nn.Tanh()
    assert _keys(model) == ["a", "b", "c", ""]


def test_a_captured_model_is_freed_with_its_names() -> None:
    # the names cache is keyed by the model: a value referring to it (here through a hook's
    # closure on a child, as well as the modules themselves) would keep it alive for good
    def block() -> weakref.ref[nn.Module]:
        model = _Chain()
        model.add_module("0", nn.Linear(2, 2))
        model.add_module("1", nn.ReLU())
        model._modules["0"].register_forward_hook(lambda m, i, o: model.training and None)
        with tensorsnap.capture(model) as snap:
            model(torch.ones(1, 2))
        with tensorsnap.capture(model):  # the second block reads the cache
            model(torch.ones(1, 2))
        assert list(snap) == ["0", "1", ""]
        return weakref.ref(model)

    gone = block()
    gc.collect()
    assert gone() is None
