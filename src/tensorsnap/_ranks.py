"""Bundles of several processes: one part per rank, committed together.

Layout (``docs/format.md``, "Ranks")::

    path/manifest.json      the index: world_size, the parts, whether ranks concatenate
    path/rank-00000/        rank 0's part, itself a complete bundle
    path/rank-00001/        ...

Under a process group ``Snapshot.save(path)`` is collective (:func:`save_collective`): rank 0
makes a hidden temporary directory beside ``path``, every rank writes its part into it, and once
every rank has reported success rank 0 writes the index and renames the directory to ``path``.
Until that rename nothing exists at ``path``; after a crash only the hidden directory is left,
and it never loads. A multi-rank directory without the index (parts written by hand, or an
unfinished run) does not load either.

``tensorsnap.extract`` (data parallel: each rank runs its own batches) writes its parts itself and
commits with :func:`write_index` ``(path, world_size, concat=True)``: ``load(path)`` of such a
bundle concatenates every key's values along dim 0 in rank order.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from os import PathLike
from typing import Any

import torch

from ._dtensor import assemble
from ._errors import BundleError
from ._manifest import MANIFEST, encode_manifest
from ._shards import fsync_dir, write_file
from ._snapshot import Snapshot

__all__ = ["open_ranks", "part_name", "process_group", "save_collective", "write_index"]


def part_name(rank: int) -> str:
    """The directory of ``rank``'s part inside a multi-rank bundle: ``rank-00003``."""
    return f"rank-{rank:05d}"


def process_group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group, or None when there is none."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()


