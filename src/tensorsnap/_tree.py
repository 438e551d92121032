"""Walking the containers that model inputs and outputs are made of."""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ._dtensor import local

__all__ = ["extent", "map_tensors", "nbytes", "tensors"]


def extent(t: torch.Tensor) -> int:
    """Number of elements from the first to the last one ``t`` can reach, inclusive."""
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        if size > 1:
            count += (size - 1) * stride
    return int(count)


# objects whose attributes are code, not data: never searched for tensors
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)


def _children(value: Any) -> Iterator[Any] | None:
    if isinstance(value, (tuple, list)):
        return iter(value)
    if isinstance(value, Mapping):
        return iter(value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (getattr(value, f.name) for f in dataclasses.fields(value))
    attributes = getattr(value, "__dict__", None)
    if type(attributes) is dict and attributes and not isinstance(value, _OPAQUE):
        return iter(list(attributes.values()))  # a plain object, e.g. a transformers cache
    return None


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``value`` (containers, mappings, dataclasses, objects' attributes).

    Depth first; an object reached twice is searched once.
    """
    if isinstance(value, torch.Tensor):
        yield value
        return
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
            continue
        if id(item) in seen:
            continue
        children = _children(item)
        if children is not None:
            seen.add(id(item))
            stack.extend(reversed(list(children)))


def nbytes(value: Any) -> int:
    """Bytes held by the distinct storages of the tensors inside ``value``."""
    if type(value) is torch.Tensor and value.layout == torch.strided:
        return value.untyped_storage().nbytes()
    total = 0
    seen: set[int] = set()
    for t in tensors(value):
        if type(t) is not torch.Tensor:
            t = local(t)  # a DTensor holds its local tensor's bytes on this rank
        if t.layout != torch.strided or t.is_meta or t.is_quantized:
            total += t.numel() * t.element_size()
            continue
        try:
            storage = t.untyped_storage()
            address = storage.data_ptr()
        except RuntimeError:  # a wrapper subclass (TwoTensor, float8 wrappers): no storage
            total += t.numel() * t.element_size()
            continue
        if address not in seen or address == 0:
            seen.add(address)
            total += storage.nbytes()
    return total


def map_tensors(
    fn: Callable[[Any], Any], value: Any, other: Any = None, leaf: type = torch.Tensor
) -> Any:
    """``value`` with every tensor replaced by ``fn(tensor)`` and every other leaf by ``other``.

    Containers keep their types: a tuple stays a tuple, a namedtuple that namedtuple, a
    ``ModelOutput`` or other mapping its class, a dataclass its class. ``leaf`` names the type
    that ``fn`` replaces, when it is not ``torch.Tensor``.
    """
    if isinstance(value, leaf):
        return fn(value)
    if isinstance(value, tuple):
        items = [map_tensors(fn, item, other, leaf) for item in value]
        if type(value) is tuple:
            return tuple(items)
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*items)
        return type(value)(items)  # torch.return_types and other structseqs
    if isinstance(value, list):
        return [map_tensors(fn, item, other, leaf) for item in value]
    if type(value) is dict:
        return {k: map_tensors(fn, v, other, leaf) for k, v in value.items()}
    if isinstance(value, Mapping):
        result = copy.copy(value)
        for k, v in value.items():
            result[k] = map_tensors(fn, v, other, leaf)  # type: ignore[index]
        return result
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        result = copy.copy(value)  # type: ignore[arg-type]
        for field in dataclasses.fields(value):
            object.__setattr__(
                result, field.name, map_tensors(fn, getattr(value, field.name), other, leaf)
            )
        return result
    return other
