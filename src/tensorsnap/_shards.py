"""Shard files: the bytes of a bundle or a spill store, as safetensors files.

Tensors are grouped by storage and the byte ranges they reach are merged into spans
(``plan_spans``); each span is written once as one flat blob (``write_shard``), hashed with
CRC-32 while it is written. Readers map a whole shard privately (``map_file``) and check its
header before using a blob (``ShardFile``). The small helpers at the end write files durably
(fsync) for the atomic directory commit in ``_bundle``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shutil
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._errors import BundleError
from ._tree import extent

__all__ = [
    "NATIVE",
    "SHARD_NAME",
    "BlobRef",
    "ShardFile",
    "Span",
    "byte_view",
    "dtype_from_name",
    "dtype_name",
    "fsync_dir",
    "link_or_copy",
    "map_file",
    "plan_spans",
    "read_small_file",
    "write_all",
    "write_file",
    "write_shard",
]

# The writer named in each shard header's ``__metadata__``.
_WRITER = "tensorsnap-bundle"

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
# dtypes that every safetensors >= 0.4 reader knows; the others are stored as raw bytes (U8).
NATIVE: dict[torch.dtype, str] = {
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

# how a shard is opened for reading: never through a link, never blocking on a FIFO
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_BINARY = getattr(os, "O_BINARY", 0)

SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
# -- dtypes ---------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object, where: str) -> torch.dtype:
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
            hi = lo + extent(t) * t.element_size()
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
            if dtype not in NATIVE:
                dtype = torch.uint8
            spans.append(Span(storage, device, lo, hi, dtype, hi - lo + (lo - hi) % _BLOB_ALIGN))
            for j in group:
                t = tensors[j]
                placements[j] = (len(spans) - 1, int(t.storage_offset()) * t.element_size() - lo)
    return spans, placements


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU ``uint8`` tensor as a writable memoryview, without copying.

    Made with ctypes rather than ``Tensor.numpy()``, so that saving and loading need no numpy
    (torch declares none). The view keeps ``t`` alive for as long as it exists.
    """
    if t.device.type != "cpu" or t.dtype != torch.uint8 or not t.is_contiguous() or t.dim() != 1:
        raise ValueError("byte_view needs a 1-dim contiguous CPU uint8 tensor")
    count = t.numel()
    if count == 0:
        return memoryview(bytearray())
    buffer = (ctypes.c_ubyte * count).from_address(t.data_ptr())
    buffer._tensor = t  # type: ignore[attr-defined]  # the memory must outlive the view
    return memoryview(buffer).cast("B")


def _span_chunks(span: Span) -> Iterator[memoryview]:
    pos = span.lo
    while pos < span.hi:
        count = min(_CHUNK, span.hi - pos)
        piece = torch.empty(0, dtype=torch.uint8, device=span.device)
        piece.set_(span.storage, pos, (count,), (1,))
        if piece.device.type != "cpu":
            piece = piece.cpu()
        yield byte_view(piece)
        pos += count
    pad = span.nbytes - (span.hi - span.lo)
    if pad:
        yield memoryview(bytes(pad))


# -- shard files -----------------------------------------------------------------------------


def write_all(fd: int, data: memoryview | bytes | bytearray) -> None:
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
            "dtype": NATIVE[span.dtype],
            "shape": [span.nbytes // itemsize],
            "data_offsets": [offset, offset + span.nbytes],
        }
        span.offset = offset
        offset += span.nbytes
    header["__metadata__"] = {"format": "pt", "writer": _WRITER}
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
                        write_all(fd, buffer)
                        buffer.clear()
                    write_all(fd, chunk)
                else:
                    buffer += chunk
                    if len(buffer) >= _BUFFER:
                        write_all(fd, buffer)
                        buffer.clear()
            span.crc32 = crc
        if buffer:
            write_all(fd, buffer)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return 8 + len(text) + offset


def map_file(path: str, nbytes: int) -> torch.UntypedStorage:
    """The whole file as a private, copy-on-write memory map (nothing is read until touched)."""
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=nbytes)
    return storage  # type: ignore[return-value]


