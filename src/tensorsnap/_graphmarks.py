"""Marking where module calls return, inside a dynamo graph.

While a graph-mode block is open, a process-wide forward hook stands in torch's hook table
under one fixed key. It does nothing in eager code; when dynamo traces a model's call (with
``_TRACING`` set, see :mod:`._graph`), it is traced into a :func:`mark` node at each point
where a module call returned, holding the module's id and its output. :mod:`._graphplan` reads
the marks and removes them before the graph runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
from torch import nn

__all__ = ["CLASS", "DEEP", "MAPPING", "OBJECT", "OPAQUE", "SHARED", "Marks", "mark"]

# our key in torch's table of process-wide forward hooks: one fixed key, so that the table looks
# the same in every block and dynamo's guards on it keep holding across blocks
_HOOK_ID = -(2**62) - 7


@torch._dynamo.allow_in_graph
def mark(module_id: int, output: Any) -> None:
    """Stands in a graph where a module call returned ``output``; removed before it runs."""
    return None


# True while a graph-mode call runs; dynamo reads it (and guards on it) when it traces the hook
_TRACING = False


# True only in code dynamo traces (False in eager code even while another thread compiles, where
# torch.compiler.is_compiling() is True); torch < 2.3 has only is_compiling
tracing: Callable[[], bool] = getattr(
    torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling
)

# the open graph-mode blocks' checks of module calls that run in eager code (GraphRunner.watch)
watchers: list[Callable[[nn.Module], None]] = []


def _mark_output(module: nn.Module, args: Any, output: Any) -> None:
    if _TRACING:
        mark(id(module), _markable(output))
    elif watchers and not tracing():
        for watch in tuple(watchers):
            watch(module)


# tags of what _markable makes of structures a graph node cannot hold as they are
MAPPING = "tensorsnap:mapping"
OBJECT = "tensorsnap:object"
CLASS = "tensorsnap:class"
OPAQUE = "tensorsnap:opaque"
SHARED = "tensorsnap:shared"
DEEP = "tensorsnap:deep"

# how deep _markable goes into a module output: dynamo spends some twenty Python frames on
# each level it traces, and runs out of stack (a RecursionError out of the model's call) near
# fifty; transformers' caches are five deep
DEEPEST = 24


def _markable(value: Any, seen: list[Any] | None = None, depth: int = 0) -> Any:
    """``value`` as an fx argument can hold it, traced by dynamo: Mappings (``ModelOutput``)
    become their class's module and name with their keys and values, and the names and values
    of their attributes (a ModelOutput's fields, as set when it was made), other objects (a
    transformers ``DynamicCache``) their class with the names and values of their attributes
    as the module call returned them, and classes their module and name; the plan rebuilds
    them, or refuses those the copy engine would not copy from their attributes.

    A tuple, list, dict or object met a second time (held twice, or holding itself) becomes a
    ``SHARED`` tag with its place in the order they were first met, so that the rebuilt
    value shares it as the copy engine's copy does (and a cycle ends). Past ``DEEPEST``
    levels, a ``DEEP`` tag: the plan refuses it.
    """
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    if depth > DEEPEST:
        return (DEEP,)
    depth += 1
    if seen is None:
        seen = []
    cls = type(value)
    if isinstance(value, (torch.device, torch.dtype)):
        return value
    if isinstance(value, torch.Size):  # (dynamo cannot read its __dict__): refused, by name
        return (OPAQUE, "torch", "Size")
    if not isinstance(value, type):  # containers and objects; classes are constants
        for i, other in enumerate(seen):
            if _same(other, value):
                return (SHARED, i)
        seen.append(value)
    if cls is tuple:
        return tuple(_markable(item, seen, depth) for item in value)
    if cls is list:
        return [_markable(item, seen, depth) for item in value]
    if isinstance(value, dict):
        plain = cls is dict  # dynamo cannot read a builtin class's __module__ as a constant
        # a ModelOutput's fields (dynamo 2.14 cannot read an OrderedDict's __dict__; the plan
        # rebuilds a plain OrderedDict from its items, as it was made)
        state = None if plain or cls is OrderedDict else getattr(value, "__dict__", None)
        attributes = state if type(state) is dict else {}
        return (
            MAPPING,
            "builtins" if plain else cls.__module__,
            "dict" if plain else cls.__qualname__,
            tuple(value.keys()),
            tuple(_markable(item, seen, depth) for item in value.values()),
            tuple(attributes.keys()),
            tuple(_markable(item, seen, depth) for item in attributes.values()),
        )
    if isinstance(value, type):
        return (CLASS, value.__module__, value.__qualname__)
    state = getattr(value, "__dict__", None)
    if type(state) is dict and not isinstance(value, (tuple, list, set, frozenset, nn.Module)):
        return (
            OBJECT,
            cls.__module__,
            cls.__qualname__,
            tuple(state.keys()),
            tuple(_markable(item, seen, depth) for item in state.values()),
        )
    return (OPAQUE, cls.__module__, cls.__qualname__)


def _same(a: Any, b: Any) -> bool:
    """``a is b``, as dynamo can trace it: for two tuples (whose identity dynamo cannot test),
    whether they hold the same items, each the same object (two tuples ``is`` one another
    does, and two different tuples rarely do: built twice from the same tensors, the second is
    rebuilt as the first, which only ``is`` can tell apart)."""
    if type(a) is tuple and type(b) is tuple:
        return len(a) == len(b) and all(map(_same, a, b))
    if type(a) is tuple or type(b) is tuple:
        return False
    return a is b


class Marks:
    """Keeps :func:`_mark_output` among torch's global forward hooks while graph blocks are open,
    with the patches of dynamo that graph mode's traces need (:class:`_Patch`)."""

    _lock = threading.Lock()
    _open = 0

    def __enter__(self) -> None:
        from torch.nn.modules import module as hooks

        with Marks._lock:
            if Marks._open == 0:
                hooks._global_forward_hooks[_HOOK_ID] = _mark_output
                for patch in _patches():
                    patch.apply()
            Marks._open += 1

    def __exit__(self, *exc: Any) -> None:
        from torch.nn.modules import module as hooks

        with Marks._lock:
            Marks._open -= 1
            if Marks._open == 0:
                hooks._global_forward_hooks.pop(_HOOK_ID, None)
                for patch in _patches():
                    patch.undo()


