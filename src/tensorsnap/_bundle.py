"""Bundles: a snapshot on disk as safetensors shards plus ``manifest.json``.

``save`` writes into a hidden sibling directory, fsyncs every file, writes the manifest last and
renames the directory into place, so a crash or a full disk never leaves a bundle that loads as
complete. ``load`` reads and checks only the manifest; reading a key maps the shard files it
needs (``torch.UntypedStorage.from_file``: private, copy-on-write pages, nothing read until
touched) and checks the CRC-32 of the bytes it uses. Loading never unpickles, imports or calls
anything named in the files: nested values are rebuilt from plain containers and from classes
already imported that are verified dataclasses, namedtuples or dict subclasses. Shard files are
written and mapped by ``_shards``; values and records are encoded as JSON by ``_manifest``. The
format is described in ``docs/format.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil
import stat
import uuid
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from os import PathLike
from typing import Any

import torch

from . import _validate
from ._errors import BundleError, BundleWarning
from ._manifest import (
    JOURNAL,
    MANIFEST,
    Decoder,
    Encoder,
    decode_record,
    encode_manifest,
    read_manifest,
    record_entry,
)
from ._shards import (
    NATIVE,
    SHARD_NAME,
    BlobRef,
    ShardFile,
    Span,
    byte_view,
    dtype_from_name,
    dtype_name,
    fsync_dir,
    link_or_copy,
    plan_spans,
    write_file,
    write_shard,
)
from ._snapshot import Record, Snapshot

__all__ = ["load", "save"]

# Shards close once they pass this size (a blob larger than it gets a shard of its own).
_SHARD_TARGET = 512 * 2**20
_RANK_DIR = re.compile(r"rank-(\d{5})")


# -- save ------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Entry:
    record: Record
    tree: Any
    tensors: list[torch.Tensor]
    spans: list[Span]
    placements: list[tuple[int | None, int]]


@dataclasses.dataclass(eq=False)
class _ShardPlan:
    spans: list[Span]
    size: int = 0
    link: BlobRef | None = None
    nbytes: int = 0


def save(
    snapshot: Snapshot,
    path: str | PathLike[str],
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> None:
    """Write ``snapshot`` as a bundle directory at ``path``, atomically.

    Args:
        snapshot: The snapshot to write.
        path: A path that does not exist yet (or an empty directory). Missing parent
            directories are created. An existing bundle is never overwritten: save to a new
            path, or remove the old one first.
        rank: Recorded in the manifest for multi-process captures; ``load(path, rank=...)``
            then checks it.
        world_size: Recorded with ``rank``.

    Raises:
        BundleError: ``path`` exists, a value cannot be stored (the message names the key and
            the path inside it), or writing failed (a full disk included); nothing is left
            behind at ``path`` then.
    """
    from . import __version__

    if not isinstance(snapshot, Snapshot):
        raise BundleError(
            f"save(snapshot=...) takes a tensorsnap.Snapshot, got {type(snapshot).__name__}"
        )
    target = os.path.abspath(_validate.path(path, "path"))
    if (rank is None) != (world_size is None) or not (
        rank is None or (type(rank) is int and type(world_size) is int and 0 <= rank < world_size)
    ):
        raise BundleError(
            f"rank={rank!r}, world_size={world_size!r}: pass both (ints, 0 <= rank < "
            "world_size) for one process's part of a multi-rank bundle, or neither"
        )
    parent, base = os.path.split(target)
    try:
        _check_target(target)
    except OSError as err:
        raise BundleError(f"cannot check the bundle path {target}: {err}") from err
    store = snapshot._store
    locate = getattr(store, "_locate", None)
    peek = getattr(store, "_peek", store.get)
    # validate (and lay out) everything before the first byte is written
    entries = []
    for record in snapshot.records:
        encoder = Encoder(f"snap[{record.key!r}]")
        tree = encoder.node(peek(record.key), [])
        spans, placements = plan_spans(encoder.tensors, locate)
        for j, span in enumerate(spans):
            if span.link is None:
                span.name = f"{record.key}@{j}"
        entries.append(_Entry(record, tree, encoder.tensors, spans, placements))
    shards = _assign_shards(entries)

    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise BundleError(
            f"cannot create {parent}, the parent directory of the bundle {target} ({err}); "
            "nothing was written. Save to a path whose parent is (or can be made) a directory"
        ) from err
    temp = os.path.join(parent, f".{base}.tensorsnap-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(temp)
        names = []
        for i, shard in enumerate(shards):
            name = f"shard-{i:05d}.safetensors"
            names.append(name)
            file = os.path.join(temp, name)
            if shard.link is not None:
                shard.nbytes = link_or_copy(shard.link.path, file)
            else:
                shard.nbytes = write_shard(file, shard.spans, fsync=True)
        records = [
            record_entry(e.record, e.tree, e.tensors, e.placements, e.spans) for e in entries
        ]
        shard_items = [{"file": n, "nbytes": s.nbytes} for n, s in zip(names, shards)]
        manifest = encode_manifest(
            records, shard_items, version=__version__, rank=rank, world_size=world_size
        )
        write_file(os.path.join(temp, MANIFEST), manifest)
        fsync_dir(temp)
        os.rename(temp, target)
    except BaseException as err:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(err, OSError):
            raise _write_error(err, target) from err
        raise
    fsync_dir(parent)


def _check_target(target: str) -> None:
    if os.path.lexists(target):
        if os.path.isdir(target) and not os.path.islink(target) and not os.listdir(target):
            return  # rename replaces an empty directory atomically
        raise BundleError(
            f"{target} already exists; bundles are never overwritten. Save to a new path, or "
            "remove the old one first (shutil.rmtree) if you mean to replace it"
        )


def _write_error(err: OSError, target: str) -> BundleError:
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return BundleError(
            f"no space left on the device while writing the bundle {target} ({err}); nothing "
            "was left behind. Free some space or save to another disk"
        )
    if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
        return BundleError(
            f"{target} appeared while the bundle was being written ({err}); nothing was "
            "overwritten. Save to a new path"
        )
    return BundleError(f"could not write the bundle {target}: {err}; nothing was left behind")


def _assign_shards(entries: list[_Entry]) -> list[_ShardPlan]:
    shards: list[_ShardPlan] = []
    linked: dict[str, int] = {}
    current: _ShardPlan | None = None
    for entry in entries:
        for span in entry.spans:
            if span.link is not None:
                index = linked.get(span.link.path)
                if index is None:
                    index = linked[span.link.path] = len(shards)
                    shards.append(_ShardPlan([], link=span.link))
                span.shard = index
                continue
            if current is None or (current.spans and current.size + span.nbytes > _SHARD_TARGET):
                current = _ShardPlan([])
                shards.append(current)
            current.spans.append(span)
            current.size += span.nbytes
            span.shard = len(shards) - 1
    return shards


# -- load ------------------------------------------------------------------------------------


def load(
    path: str | PathLike[str],
    rank: int | None = None,
    *,
    assemble: bool = False,
    verify: bool = True,
) -> Snapshot:
    """Open a bundle written by ``Snapshot.save``; values are read lazily, memory-mapped.

    Only ``manifest.json`` is read here. ``snap[key]`` maps the shard files the key needs and
    checks the CRC-32 of its bytes. Tensors come back on the CPU, backed by private
    copy-on-write maps of the files (writing to them never changes the bundle).

    Args:
        path: The bundle directory.
        rank: For bundles written by several processes: which rank's part to read. Without
            it, a data-parallel ``extract`` comes back concatenated in rank order, and other
            multi-rank bundles raise, asking for it.
        assemble: For multi-rank bundles: values that were DTensors come back as full
            tensors, rebuilt from the local tensors of every rank of their mesh (concatenated
            for ``Shard``, reduced for ``Partial``); other values are rank ``rank``'s (rank 0's
            when ``rank`` is None). Without it a DTensor comes back as the rank's local tensor.
        verify: Check each blob's CRC-32 the first time it is read (default). ``False`` skips
            the check, which is most of the cost of reading (about 0.4x of a raw safetensors
            read with it, 0.9x without): for bundles you wrote and trust. Sizes, headers and
            paths are checked either way.

    Returns:
        A read-only :class:`~tensorsnap.Snapshot` with the saved keys, records and values.

    Raises:
        BundleError: The bundle is missing, incomplete (an interrupted save), damaged or
            edited; or ``rank`` does not fit it. The message names the file and the key.

    Example:
        >>> import tempfile, os, torch, tensorsnap
        >>> from tensorsnap._snapshot import Record, Snapshot
        >>> snap = Snapshot()
        >>> snap._add(Record("fc", "fc", 0, None, "output", (2,), torch.float32, 8), torch.ones(2))
        >>> path = os.path.join(tempfile.mkdtemp(), "run")
        >>> snap.save(path)
        >>> tensorsnap.load(path)["fc"].tolist()
        [1.0, 1.0]
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise BundleError(f"rank={rank!r}: expected None or a rank number (an int >= 0)")
    _validate.flag(assemble, "assemble")
    _validate.flag(verify, "verify")
    root = os.path.realpath(_validate.path(path, "path"))
    if not os.path.isdir(root):
        raise BundleError(f"no bundle at {root}: it is not a directory (write one with snap.save)")
    manifest_path = os.path.join(root, MANIFEST)
    try:
        if os.path.lexists(manifest_path):
            return _open(root, rank, assemble, verify)
        entries = os.listdir(root)
    except OSError as err:  # e.g. a part or a shard that cannot be read (permissions)
        raise BundleError(f"{root} cannot be read as a bundle: {err}") from err
    ranks = sorted(d for d in entries if _RANK_DIR.fullmatch(d))
    if ranks:
        raise BundleError(
            f"{root} has parts for {len(ranks)} ranks but no {MANIFEST}: the multi-rank "
            "save or extract that wrote it did not finish (the index is written last), so "
            "it is incomplete; save again"
        )
    if os.path.lexists(os.path.join(root, JOURNAL)):
        raise BundleError(
            f"{root} is an unfinished tensorsnap.extract (it has {JOURNAL} and no {MANIFEST}):"
            " run the same extract(..., resume=True) to finish it, or remove the directory"
        )
    raise BundleError(
        f"{root} has no {MANIFEST}: it is not a bundle, or its save did not finish (an "
        "interrupted save never writes the manifest); save the snapshot again"
    )


