"""Keys: naming modules the way users see them, and deciding once per key what is selected."""

from __future__ import annotations

import fnmatch
import operator
import re
import weakref
from collections.abc import Iterable
from itertools import chain

from torch import nn

from . import _validate
from ._errors import SelectionError
from ._snapshot import closest

__all__ = ["DISCOVERY_HINT", "Selector", "call_key", "module_names", "op_key"]

# The end of an include error: how to see the keys that exist. The command line replaces it
# with the command that lists them.
DISCOVERY_HINT = (
    " (list the keys with tensorsnap.names(model, *args); inputs, grads and ops keys exist "
    "only when inputs=, grads= or ops= is on)"
)

# Attribute names under which wrappers hold the module they wrap. The wrapped module takes the
# wrapper's name, so keys never carry them.
_WRAPPED = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def call_key(name: str, call: int) -> str:
    """The key of call ``call`` of module ``name``: ``P``, then ``P#1``, ``P#2``..."""
    return name if call == 0 else f"{name}#{call}"


def op_key(call: str, op: str, count: int) -> str:
    """The key of the ``count``-th ``op`` run by module call ``call``: ``C/op``, ``C/op#1``..."""
    return f"{call}/{op}" if count == 0 else f"{call}/{op}#{count}"


def _is_wrapper(module: nn.Module) -> str | None:
    """The attribute holding the wrapped module, if ``module`` is a transparent wrapper."""
    children = module._modules
    if not children:  # most modules: a wrapper holds what it wraps
        return None
    for name in _WRAPPED:
        if name in children:
            return name
    cls = type(module)
    if cls.__name__ in ("DistributedDataParallel", "DataParallel") and "module" in children:
        return "module"
    return None


def module_names(
    model: nn.Module, wrappers: set[int] | None = None, modules: list[nn.Module] | None = None
) -> dict[int, str]:
    """Map ``id(module)`` to the name its keys use, for every module of ``model``.

    Names are those of ``model.named_modules()`` (the root is ``""``; a module registered twice
    keeps its first name) with wrapper levels removed: the module inside a DDP, FSDP, checkpoint
    or ``torch.compile`` wrapper takes the wrapper's name, and the wrapper itself is not
    recorded. The original qualified names (with ``module.`` or ``_fsdp_wrapped_module.``) are
    not kept anywhere: they describe how a run was wrapped, not what it computed, and the keys
    are those of the unwrapped model. ``wrappers``, when given, receives the wrappers' ids, and
    ``modules`` the named modules themselves, in the same order.
    """
    try:
        walk = _walks.get(model)
    except TypeError:  # a model class with an __eq__ and no __hash__: walked every time
        walk = None
        hashable = False
    else:
        hashable = True
    tree = walk.live() if walk is not None else None
    if walk is None or tree is None:
        walk, tree = _walk(model)
        if hashable:
            _walks[model] = walk
    return walk.give(tree, wrappers, modules)


_children = operator.attrgetter("_modules")


