"""Streaming a dataset's captures into shard files: append per batch, journal, seal at the end.

Each tensor leaf of each key has a shard file of its own; a batch's bytes are appended to it
after the batch has been checked against the first one. Row-major tensors concatenated along
dim 0 are their bytes concatenated, so when the run ends each shard already holds its whole
tensor: the safetensors header goes into the space reserved at the head of the file and the
manifest is written last.

After the first batch and then every ``_COMMIT_SECONDS``, the touched files are fsynced and
``extract-journal.json`` is replaced atomically with the state after the last completed batch
(batches done, each file's length and running CRC-32). A restarted run cuts every file back to
its journaled length and deletes files the journal does not know, so bytes written after the
last journal entry are never seen.

On machines with cores to spare (:func:`background_writes`), a batch's bytes are written and
checksummed by a writer thread while the next batch runs; the batch is checked, and its sizes
known, before it is handed over, and every journal entry, error and the end wait for the batch
in flight, so the journal still only ever names completed batches.

Written bytes are pushed to the disk while the run goes on, so that the end finds little left
to flush: the kernel is asked to start writing them back (:func:`_writeback`), and a flusher
thread (:func:`flushes`) fdatasyncs the shards every ``_FLUSH_BYTES``, one flush in flight at a
time. Both only move work earlier; what is durable is still decided by the journal's and the
end's fsyncs, which never run beside a flush and first take up its error (see ``_flushed``).
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ._errors import BundleError, TensorSnapError, attr, format_path
from ._manifest import JOURNAL, MANIFEST, Encoder, encode_manifest
from ._shards import (
    NATIVE,
    byte_view,
    dtype_from_name,
    dtype_name,
    fsync_dir,
    read_small_file,
    write_all,
)
from ._snapshot import Record, Snapshot

__all__ = [
    "BACKGROUND",
    "FLUSH",
    "TEMP",
    "Writer",
    "background_writes",
    "flushes",
    "read_journal",
    "tensor_bytes",
]

_JOURNAL_FORMAT = "tensorsnap-extract-journal"
_JOURNAL_VERSION = 1
# Journal (and fsync the files written since the last entry) at most this often: each entry
# costs one fsync per touched file; a restart redoes at most this much work.
_COMMIT_SECONDS = 2.0
# Write batches from a background thread: True, False, or None to decide by the cores present
# (benchmarks/bench_extract.py sets it to compare both)
BACKGROUND: bool | None = None
# the fewest cores with which None writes in the background: with one core the thread has
# nothing to overlap with; on 2 it already overlaps the writes' fsyncs with the next batch
# (1.16x on the disk-bound workload of bench_extract.py --sections background)
_BACKGROUND_CORES = 2
# Bytes reserved at the head of each shard for its safetensors header (written at the end).
_DATA_START = 256
# Blobs end on this many bytes, as in every bundle (docs/format.md).
_BLOB_ALIGN = 16
# Ask the kernel to start writing a shard's new bytes to disk once this many have piled up
# since the last request (see _writeback)
_WRITEBACK_BYTES = 8 * 2**20
# Flush the shards to the disk from a thread of its own: True, False, or None for the default
# (on; benchmarks/bench_extract.py turns it off to measure what it buys)
FLUSH: bool | None = None
# fdatasync the shards (in the flusher thread) once this many bytes were written since the last
# flush began; see Writer._flush_soon
_FLUSH_BYTES = 32 * 2**20
# Shard files kept open between batches; the least recently used beyond it are closed.
_MAX_OPEN = 256
_SHARD_FILE = re.compile(r"shard-\d{5}\.safetensors")
# the most bytes read as a journal (it holds one small entry per key and leaf)
_MAX_JOURNAL = 2**30
# leftovers of a commit that a kill interrupted: never complete
TEMP = (f".{JOURNAL}.tmp", f".{MANIFEST}.tmp")


def background_writes() -> bool:
    """Whether extract writes each batch from a thread while the next one runs."""
    if BACKGROUND is not None:
        return BACKGROUND
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return cores >= _BACKGROUND_CORES


def flushes() -> bool:
    """Whether extract fdatasyncs the shards from a flusher thread while the run goes on."""
    return True if FLUSH is None else FLUSH


# fdatasync where there is one: a shard's length is flushed with its data, its times need not be
_FDATASYNC: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def _flush(fds: list[int]) -> None:
    """Flush the files to the disk (in the flusher thread)."""
    for fd in fds:
        _FDATASYNC(fd)


def read_journal(root: str) -> dict[str, Any]:
    path = os.path.join(root, JOURNAL)
    try:
        # NaN and Infinity are not JSON: a journal holding them was edited (int(inf) would
        # escape as an OverflowError), so they are refused as the manifest's reader does
        state = json.loads(read_small_file(path, _MAX_JOURNAL), parse_constant=_no_constant)
    except (OSError, ValueError, RecursionError) as err:
        raise BundleError(f"{path} cannot be read ({err}); remove {root} and start over") from err
    if not isinstance(state, dict) or state.get("format") != _JOURNAL_FORMAT:
        raise BundleError(f"{path} is not an extract journal; remove {root} and start over")
    if state.get("version") != _JOURNAL_VERSION:
        raise BundleError(
            f"{path} has journal version {state.get('version')!r}; this tensorsnap resumes "
            f"version {_JOURNAL_VERSION} only: finish it with the tensorsnap that started it"
        )
    return state


def _find_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range`` through ctypes (the os module has no binding), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _find_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, no wait


def _writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``nbytes`` at ``offset`` of ``fd`` to disk, without waiting for it.

    Without it the kernel holds a batch's bytes as dirty pages until the journal's or the
    end's fsync (it starts writing back on its own only at 10% of memory, or after 30 s), so
    the disk idles while the model runs and the model idles during that fsync; started per
    batch, the disk writes while the next batch runs, and the fsyncs find little left to do
    (benchmarks/bench_extract.py --sections disk: 0.64x of a dd-style write without it). Only
    a hint: durability still comes from fsync, so a failure is ignored.
    """
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


