"""Bundles: a snapshot on disk as safetensors shards plus ``manifest.json``.

``save`` writes into a hidden sibling directory, fsyncs every file, writes the manifest last and
renames the directory into place, so a crash or a full disk never leaves a bundle that loads as
complete. ``load`` reads and checks only the manifest; reading a key maps the shard files it
needs (``torch.UntypedStorage.from_file``: private, copy-on-write pages, nothing read until
touched) and checks the CRC-32 of the bytes it uses. Loading never unpickles, imports or calls
anything named in the files: nested values are rebuilt from plain containers and from classes
already imported that are verified dataclasses, namedtuples or dict subclasses. The format is
described in ``docs/format.md``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import inspect
import json
import os
import re
import shutil
import stat
import struct
import sys
import uuid
import warnings
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Mapping
from os import PathLike
from typing import Any

import torch

from ._errors import BundleError, BundleWarning, attr, format_path
from ._snapshot import KINDS, Record, Snapshot

__all__ = ["BlobRef", "Span", "load", "map_file", "plan_spans", "save", "tensors_in", "write_shard"]

FORMAT = "tensorsnap-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Shards close once they pass this size (a blob larger than it gets a shard of its own).
_SHARD_TARGET = 512 * 2**20
# Blobs start and end on this many bytes, so that every dtype can view the mapped file in place.
_BLOB_ALIGN = 16
# The data section of a shard starts on a cache line.
_HEADER_ALIGN = 64
# Blobs are hashed and written in pieces of this size (hash while the piece is in cache).
_CHUNK = 8 * 2**20
# Small writes are gathered into one buffer of this size to save system calls.
_BUFFER = 2**20
# safetensors itself refuses headers above 100 MB.
_MAX_HEADER = 100 * 10**6
_MAX_MANIFEST = 2**31

_DIGEST_FIELD = "manifest_sha256"
_ZERO_DIGEST = "0" * 64

# dtypes that every safetensors >= 0.4 reader knows; the others are stored as raw bytes (U8).
_NATIVE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}

_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
_RANK_DIR = re.compile(r"rank-(\d{5})")
_DEFAULT_FACTORIES: dict[str, type] = {t.__name__: t for t in (list, dict, set, int, float, str)}


# -- dtypes ---------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: object, where: str) -> torch.dtype:
    # a lookup in torch's namespace, checked to be a dtype: nothing is imported or called
    found = vars(torch).get(name) if isinstance(name, str) else None
    if not isinstance(found, torch.dtype):
        raise BundleError(f"{where}: {name!r} is not a torch dtype known to this torch version")
    return found


# -- spans: the bytes that are written -------------------------------------------------------


@dataclasses.dataclass(eq=False)
class BlobRef:
    """A blob already written in a shard file (by a spill store), that a bundle can link."""

    path: str
    file_nbytes: int
    data_start: int
    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    crc32: int


@dataclasses.dataclass(eq=False)
class Span:
    """Bytes ``[lo, hi)`` of one storage, written once as one flat blob.

    ``nbytes`` is ``hi - lo`` rounded up to ``_BLOB_ALIGN`` (the rest is zeros). Every tensor that
    views the span is recorded as (span, byte offset inside it, shape, stride).
    """

    storage: torch.UntypedStorage
    device: torch.device
    lo: int
    hi: int
    dtype: torch.dtype
    nbytes: int
    name: str = ""
    shard: int = -1
    offset: int = 0
    crc32: int = 0
    link: BlobRef | None = None


def _extent(t: torch.Tensor) -> int:
    """Elements from the first to the last one ``t`` can reach, inclusive."""
    extent = 1
    for size, stride in zip(t.shape, t.stride()):
        if size > 1:
            extent += (size - 1) * stride
    return extent


def plan_spans(
    tensors: list[torch.Tensor],
    locate: Callable[[torch.Tensor], tuple[BlobRef, int] | None] | None = None,
) -> tuple[list[Span], list[tuple[int | None, int]]]:
    """Group tensors by storage and merge the byte ranges they reach into spans.

    Returns the spans and, for each tensor, ``(span index, byte offset in the span)`` (``None``
    for tensors with no bytes: zero-size and meta tensors). ``locate`` finds tensors that a
    spill store already wrote; such a group becomes a span that links the existing blob.
    """
    placements: list[tuple[int | None, int]] = [(None, 0)] * len(tensors)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0 or t.is_meta:
            continue
        groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(i)
    spans: list[Span] = []
    for (device, _), members in groups.items():
        storage = tensors[members[0]].untyped_storage()
        if locate is not None:
            found = [locate(tensors[i]) for i in members]
            refs = {id(f[0]) for f in found if f is not None}
            if all(f is not None for f in found) and len(refs) == 1:
                ref = found[0][0]  # type: ignore[index]
                lo = ref.data_start + ref.offset
                spans.append(
                    Span(storage, device, lo, lo + ref.nbytes, ref.dtype, ref.nbytes,
                         name=ref.name, offset=ref.offset, crc32=ref.crc32, link=ref)
                )  # fmt: skip
                for i, f in zip(members, found):
                    placements[i] = (len(spans) - 1, f[1])  # type: ignore[index]
                continue
        ranges = []
        for i in members:
            t = tensors[i]
            lo = int(t.storage_offset()) * t.element_size()
            hi = lo + int(_extent(t)) * t.element_size()
            ranges.append((lo - lo % _BLOB_ALIGN, hi, i))
        ranges.sort()
        # merge overlapping ranges: each merged range is written once, its tensors view it
        merged: list[tuple[int, int, list[int]]] = []
        for lo, hi, i in ranges:
            if merged and lo <= merged[-1][1]:
                start, end, group = merged[-1]
                merged[-1] = (start, max(end, hi), [*group, i])
            else:
                merged.append((lo, hi, [i]))
        for lo, hi, group in merged:
            dtypes = {tensors[j].dtype for j in group}
            # one native dtype keeps the shard readable by plain safetensors; else raw bytes
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.uint8
            if dtype not in _NATIVE:
                dtype = torch.uint8
            spans.append(Span(storage, device, lo, hi, dtype, hi - lo + (lo - hi) % _BLOB_ALIGN))
            for j in group:
                t = tensors[j]
                placements[j] = (len(spans) - 1, int(t.storage_offset()) * t.element_size() - lo)
    return spans, placements


def _span_chunks(span: Span) -> Iterator[memoryview]:
    pos = span.lo
    while pos < span.hi:
        count = min(_CHUNK, span.hi - pos)
        piece = torch.empty(0, dtype=torch.uint8, device=span.device)
        piece.set_(span.storage, pos, (count,), (1,))
        if piece.device.type != "cpu":
            piece = piece.cpu()
        yield memoryview(piece.numpy())  # type: ignore[arg-type]
        pos += count
    pad = span.nbytes - (span.hi - span.lo)
    if pad:
        yield memoryview(bytes(pad))


# -- shard files -----------------------------------------------------------------------------


def _write_all(fd: int, data: memoryview | bytes | bytearray) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_shard(path: str, spans: list[Span], *, fsync: bool) -> int:
    """Write ``spans`` as one safetensors file; fill in their offsets and CRC-32. Returns size."""
    header: dict[str, Any] = {}
    offset = 0
    for span in spans:
        itemsize = span.dtype.itemsize
        header[span.name] = {
            "dtype": _NATIVE[span.dtype],
            "shape": [span.nbytes // itemsize],
            "data_offsets": [offset, offset + span.nbytes],
        }
        span.offset = offset
        offset += span.nbytes
    header["__metadata__"] = {"format": "pt", "writer": FORMAT}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    # pad the header with spaces (as safetensors does) so the data starts aligned
    text += b" " * (-(8 + len(text)) % _HEADER_ALIGN)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        buffer = bytearray(struct.pack("<Q", len(text)) + text)
        for span in spans:
            crc = 0
            for chunk in _span_chunks(span):
                crc = zlib.crc32(chunk, crc)
                if len(chunk) >= _BUFFER:
                    if buffer:
                        _write_all(fd, buffer)
                        buffer.clear()
                    _write_all(fd, chunk)
                else:
                    buffer += chunk
                    if len(buffer) >= _BUFFER:
                        _write_all(fd, buffer)
                        buffer.clear()
            span.crc32 = crc
        if buffer:
            _write_all(fd, buffer)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return 8 + len(text) + offset


def map_file(path: str, nbytes: int) -> torch.UntypedStorage:
    """The whole file as a private, copy-on-write memory map (nothing is read until touched)."""
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=nbytes)
    return storage  # type: ignore[return-value]


class _Shard:
    """One shard of a bundle being read: checked against the manifest, then mapped."""

    def __init__(self, path: str, nbytes: int) -> None:
        self.path = path
        self.nbytes = nbytes
        self.storage: torch.UntypedStorage | None = None
        self.header: dict[str, Any] = {}
        self.data_start = 0

    def open(self, key: str) -> torch.UntypedStorage:
        if self.storage is not None:
            return self.storage
        try:
            size = os.stat(self.path).st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 2 <= length <= min(_MAX_HEADER, size - 8):
                    raise BundleError(
                        f"{self.path} (used by key {key!r}): the safetensors header length is "
                        "damaged; the shard is truncated or corrupted, re-create the bundle"
                    )
                header = json.loads(f.read(length))
        except OSError as err:
            raise BundleError(f"{self.path} (used by key {key!r}) cannot be read: {err}") from err
        except (ValueError, UnicodeDecodeError) as err:
            raise BundleError(
                f"{self.path} (used by key {key!r}): the safetensors header is not valid JSON "
                f"({err}); the shard is damaged, re-create the bundle"
            ) from err
        if size != self.nbytes:
            raise BundleError(
                f"{self.path} (used by key {key!r}) has {size} bytes, the manifest says "
                f"{self.nbytes}; the shard is truncated or was replaced, re-create the bundle"
            )
        if not isinstance(header, dict):
            raise BundleError(f"{self.path} (used by key {key!r}): the header is not an object")
        self.header = header
        self.data_start = 8 + length
        self.storage = map_file(self.path, size)
        return self.storage


# -- structure: values to JSON nodes ---------------------------------------------------------


def _class_ref(cls: type) -> dict[str, str]:
    return {"module": cls.__module__, "qualname": cls.__qualname__}


class _Encoder:
    """Turns one value into a JSON tree whose leaves index ``tensors``.

    With ``strict=False`` (spill stores) objects the format cannot describe are skipped instead
    of refused: only the tensors matter there.
    """

    def __init__(self, root: str, strict: bool = True) -> None:
        self.root = root
        self.strict = strict
        self.tensors: list[torch.Tensor] = []
        self._index: dict[int, int] = {}
        self.sources: list[torch.Tensor] = []
        self._active: set[int] = set()

    def fail(self, parts: list[object], message: str) -> BundleError:
        return BundleError(f"{format_path(self.root, parts)}: {message}")

    def node(self, x: Any, parts: list[object]) -> Any:
        cls = type(x)
        if x is None:
            return {"type": "none"}
        if cls is bool:
            return {"type": "bool", "value": x}
        if isinstance(x, torch.Tensor):
            return {"type": "tensor", "index": self.tensor(x, parts)}
        if isinstance(x, bool):
            return {"type": "bool", "value": bool(x)}
        if isinstance(x, int):
            return {"type": "int", "value": int(x)}
        if isinstance(x, float):
            return {"type": "float", "value": float.hex(float(x))}
        if isinstance(x, complex):
            return {"type": "complex", "real": float.hex(x.real), "imag": float.hex(x.imag)}
        if isinstance(x, str):
            return {"type": "str", "value": str(x)}
        if isinstance(x, (bytes, bytearray)):
            return {"type": "bytes", "value": bytes(x).hex()}
        if isinstance(x, torch.dtype):
            return {"type": "dtype", "value": _dtype_name(x)}
        if isinstance(x, torch.device):
            return {"type": "device", "value": str(x)}
        if isinstance(x, torch.Size):
            return {"type": "size", "value": [int(s) for s in x]}
        if id(x) in self._active:
            raise self.fail(
                parts, "the value contains a reference cycle, which bundles cannot store"
            )
        self._active.add(id(x))
        try:
            return self.container(x, cls, parts)
        finally:
            self._active.discard(id(x))

    def items(self, pairs: Any, parts: list[object]) -> list[list[Any]]:
        return [[self.node(k, [*parts, k]), self.node(v, [*parts, k])] for k, v in pairs]

    def container(self, x: Any, cls: type, parts: list[object]) -> Any:
        if cls is tuple or cls is list:
            items = [self.node(v, [*parts, i]) for i, v in enumerate(x)]
            return {"type": cls.__name__, "items": items}
        if cls is dict:
            return {"type": "dict", "items": self.items(x.items(), parts)}
        if cls is set or cls is frozenset:
            return {"type": cls.__name__, "items": [self.node(v, parts) for v in x]}
        if isinstance(x, tuple) and isinstance(getattr(cls, "_fields", None), tuple):
            return {
                "type": "namedtuple",
                "class": _class_ref(cls),
                "fields": list(cls._fields),  # type: ignore[attr-defined]
                "items": [self.node(v, [*parts, attr(str(f))]) for f, v in zip(cls._fields, x)],  # type: ignore[attr-defined]
            }
        if dataclasses.is_dataclass(x):
            node: dict[str, Any] = {
                "type": "dataclass",
                "class": _class_ref(cls),
                "fields": [
                    [f.name, self.node(getattr(x, f.name, None), [*parts, attr(f.name)])]
                    for f in dataclasses.fields(x)
                ],
            }
            if isinstance(x, Mapping):
                node["items"] = self.items(x.items(), parts)
            return node
        if isinstance(x, Mapping):
            node = {
                "type": "mapping",
                "class": _class_ref(cls),
                "items": self.items(x.items(), parts),
            }
            if isinstance(x, defaultdict):
                factory: Any = x.default_factory
                known = factory in _DEFAULT_FACTORIES.values()
                node["factory"] = factory.__name__ if known else None
            return node
        if isinstance(x, (tuple, list)):  # other sequence subclasses keep their items only
            items = [self.node(v, [*parts, i]) for i, v in enumerate(x)]
            return {"type": "tuple" if isinstance(x, tuple) else "list", "items": items}
        state = getattr(x, "__dict__", None)
        if isinstance(state, dict):
            return {
                "type": "object",
                "class": _class_ref(cls),
                "attrs": [
                    [k, self.node(v, [*parts, attr(k)])]
                    for k, v in state.items()
                    if isinstance(k, str)
                ],
            }
        if not self.strict:
            return {"type": "none"}
        raise self.fail(
            parts,
            f"cannot store a {cls.__qualname__} object in a bundle (bundles hold tensors, "
            "containers, dataclasses, namedtuples, mappings, objects with a __dict__ and "
            "scalars); exclude this key from the capture or convert the value first",
        )

    def tensor(self, t: torch.Tensor, parts: list[object]) -> int:
        found = self._index.get(id(t))
        if found is not None:
            return found
        plain = type(t) is torch.Tensor or type(t) is torch.nn.Parameter
        dense = t.layout == torch.strided and not t.is_quantized and not t.is_nested
        if not self.strict and not (plain and dense):
            return -1
        if not plain:
            raise self.fail(
                parts, f"cannot store a {type(t).__name__}; convert it to a plain tensor"
            )
        if not dense:
            raise self.fail(
                parts,
                f"cannot store a {t.layout} {'quantized ' if t.is_quantized else ''}tensor; "
                "convert it first, for example with .to_dense() or .dequantize()",
            )
        self._index[id(t)] = len(self.tensors)
        self.sources.append(t)  # also keeps its id from being reused while we index by it
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        self.tensors.append(t)
        return len(self.tensors) - 1


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The distinct plain strided tensors inside ``value``, as they are (for spill stores).

    Objects and tensors that a bundle cannot describe are skipped, not refused.
    """
    encoder = _Encoder("value", strict=False)
    try:
        encoder.node(value, [])
    except BundleError:  # a reference cycle: spill what was found before it
        pass
    return [t for t in encoder.sources if not (t.is_conj() or t.is_neg())]


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

    target = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(target)
    _check_target(target)
    store = snapshot._store
    locate = getattr(store, "_locate", None)
    peek = getattr(store, "_peek", store.get)
    # validate (and lay out) everything before the first byte is written
    entries = []
    for record in snapshot.records:
        encoder = _Encoder(f"snap[{record.key!r}]")
        tree = encoder.node(peek(record.key), [])
        spans, placements = plan_spans(encoder.tensors, locate)
        for j, span in enumerate(spans):
            if span.link is None:
                span.name = f"{record.key}@{j}"
        entries.append(_Entry(record, tree, encoder.tensors, spans, placements))
    shards = _assign_shards(entries)

    os.makedirs(parent, exist_ok=True)
    temp = os.path.join(parent, f".{base}.tensorsnap-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(temp)
        names = []
        for i, shard in enumerate(shards):
            name = f"shard-{i:05d}.safetensors"
            names.append(name)
            file = os.path.join(temp, name)
            if shard.link is not None:
                shard.nbytes = _link_or_copy(shard.link.path, file)
            else:
                shard.nbytes = write_shard(file, shard.spans, fsync=True)
        manifest = _manifest(entries, shards, names, __version__, rank, world_size)
        _write_file(os.path.join(temp, MANIFEST), manifest)
        _fsync_dir(temp)
        os.rename(temp, target)
    except BaseException as err:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(err, OSError):
            raise _write_error(err, target) from err
        raise
    _fsync_dir(parent)


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


def _link_or_copy(source: str, file: str) -> int:
    """Hard-link a spill shard into the bundle (no bytes copied); copy across file systems."""
    try:
        os.link(source, file)
    except OSError:
        shutil.copyfile(source, file)
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:  # nor fsynced on some file systems; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _manifest(
    entries: list[_Entry],
    shards: list[_ShardPlan],
    names: list[str],
    version: str,
    rank: int | None,
    world_size: int | None,
) -> bytes:
    records = []
    for entry in entries:
        r = entry.record
        tensors = []
        for t, (span, offset) in zip(entry.tensors, entry.placements):
            tensors.append(
                {
                    "dtype": _dtype_name(t.dtype),
                    "shape": list(t.shape),
                    "stride": list(t.stride()),
                    "blob": span,
                    "offset": offset,
                    "device": str(t.device),
                }
            )
        records.append(
            {
                "key": r.key,
                "module": r.module,
                "call": r.call,
                "op": r.op,
                "kind": r.kind,
                "shape": list(r.shape) if r.shape is not None else None,
                "dtype": _dtype_name(r.dtype) if r.dtype is not None else None,
                "nbytes": r.nbytes,
                "blobs": [
                    {
                        "shard": s.shard,
                        "name": s.name,
                        "dtype": _dtype_name(s.dtype),
                        "offset": s.offset,
                        "nbytes": s.nbytes,
                        "crc32": s.crc32,
                    }
                    for s in entry.spans
                ],
                "tensors": tensors,
                "value": entry.tree,
            }
        )
    body = {
        _DIGEST_FIELD: _ZERO_DIGEST,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tensorsnap_version": version,
        "torch_version": torch.__version__,
        "rank": rank,
        "world_size": world_size,
        "shards": [{"file": n, "nbytes": s.nbytes} for n, s in zip(names, shards)],
        "records": records,
    }
    text = json.dumps(body, indent=1, ensure_ascii=True, allow_nan=False).encode() + b"\n"
    digest = hashlib.sha256(text).hexdigest()
    return text.replace(_ZERO_DIGEST.encode(), digest.encode(), 1)