class _Walk:
    """A model's names, and the module tree they were read from.

    A capture opens a block per batch, and walking the tree costs about 1 us per module; the
    names of the last walk serve while every module of it is alive, with its class and the
    same children (the same objects, under the same names). Names depend on nothing else. The
    walk holds its modules by weak reference only: the model is its key in ``_walks``, and a
    value referring to it would keep every captured model alive.
    """

    __slots__ = ("children", "classes", "ids", "named", "names", "refs", "sizes", "wrappers")

    def __init__(
        self, tree: list[nn.Module], named: list[int], names: dict[int, str], wrappers: set[int]
    ) -> None:
        self.names, self.wrappers = names, wrappers
        self.named = named  # the places in ``tree`` of the named modules (wrappers are not)
        self.refs = [weakref.ref(module) for module in tree]
        self.classes = list(map(type, tree))
        dicts = list(map(_children, tree))
        self.sizes = list(map(len, dicts))
        self.children = list(chain.from_iterable(dicts))
        # every child is in the tree, alive while it is compared: its id names it
        self.ids = list(map(id, chain.from_iterable(map(dict.values, dicts))))

    def live(self) -> list[nn.Module] | None:
        """The tree's modules, if each is alive with its class and children; else None."""
        tree = [ref() for ref in self.refs]
        if list(map(type, tree)) != self.classes:  # (a module gone is a None)
            return None
        dicts = list(map(_children, tree))
        if list(map(len, dicts)) != self.sizes or list(chain.from_iterable(dicts)) != self.children:
            return None
        if list(map(id, chain.from_iterable(map(dict.values, dicts)))) != self.ids:
            return None
        return tree  # type: ignore[return-value]

    def give(
        self, tree: list[nn.Module], wrappers: set[int] | None, modules: list[nn.Module] | None
    ) -> dict[int, str]:
        if wrappers is not None:
            wrappers.update(self.wrappers)
        if modules is not None:
            modules.extend([tree[i] for i in self.named])
        return dict(self.names)


# the last walk of each model (dropped with the model)
_walks: weakref.WeakKeyDictionary[nn.Module, _Walk] = weakref.WeakKeyDictionary()


def _walk(model: nn.Module) -> tuple[_Walk, list[nn.Module]]:
    names: dict[int, str] = {}
    wrappers: set[int] = set()
    tree: list[nn.Module] = []
    named: list[int] = []
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        tree.append(module)
        wrapped = _is_wrapper(module)
        if wrapped is not None:
            wrappers.add(id(module))
            # the wrapper's own name goes to what it wraps; the wrapper is not a key
            inner = module._modules[wrapped]
            if inner is not None:
                visit(inner, name)
            for child_name, child in module._modules.items():
                if child_name != wrapped and child is not None:
                    visit(child, f"{name}.{child_name}" if name else child_name)
            return
        names[id(module)] = name
        named.append(len(tree) - 1)
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return _Walk(tree, named, names, wrappers), tree


def _patterns(value: str | Iterable[str] | None, option: str) -> list[str]:
    return _validate.patterns(value, option)


class Selector:
    """Decides, once per key, whether a value is copied.

    ``include``/``exclude`` are fnmatch patterns over whole keys, where ``*`` also matches
    ``.``, ``/``, ``:`` and ``#``. Every key offered is remembered, so that an include pattern
    that matched nothing can be reported with the closest keys that did exist.
    """

    def __init__(
        self, include: str | Iterable[str] | None, exclude: str | Iterable[str] | None
    ) -> None:
        self.include = _patterns(include, "include")
        self.exclude = _patterns(exclude, "exclude")
        self._include_re = _compile(self.include) if self.include else None
        self._exclude_re = _compile(self.exclude) if self.exclude else None
        self._unmatched = list(self.include)
        self._cache: dict[str, bool] = {}

    @property
    def everything(self) -> bool:
        return not self.include and not self.exclude

    def __call__(self, key: str) -> bool:
        selected = self._cache.get(key)
        if selected is None:
            selected = self._cache[key] = self._decide(key)
        return selected

    def _decide(self, key: str) -> bool:
        if self._unmatched:
            self._unmatched = [p for p in self._unmatched if not fnmatch.fnmatchcase(key, p)]
        if self._include_re is not None and not self._include_re.match(key):
            return False
        return not (self._exclude_re is not None and self._exclude_re.match(key))

    def check(self) -> None:
        """Raise if an include pattern matched no key offered so far."""
        if not self._unmatched:
            return
        seen = list(self._cache)
        parts = []
        for pattern in self._unmatched:
            hint = closest(pattern, seen)
            near = f"; closest: {', '.join(map(repr, hint))}" if hint else ""
            parts.append(f"include pattern {pattern!r} matched no key{near}")
        raise SelectionError("; ".join(parts) + DISCOVERY_HINT)


def _compile(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