def _open(root: str, rank: int | None, assemble: bool = False, verify: bool = True) -> Snapshot:
    manifest_path = os.path.join(root, MANIFEST)
    manifest = read_manifest(manifest_path)
    if "parts" in manifest:  # the index of a multi-rank bundle
        from ._ranks import open_ranks

        try:
            return open_ranks(root, manifest, rank, assemble, partial(_open, verify=verify))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BundleError(
                f"{manifest_path}: malformed index ({type(err).__name__}: {err}); the bundle "
                "was edited or damaged, re-create it"
            ) from err
    saved_rank, world_size = manifest.get("rank"), manifest.get("world_size")
    # a part has both, a single-process bundle neither; an index without its parts is neither
    if not (
        (saved_rank is None and world_size is None)
        or (type(saved_rank) is int and type(world_size) is int and 0 <= saved_rank < world_size)
    ):
        raise BundleError(
            f"{manifest_path}: rank={saved_rank!r} and world_size={world_size!r} do not describe "
            "a bundle (a single process has neither, a rank's part both, and an index lists its "
            "parts); the bundle was edited or damaged, re-create it"
        )
    if assemble:
        raise BundleError(
            f"{root} was saved as one part (it is not a multi-rank bundle), so there is "
            "nothing to assemble; call tensorsnap.load(path) without assemble=True"
        )
    if rank is not None and saved_rank is None:
        raise BundleError(
            f"{root} was saved by a single process and has no ranks; call tensorsnap.load(path) "
            f"without rank= (got rank={rank})"
        )
    if rank is not None and saved_rank != rank:
        raise BundleError(f"{manifest_path} holds rank {saved_rank}, not rank {rank}")
    try:
        return _build(root, manifest_path, manifest, verify)
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise BundleError(
            f"{manifest_path}: malformed manifest ({type(err).__name__}: {err}); the bundle was "
            "edited or damaged, re-create it"
        ) from err


