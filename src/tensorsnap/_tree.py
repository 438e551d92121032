"""Walking the containers that model inputs and outputs are made of."""

from __future__ import annotations

import dataclasses
import types
from collections import OrderedDict, defaultdict
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
    """``value`` with every tensor replaced by ``fn(tensor)``, in a structure of its own types.

    Containers keep their types (a tuple stays a tuple, a namedtuple that namedtuple, a
    ``ModelOutput`` or other dict its class, a dataclass its class) and have their other leaves
    replaced by ``other``; plain objects (a transformers cache) are rebuilt with the same class
    where they hold tensors, keeping their other attributes as they are. No user code runs:
    nothing of the class's own (``__new__``, ``__init__``, ``__setitem__``, ``__setattr__``)
    sees the replacements, so a namedtuple that validates its fields (``PackedSequence``) is
    rebuilt all the same. ``leaf`` names the type that ``fn`` replaces, when not a tensor.
    """
    if isinstance(value, leaf):
        return fn(value)
    return _Mapper(fn, other, leaf).map(value)[0]


class _Mapper:
    """One :func:`map_tensors` walk; ``map`` returns ``(result, whether a leaf was found)``."""

    def __init__(self, fn: Callable[[Any], Any], other: Any, leaf: type) -> None:
        self.fn, self.other, self.leaf = fn, other, leaf
        self.memo: dict[int, tuple[Any, bool]] = {}

    def map(self, value: Any) -> tuple[Any, bool]:
        if isinstance(value, self.leaf):
            return self.fn(value), True
        if value is None or isinstance(value, _PLAIN):
            return self.other, False
        if isinstance(value, torch.nn.Module):
            return self.other, False  # a model's own state, not a value it computed
        done = self.memo.get(id(value))
        if done is not None:
            return done
        cls = type(value)
        if isinstance(value, tuple):
            items, found = self.items(value)
            if cls is tuple:
                result: Any = tuple(items)
            elif hasattr(cls, "n_fields"):  # torch.return_types and other C structseqs
                result = cls(items)
            else:  # a namedtuple: tuple.__new__ skips a validating __new__ (PackedSequence)
                result = tuple.__new__(cls, items)
                self.attributes(value, result)
            return self.remember(value, result, found)
        if isinstance(value, list):
            result = [] if cls is list else list.__new__(cls)
            self.memo[id(value)] = (result, True)
            items, found = self.items(value)
            list.extend(result, items)
            if cls is not list:
                self.attributes(value, result)
            return self.remember(value, result, found)
        if isinstance(value, dict):
            base = next(b for b in cls.__mro__ if b in _DICTS)  # the C type's own methods
            result = {} if cls is dict else base.__new__(cls)
            self.memo[id(value)] = (result, True)
            found = False
            for k, v in base.items(value):
                item, has = self.map(v)
                base.__setitem__(result, k, item)
                found = found or has
            if isinstance(value, defaultdict):
                object.__setattr__(result, "default_factory", value.default_factory)
            if cls is not dict:
                found = self.attributes(value, result) or found  # a ModelOutput's fields
            return self.remember(value, result, found)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return self.object(value, [f.name for f in dataclasses.fields(value)])
        if type(getattr(value, "__dict__", None)) is dict and not isinstance(value, Mapping):
            return self.object(value, [])
        return self.other, False

    def items(self, value: Any) -> tuple[list[Any], bool]:
        found = False
        items = []
        for item in value:
            mapped, has = self.map(item)
            items.append(mapped)
            found = found or has
        return items, found

    def object(self, value: Any, fields: list[str]) -> tuple[Any, bool]:
        """A dataclass (its fields are container slots) or a plain object (its attributes)."""
        try:
            result = object.__new__(type(value))
        except TypeError:  # a built-in layout that object.__new__ cannot make
            return self.other, False
        self.memo[id(value)] = (result, True)
        found = False
        for name in fields:
            item, has = self.map(getattr(value, name))
            object.__setattr__(result, name, item)
            found = found or has
        found = self.attributes(value, result, skip=frozenset(fields)) or found
        if not found and not fields:
            # an object without tensors is no part of the value's gradient: a container holds
            # None for it, and an object holding it keeps it as it is
            return self.remember(value, self.other, False)
        return self.remember(value, result, found)

    def attributes(self, value: Any, result: Any, skip: frozenset[str] = frozenset()) -> bool:
        """Copy ``value``'s instance attributes into ``result``, mapping those holding leaves."""
        state = getattr(value, "__dict__", None)
        if type(state) is not dict:
            return False
        found = False
        target = object.__getattribute__(result, "__dict__")
        for name, item in state.items():
            if name in skip:
                continue
            mapped, has = self.map(item)
            target[name] = mapped if has else item  # state without tensors stays as it was
            found = found or has
        return found

    def remember(self, value: Any, result: Any, found: bool) -> tuple[Any, bool]:
        self.memo[id(value)] = (result, found)
        return result, found


_SCALARS = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_PLAIN = _SCALARS + _OPAQUE  # leaves that are never searched
_DICTS = (OrderedDict, defaultdict, dict)
