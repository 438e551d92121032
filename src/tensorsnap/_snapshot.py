"""What a capture returns: a read-only mapping from keys to copies, in execution order."""

from __future__ import annotations

import difflib
import html
import re
from collections.abc import Iterator, Mapping
from os import PathLike
from typing import Any, NamedTuple

import torch

from ._errors import SelectionError, TensorSnapError
from ._store import MemoryStore, Store

__all__ = ["Record", "Snapshot", "closest", "human_bytes"]

KINDS = ("output", "input", "kwargs", "grad", "grad_in", "op", "op_grad", "saved")


class Record(NamedTuple):
    """What is known about one captured value without reading it (an immutable named tuple).

    Attributes:
        key: The key, e.g. ``"transformer.h.0.mlp#1:grad"``.
        module: Qualified name of the module (``""`` for the root).
        call: Which call of that module, counted from 0.
        op: The torch-level op name for op records (``"softmax"``), else None.
        kind: One of ``"output"``, ``"input"``, ``"kwargs"``, ``"grad"``, ``"grad_in"``,
            ``"op"``, ``"op_grad"``, ``"saved"``.
        shape: The shape when the value is one tensor, else None.
        dtype: The dtype when the value is one tensor, else None.
        nbytes: Bytes held by the tensors in the value.
    """

    key: str
    module: str
    call: int
    op: str | None
    kind: str
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    nbytes: int


def closest(key: str, keys: list[str], count: int = 3) -> list[str]:
    """The existing keys most like ``key`` (a key or a glob pattern), for error messages.

    Keys are compared by structure: ``key`` (without its glob characters) against every key and
    every tail of it that starts at a part boundary (``.``, ``/``, ``:``, ``#``), so that a
    pattern missing its leading module path (``h.0.mlp`` for ``transformer.h.0.mlp``) or
    carrying a kind that was not captured (``fc1:grad`` without grads) still finds its key. The
    root key ``""`` is suggested only for an empty ``key``; nothing is suggested when no key is
    alike (an unrelated suggestion misleads more than none).

    Example:
        >>> closest("h.0.mlpp", ["transformer.h.0.attn", "transformer.h.0.mlp", ""])
        ['transformer.h.0.mlp']
    """
    core = key.replace("*", "").replace("?", "").strip("./:#")
    if not core:
        return [k for k in keys if k == ""][:count] if key == "" else []
    # the pattern itself, and (a little lower) without a ':kind' that may not have been captured
    wanted = [(core, 1.0)]
    if ":" in core and core.split(":")[0]:
        wanted.append((core.split(":")[0], 0.95))
    matchers = []
    for text, weight in wanted:
        matcher = difflib.SequenceMatcher(autojunk=False)
        matcher.set_seq2(text)
        matchers.append((matcher, weight))
    scored: list[tuple[float, int, str]] = []
    for index, candidate in enumerate(dict.fromkeys(keys)):
        if not candidate:
            continue
        starts = [0] + [m.end() for m in _BOUNDARY.finditer(candidate)]
        best = 0.0
        for start in starts:
            for matcher, weight in matchers:
                matcher.set_seq1(candidate[start:])
                # the quick upper bounds skip most candidates without the full comparison
                if (
                    matcher.real_quick_ratio() * weight > best
                    and matcher.quick_ratio() * weight > best
                ):
                    best = max(best, matcher.ratio() * weight)
        if best >= 0.6:
            scored.append((-best, index, candidate))
    return [candidate for _, _, candidate in sorted(scored)[:count]]


_BOUNDARY = re.compile(r"[./:#]")