def _build(root: str, manifest_path: str, manifest: dict[str, Any], verify: bool) -> Snapshot:
    shard_list = manifest["shards"]
    if not isinstance(shard_list, list):
        raise TypeError("shards is not a list")
    records: list[Record] = []
    entries: dict[str, dict[str, Any]] = {}
    users: dict[int, str] = {}
    for item in manifest["records"]:
        key = item["key"]
        if not isinstance(key, str) or key in entries:
            raise BundleError(f"{manifest_path}: key {key!r} is not a string or appears twice")
        where = f"{manifest_path}: key {key!r}"
        records.append(decode_record(item, where))
        entries[key] = item
        for blob in item["blobs"]:
            users.setdefault(blob["shard"], key)
    shards = []
    for i, item in enumerate(shard_list):
        shards.append(_shard_path(root, item, users.get(i, "(none)")))
    return Snapshot(records, _BundleStore(manifest_path, shards, entries, verify))


def _shard_path(root: str, item: dict[str, Any], key: str) -> ShardFile:
    name, nbytes = item["file"], item["nbytes"]
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name) or name == MANIFEST:
        raise BundleError(
            f"{os.path.join(root, MANIFEST)}: shard file name {name!r} (used by key {key!r}) is "
            "not a plain file name inside the bundle; the manifest was edited, refusing to read it"
        )
    path = os.path.join(root, name)
    real = os.path.realpath(path)
    if os.path.dirname(real) != root:
        raise BundleError(
            f"{path} (used by key {key!r}) is a link that leads outside the bundle ({real}); "
            "refusing to read it"
        )
    try:
        info = os.stat(real)
    except OSError as err:
        raise BundleError(f"{path} (used by key {key!r}) is missing: {err}") from err
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{path} (used by key {key!r}) is not a regular file")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or info.st_size != nbytes:
        raise BundleError(
            f"{path} (used by key {key!r}) has {info.st_size} bytes, the manifest says {nbytes!r};"
            " the shard is truncated or was replaced, re-create the bundle"
        )
    return ShardFile(real, nbytes)


