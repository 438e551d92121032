"""Keys: naming modules the way users see them, and deciding once per key what is selected."""

from __future__ import annotations

import fnmatch
import re
import weakref
from collections.abc import Iterable

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
        return _walk(model).give(wrappers, modules)
    if walk is None or not walk.current():
        walk = _walk(model)
        if walk.comparable:
            _walks[model] = walk
    return walk.give(wrappers, modules)


class _Walk:
    """A model's names, and the module tree they were read from.

    A capture opens a block per batch, and walking the tree costs about 1 us per module; the
    names of the last walk serve while every module of it still has its class and the same
    children (the same objects, under the same names). Names depend on nothing else.
    """

    __slots__ = ("comparable", "modules", "names", "tree", "wrappers")

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.wrappers: set[int] = set()
        self.modules: list[nn.Module] = []
        self.tree: list[tuple[nn.Module, type, dict[str, nn.Module | None]]] = []
        # children compared with == (a dict comparison) are compared by identity only when no
        # module class defines an __eq__ of its own
        self.comparable = True

    def give(self, wrappers: set[int] | None, modules: list[nn.Module] | None) -> dict[int, str]:
        if wrappers is not None:
            wrappers.update(self.wrappers)
        if modules is not None:
            modules.extend(self.modules)
        return dict(self.names)

    def current(self) -> bool:
        for module, cls, children in self.tree:
            if type(module) is not cls or module._modules != children:
                return False
        return True


# the last walk of each model (dropped with the model)
_walks: weakref.WeakKeyDictionary[nn.Module, _Walk] = weakref.WeakKeyDictionary()


def _walk(model: nn.Module) -> _Walk:
    walk = _Walk()
    names, wrappers, modules = walk.names, walk.wrappers, walk.modules

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in names:
            return
        walk.tree.append((module, type(module), dict(module._modules)))
        if type(module).__eq__ is not object.__eq__:
            walk.comparable = False
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
        modules.append(module)
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return walk


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
