"""Graph mode's hand-over: each captured value taken from the graph's outputs, as a key holds it.

A graph returns its captured values as extra outputs. A key's value is one of them (a
:class:`Leaf`: kept as it is, or copied when the caller can reach it), or a module output's
structure (tuples, lists, dicts, ModelOutputs, objects such as a ``DynamicCache``) rebuilt
around them, exactly as the copy engine would copy the module's output. :func:`fill` rebuilds
a structure by walking it; :func:`builder` compiles the same walk into one Python function per
structure, which a graph run many times calls instead (the walk costs about a microsecond per
part, the function a few tens of nanoseconds).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ._recorder import Recorder

__all__ = [
    "CONSTANTS",
    "COPIED",
    "COPY",
    "KEEP",
    "Leaf",
    "Mapping",
    "Object",
    "Shared",
    "builder",
    "fill",
    "take",
    "value_of",
]

# how a captured value reaches the session
KEEP = 0  # fresh and never written again: kept as it is (copied when it is a view)
COPIED = 1  # copied inside the graph, before a later node wrote it
COPY = 2  # the caller can reach its storage: copied when the graph returns


class Leaf:
    """A place in a module output's structure filled from the graph's extra outputs."""

    __slots__ = ("how", "index")

    def __init__(self, index: int, how: int) -> None:
        self.index = index
        self.how = how


# what a module output's structure holds as it is (a ModelOutput's unset fields, a cache's flags)
CONSTANTS = frozenset({type(None), bool, int, float, str, torch.device, torch.dtype})


def value_of(
    value: Any,
    whole: bool,
    extras: Any,
    plain: bool,
    recorder: Recorder,
    key: str,
    clones: dict[int, Any],
    build: Callable[[Any, Callable[[Leaf], Any]], Any] | None = None,
) -> Any:
    """One entry's value; ``clones``: the copies made so far in this hand-over, by place
    among the extra outputs (a tensor the caller can reach, held by two keys, is copied once:
    the keys share the copy, as they share a kept tensor); ``build``: the structure's
    :func:`builder`, if it has one."""
    if type(value) is Leaf:
        return take(extras, value, plain, recorder, key, clones)
    if build is not None and plain and not whole:
        return build(extras, lambda leaf: take(extras, leaf, True, recorder, key, clones))
    if plain and whole:
        return recorder.copy_value(fill(value, extras, False, recorder, key, {}, clones), key)
    return fill(value, extras, plain, recorder, key, {}, clones)


def take(
    extras: Any, leaf: Leaf, plain: bool, recorder: Recorder, key: str, clones: dict[int, Any]
) -> Any:
    value = extras[leaf.index]
    if not plain or leaf.how == COPIED:
        return value  # the session's copier copies it, or it is a copy already
    if leaf.how == KEEP:
        # fresh storage that nothing writes again and only the snapshot will hold: views of
        # it stay views (of one storage with the other keys that view it), as lazy=True keeps
        if type(value) is torch.Tensor:
            return value.detach() if value.requires_grad else value
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in value):
            return value
    copy = clones.get(leaf.index)
    if copy is None:
        copy = clones[leaf.index] = recorder.copy_value(value, key)
    return copy


def fill(
    structure: Any,
    extras: Any,
    plain: bool,
    recorder: Recorder,
    key: str,
    memo: dict[int, Any],
    clones: dict[int, Any],
) -> Any:
    """The value of a module output's ``structure``; ``memo``: what each tuple, list, mapping
    and object of it became, so that one held twice (a :class:`Shared`) is one value twice."""
    kind = type(structure)
    if kind is Leaf:
        return take(extras, structure, plain, recorder, key, clones)
    if kind in CONSTANTS:
        return structure
    if kind is Shared:
        return memo[id(structure.target)]

    def part_of(part: Any) -> Any:
        return fill(part, extras, plain, recorder, key, memo, clones)

    if isinstance(structure, tuple):
        made = memo[id(structure)] = tuple([part_of(item) for item in structure])
        return made
    if isinstance(structure, list):
        items: list[Any] = []
        memo[id(structure)] = items  # made before its items: it may hold itself
        items.extend([part_of(item) for item in structure])
        return items
    if isinstance(structure, dict):
        return {k: part_of(v) for k, v in structure.items()}
    if isinstance(structure, Mapping):
        if structure.fields:
            # as the copy engine copies a ModelOutput: no __init__ or __post_init__ (which would
            # re-derive and reorder the items), its items and attributes set as they were
            model_output: Any = structure.cls
            made = memo[id(structure)] = model_output.__new__(model_output)
            for k, v in zip(structure.keys, structure.values, strict=True):
                OrderedDict.__setitem__(made, k, part_of(v))
            made.__dict__.update(
                [(k, part_of(v)) for k, v in zip(structure.names, structure.state, strict=True)]
            )
            return made
        mapping = memo[id(structure)] = structure.cls()
        for k, v in zip(structure.keys, structure.values, strict=True):
            mapping[k] = part_of(v)
        return mapping
    if isinstance(structure, Object):
        # as the copy engine rebuilds it: a new instance, its attributes' copies set on it
        cls: Any = structure.cls
        result = memo[id(structure)] = cls.__new__(cls)
        values = [part_of(v) for v in structure.values]
        result.__dict__.update(zip(structure.keys, values, strict=True))
        return result
    return structure


class _Rebuilt:
    """A class and its parts (keys or attribute names, and their values), rebuilt by fill."""

    __slots__ = ("cls", "keys", "values")

    def __init__(self, cls: type, keys: tuple[Any, ...], values: tuple[Any, ...]) -> None:
        self.cls, self.keys, self.values = cls, keys, values


class Mapping(_Rebuilt):
    """A Mapping in a module output (``dict``, ``OrderedDict``, a ``ModelOutput``): rebuilt
    from its items, and a ModelOutput from its attributes too."""

    __slots__ = ("fields", "names", "state")

    def __init__(self, cls: type, keys: tuple[Any, ...], fields: bool, names: tuple[str, ...]):
        super().__init__(cls, keys, ())
        self.fields = fields  # a ModelOutput: its items, then its attributes, set as they were
        self.names = names  # its attributes' names, and their values (filled in later)
        self.state: tuple[Any, ...] = ()


class Object(_Rebuilt):
    """Another object in a module output (a ``DynamicCache``): rebuilt from its attributes."""

    __slots__ = ()


class Shared:
    """A list, mapping or object of a module output met again: the same value once more."""

    __slots__ = ("target",)

    def __init__(self, target: Any) -> None:
        self.target = target


# ---- a structure's walk, compiled -------------------------------------------------------------

_LARGEST = 4000  # parts of a structure compiled into one function; larger ones are walked


def builder(structure: Any, name: str) -> Callable[[Any, Callable[[Leaf], Any]], Any] | None:
    """A function ``build(extras, take_leaf)`` returning what :func:`fill` returns for
    ``structure`` with ``plain=True``, or None if it is too large to compile.

    The function makes the same objects in the same order as the walk: each tuple after its
    parts, each list, ModelOutput, mapping and object before them (so that a part may hold it),
    ModelOutput items one by one and then its attributes. A kept or reachable leaf is
    ``take_leaf(leaf)`` (its copy is shared through the hand-over's ``clones``, as the walk
    does); a leaf copied inside the graph is the graph's output as it is.
    """
    emitter = _Emitter()
    try:
        result = emitter.part(structure)
    except (_TooLarge, KeyError):  # (KeyError: a part met again before it was made; the
        return None  # walk raises it where it meets it)
    source = "def build(extras, take_leaf):\n" + "".join(
        f"    {line}\n" for line in [*emitter.lines, f"return {result}"]
    )
    namespace = dict(emitter.constants)
    exec(compile(source, f"<tensorsnap: rebuild {name}>", "exec"), namespace)
    return namespace["build"]


class _TooLarge(Exception):
    pass


class _Emitter:
    """Writes the lines of one structure's builder: each part's value becomes an expression."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {"OrderedDict_setitem": OrderedDict.__setitem__}
        self.made: dict[int, str] = {}  # id(part) -> the variable holding what it became
        self.count = 0

    def constant(self, value: Any) -> str:
        name = f"c{len(self.constants)}"
        self.constants[name] = value
        return name

    def variable(self, line: str) -> str:
        self.count += 1
        if self.count > _LARGEST:
            raise _TooLarge
        name = f"v{self.count}"
        self.lines.append(f"{name} = {line}")
        return name

    def part(self, structure: Any) -> str:
        """An expression for ``structure``'s value, after the lines that make its parts."""
        kind = type(structure)
        if kind is Leaf:
            if structure.how == COPIED:
                return f"extras[{structure.index}]"
            return self.variable(f"take_leaf({self.constant(structure)})")
        if kind in CONSTANTS:
            return self.constant(structure)
        if kind is Shared:
            return self.made[id(structure.target)]
        if isinstance(structure, tuple):
            items = [self.part(item) for item in structure]
            made = self.made[id(structure)] = self.variable(f"({''.join(i + ', ' for i in items)})")
            return made
        if isinstance(structure, list):
            made = self.made[id(structure)] = self.variable("[]")
            items = [self.part(item) for item in structure]
            self.lines.append(f"{made}.extend(({''.join(i + ', ' for i in items)}))")
            return made
        if isinstance(structure, dict):
            pairs = [(self.constant(k), self.part(v)) for k, v in structure.items()]
            return self.variable("{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}")
        if isinstance(structure, Mapping):
            cls = self.constant(structure.cls)
            if structure.fields:
                made = self.made[id(structure)] = self.variable(f"{cls}.__new__({cls})")
                for k, v in zip(structure.keys, structure.values, strict=True):
                    item = self.part(v)
                    self.lines.append(f"OrderedDict_setitem({made}, {self.constant(k)}, {item})")
                pairs = [
                    (self.constant(k), self.part(v))
                    for k, v in zip(structure.names, structure.state, strict=True)
                ]
                self.lines.append(f"{made}.__dict__.update({self._pairs(pairs)})")
                return made
            made = self.made[id(structure)] = self.variable(f"{cls}()")
            for k, v in zip(structure.keys, structure.values, strict=True):
                item = self.part(v)
                self.lines.append(f"{made}[{self.constant(k)}] = {item}")
            return made
        if isinstance(structure, Object):
            cls = self.constant(structure.cls)
            made = self.made[id(structure)] = self.variable(f"{cls}.__new__({cls})")
            values = [self.part(v) for v in structure.values]
            pairs = [(self.constant(k), v) for k, v in zip(structure.keys, values, strict=True)]
            self.lines.append(f"{made}.__dict__.update({self._pairs(pairs)})")
            return made
        return self.constant(structure)

    @staticmethod
    def _pairs(pairs: list[tuple[str, str]]) -> str:
        return "(" + "".join(f"({k}, {v}), " for k, v in pairs) + ")"