# -- writing ----------------------------------------------------------------------------------


class _Leaf:
    """One tensor position in a key's value: a shard file its batches are appended to."""

    __slots__ = ("crc32", "device", "dtype", "file", "nbytes", "rest", "rows", "unflushed")

    def __init__(self, file: str, dtype: torch.dtype, rest: list[int] | None, device: str) -> None:
        self.file = file
        self.dtype = dtype
        self.rest = rest  # the shape beyond dim 0; None for 0-dim values (stacked)
        self.device = device
        self.rows = 0
        self.nbytes = 0
        self.crc32 = 0
        self.unflushed = _DATA_START  # where the bytes not yet handed to _writeback start

    def shape(self) -> list[int]:
        return [self.rows, *(self.rest or [])]

    def state(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "dtype": dtype_name(self.dtype),
            "rest": self.rest,
            "device": self.device,
            "rows": self.rows,
            "nbytes": self.nbytes,
            "crc32": self.crc32,
        }


class _Key:
    __slots__ = ("leaves", "record", "tree")

    def __init__(self, record: Record, tree: Any, leaves: list[_Leaf]) -> None:
        self.record = record
        self.tree = tree
        self.leaves = leaves


class Writer:
    """Appends batches to the shard files of one output directory, journals, finishes."""

    def __init__(
        self,
        root: str,
        options: dict[str, Any],
        model: dict[str, str],
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.root = root
        self.options = options
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.keys: dict[str, _Key] = {}
        self.batches = 0
        # running CRC-32 of the batches' inputs (see _extract.inputs_crc32); None when resumed
        # from a journal written before it was kept
        self.inputs_crc32: int | None = 0
        self.defined = False
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._dirty: set[str] = set()
        self._last_commit = time.monotonic()
        self._added = 0  # batches handed to add(), written or in flight
        self._thread: ThreadPoolExecutor | None = None
        if background_writes():
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="tensorsnap-extract")
        self._pending: Future[None] | None = None  # the batch being written
        self._committing: Future[None] | None = None  # a journal entry being made after it
        self._flusher: ThreadPoolExecutor | None = None
        if flushes():
            self._flusher = ThreadPoolExecutor(1, thread_name_prefix="tensorsnap-flush")
        self._flushing: Future[None] | None = None  # the flush in flight
        self._flush_error: OSError | None = None  # what a flush raised, raised ever after
        self._unflushed = 0  # bytes written since the last flush began

    # -- one batch ------------------------------------------------------------------------

    def add(
        self,
        index: int,
        snap: Snapshot,
        inputs_crc32: int | None = None,
        ready: Sequence[Any] = (),
    ) -> int:
        """Check batch ``index``'s values against the first batch's, then append them.

        ``inputs_crc32`` is the inputs' running checksum after this batch, journaled with it.
        ``ready`` are fences (objects with ``synchronize()``) to wait for before the values'
        bytes are read: copies still in flight into them (see ``_rows``).
        """
        values = []
        for record in snap.records:
            encoder = Encoder(f"batch {index}: snap[{record.key!r}]")
            tree = encoder.node(snap[record.key], [])
            values.append((record, tree, encoder.tensors))
        # the batch before is out (and its error, if any, raised here); a journal entry after
        # it may still be in the making, overlapping this batch's run
        self._wait_write()
        if not self.defined:
            self._define(values)
        else:
            self._check(index, values)
        # every check passed: now write (new sizes are applied only once all bytes are out)
        jobs = [
            (leaf, t)
            for record, _, tensors in values
            for leaf, t in zip(self.keys[record.key].leaves, tensors)
        ]
        self._added = index + 1
        if self._thread is None:
            self._write(index, jobs, inputs_crc32, ready)
        else:
            # the writer thread reads on its own stream: it first waits for what this thread
            # queued on its current streams (copies made on a side stream, say)
            fences = list(ready)
            for device in {t.device for _, t in jobs if t.device.type == "cuda"}:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                fences.append(event)
            self._pending = self._thread.submit(self._write, index, jobs, inputs_crc32, fences)
        return sum(t.numel() * t.element_size() for _, t in jobs)

    def _write(
        self,
        index: int,
        jobs: list[tuple[_Leaf, torch.Tensor]],
        inputs_crc32: int | None,
        ready: Sequence[Any] = (),
    ) -> None:
        """Append one checked batch; its sizes and checksums count once every byte is out."""
        for event in ready:
            event.synchronize()
        updates = []
        for leaf, t in jobs:
            data = tensor_bytes(t)
            fd = self._fd(leaf.file)
            write_all(fd, data)
            self._dirty.add(leaf.file)
            end = _DATA_START + leaf.nbytes + len(data)  # a leaf is written once per batch
            if end - leaf.unflushed >= _WRITEBACK_BYTES:
                _writeback(fd, leaf.unflushed, end - leaf.unflushed)
                leaf.unflushed = end
            rows = int(t.shape[0]) if t.dim() else 1
            updates.append((leaf, rows, len(data), zlib.crc32(data, leaf.crc32)))
            self._unflushed += len(data)
        if self._unflushed >= _FLUSH_BYTES:
            # the files still open (one closed to stay under _MAX_OPEN was fsynced then)
            self._flush_soon([self._fds[leaf.file] for leaf, _ in jobs if leaf.file in self._fds])
        for leaf, rows, nbytes, crc in updates:
            leaf.rows += rows
            leaf.nbytes += nbytes
            leaf.crc32 = crc
        self.batches = index + 1
        self.inputs_crc32 = inputs_crc32

    def _flush_soon(self, fds: list[int]) -> None:
        """Have the flusher thread fdatasync ``fds`` (the files just written), unless a flush
        is still in flight (the next one covers these bytes too).

        The end's fsync costs about as long as the bytes not yet flushed take to reach the
        disk (on a VM, the host flushing its own cache too, which no writeback hint starts:
        ~0.85 ms per MB here), so without this it came after all the run's work instead of
        beside it (benchmarks/bench_extract.py --sections disk, 2-core VM with
        OMP_WAIT_POLICY=PASSIVE: 0.72x -> 0.91x of a dd-style write). Fsyncs made in the
        writing thread would stop it instead (a synthetic loop of 8 batches of 57 MB: 1.57 s
        against 0.89 s from a thread), hence the thread of its own.
        """
        if self._flusher is None:
            return
        if self._flushing is not None:
            if not self._flushing.done():
                return
            self._flushed()  # raises what it raised
        self._flushing = self._flusher.submit(_flush, list(dict.fromkeys(fds)))
        self._unflushed = 0

    def _flushed(self) -> None:
        """Until the flush in flight is done; raises what it or any flush before raised.

        Linux reports a file's write error once to each open file, and the flusher syncs the
        writer's own descriptors, so once a flush has seen one, the journal's and the end's
        fsyncs of the same files would succeed: every later journal entry and the end are
        refused instead, and the journal keeps the last entry made before it. Called before
        each fsync that makes bytes count (journal, end, a file closed to stay under
        ``_MAX_OPEN``), so that they never run beside a flush.
        """
        flushing, self._flushing = self._flushing, None
        if flushing is not None:
            error = flushing.exception()  # waits for it
            if error is not None and self._flush_error is None:
                self._flush_error = error if isinstance(error, OSError) else OSError(str(error))
        if self._flush_error is not None:
            raise self._flush_error

    def foreground(self) -> None:
        """Write every batch in the caller's thread (extract with a memory budget: one batch
        is held at a time)."""
        self.wait()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def wait(self) -> None:
        """Until the batch and journal entry in flight are out; raises what they raised (the
        batch's error first)."""
        futures = [f for f in (self._pending, self._committing) if f is not None]
        self._pending = self._committing = None
        errors = [f.exception() for f in futures]  # waits for each
        for error in errors:
            if error is not None:
                raise error

    def _wait_write(self) -> None:
        """Until the batch in flight is written; raises what writing it raised, or what a
        journal entry that has finished raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        if self._committing is not None and self._committing.done():
            committing, self._committing = self._committing, None
            committing.result()

    def _define(self, values: list[tuple[Record, Any, list[torch.Tensor]]]) -> None:
        count = itertools.count()
        for record, tree, tensors in values:
            leaves = []
            for t in tensors:
                leaf = _Leaf(
                    f"shard-{next(count):05d}.safetensors",
                    t.dtype,
                    list(t.shape[1:]) if t.dim() else None,
                    str(t.device),
                )
                _create(os.path.join(self.root, leaf.file))
                leaves.append(leaf)
            self.keys[record.key] = _Key(record, tree, leaves)
        self.defined = True
        fsync_dir(self.root)

    def _check(self, index: int, values: list[tuple[Record, Any, list[torch.Tensor]]]) -> None:
        arrived = {record.key for record, _, _ in values}
        for name in self.keys:
            if name not in arrived:
                raise TensorSnapError(
                    f"key {name!r} is missing from batch {index} (the first batch had it); every "
                    "batch must produce the same keys: exclude it (exclude=[...]) if its module "
                    "does not run for every batch"
                )
        for record, tree, tensors in values:
            key = self.keys.get(record.key)
            if key is None:
                raise TensorSnapError(
                    f"key {record.key!r} appears in batch {index} but not in the first batch; "
                    "every batch must produce the same keys: exclude it (exclude=[...])"
                )
            where = _difference(key.tree, tree, [])
            if where is not None:
                raise TensorSnapError(
                    f"batch {index}: {format_path(f'snap[{record.key!r}]', where)} differs in "
                    "structure or in a non-tensor value from the first batch's; values are "
                    "concatenated leaf by leaf, so they must have the same structure: exclude "
                    "this key"
                )
            paths = _tensor_paths(tree)
            for i, (leaf, t) in enumerate(zip(key.leaves, tensors)):
                rest = list(t.shape[1:]) if t.dim() else None
                if t.dtype == leaf.dtype and rest == leaf.rest:
                    continue
                name = format_path(f"snap[{record.key!r}]", paths.get(i, []))
                expected = f"{leaf.dtype} of shape " + (
                    "() (0-dim)" if leaf.rest is None else f"(*, {', '.join(map(str, leaf.rest))})"
                )
                raise TensorSnapError(
                    f"batch {index}: {name} is {t.dtype} of shape {tuple(t.shape)}, the first "
                    f"batch had {expected}; values are concatenated along dim 0, so their dtype "
                    "and every dim after the first must match in all batches (pad or crop the "
                    "batches to one length, or exclude this key)"
                )

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            self._fds.move_to_end(file)
            return fd
        if len(self._fds) >= _MAX_OPEN:
            self._flushed()  # the flush in flight may be using the file closed here
            old, old_fd = self._fds.popitem(last=False)
            if old in self._dirty:
                os.fsync(old_fd)
                self._dirty.discard(old)
            os.close(old_fd)
        fd = os.open(os.path.join(self.root, file), os.O_WRONLY | os.O_APPEND)
        self._fds[file] = fd
        return fd

    # -- journal ----------------------------------------------------------------------------

    def maybe_commit(self) -> None:
        """Journal after the first batch and then every ``_COMMIT_SECONDS``.

        With a writer thread the entry is made there, after the batch in flight (the thread
        runs its jobs in order), so that its fsyncs, the disk's slowest part, overlap the next
        batch's run instead of stopping it. One entry is in the making at a time: one still
        not made when the next is due (a disk slower than the batches) is waited for.
        """
        if time.monotonic() - self._last_commit < _COMMIT_SECONDS and self._added != 1:
            return
        if self._thread is None:
            self.commit()
        else:
            committing, self._committing = self._committing, None
            if committing is not None:
                committing.result()  # raises what the entry before raised
            self._last_commit = time.monotonic()
            self._committing = self._thread.submit(self._journal)

    def commit(self) -> None:
        """Make the state after the last completed batch durable, then journal it."""
        self.wait()
        self._journal()

    def _journal(self) -> None:
        """``commit`` once nothing is in flight (in the writer thread, after the batch)."""
        self._flushed()
        for file in sorted(self._dirty):
            os.fsync(self._fds[file])
        self._dirty.clear()
        state = {
            "format": _JOURNAL_FORMAT,
            "version": _JOURNAL_VERSION,
            "options": self.options,
            "model": self.model,
            "batches": self.batches,
            "inputs_crc32": self.inputs_crc32,
            "keys": [
                {
                    "record": [
                        k.record.key,
                        k.record.module,
                        k.record.call,
                        k.record.op,
                        k.record.kind,
                    ],
                    "value": k.tree,
                    "leaves": [leaf.state() for leaf in k.leaves],
                }
                for k in self.keys.values()
            ]
            if self.defined
            else None,
        }
        _replace(self.root, JOURNAL, json.dumps(state, separators=(",", ":")).encode())
        self._last_commit = time.monotonic()

    def recover(self, state: dict[str, Any], entries: set[str]) -> None:
        """Continue from a journal: cut files back to it, drop files it does not know."""
        path = os.path.join(self.root, JOURNAL)
        try:
            self.batches = int(state["batches"])
            crc = state.get("inputs_crc32")
            self.inputs_crc32 = None if crc is None else int(crc)
            known = set()
            if state["keys"] is not None:
                for item in state["keys"]:
                    key, module, call, op, kind = item["record"]
                    leaves = []
                    for spec in item["leaves"]:
                        leaf = _Leaf(
                            spec["file"],
                            dtype_from_name(spec["dtype"], path),
                            spec["rest"],
                            spec["device"],
                        )
                        leaf.rows, leaf.nbytes, leaf.crc32 = (
                            int(spec["rows"]),
                            int(spec["nbytes"]),
                            int(spec["crc32"]),
                        )
                        leaf.unflushed = _DATA_START + leaf.nbytes
                        if not _SHARD_FILE.fullmatch(leaf.file):
                            raise ValueError(f"shard name {leaf.file!r}")
                        leaves.append(leaf)
                        known.add(leaf.file)
                    record = Record(key, module, call, op, kind, None, None, 0)
                    self.keys[key] = _Key(record, item["value"], leaves)
                self.defined = True
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"{path} is damaged ({type(err).__name__}: {err}); remove {self.root} and start "
                "over"
            ) from err
        for key in self.keys.values():
            for leaf in key.leaves:
                file = os.path.join(self.root, leaf.file)
                size = os.path.getsize(file) if os.path.isfile(file) else -1
                if size < _DATA_START + leaf.nbytes:
                    raise BundleError(
                        f"{file} (key {key.record.key!r}) is missing or shorter than {JOURNAL} "
                        f"says ({size} < {_DATA_START + leaf.nbytes} bytes); the directory was "
                        f"damaged: remove {self.root} and start over"
                    )
                if size != _DATA_START + leaf.nbytes:  # bytes of a batch never journaled
                    os.truncate(file, _DATA_START + leaf.nbytes)
        for name in entries:
            if _SHARD_FILE.fullmatch(name) and name not in known:
                os.unlink(os.path.join(self.root, name))
        fsync_dir(self.root)

    def abort(self) -> None:
        """After an error: journal the batches completed so far, close the files."""
        if self._thread is not None:  # the batch in flight ends first, even on a second ^C
            self._thread.shutdown(wait=True)
            self._thread = None
        try:
            self.wait()
        except Exception:
            pass  # the batch in flight is not complete; the error being raised matters more
        try:
            self.commit()
        except OSError:
            pass  # the error being raised matters more; the last journal entry still holds
        self._close()

    def _close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._flusher is not None:  # the flush in flight uses the files closed here
            self._flusher.shutdown(wait=True)
            self._flusher = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- the end ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Headers into every shard, then the manifest (the commit point), then no journal."""
        from . import __version__

        self.wait()
        self._flushed()
        # one fsync per shard, in _seal after its header: the manifest is the commit point, so
        # data and header need only both be durable before it (a reopened file's fsync still
        # reports a write error that no fsync has seen: Linux samples it as unseen at open)
        self._close()
        self._dirty.clear()
        records: list[dict[str, Any]] = []
        shards: list[dict[str, Any]] = []
        for key in self.keys.values():
            blobs: list[dict[str, Any]] = []
            tensors: list[dict[str, Any]] = []
            for leaf in key.leaves:
                shards.append({"file": leaf.file, "nbytes": _seal(self.root, leaf)})
                numel = 1
                for size in leaf.shape():
                    numel *= size
                blob = None
                if numel:
                    blob = len(blobs)
                    blobs.append(
                        {
                            "shard": len(shards) - 1,
                            "name": "data",
                            "dtype": dtype_name(_blob_dtype(leaf.dtype)),
                            "offset": 0,
                            "nbytes": _padded(leaf.nbytes),
                            "crc32": _padded_crc(leaf),
                        }
                    )
                tensors.append(
                    {
                        "dtype": dtype_name(leaf.dtype),
                        "shape": leaf.shape(),
                        "stride": _contiguous(leaf.shape()),
                        "blob": blob,
                        "offset": 0,
                        "device": leaf.device,
                    }
                )
            r = key.record
            lone = key.tree.get("type") == "tensor" and len(key.leaves) == 1
            records.append(
                {
                    "key": r.key,
                    "module": r.module,
                    "call": r.call,
                    "op": r.op,
                    "kind": r.kind,
                    "shape": key.leaves[0].shape() if lone else None,
                    "dtype": dtype_name(key.leaves[0].dtype) if lone else None,
                    "nbytes": sum(leaf.nbytes for leaf in key.leaves),
                    "blobs": blobs,
                    "tensors": tensors,
                    "value": key.tree,
                }
            )
        info = {"options": self.options, "model": self.model, "batches": self.batches}
        manifest = encode_manifest(
            records,
            shards,
            version=__version__,
            rank=self.rank,
            world_size=self.world_size,
            extra={"extract": info},
        )
        _replace(self.root, MANIFEST, manifest)
        os.unlink(os.path.join(self.root, JOURNAL))
        fsync_dir(self.root)


