"""Lazy copies: keep a reference, copy only when something is about to overwrite it.

``capture(..., lazy=True)`` records a detached alias of each captured tensor instead of a copy,
with the tensor's version counter. The function mode calls :meth:`Deferred.before` ahead of every
torch-level call; when the call is about to write into a storage that holds deferred values, they
are copied first. When the block ends, a deferred value whose storage nobody else can reach is
kept as it is (nothing can change it any more: it costs no copy at all); the others are copied
then. A version counter that moved without a write we saw means an untracked write (through
``.numpy()``, DLPack or a C++ extension that did not bump it): that value is refused, never
returned wrong.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ._errors import TensorSnapError
from ._ops import op_name

__all__ = ["Deferred"]

# where a functional op takes its ``inplace`` flag, by function; None when it has none
_INPLACE_ARG: dict[Any, int | None] = {}


def _inplace_index(func: Any) -> int | None:
    if func in _INPLACE_ARG:
        return _INPLACE_ARG[func]
    index = None
    try:
        names = list(inspect.signature(func).parameters)
        if "inplace" in names:
            index = names.index("inplace")
    except (TypeError, ValueError):  # builtins without a signature have no inplace flag
        pass
    _INPLACE_ARG[func] = index
    return index


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors ``func(*args, **kwargs)`` is about to write into, as far as we can tell."""
    targets: list[torch.Tensor] = []
    name = op_name(func)
    in_place = (name.endswith("_") and not name.startswith("_")) or name == "setitem"
    if in_place and args and isinstance(args[0], torch.Tensor):
        targets.append(args[0])
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        targets.append(out)
    elif isinstance(out, (tuple, list)):
        targets.extend(t for t in out if isinstance(t, torch.Tensor))
    index = _inplace_index(func)
    if index is not None:
        flag = kwargs.get("inplace", args[index] if index < len(args) else False)
        if flag is True and args and isinstance(args[0], torch.Tensor):
            targets.append(args[0])
    return targets


class _Entry:
    __slots__ = ("alias", "key", "version")

    def __init__(self, key: str, alias: torch.Tensor, version: int) -> None:
        self.key = key
        self.alias = alias
        self.version = version


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Deferred:
    """The deferred values of one capture session, grouped by the storage they alias."""

    def __init__(self, store: Callable[[str, torch.Tensor], None]) -> None:
        self._store = store  # replaces a key's value with its copy
        self._held: dict[int, list[_Entry]] = {}

    def hold(self, key: str, t: torch.Tensor) -> torch.Tensor | None:
        """Keep an alias of ``t`` for ``key``; None if ``t`` cannot be deferred safely."""
        if (
            type(t) is not torch.Tensor
            or t.layout != torch.strided
            or t.is_inference()  # no version counter: an untracked write would go unnoticed
            or t.device.type == "meta"
            or t.numel() == 0
        ):
            return None
        alias = t.detach()  # shares storage and version counter, not autograd history
        self._held.setdefault(_storage_id(t), []).append(_Entry(key, alias, t._version))
        return alias

    def before(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> None:
        """Copy the deferred values that ``func`` is about to overwrite."""
        if not self._held:
            return
        for target in _written(func, args, kwargs or {}):
            if target.layout == torch.strided and target.device.type != "meta":
                entries = self._held.pop(_storage_id(target), None)
                if entries:
                    for entry in entries:
                        self._copy(entry)

    def settle(self) -> list[str]:
        """At the end of the block: copy what others can still reach, keep what they cannot.

        Returns:
            Keys whose values were overwritten by writes we could not see (already dropped from
            the store's care; the caller decides how to report them).
        """
        spoiled: list[str] = []
        held, self._held = self._held, {}
        for entries in held.values():
            fresh = [e for e in entries if e.alias._version == e.version]
            spoiled.extend(e.key for e in entries if e.alias._version != e.version)
            if not fresh:
                continue
            storage = fresh[0].alias.untyped_storage()
            # our aliases, plus the storage object just made to ask: anything more is someone
            # else's tensor, which could still write into the values after the block
            if torch._C._storage_Use_Count(storage._cdata) > len(entries) + 1:
                for entry in fresh:
                    self._copy(entry)
        return spoiled

    def _copy(self, entry: _Entry) -> None:
        if entry.alias._version != entry.version:
            raise TensorSnapError(
                f"lazy capture: the value of {entry.key!r} was overwritten by a write tensorsnap "
                "could not see (e.g. through .numpy(), DLPack or a C++ extension) before it was "
                "copied; capture without lazy=True to copy every value when it is produced"
            )
        with torch.no_grad():
            self._store(entry.key, entry.alias.clone())