class Snapshot(Mapping[str, Any]):
    """The copies a capture took, as a read-only mapping in the order they were produced.

    ``snap[key]`` is the copy; ``snap.records`` describes every value without reading it.
    """

    def __init__(self, records: list[Record] | None = None, store: Store | None = None) -> None:
        self._records: list[Record] = records if records is not None else []
        self._index: dict[str, int] = {r.key: i for i, r in enumerate(self._records)}
        self._store: Store = store if store is not None else MemoryStore()
        self._closed = False

    # -- filled by the capture session -------------------------------------------------------

    def _add(self, record: Record, value: Any) -> None:
        # record first: a SpillStore keeps the value in memory when spilling fails, and then
        # raises; the key must stay readable
        self._index[record.key] = len(self._records)
        self._records.append(record)
        self._store.put(record.key, value, record.nbytes)

    def _extend(self, records: list[Record], keys: list[str], values: list[Any]) -> None:
        """``_add`` of each pair, in order (graph mode hands over a graph's values at once);
        ``keys``: the records' keys."""
        store = self._store
        if type(store) is not MemoryStore:  # each value after its record, as _add does
            for record, value in zip(records, values, strict=True):
                self._add(record, value)
            return
        start = len(self._records)
        self._records.extend(records)
        self._index.update(zip(keys, range(start, start + len(keys))))
        store.put_all(keys, values)

    def _replace(self, record: Record, value: Any) -> None:
        self._records[self._index[record.key]] = record
        self._store.put(record.key, value, record.nbytes)

    def _drop(self, key: str) -> None:
        """Forget a key whose value turned out to be wrong (lazy capture, untracked write)."""
        index = self._index.pop(key)
        del self._records[index]
        self._index = {r.key: i for i, r in enumerate(self._records)}
        self._store.put(key, None, 0)

    def _drop_after(self, key: str) -> None:
        """Forget every key recorded after ``key`` (a deferred check stopped the block there)."""
        keep = self._index.get(key)
        if keep is None:
            return
        for record in self._records[keep + 1 :]:
            del self._index[record.key]
            self._store.put(record.key, None, 0)
        del self._records[keep + 1 :]

    # -- Mapping -----------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if key not in self._index:
            if not isinstance(key, str):
                raise SelectionError(f"snapshot keys are strings, got {type(key).__name__}")
            hint = closest(key, list(self._index))
            near = f"; closest: {', '.join(map(repr, hint))}" if hint else ""
            raise SelectionError(
                f"no key {key!r} in this snapshot{near} (list them with snap.keys() or "
                "tensorsnap.names(model, x))"
            )
        if self._closed:
            raise TensorSnapError(
                f"snap[{key!r}]: this snapshot was closed (snap.close(), or the end of its "
                "`with snap:` block), which dropped its values; read them before closing it, "
                "or load the bundle again"
            )
        return self._store.get(key)

    def __iter__(self) -> Iterator[str]:
        return (r.key for r in list(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    # -- the rest ----------------------------------------------------------------------------

    @property
    def records(self) -> tuple[Record, ...]:
        """One :class:`Record` per key, in the same order as the keys."""
        return tuple(self._records)

    @property
    def nbytes(self) -> int:
        """Total bytes of the copies."""
        return sum(r.nbytes for r in self._records)

    def save(self, path: str | PathLike[str], *, collective: bool | None = None) -> None:
        """Write the snapshot as a bundle directory (see ``docs/format.md``).

        Under ``torch.distributed`` saving is collective: every rank calls ``save`` with the
        same path on a shared file system, each writes its part ``path/rank-0000r/``, and rank 0
        commits the bundle once all parts are written. ``collective=False`` writes only this
        process's snapshot as a plain bundle (for saving from one rank alone).
        """
        from . import _validate
        from ._bundle import save

        if collective is not None:
            _validate.flag(collective, "collective")
        if collective is not False:
            from ._ranks import process_group, save_collective

            if process_group() is not None:
                save_collective(self, path)
                return
            if collective:
                raise TensorSnapError(
                    "save(collective=True) needs a torch.distributed process group; call "
                    "torch.distributed.init_process_group() first, or drop collective="
                )
        save(self, path)

    def close(self) -> None:
        """Drop the copies (and any spill files) now rather than when collected.

        Keys and records stay; reading a value afterwards raises :class:`TensorSnapError`.
        """
        self._closed = True
        self._store.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, limit: int = 40) -> tuple[list[tuple[str, ...]], int]:
        rows: list[tuple[str, ...]] = []
        for r in self._records[:limit]:
            shape = "x".join(map(str, r.shape)) if r.shape is not None else "-"
            dtype = str(r.dtype).removeprefix("torch.") if r.dtype is not None else "-"
            rows.append((r.key or '""', r.kind, shape, dtype, human_bytes(r.nbytes)))
        return rows, max(0, len(self._records) - limit)

    def __repr__(self) -> str:
        head = f"Snapshot({len(self._records)} keys, {human_bytes(self.nbytes)})"
        rows, more = self._rows()
        if not rows:
            return head
        table = [("key", "kind", "shape", "dtype", "bytes"), *rows]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        lines = [head]
        for row in table:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if more:
            lines.append(f"  ... and {more} more")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows, more = self._rows()
        head = "".join(f"<th>{h}</th>" for h in ("key", "kind", "shape", "dtype", "bytes"))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for row in rows
        )
        tail = f"<p>... and {more} more</p>" if more else ""
        return (
            f"<p>Snapshot: {len(self._records)} keys, {human_bytes(self.nbytes)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{tail}"
        )


def human_bytes(nbytes: int) -> str:
    """``1.5 MB``: decimal units, as sizes are written everywhere in tensorsnap."""
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # pragma: no cover