class _BundleStore:
    """The read-only, lazy store behind a loaded bundle."""

    def __init__(
        self, manifest: str, shards: list[ShardFile], entries: dict[str, Any], verify: bool
    ) -> None:
        self._manifest = manifest
        self._verify = verify
        self._shards = shards
        self._entries = entries
        self._verified: set[tuple[int, str]] = set()

    def put(self, key: str, value: Any, nbytes: int) -> None:
        raise BundleError(f"{self._manifest}: a loaded bundle is read-only (cannot add {key!r})")

    def close(self) -> None:
        for shard in self._shards:
            shard.storage = None

    def get(
        self, key: str, on_dtensor: Callable[[torch.Tensor, dict[str, Any]], Any] | None = None
    ) -> Any:
        return self.decode(key, self.tensors(key), on_dtensor)

    def tensors(self, key: str) -> list[torch.Tensor]:
        """The distinct tensors of ``key``'s value, in the manifest's order (checked, mapped)."""
        entry = self._entries[key]
        with self._malformed(key):
            blobs = [self._blob(blob, key) for blob in entry["blobs"]]
            tensors = [self._tensor(spec, blobs, key) for spec in entry["tensors"]]
            self._check_record(key, entry, tensors)
            return tensors

    def _check_record(self, key: str, entry: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """A value that is one tensor (or its statistics) must have the shape and dtype its
        record says."""
        tree = entry["value"]
        shape = entry.get("shape")
        if isinstance(tree, dict) and tree.get("type") == "stats" and shape is not None:
            if tree.get("shape") != shape or tree.get("dtype") != entry.get("dtype"):
                raise BundleError(
                    f"{self._manifest}: key {key!r}: its record says shape {shape} and dtype "
                    f"{entry.get('dtype')}, but its statistics describe {tree.get('shape')!r} "
                    f"{tree.get('dtype')!r}; the manifest was edited or damaged, re-create the "
                    "bundle"
                )
            return
        if not (isinstance(tree, dict) and tree.get("type") == "tensor"):
            return
        index = tree.get("index")
        if shape is None or type(index) is not int or not 0 <= index < len(tensors):
            return  # no shape recorded, or a bad index that decoding reports
        t = tensors[index]
        if list(t.shape) != shape or dtype_name(t.dtype) != entry.get("dtype"):
            raise BundleError(
                f"{self._manifest}: key {key!r}: its record says shape {shape} and dtype "
                f"{entry.get('dtype')}, but the stored tensor is {list(t.shape)} "
                f"{dtype_name(t.dtype)}; the manifest was edited or damaged, re-create the bundle"
            )

    def tree(self, key: str) -> Any:
        """``key``'s value tree as saved (JSON nodes whose tensor leaves index ``tensors``)."""
        return self._entries[key]["value"]

    def decode(
        self,
        key: str,
        tensors: list[torch.Tensor],
        on_dtensor: Callable[[torch.Tensor, dict[str, Any]], Any] | None = None,
    ) -> Any:
        """``key``'s value rebuilt around ``tensors`` (its own, or e.g. concatenated ones)."""
        with self._malformed(key):
            return Decoder(key, tensors, on_dtensor).node(self._entries[key]["value"])

    @contextlib.contextmanager
    def _malformed(self, key: str) -> Iterator[None]:
        try:
            yield
        except (BundleError, BundleWarning):
            raise
        except (
            KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError,
            OverflowError, RecursionError, MemoryError,
        ) as err:  # fmt: skip
            raise BundleError(
                f"{self._manifest}: key {key!r}: the manifest entry is malformed "
                f"({type(err).__name__}: {err}); the bundle was edited or damaged, re-create it"
            ) from err

    def _blob(self, blob: dict[str, Any], key: str) -> tuple[torch.UntypedStorage, int, int]:
        index, name, offset, nbytes = blob["shard"], blob["name"], blob["offset"], blob["nbytes"]
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not 0 <= index < len(self._shards)
        ):
            raise BundleError(
                f"{self._manifest}: key {key!r} names shard {index!r}, which is not listed"
            )
        shard = self._shards[index]
        storage = shard.open(key)
        dtype = dtype_from_name(blob["dtype"], f"{self._manifest}: key {key!r}")
        found = shard.header.get(name) if isinstance(name, str) and name != "__metadata__" else None
        expected = {
            "dtype": NATIVE.get(dtype),
            "shape": [nbytes // dtype.itemsize] if isinstance(nbytes, int) else None,
            "data_offsets": [offset, offset + nbytes] if isinstance(offset, int) else None,
        }
        if (
            found != expected
            or not isinstance(offset, int)
            or not isinstance(nbytes, int)
            or offset < 0
            or nbytes <= 0
            or shard.data_start + offset + nbytes > shard.nbytes
        ):
            raise BundleError(
                f"{shard.path}: the data of key {key!r} (blob {name!r}) does not match the "
                f"manifest (header entry {found!r}); the shard or the manifest was damaged or "
                "edited, re-create the bundle"
            )
        start = shard.data_start + offset
        if self._verify and (index, name) not in self._verified:
            view = torch.empty(0, dtype=torch.uint8).set_(storage, start, (nbytes,), (1,))
            if zlib.crc32(byte_view(view)) != blob["crc32"]:
                raise BundleError(
                    f"{shard.path}: checksum mismatch in the data of key {key!r} (blob {name!r}); "
                    "the file is damaged or was modified after saving, re-create the bundle"
                )
            self._verified.add((index, name))
        return storage, start, nbytes

    def _tensor(
        self, spec: dict[str, Any], blobs: list[tuple[torch.UntypedStorage, int, int]], key: str
    ) -> torch.Tensor:
        where = f"{self._manifest}: key {key!r}"
        dtype = dtype_from_name(spec["dtype"], where)
        shape, stride, offset = spec["shape"], spec["stride"], spec["offset"]
        if not (
            isinstance(shape, list)
            and isinstance(stride, list)
            and len(shape) == len(stride)
            and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape + stride
            )
            and isinstance(offset, int)
            and offset >= 0
        ):
            raise BundleError(f"{where}: a tensor has a malformed shape, stride or offset")
        device = spec.get("device")
        numel = 1
        extent = 1
        for size, step in zip(shape, stride):
            numel *= size
            if size > 1:
                extent += (size - 1) * step
        blob = spec["blob"]
        if blob is None:
            # no bytes: only a zero-size or a meta tensor has none; anything else would be
            # torch.empty memory, whatever the heap held
            meta = device == "meta"
            if numel != 0 and not meta:
                raise BundleError(
                    f'{where}: a tensor of shape {shape} has no blob ("blob": null), which '
                    "only zero-size and meta tensors may have; the bundle was edited or damaged"
                )
            return torch.empty_strided(shape, stride, dtype=dtype, device="meta" if meta else "cpu")
        if type(blob) is not int or not 0 <= blob < len(blobs):
            raise BundleError(f"{where}: a tensor names blob {blob!r}, which is not listed")
        storage, start, nbytes = blobs[blob]
        itemsize = dtype.itemsize
        if numel == 0 or offset + extent * itemsize > nbytes:
            raise BundleError(f"{where}: a tensor reaches beyond the bytes stored for it")
        base = start + offset
        if base % itemsize:  # not aligned for this dtype: copy into memory that is
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, base, (extent * itemsize,), (1,))
            storage, base = raw.clone().untyped_storage(), 0
        result = torch.empty(0, dtype=dtype)
        return result.set_(storage, base // itemsize, shape, stride)