def _create(path: str) -> None:
    """A new shard: a placeholder header (an empty safetensors file) in the reserved space."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, _header(torch.uint8, 0))
    finally:
        os.close(fd)


def _seal(root: str, leaf: _Leaf) -> int:
    """Pad the data to the blob alignment and write the real header; returns the file size."""
    path = os.path.join(root, leaf.file)
    padded = _padded(leaf.nbytes)
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, _DATA_START + leaf.nbytes)
        if padded > leaf.nbytes:
            os.pwrite(fd, bytes(padded - leaf.nbytes), _DATA_START + leaf.nbytes)
        os.pwrite(fd, _header(_blob_dtype(leaf.dtype), padded), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return _DATA_START + padded


def _header(dtype: torch.dtype, nbytes: int) -> bytes:
    entry = {
        "dtype": NATIVE[dtype],
        "shape": [nbytes // dtype.itemsize],
        "data_offsets": [0, nbytes],
    }
    header = {"data": entry, "__metadata__": {"format": "pt", "writer": "tensorsnap-bundle"}}
    text = json.dumps(header, separators=(",", ":")).encode()
    if 8 + len(text) > _DATA_START:  # pragma: no cover - 20-digit sizes still fit
        raise BundleError(f"safetensors header of {len(text)} bytes does not fit")
    # pad with spaces (as safetensors does): the header's length covers the padding
    return (_DATA_START - 8).to_bytes(8, "little") + text.ljust(_DATA_START - 8)


def _blob_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in NATIVE else torch.uint8


def _padded(nbytes: int) -> int:
    return nbytes + (-nbytes) % _BLOB_ALIGN


def _padded_crc(leaf: _Leaf) -> int:
    return zlib.crc32(bytes(_padded(leaf.nbytes) - leaf.nbytes), leaf.crc32)


def _contiguous(shape: list[int]) -> list[int]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return stride[::-1]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements in row-major order, as bytes (copied only if not already so)."""
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return byte_view(flat.view(torch.uint8))


