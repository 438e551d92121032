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


def _inplace_index(func: Any) -> int | None:
    """Where a functional op takes its ``inplace`` flag; None when it has none."""
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # builtins without a signature have no inplace flag
        return None
    return names.index("inplace") if "inplace" in names else None


# what a function writes into, by function: (its first argument, the index of its ``inplace``
# flag or None); worked out once per function, since this is asked on every torch call
_WRITES: dict[Any, tuple[bool, int | None]] = {}


def _writes(func: Any) -> tuple[bool, int | None]:
    try:
        found = _WRITES.get(func)
    except TypeError:  # an unhashable callable: worked out below, every time
        found = None
    if found is None:
        name = op_name(func)
        in_place = (name.endswith("_") and not name.startswith("_")) or name == "setitem"
        found = (in_place, _inplace_index(func))
        try:
            _WRITES[func] = found
        except TypeError:
            pass
    return found


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors ``func(*args, **kwargs)`` is about to write into, as far as we can tell."""
    in_place, index = _writes(func)
    targets: list[torch.Tensor] = []
    if in_place and args and isinstance(args[0], torch.Tensor):
        targets.append(args[0])
    if kwargs:
        out = kwargs.get("out")
        if isinstance(out, torch.Tensor):
            targets.append(out)
        elif isinstance(out, (tuple, list)):
            targets.extend(t for t in out if isinstance(t, torch.Tensor))
    if index is not None:
        flag = (kwargs or {}).get("inplace", args[index] if index < len(args) else False)
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
    """The deferred values of one capture session, grouped by the storage they alias.

    New values wait in a list; they are grouped by storage only when a write is coming (or at
    the end), so that holding a value costs a detach and an append, and grouping each value
    happens once.
    """

    def __init__(self, store: Callable[[str, torch.Tensor], None]) -> None:
        self._store = store  # replaces a key's value with its copy
        self._held: dict[int, list[_Entry]] = {}
        self._pending: list[_Entry] = []

    def hold(self, key: str, t: torch.Tensor) -> torch.Tensor | None:
        """Keep an alias of ``t`` for ``key``; None if ``t`` cannot be deferred safely."""
        if (
            type(t) is not torch.Tensor
            or t.layout != torch.strided
            or t.is_inference()  # no version counter: an untracked write would go unnoticed
            or t.is_meta
            or t.numel() == 0
        ):
            return None
        alias = t.detach()  # shares storage and version counter, not autograd history
        self._pending.append(_Entry(key, alias, t._version))
        return alias

    def _group(self) -> None:
        held = self._held
        for entry in self._pending:
            held.setdefault(_storage_id(entry.alias), []).append(entry)
        self._pending.clear()

    def before(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> None:
        """Copy the deferred values that ``func`` is about to overwrite."""
        if not (self._held or self._pending):
            return
        targets = _written(func, args, kwargs or {})
        if not targets:
            return
        self._group()
        for target in targets:
            if target.layout == torch.strided and not target.is_meta:
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
        self._group()
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
