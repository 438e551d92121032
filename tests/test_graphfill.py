"""Graph mode's compiled rebuild of module outputs (``_graphfill.builder``) against the walk.

A builder must return what :func:`_graphfill.fill` returns for the same structure and graph
outputs: the same classes, items, attributes and order, the same object wherever the walk
gives one object twice (a list holding itself, a cache held by two outputs), the graph's own
tensors where they are kept, and one copy per reachable tensor, shared as the walk shares it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers.utils import ModelOutput

from tensorsnap._graphfill import (
    COPIED,
    COPY,
    KEEP,
    Leaf,
    Mapping,
    Object,
    Shared,
    builder,
    fill,
    take,
)


@dataclass
class _Output(ModelOutput):  # type: ignore[misc]
    hidden: torch.Tensor | None = None
    cache: Any = None


class _Cache:
    pass


class _Recorder:
    """The part of the recorder ``take`` uses: a copy of a reachable value, counted."""

    def __init__(self) -> None:
        self.copies = 0

    def copy_value(self, value: Any, key: str) -> Any:
        self.copies += 1
        return value.clone()


def _both(structure: Any, extras: list[torch.Tensor]) -> tuple[Any, Any, int, int]:
    walked_by, built_by = _Recorder(), _Recorder()
    walked = fill(structure, extras, True, walked_by, "k", {}, {})  # type: ignore[arg-type]
    build = builder(structure, "m")
    assert build is not None
    clones: dict[int, Any] = {}
    built = build(extras, lambda leaf: take(extras, leaf, True, built_by, "k", clones))  # type: ignore[arg-type]
    return walked, built, walked_by.copies, built_by.copies


def _shape(value: Any, seen: dict[int, int]) -> Any:
    """A value's classes, contents, attributes and identities (objects numbered as first met)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.tolist(), value.stride())
    if isinstance(value, (str, int, float, type(None), torch.dtype, torch.device, type)):
        return value
    if id(value) in seen:
        return ("again", seen[id(value)])
    seen[id(value)] = len(seen)
    items: Any = None
    if isinstance(value, dict):
        items = [(k, _shape(v, seen)) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [_shape(v, seen) for v in value]
    attributes = [(k, _shape(v, seen)) for k, v in getattr(value, "__dict__", {}).items()]
    return (type(value), items, attributes)


def _tensors(value: Any, found: list[torch.Tensor], seen: set[int]) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        found.append(value)
        return found
    if id(value) in seen or isinstance(value, type):
        return found
    seen.add(id(value))
    parts = list(value.values()) if isinstance(value, dict) else []
    parts += list(value) if isinstance(value, (tuple, list)) else []
    parts += list(getattr(value, "__dict__", {}).values())
    for part in parts:
        _tensors(part, found, seen)
    return found


def _model_output(hidden: Any, cache: Any) -> Mapping:
    output = Mapping(_Output, ("hidden", "cache"), True, ("note",))
    output.values = (hidden, cache)
    output.state = ("set after init",)
    return output


def _cache(keys: Any, values: Any) -> Object:
    found = Object(_Cache, ("keys", "values", "seen", "device"), ())
    found.values = (keys, values, 3, torch.device("cpu"))
    return found


def _cases() -> dict[str, Any]:
    shared_cache = _cache(Leaf(2, COPY), Leaf(3, COPY))
    own = []  # a list that holds itself
    own.extend([Leaf(0, KEEP), Shared(own)])
    pair = (Leaf(0, KEEP), Leaf(1, COPIED))
    ordered = Mapping(OrderedDict, ("b", "a"), False, ())
    ordered.values = (Leaf(1, COPIED), None)
    return {
        "tuple": (Leaf(0, KEEP), Leaf(1, COPIED), None, 2.5),
        "one-tuple": (Leaf(0, KEEP),),
        "empty": ((), [], {}),
        "model output with a cache": _model_output(Leaf(0, KEEP), shared_cache),
        "a cache held twice": [
            _model_output(Leaf(1, COPIED), shared_cache),
            Shared(shared_cache),
        ],
        "a reachable tensor held twice": (Leaf(2, COPY), [Leaf(2, COPY)]),
        "a list holding itself": own,
        "a tuple held twice": [pair, Shared(pair)],
        "dict and ordered dict": {"x": Leaf(1, COPIED), "y": ordered, 3: torch.float16},
        "a class": (_Cache, Leaf(0, KEEP)),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_a_builder_returns_what_the_walk_returns(case: str) -> None:
    structure = _cases()[case]
    extras = [torch.arange(4.0) + i for i in range(4)]
    walked, built, walk_copies, build_copies = _both(structure, extras)
    assert _shape(built, {}) == _shape(walked, {})
    assert build_copies == walk_copies  # one copy per reachable tensor, however often held
    for a, b in zip(_tensors(walked, [], set()), _tensors(built, [], set()), strict=True):
        kept = any(a is e for e in extras)
        assert (b is a) == kept  # kept and in-graph copies are the graph's outputs themselves
        if not kept:  # reachable: a copy, not the output the caller holds
            assert all(b is not e for e in extras) and torch.equal(a, b)


def test_a_model_output_is_made_without_its_init_items_in_order_then_attributes() -> None:
    extras = [torch.ones(2), torch.zeros(2)]
    output = Mapping(_Output, ("cache", "hidden"), True, ("note",))  # items out of field order
    output.values = (None, Leaf(0, KEEP))
    output.state = ("x",)
    build = builder(output, "m")
    assert build is not None
    made = build(extras, lambda leaf: extras[leaf.index])
    walked = fill(output, extras, True, None, "k", {}, {})  # type: ignore[arg-type]
    assert type(made) is _Output and list(made.keys()) == ["cache", "hidden"] == list(walked)
    assert made["hidden"] is extras[0] and made.note == "x" and made["cache"] is None


def test_a_structure_too_large_to_compile_is_walked() -> None:
    structure = [(Leaf(0, KEEP),) for _ in range(5000)]
    assert builder(structure, "m") is None