def _replace(root: str, name: str, data: bytes) -> None:
    """Write ``root/name`` atomically: a temp file, fsynced, renamed over it, directory fsynced."""
    temp = os.path.join(root, f".{name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, os.path.join(root, name))
    except BaseException:  # a full disk: leave no temp file behind, the old file stands
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_dir(root)


# -- comparing value trees --------------------------------------------------------------------


def _children(node: Any) -> list[tuple[object, Any]]:
    """(path part, child node) pairs of a manifest value node."""
    kind = node.get("type") if isinstance(node, dict) else None
    if kind in ("tuple", "list", "set", "frozenset"):
        return list(enumerate(node["items"]))
    if kind == "namedtuple":
        return [(attr(str(f)), v) for f, v in zip(node["fields"], node["items"])]
    if kind in ("dict", "mapping"):
        return [(k.get("value", "?"), v) for k, v in node["items"]]
    if kind == "dataclass":
        pairs = [(attr(name), v) for name, v in node["fields"]]
        return pairs + [(k.get("value", "?"), v) for k, v in node.get("items", [])]
    if kind == "object":
        return [(attr(name), v) for name, v in node["attrs"]]
    return []


def _difference(a: Any, b: Any, parts: list[object]) -> list[object] | None:
    """The path of the first place where two value trees differ, or None."""
    if a == b:
        return None
    ca, cb = _children(a), _children(b)
    if ca and len(ca) == len(cb) and _shallow(a) == _shallow(b):
        for (part, x), (_, y) in zip(ca, cb):
            found = _difference(x, y, [*parts, part])
            if found is not None:
                return found
    return parts


def _shallow(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in ("items", "fields", "attrs")}


def _tensor_paths(tree: Any) -> dict[int, list[object]]:
    found: dict[int, list[object]] = {}

    def walk(node: Any, parts: list[object]) -> None:
        if isinstance(node, dict) and node.get("type") == "tensor":
            found.setdefault(node["index"], parts)
        for part, child in _children(node):
            walk(child, [*parts, part])

    walk(tree, [])
    return found


# -- progress ---------------------------------------------------------------------------------