# -- load ------------------------------------------------------------------------------------


def load(path: str | PathLike[str], rank: int | None = None) -> Snapshot:
    """Open a bundle written by ``Snapshot.save``; values are read lazily, memory-mapped.

    Only ``manifest.json`` is read here. ``snap[key]`` maps the shard files the key needs and
    checks the CRC-32 of its bytes. Tensors come back on the CPU, backed by private
    copy-on-write maps of the files (writing to them never changes the bundle).

    Args:
        path: The bundle directory.
        rank: For bundles written by several processes: which rank's part to read.

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
    root = os.path.realpath(os.fspath(path))
    if not os.path.isdir(root):
        raise BundleError(f"no bundle at {root}: it is not a directory (write one with snap.save)")
    manifest_path = os.path.join(root, MANIFEST)
    if not os.path.lexists(manifest_path):
        ranks = sorted(d for d in os.listdir(root) if _RANK_DIR.fullmatch(d))
        if ranks and rank is None:
            raise BundleError(
                f"{root} holds one part per rank ({len(ranks)} ranks); pass rank=, for example "
                "tensorsnap.load(path, rank=0)"
            )
        if ranks:
            part = os.path.join(root, f"rank-{rank:05d}")
            if not os.path.isdir(part):
                raise BundleError(f"{root} has no part for rank {rank} (found {', '.join(ranks)})")
            return _open(part, rank)
        raise BundleError(
            f"{root} has no {MANIFEST}: it is not a bundle, or its save did not finish (an "
            "interrupted save never writes the manifest); save the snapshot again"
        )
    return _open(root, rank)


def _open(root: str, rank: int | None) -> Snapshot:
    manifest_path = os.path.join(root, MANIFEST)
    manifest = _read_manifest(manifest_path)
    saved_rank = manifest.get("rank")
    if rank is not None and saved_rank is None:
        raise BundleError(
            f"{root} was saved by a single process and has no ranks; call tensorsnap.load(path) "
            f"without rank= (got rank={rank})"
        )
    if rank is not None and saved_rank != rank:
        raise BundleError(f"{manifest_path} holds rank {saved_rank}, not rank {rank}")
    try:
        return _build(root, manifest_path, manifest)
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise BundleError(
            f"{manifest_path}: malformed manifest ({type(err).__name__}: {err}); the bundle was "
            "edited or damaged, re-create it"
        ) from err


def _read_manifest(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_MANIFEST + 1)
    except OSError as err:
        raise BundleError(f"{path} cannot be read: {err}") from err
    damaged = f"{path} is damaged or was edited by hand"
    try:
        manifest = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise BundleError(f"{damaged}: it is not valid JSON ({err}); re-create the bundle") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a tensorsnap bundle manifest (no format {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise BundleError(
            f"{path} has format version {version!r}; this tensorsnap reads version "
            f"{FORMAT_VERSION} (upgrade tensorsnap to read newer bundles)"
        )
    digest = manifest.get(_DIGEST_FIELD)
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise BundleError(f"{damaged}: its {_DIGEST_FIELD} is missing; re-create the bundle")
    zeroed = data.replace(digest.encode(), _ZERO_DIGEST.encode(), 1)
    if hashlib.sha256(zeroed).hexdigest() != digest:
        raise BundleError(
            f"{damaged}: its SHA-256 does not match {_DIGEST_FIELD}; re-create the bundle"
        )
    return manifest


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _build(root: str, manifest_path: str, manifest: dict[str, Any]) -> Snapshot:
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
        records.append(_record(item, where))
        entries[key] = item
        for blob in item["blobs"]:
            users.setdefault(blob["shard"], key)
    shards = []
    for i, item in enumerate(shard_list):
        shards.append(_shard_path(root, item, users.get(i, "(none)")))
    return Snapshot(records, _BundleStore(manifest_path, shards, entries))


def _record(item: dict[str, Any], where: str) -> Record:
    def expect(name: str, kind: type | tuple[type, ...]) -> Any:
        value = item.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise BundleError(f"{where}: field {name!r} is {value!r}, expected {kind}")
        return value

    shape = item.get("shape")
    if shape is not None and not (
        isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
    ):
        raise BundleError(f"{where}: field 'shape' is {shape!r}, expected a list of sizes")
    dtype = item.get("dtype")
    kind = expect("kind", str)
    if kind not in KINDS:
        raise BundleError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    return Record(
        key=expect("key", str),
        module=expect("module", str),
        call=expect("call", int),
        op=expect("op", (str, type(None))),
        kind=kind,
        shape=tuple(shape) if shape is not None else None,
        dtype=_dtype_from_name(dtype, where) if dtype is not None else None,
        nbytes=expect("nbytes", int),
    )


def _shard_path(root: str, item: dict[str, Any], key: str) -> _Shard:
    name, nbytes = item["file"], item["nbytes"]
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or name == MANIFEST:
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
    return _Shard(real, nbytes)


class _BundleStore:
    """The read-only, lazy store behind a loaded bundle."""

    def __init__(self, manifest: str, shards: list[_Shard], entries: dict[str, Any]) -> None:
        self._manifest = manifest
        self._shards = shards
        self._entries = entries
        self._verified: set[tuple[int, str]] = set()

    def put(self, key: str, value: Any, nbytes: int) -> None:
        raise BundleError(f"{self._manifest}: a loaded bundle is read-only (cannot add {key!r})")

    def close(self) -> None:
        for shard in self._shards:
            shard.storage = None

    def get(self, key: str) -> Any:
        entry = self._entries[key]
        try:
            blobs = [self._blob(blob, key) for blob in entry["blobs"]]
            tensors = [self._tensor(spec, blobs, key) for spec in entry["tensors"]]
            return _Decoder(key, tensors).node(entry["value"])
        except (BundleError, BundleWarning):
            raise
        except (
            KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError,
            OverflowError, RecursionError,
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
        dtype = _dtype_from_name(blob["dtype"], f"{self._manifest}: key {key!r}")
        found = shard.header.get(name) if isinstance(name, str) and name != "__metadata__" else None
        expected = {
            "dtype": _NATIVE.get(dtype),
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
        if (index, name) not in self._verified:
            view = torch.empty(0, dtype=torch.uint8).set_(storage, start, (nbytes,), (1,))
            if zlib.crc32(view.numpy()) != blob["crc32"]:  # type: ignore[arg-type]
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
        dtype = _dtype_from_name(spec["dtype"], where)
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
        if spec["blob"] is None:
            meta = device == "meta"
            return torch.empty_strided(shape, stride, dtype=dtype, device="meta" if meta else "cpu")
        storage, start, nbytes = blobs[spec["blob"]]
        itemsize = dtype.itemsize
        numel = 1
        extent = 1
        for size, step in zip(shape, stride):
            numel *= size
            if size > 1:
                extent += (size - 1) * step
        if numel == 0 or offset + extent * itemsize > nbytes:
            raise BundleError(f"{where}: a tensor reaches beyond the bytes stored for it")
        base = start + offset
        if base % itemsize:  # not aligned for this dtype: copy into memory that is
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, base, (extent * itemsize,), (1,))
            storage, base = raw.clone().untyped_storage(), 0
        result = torch.empty(0, dtype=dtype)
        return result.set_(storage, base // itemsize, shape, stride)


# -- structure: JSON nodes to values ---------------------------------------------------------


def _find_class(ref: Any) -> type | None:
    """A class already imported in this process, by a dict lookup: nothing runs or imports."""
    if not isinstance(ref, dict):
        raise TypeError("class reference is not an object")
    module_name, qualname = ref["module"], ref["qualname"]
    if not isinstance(module_name, str) or not isinstance(qualname, str):
        raise TypeError("class reference is not two strings")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        try:
            namespace = vars(found)
        except TypeError:
            return None
        found = namespace.get(part)
    return found if isinstance(found, type) else None


def _warn(message: str) -> None:
    # point the warning at the first frame outside tensorsnap (the user's snap[key])
    frame, level = sys._getframe(1), 2
    package = os.path.dirname(__file__)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, BundleWarning, stacklevel=level - 1)


class _Decoder:
    def __init__(self, key: str, tensors: list[torch.Tensor]) -> None:
        self.key = key
        self.tensors = tensors

    def node(self, n: dict[str, Any]) -> Any:
        kind = n["type"]
        method = getattr(self, f"_{kind}", None) if isinstance(kind, str) else None
        if method is None:
            raise ValueError(f"unknown node type {kind!r}")
        return method(n)

    def items(self, n: dict[str, Any]) -> list[tuple[Any, Any]]:
        return [(self.node(k), self.node(v)) for k, v in n["items"]]

    def fallback(self, n: dict[str, Any], why: str, plain: str) -> None:
        ref = n["class"]
        _warn(
            f"snap[{self.key!r}]: {ref['module']}.{ref['qualname']} {why}; it comes back as a "
            f"plain {plain} (import the class before reading the key to get it back)"
        )

    def _none(self, n: dict[str, Any]) -> None:
        return None

    def _bool(self, n: dict[str, Any]) -> bool:
        return _typed(n["value"], bool)

    def _int(self, n: dict[str, Any]) -> int:
        return _typed(n["value"], int)

    def _float(self, n: dict[str, Any]) -> float:
        return float.fromhex(_typed(n["value"], str))

    def _complex(self, n: dict[str, Any]) -> complex:
        return complex(float.fromhex(n["real"]), float.fromhex(n["imag"]))

    def _str(self, n: dict[str, Any]) -> str:
        return _typed(n["value"], str)

    def _bytes(self, n: dict[str, Any]) -> bytes:
        return bytes.fromhex(n["value"])

    def _dtype(self, n: dict[str, Any]) -> torch.dtype:
        return _dtype_from_name(n["value"], f"snap[{self.key!r}]")

    def _device(self, n: dict[str, Any]) -> torch.device:
        return torch.device(_typed(n["value"], str))

    def _size(self, n: dict[str, Any]) -> torch.Size:
        return torch.Size([_typed(s, int) for s in n["value"]])

    def _tensor(self, n: dict[str, Any]) -> torch.Tensor:
        index = _typed(n["index"], int)
        if index < 0:
            raise IndexError(f"tensor index {index}")
        return self.tensors[index]

    def _tuple(self, n: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(self.node(v) for v in n["items"])

    def _list(self, n: dict[str, Any]) -> list[Any]:
        return [self.node(v) for v in n["items"]]

    def _dict(self, n: dict[str, Any]) -> dict[Any, Any]:
        return dict(self.items(n))

    def _set(self, n: dict[str, Any]) -> set[Any]:
        return {self.node(v) for v in n["items"]}

    def _frozenset(self, n: dict[str, Any]) -> frozenset[Any]:
        return frozenset(self.node(v) for v in n["items"])

    def _namedtuple(self, n: dict[str, Any]) -> tuple[Any, ...]:
        items = [self.node(v) for v in n["items"]]
        cls = _find_class(n["class"])
        if cls is None:
            self.fallback(n, "is not imported", "tuple")
            return tuple(items)
        fields = inspect.getattr_static(cls, "_fields", None)
        if (
            not issubclass(cls, tuple)
            or not isinstance(fields, tuple)
            or list(fields) != n["fields"]
        ):
            self.fallback(n, "is not a namedtuple with the saved fields", "tuple")
            return tuple(items)
        return tuple.__new__(cls, items)

    def _dataclass(self, n: dict[str, Any]) -> Any:
        fields = [(_typed(name, str), self.node(v)) for name, v in n["fields"]]
        items = self.items(n) if "items" in n else None
        cls = _find_class(n["class"])
        plain = dict(items) if items is not None else dict(fields)
        if cls is None:
            self.fallback(n, "is not imported", "dict")
            return plain
        names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else None
        if names != [name for name, _ in fields] or (
            items is not None and not issubclass(cls, dict)
        ):
            self.fallback(n, "is not a dataclass with the saved fields", "dict")
            return plain
        # no __init__, __new__ or __post_init__ of the class runs: the instance is assembled
        try:
            obj = _new_mapping(cls, items) if items is not None else object.__new__(cls)
            for name, value in fields:
                object.__setattr__(obj, name, value)
        except TypeError:
            self.fallback(n, "cannot be assembled without running its code", "dict")
            return plain
        return obj

    def _mapping(self, n: dict[str, Any]) -> Any:
        items = self.items(n)
        cls = _find_class(n["class"])
        if cls is None:
            self.fallback(n, "is not imported", "dict")
            return dict(items)
        if not issubclass(cls, dict):
            self.fallback(n, "is not a dict subclass", "dict")
            return dict(items)
        obj = _new_mapping(cls, items)
        if isinstance(obj, defaultdict):
            obj.default_factory = _DEFAULT_FACTORIES.get(n.get("factory"))  # type: ignore[arg-type]
        return obj

    def _object(self, n: dict[str, Any]) -> dict[str, Any]:
        attrs = {_typed(name, str): self.node(v) for name, v in n["attrs"]}
        self.fallback(n, "is not a dataclass, namedtuple or mapping", "dict of its attributes")
        return attrs


def _new_mapping(cls: type, items: list[tuple[Any, Any]]) -> Any:
    # the nearest built-in base creates and fills the instance, never the class's own code
    base = next(b for b in cls.__mro__ if b in (OrderedDict, defaultdict, dict))
    obj: Any = base.__new__(cls)
    for key, value in items:
        base.__setitem__(obj, key, value)
    return obj


def _typed(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value