class ShardFile:
    """One shard of a bundle being read: checked against the manifest, then mapped."""

    def __init__(self, path: str, nbytes: int) -> None:
        self.path = path
        self.nbytes = nbytes
        self.storage: torch.UntypedStorage | None = None
        self.header: dict[str, Any] = {}
        self.data_start = 0
        self._identity: tuple[int, ...] | None = None

    def open(self, key: str) -> torch.UntypedStorage:
        if self.storage is not None:
            self.check(key)
            return self.storage
        where = f"{self.path} (used by key {key!r})"
        try:
            # O_NONBLOCK: a FIFO put in the shard's place must not block the open
            fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _BINARY)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise BundleError(f"{where} is not a regular file; refusing to read it")
                size = info.st_size
                head = _read_exactly(fd, 8)
                length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 2 <= length <= min(_MAX_HEADER, size - 8):
                    raise BundleError(
                        f"{where}: the safetensors header length is damaged; the shard is "
                        "truncated or corrupted, re-create the bundle"
                    )
                header = json.loads(_read_exactly(fd, length))
            finally:
                os.close(fd)
        except OSError as err:
            raise BundleError(f"{where} cannot be read: {err}") from err
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise BundleError(
                f"{where}: the safetensors header is not valid JSON ({err}); the shard is "
                "damaged, re-create the bundle"
            ) from err
        if size != self.nbytes:
            raise BundleError(
                f"{where} has {size} bytes, the manifest says {self.nbytes}; the shard is "
                "truncated or was replaced, re-create the bundle"
            )
        if not isinstance(header, dict):
            raise BundleError(f"{where}: the header is not an object")
        _check_coverage(header, size - 8 - length, where)
        self.header = header
        self.data_start = 8 + length
        self.storage = map_file(self.path, size)
        self._identity = _identity(info)
        return self.storage

    def check(self, key: str) -> None:
        """Raise if the mapped file was truncated, replaced or rewritten since it was mapped.

        Reading pages of a mapped file that was cut shorter kills the process (SIGBUS), so
        every read of a key checks first. A change after this check and before the pages are
        touched (or to tensors already handed out) is not caught: see docs/format.md.
        """
        try:
            now = _identity(os.stat(self.path))
        except OSError as err:
            raise BundleError(
                f"{self.path} (used by key {key!r}) disappeared while the bundle was open "
                f"({err}); re-load the bundle"
            ) from err
        if now != self._identity:
            raise BundleError(
                f"{self.path} (used by key {key!r}) changed on disk while the bundle was open "
                "(its size, inode or modification time differ from when it was mapped); "
                "refusing to read it: re-load the bundle, and do not modify bundles in place"
            )


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _read_exactly(fd: int, count: int) -> bytes:
    parts = []
    while count > 0:
        piece = os.read(fd, min(count, 2**24))
        if not piece:
            break
        parts.append(piece)
        count -= len(piece)
    return b"".join(parts)


def _check_coverage(header: dict[str, Any], data_size: int, where: str) -> None:
    """The header's blobs must tile the data section exactly, as safetensors' reader demands.

    This is what catches a damaged header length even with ``verify=False``: a length that is
    off shifts where the data starts, and the blobs no longer end at the end of the file.
    """
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(v) is int for v in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise BundleError(
                f"{where}: header entry {name!r} has malformed data_offsets; the shard is "
                "damaged, re-create the bundle"
            )
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    end = 0
    for lo, hi in spans:
        if lo != end:
            break
        end = hi
    if end != data_size:
        raise BundleError(
            f"{where}: the safetensors header does not cover the data exactly (its blobs end "
            f"at byte {end} of a {data_size}-byte data section, or leave gaps); the header or "
            "its length field is damaged, re-create the bundle"
        )


def read_small_file(path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (a manifest, a journal).

    Links are not followed, a FIFO or device in its place is refused without blocking on it,
    and nothing beyond ``limit`` is read.

    Raises:
        OSError: It cannot be opened or read.
        BundleError: It is not a regular file, or is larger than ``limit``.
    """
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _BINARY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(
                f"{path} is not a regular file (a link, FIFO, device or directory); refusing "
                "to read it"
            )
        if info.st_size > limit:
            raise BundleError(
                f"{path} has {info.st_size} bytes, more than the {limit} this reader accepts; "
                "it is not a file tensorsnap wrote"
            )
        data = _read_exactly(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while being read
        raise BundleError(f"{path} grew past {limit} bytes while it was read")
    return data


def link_or_copy(source: str, file: str) -> int:
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


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
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
