"""Recording: what happens to a value once the capture session has given it a key.

Copy it (plain tensors and tuples of them by :mod:`._clones`, anything else by the copy engine,
or hold it for a deferred copy under ``lazy=True``), describe it in a :class:`Record`, store it
in the snapshot, and check it for NaN and Inf when asked. Gradients arrive here too, one part at
a time (the :class:`._grads.GradientSink` the watchers are handed).

With ``device="cpu"`` the copy engine's device-to-host copies are queued (:mod:`._offload`)
rather than made while the host waits: the recorder then puts a :class:`._offload.PendingStore`
in front of the snapshot's store, so that no reader (``snap[key]``, a spill writer, ``save``)
sees a copy before its bytes arrived, and has the NaN/Inf checks of host copies wait for them
too. The block's end completes them all (the session flushes its store).
"""

from __future__ import annotations

from typing import Any

import torch

from . import _tree
from ._clones import clone, clone_items, storage_bytes
from ._finite import FiniteCheck
from ._lazy import Deferred
from ._offload import PendingStore
from ._snapshot import Record, Snapshot
from ._stats import Stats
from ._tree import extent

__all__ = ["Recorder", "make_record"]


class Recorder:
    """Copies, describes and stores the values of one capture block in its snapshot."""

    def __init__(
        self,
        snapshot: Snapshot,
        copier: Any,
        plain: bool,
        deferred: Deferred | None,
        finite: FiniteCheck | None,
        dry: bool,
    ) -> None:
        self.snapshot = snapshot
        self.copier = copier  # the copy engine, a stats reducer or extract's row cutter
        self.plain = plain  # no device=, dtype= or other copier: the fast clones apply
        self.deferred = deferred
        self.finite = finite
        self.dry = dry  # names(): records without values
        self.open = False  # set by the session: gradients after the block are not its
        # set by the session: False while writes go unseen (see _Session._suspend), when a
        # lazy capture copies at once
        self.hold = True
        start = None if dry else getattr(copier, "start_offload", None)
        self.offload = start() if start is not None else None
        if self.offload is not None:
            snapshot._store = PendingStore(snapshot._store, self.offload)
            if finite is not None:
                finite.offload = self.offload

    def record(
        self,
        key: str,
        name: str,
        call: int,
        op: str | None,
        kind: str,
        value: Any,
    ) -> None:
        """Copy (or, lazily, hold) ``value`` and store it under ``key``."""
        if self.dry:
            self.snapshot._add(make_record(key, name, call, op, kind, value), None)
            return
        if self.deferred is not None and self.hold:
            alias = self.deferred.hold(key, value)
            if alias is not None:
                self.snapshot._add(make_record(key, name, call, op, kind, alias), alias)
                self.check_finite(key, alias)
                return
        copy: Any = None
        if self.plain:  # plain tensors and tuples of them: copied in a few calls
            if type(value) is torch.Tensor:
                copy = clone(value)
                if copy is not None:
                    shape, dtype = tuple(copy.shape), copy.dtype
                    record = Record(key, name, call, op, kind, shape, dtype, storage_bytes(copy))
            elif type(value) is tuple or type(value) is list:
                copy, nbytes = clone_items(value)
                if copy is not None:
                    record = Record(key, name, call, op, kind, None, None, nbytes)
        if copy is None:
            copy = self.copier.copy_value(value, root=f"snap[{key!r}]")
            record = make_record(key, name, call, op, kind, copy)
        self.snapshot._add(record, copy)
        self.check_finite(key, copy)

    def adopt(self, key: str, name: str, call: int, op: str | None, kind: str, value: Any) -> None:
        """Store ``value``, already a copy nobody else holds (graph mode), as it is.

        A view keeps its storage shared with the keys it views; its record counts the bytes of
        the span it reaches, what the copy of it would hold.
        """
        if type(value) is torch.Tensor and value.layout is torch.strided and not value.is_nested:
            # the span it reaches, as its copy would hold: a view detached in grad mode has no
            # _base, and still reaches past its own elements
            nbytes = extent(value) * value.element_size() if value.numel() else 0
            record = Record(key, name, call, op, kind, tuple(value.shape), value.dtype, nbytes)
        else:
            record = make_record(key, name, call, op, kind, value)
        self.snapshot._add(record, value)
        self.check_finite(key, value)

    def adopt_all(self, records: list[Record], keys: list[str], values: list[Any]) -> None:
        """Store values, already copies nobody else holds, whose records (and their keys) are
        known (graph mode: the records of a graph's earlier run with the same shapes)."""
        if self.finite is None:
            self.snapshot._extend(records, keys, values)
            return
        for record, value in zip(records, values, strict=True):  # stops at the first bad key
            self.snapshot._add(record, value)
            self.finite.check(record.key, value)

    def records_from(self, start: int) -> list[Record]:
        """The records of the keys stored after the first ``start``."""
        return self.snapshot._records[start:]

    def store_gradient(
        self, key: str, module: str, call: int, op: str | None, kind: str, value: Any
    ) -> None:
        """Add or update a gradient key as its parts arrive during backward."""
        record = make_record(key, module, call, op, kind, value)
        if key in self.snapshot:
            self.snapshot._replace(record, value)
        else:
            self.snapshot._add(record, value)
        self.check_finite(key, value)

    def copy_value(self, value: Any, key: str) -> Any:
        """A copy of ``value`` as a capture keeps it (the fast clone, else the copy engine)."""
        copy = clone(value) if self.plain else None
        if copy is None:
            copy = self.copier.copy_value(value, root=f"snap[{key!r}]")
        return copy

    def check_finite(self, key: str, value: Any) -> None:
        # CPU values are checked now; device values are read at boundaries (see _finite)
        if self.finite is not None:
            self.finite.check(key, value)


def make_record(key: str, module: str, call: int, op: str | None, kind: str, value: Any) -> Record:
    """The record of a value: its shape and dtype if it is one tensor, and the bytes it holds."""
    if isinstance(value, (torch.Tensor, Stats)):
        # a nested tensor has no single shape: its parts' shapes are in the value
        nested = isinstance(value, torch.Tensor) and value.is_nested
        shape: tuple[int, ...] | None = None if nested else tuple(value.shape)
        dtype: torch.dtype | None = value.dtype
    else:
        shape = dtype = None
    return Record(key, module, call, op, kind, shape, dtype, _tree.nbytes(value))