class _Patch:
    """One attribute of dynamo's replaced while graph blocks are open, and restored after.

    The replacement is made once from what the attribute held; if something else replaced
    that since (another library's patch), it is made again from what the attribute holds now.
    """

    __slots__ = ("make", "name", "original", "owner", "replacement")

    def __init__(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        self.owner, self.name, self.make = owner, name, make
        self.original: Any = None
        self.replacement: Any = None

    def apply(self) -> None:  # under Marks._lock
        current = getattr(self.owner, self.name)
        if current is not self.original or self.replacement is None:
            self.original, self.replacement = current, self.make(current)
        setattr(self.owner, self.name, self.replacement)

    def undo(self) -> None:  # under Marks._lock
        setattr(self.owner, self.name, self.original)


_made: list[_Patch] | None = None


def _patches() -> list[_Patch]:  # under Marks._lock
    global _made
    if _made is None:
        _made = _AttributeOrder.patches() + KeepIndexing.patches()
    return _made


class _AttributeOrder:
    """While graph mode traces, an object's ``__dict__`` lists its attributes in Python's order.

    dynamo lists the attributes set during the trace first, then the others: an object that
    existed before the call (a cache the caller passed in, whose layers get their tensors)
    would be marked, and rebuilt, with its attributes in another order than the object has
    and than the eager capture's copy has. Python keeps an attribute where it was when it is
    set again, and puts new ones last: that is the order given here. (An attribute deleted
    and set again in the same call stays where it was, where Python moves it last.) On a
    torch without dynamo's ``SideEffectsProxyDict``, nothing is changed.
    """

    @staticmethod
    def patches() -> list[_Patch]:
        try:
            from torch._dynamo import variables
            from torch._dynamo.variables import dicts

            proxy = dicts.SideEffectsProxyDict
            hashed, constant = dicts.HashableTracker, dicts.ConstantVariable
            deleted = variables.DeletedVariable
            proxy.__iter__  # noqa: B018
            proxy.side_effects_table  # noqa: B018  (what __iter__ below reads)
        except (ImportError, AttributeError):
            return []

        def make(original: Any) -> Any:
            def __iter__(self: Any) -> Any:
                if not _TRACING:
                    yield from original(self)
                    return
                table = self.side_effects_table()
                for name in self.item_dict:
                    if not isinstance(table.get(name), deleted):
                        yield hashed(constant.create(name))
                for name, value in table.items():
                    if name not in self.item_dict and not isinstance(value, deleted):
                        yield hashed(constant.create(name))

            return __iter__

        return [_Patch(proxy, "__iter__", make)]


class KeepIndexing:
    """Keeps the tensor indexing whose result nothing uses in graph mode's graphs.

    When dynamo finishes a graph it removes ``operator.getitem`` nodes without users (a
    miniature dead-code pass in ``OutputGraph.remove_unused_graphargs``), and with them a
    tensor indexing the eager capture records (transformers' ``_non_vmap_expansion_sdpa``
    indexes four tensors and its causal mask reads two). While graph blocks are open, that pass
    keeps nodes that index a tensor in the traces of a thread whose graph-mode call set
    ``local.ours`` (see ``_graph._Tracing``). On a torch without these methods the nodes go,
    and the check of the graph's keys against an eager run finds it.
    """

    local = threading.local()

    @classmethod
    def patches(cls) -> list[_Patch]:
        try:
            from torch._dynamo.output_graph import OutputGraph
        except ImportError:
            return []
        if not (
            hasattr(OutputGraph, "remove_unused_graphargs") and hasattr(OutputGraph, "remove_node")
        ):
            return []
        return [
            _Patch(OutputGraph, "remove_unused_graphargs", cls._prune),
            _Patch(OutputGraph, "remove_node", cls._remove),
        ]

    @classmethod
    def _prune(cls, prune: Callable[..., Any]) -> Callable[..., Any]:
        def remove_unused_graphargs(graph: Any) -> Any:
            local = cls.local
            local.pruning = getattr(local, "ours", False)
            try:
                return prune(graph)
            finally:
                local.pruning = False

        return remove_unused_graphargs

    @classmethod
    def _remove(cls, remove: Callable[..., Any]) -> Callable[..., Any]:
        import operator

        def remove_node(graph: Any, node: Any, *args: Any, **kwargs: Any) -> Any:
            if (
                getattr(cls.local, "pruning", False)
                and node.op == "call_function"
                and node.target is operator.getitem
                and isinstance(node.meta.get("example_value"), torch.Tensor)
            ):
                return None
            return remove(graph, node, *args, **kwargs)

        return remove_node