def write_index(path: str | PathLike[str], world_size: int, *, concat: bool = False) -> None:
    """Commit a multi-rank bundle whose parts ``path/rank-0000r/`` are all written.

    Writes ``path/manifest.json`` (through a temporary file and a rename, so a crash leaves no
    half-written index); from then on ``load`` accepts the bundle. Call it on one rank, after a
    barrier that follows every rank's part.

    Args:
        path: The bundle directory holding the parts.
        world_size: Number of parts; ``rank-00000`` to ``rank-<world_size - 1>`` must exist.
        concat: The ranks hold consecutive slices of one result (data-parallel ``extract``):
            ``load(path)`` concatenates each key along dim 0 in rank order. Otherwise each
            rank's part stands alone and ``load`` needs ``rank=``.
    """
    from . import __version__

    root = os.path.abspath(os.fspath(path))
    parts = [part_name(r) for r in range(world_size)]
    missing = [p for p in parts if not os.path.isfile(os.path.join(root, p, MANIFEST))]
    if missing:
        raise BundleError(
            f"{root}: parts {', '.join(missing)} are missing or unfinished; every rank must "
            "finish its part before the bundle is committed"
        )
    data = encode_manifest(
        [],
        [],
        version=__version__,
        rank=None,
        world_size=world_size,
        extra={"parts": parts, "concat": concat},
    )
    temp = os.path.join(root, f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_file(temp, data)
        os.rename(temp, os.path.join(root, MANIFEST))
    except BaseException:
        if os.path.lexists(temp):
            os.remove(temp)
        raise
    fsync_dir(root)


def save_collective(snapshot: Snapshot, path: str | PathLike[str]) -> None:
    """``Snapshot.save`` under a process group: every rank calls it with the same path.

    Raises the same :class:`BundleError` on every rank when any rank fails (the message names
    the ranks and their errors); nothing is left at ``path`` then.
    """
    import torch.distributed as dist

    from ._bundle import _check_target, save

    rank, world_size = dist.get_rank(), dist.get_world_size()
    target = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(target)
    # rank 0 checks the target and makes the temporary directory; everyone learns its name
    plan: list[Any] = [None]
    if rank == 0:
        try:
            _check_target(target)
            os.makedirs(parent, exist_ok=True)
            temp = os.path.join(parent, f".{base}.tensorsnap-tmp-{uuid.uuid4().hex[:12]}")
            os.mkdir(temp)
            plan[0] = ("ok", temp)
        except (BundleError, OSError) as err:
            plan[0] = ("error", str(err))
    dist.broadcast_object_list(plan, src=0)
    status, text = plan[0]
    if status != "ok":
        raise BundleError(f"rank 0: {text}")
    temp = text
    mine: BaseException | None = None
    try:
        save(snapshot, os.path.join(temp, part_name(rank)), rank=rank, world_size=world_size)
    except Exception as err:  # reported to every rank, then raised everywhere
        mine = err
    _agree(dist, rank, world_size, mine, temp, target, "its part")
    if rank == 0:
        try:
            write_index(temp, world_size)
            os.rename(temp, target)
            fsync_dir(parent)
        except Exception as err:
            mine = err
    _agree(dist, rank, world_size, mine if rank == 0 else None, temp, target, "the index")


def _agree(
    dist: Any,
    rank: int,
    world_size: int,
    mine: BaseException | None,
    temp: str,
    target: str,
    what: str,
) -> None:
    """Every rank learns every rank's error; all raise together, and rank 0 cleans up."""
    errors: list[Any] = [None] * world_size
    dist.all_gather_object(errors, None if mine is None else f"{type(mine).__name__}: {mine}")
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(temp, ignore_errors=True)
    raise BundleError(
        f"saving {target} failed while writing {what}; nothing was left at it. " + "; ".join(failed)
    ) from mine


def open_ranks(
    root: str,
    manifest: dict[str, Any],
    rank: int | None,
    assemble_dtensors: bool,
    open_part: Callable[[str, int], Snapshot],
) -> Snapshot:
    """Load a committed multi-rank bundle (``load`` calls this for an index manifest)."""
    world_size = manifest["world_size"]
    parts = manifest["parts"]
    concat = manifest.get("concat", False)
    # the parts listed bound world_size: a list of a billion names is never built to compare
    if (
        type(world_size) is not int
        or not isinstance(parts, list)
        or not 1 <= world_size == len(parts)
        or parts != [part_name(r) for r in range(world_size)]
        or not isinstance(concat, bool)
    ):
        raise BundleError(
            f"{os.path.join(root, MANIFEST)}: malformed index of a multi-rank bundle "
            f"(world_size={world_size!r}, parts={parts!r}); the bundle was edited, re-create it"
        )
    if rank is not None and rank >= world_size:
        raise BundleError(f"{root} has no part for rank {rank} (it has ranks 0-{world_size - 1})")

    def part(r: int) -> Snapshot:
        return open_part(os.path.join(root, part_name(r)), r)

    if rank is None and concat and not assemble_dtensors:
        return _concatenated([part(r) for r in range(world_size)], root)
    if rank is None and not assemble_dtensors:
        raise BundleError(
            f"{root} holds one part per rank ({world_size} ranks); pass rank=, for example "
            "tensorsnap.load(path, rank=0), or assemble=True for full DTensor values"
        )
    home = 0 if rank is None else rank
    snap = part(home)
    if not assemble_dtensors:
        return snap
    parts_by_rank = {home: snap, **{r: part(r) for r in range(world_size) if r != home}}
    return Snapshot(list(snap.records), _AssembledStore(parts_by_rank, home))


class _AssembledStore:
    """One rank's values with every DTensor replaced by the full tensor of its mesh's ranks."""

    def __init__(self, parts: dict[int, Snapshot], home: int) -> None:
        self._parts = parts
        self._home = home

    def put(self, key: str, value: Any, nbytes: int) -> None:
        raise BundleError(f"a loaded bundle is read-only (cannot add {key!r})")

    def close(self) -> None:
        for snap in self._parts.values():
            snap.close()

    def get(self, key: str) -> Any:
        where = f"snap[{key!r}]"
        locals_of: dict[int, list[torch.Tensor]] = {}

        def collect(found: list[torch.Tensor]) -> Callable[[torch.Tensor, dict[str, Any]], Any]:
            def on_dtensor(t: torch.Tensor, layout: dict[str, Any]) -> torch.Tensor:
                found.append(t)
                return t

            return on_dtensor

        home = self._parts[self._home]._store
        mine: list[torch.Tensor] = []
        value = home.get(key, on_dtensor=collect(mine))  # type: ignore[call-arg]
        if not mine:
            return value
        for r, snap in self._parts.items():
            if key not in snap:
                raise BundleError(f"{where}: rank {r}'s part has no such key; cannot assemble it")
            found: list[torch.Tensor] = []
            snap._store.get(key, on_dtensor=collect(found))  # type: ignore[call-arg]
            locals_of[r] = found
        counter = iter(range(len(mine)))

        def full(t: torch.Tensor, layout: dict[str, Any]) -> torch.Tensor:
            i = next(counter)
            ranks = [r for r in locals_of if len(locals_of[r]) > i]
            try:
                return assemble({r: locals_of[r][i] for r in ranks}, layout, where)
            except (ValueError, RuntimeError) as err:
                raise BundleError(f"cannot assemble {err}") from err

        return home.get(key, on_dtensor=full)  # type: ignore[call-arg]


def _concatenated(parts: list[Snapshot], root: str) -> Snapshot:
    """Data-parallel parts as one snapshot: each key's values concatenated in rank order."""
    first = parts[0]
    keys = list(first)
    for r, snap in enumerate(parts[1:], start=1):
        if list(snap) != keys:
            only = sorted(set(keys).symmetric_difference(snap))[:3]
            raise BundleError(
                f"{root}: rank {r}'s part has different keys from rank 0's (e.g. {only}); "
                "ranks of a data-parallel extract must capture the same keys"
            )
    records = []
    # the keys are in the same order on every rank (checked above): records pair by position,
    # which keeps this linear in the keys (a lookup per key and rank made it cubic)
    for per_rank in zip(*(snap.records for snap in parts)):
        record = per_rank[0]
        shape = record.shape
        if shape is not None:
            # 0-dim values are stacked across ranks (_cat), others concatenated along dim 0
            rows = [len(parts)] if not shape else [sum((r.shape or (0,))[0] for r in per_rank)]
            shape = (*rows, *shape[1:])
        records.append(record._replace(shape=shape, nbytes=sum(r.nbytes for r in per_rank)))
    return Snapshot(records, _ConcatStore(parts, root))


class _ConcatStore:
    """Data-parallel parts as one store: each key's tensors concatenated in rank order.

    The value is rebuilt once, by the same decoder as a single part's (so no class code runs:
    no ``__init__``, ``__setitem__`` or ``copy`` of a saved dict subclass or ModelOutput),
    around tensors that are each the concatenation of that tensor on every rank.
    """

    def __init__(self, parts: list[Snapshot], root: str) -> None:
        self._parts = parts
        self._root = root

    def put(self, key: str, value: Any, nbytes: int) -> None:
        raise BundleError(f"{self._root}: a loaded bundle is read-only (cannot add {key!r})")

    def close(self) -> None:
        for snap in self._parts:
            snap.close()

    def get(self, key: str) -> Any:
        where = f"snap[{key!r}]"
        stores: list[Any] = [snap._store for snap in self._parts]
        first = stores[0]
        tree = first.tree(key)
        per_rank = []
        for r, store in enumerate(stores):
            if r and store.tree(key) != tree:
                raise BundleError(
                    f"{self._root}: {where} has a different structure (or different non-tensor "
                    f"values) on rank {r} than on rank 0, so the ranks cannot be concatenated; "
                    "read the ranks one by one with tensorsnap.load(path, rank=r)"
                )
            per_rank.append(store.tensors(key))
        if any(len(t) != len(per_rank[0]) for t in per_rank):
            raise BundleError(
                f"{self._root}: {where} holds a different number of tensors on some ranks; read "
                "the ranks one by one with tensorsnap.load(path, rank=r)"
            )
        joined = [
            _cat([tensors[i] for tensors in per_rank], f"{where} (tensor {i})", self._root)
            for i in range(len(per_rank[0]))
        ]
        return first.decode(key, joined)


def _cat(values: list[torch.Tensor], where: str, root: str) -> torch.Tensor:
    if values[0].dim() == 0:
        try:
            return torch.stack(values)
        except RuntimeError as err:
            raise BundleError(f"{root}: {where} cannot be stacked across ranks ({err})") from err
    try:
        return torch.cat(values)
    except RuntimeError as err:
        shapes = [tuple(v.shape) for v in values]
        raise BundleError(
            f"{root}: {where} has shapes {shapes} on ranks 0..{len(values) - 1}, which do "
            "not concatenate along dim 0"
        ) from err
