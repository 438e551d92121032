"""A store that keeps copies in memory up to a budget and spills the oldest ones to disk.

Spilling writes a value's tensors into a safetensors shard (the same layout as a bundle shard)
from a background thread, then points those very tensor objects at a memory map of the file
(``Tensor.set_``): the value keeps its types, identities and views, reads come back from the
page cache or the disk, and the memory the copies held is freed. ``save`` hard-links these
shard files into a bundle instead of writing the bytes again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import deque
from os import PathLike
from typing import Any

import torch

from . import _validate
from ._errors import BundleError, TensorSnapError
from ._manifest import tensors_in
from ._shards import BlobRef, Span, map_file, plan_spans, write_all, write_shard

__all__ = ["SpillStore"]

# Values spilled together go into one shard of at most about this size.
_SPILL_SHARD = 256 * 2**20
# The writer may fall behind by this many bytes (or one value) before put() waits for it.
_MIN_SLACK = 2**20
_MAX_SLACK = 64 * 2**20


class _Item:
    """One value and where it lives: ``ram``, ``queued`` (being written), ``written`` (waiting
    to be swapped in the caller's thread), ``disk``, ``pinned`` (stays in memory) or
    ``dropped`` (replaced or closed)."""

    __slots__ = ("handed_out", "key", "located", "nbytes", "state", "value")

    def __init__(self, key: str, value: Any, nbytes: int) -> None:
        self.key = key
        self.value = value
        self.nbytes = nbytes
        self.state = "ram"
        self.handed_out = False
        self.located: list[int] = []


# (tensor, its version when written, mapped storage, element offset, blob, byte offset in blob)
_Swap = list[tuple[torch.Tensor, int, torch.UntypedStorage, int, BlobRef, int]]


class _State:
    """Everything the writer thread shares with the store (the thread never holds the store,
    so that the store can be collected and its finalizer can run)."""

    def __init__(self, max_memory: int, spill_dir: str | None) -> None:
        self.max_memory = max_memory
        self.slack = min(max(max_memory // 8, _MIN_SLACK), _MAX_SLACK)
        self.parent = spill_dir
        self.directory: str | None = None
        self.cond = threading.Condition()
        self.items: dict[str, _Item] = {}
        self.order: deque[_Item] = deque()  # candidates for spilling, oldest first
        self.queue: deque[_Item] = deque()
        self.ram = 0  # bytes of values held in memory, queued ones included
        self.queued = 0  # bytes queued or being written
        self.deferred: list[tuple[_Item, _Swap]] = []
        self.located: dict[int, tuple[torch.Tensor, int, BlobRef, int]] = {}
        self.error: BaseException | None = None
        self.closed = False
        self.thread: threading.Thread | None = None
        self.shards = 0
        self.blobs = 0


class SpillStore:
    """Keeps values in memory up to ``max_memory`` bytes, then spills the oldest to disk.

    ``put`` returns at once while the values in memory fit the budget. Past it, the oldest
    values are queued for a background writer; ``put`` waits only when the writer falls behind
    by more than ``max(slack, the value being put)`` bytes, where ``slack`` is an eighth of the
    budget (between 1 MiB and 64 MiB). Memory therefore stays near ``max_memory`` plus that.
    Spilled values read back transparently from a private memory map of their shard; only CPU
    tensors spill (others stay where they are). The spill files live in a fresh directory
    (inside ``spill_dir`` when given, else the system temp dir) removed by ``close()`` or when
    the store is garbage collected; tensors already handed out stay readable after that.

    Args:
        max_memory: Budget in bytes for values held in memory (0 spills everything).
        spill_dir: Where to create the spill directory; None for the system temp dir.

    Example:
        >>> import torch
        >>> store = SpillStore(max_memory=1000, spill_dir=None)
        >>> store.put("a", torch.ones(1000), 4000)  # over budget: written to disk
        >>> store.flush()
        >>> store.get("a").sum().item(), store.memory
        (1000.0, 0)
        >>> store.close()
    """

    def __init__(self, max_memory: int, spill_dir: str | PathLike[str] | None) -> None:
        if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 0:
            raise TensorSnapError(f"max_memory={max_memory!r}: expected a number of bytes >= 0")
        parent = _validate.spill_dir(spill_dir)
        _probe(parent)  # an unusable directory fails now, before the model runs
        self._state = _State(max_memory, parent)
        self._finalizer = weakref.finalize(self, _shutdown, self._state)

    # -- Store -----------------------------------------------------------------------------

    def put(self, key: str, value: Any, nbytes: int) -> None:
        """Keep ``value``; spill older values if the budget is exceeded."""
        s = self._state
        with s.cond:
            if s.closed:
                raise TensorSnapError(f"cannot store {key!r}: the spill store was closed")
            _apply_deferred(s)
            old = s.items.pop(key, None)
            if old is not None:
                _drop(s, old)
            item = _Item(key, value, nbytes)
            s.items[key] = item
            s.order.append(item)
            s.ram += nbytes
            # after a failed write everything stays in memory; flush() reports the failure
            if s.ram - s.queued > s.max_memory and s.error is None:
                self._queue_oldest()
            # back-pressure: the writer may fall behind by the slack or this one value
            while s.queued > max(s.slack, nbytes) and s.error is None and not s.closed:
                s.cond.wait()

    def get(self, key: str) -> Any:
        """The value, the same object every time (spilled tensors are memory-mapped)."""
        s = self._state
        with s.cond:
            _apply_deferred(s)
            item = s.items[key]
            item.handed_out = True
            return item.value

    def close(self) -> None:
        """Drop every value and remove the spill directory."""
        self._finalizer()

    # -- beyond the protocol ---------------------------------------------------------------

    @property
    def max_memory(self) -> int:
        """The budget in bytes."""
        return self._state.max_memory

    @property
    def memory(self) -> int:
        """Bytes of values held in memory now (values being written included)."""
        return self._state.ram

    @property
    def spill_dir(self) -> str | None:
        """The directory spill shards are written to, once the first value spilled."""
        return self._state.directory

    def flush(self) -> None:
        """Wait until every queued value is on disk (and swapped, unless handed out).

        Raises:
            BundleError: A spill write failed since the last ``flush`` (a full disk, a
                directory removed): the message names the directory; every value is still
                readable, those that could not be written from memory. ``put`` never raises
                it, since it runs inside the model's forward; ``capture`` calls this when the
                block ends.
        """
        s = self._state
        with s.cond:
            while s.queued and s.error is None and not s.closed:
                s.cond.wait()
            _apply_deferred(s)
            error, s.error = s.error, None
        if error is not None:
            where = s.directory or s.parent or tempfile.gettempdir()
            raise BundleError(
                f"could not spill values to {where} ({error}); the values that did not fit stay "
                "in memory and are all readable. Free space there or pass another spill_dir="
            ) from error

    def _peek(self, key: str) -> Any:
        """The value, for ``save``, without marking it handed out."""
        with self._state.cond:
            return self._state.items[key].value

    def _locate(self, t: torch.Tensor) -> tuple[BlobRef, int] | None:
        """Where ``t``'s bytes already are in a spill shard, if it is unchanged since."""
        with self._state.cond:
            found = self._state.located.get(id(t))
        if found is None or found[0] is not t or t._version != found[1]:
            return None
        return found[2], found[3]

    def _queue_oldest(self) -> None:
        s = self._state
        while s.ram - s.queued > s.max_memory and s.order:
            item = s.order.popleft()
            if item.state != "ram":
                continue
            item.state = "queued"
            s.queue.append(item)
            s.queued += item.nbytes
        if s.queue:
            if s.thread is None:
                s.thread = threading.Thread(
                    target=_writer, args=(s,), name="tensorsnap-spill", daemon=True
                )
                s.thread.start()
            s.cond.notify_all()


def _probe(parent: str | None) -> None:
    """Check that spill files can be created in ``parent`` (created if missing)."""
    where = parent if parent is not None else tempfile.gettempdir()
    try:
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tensorsnap-probe-", dir=where)
        try:
            write_all(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        if parent is None:  # nobody named this directory: say which one it is and how to move
            raise BundleError(
                f"the default temporary directory {where!r} (spill_dir=None) cannot hold spill "
                f"files ({err}); pass spill_dir= a writable directory with free space, or set "
                "the TMPDIR environment variable to one"
            ) from err
        raise BundleError(
            f"spill_dir={where!r} cannot hold spill files ({err}); pass a writable directory "
            "with free space as spill_dir=, or None for the system temp dir"
        ) from err


def _drop(s: _State, item: _Item) -> None:
    if item.state in ("ram", "queued", "written", "pinned"):
        s.ram -= item.nbytes
    if item.state == "queued":
        s.queued -= item.nbytes
    for ident in item.located:
        s.located.pop(ident, None)
    item.state = "dropped"
    item.value = None


def _writer(s: _State) -> None:
    while True:
        with s.cond:
            while not s.queue and not s.closed:
                s.cond.wait()
            if s.closed:
                return
            batch: list[_Item] = []
            size = 0
            while s.queue and (not batch or size + s.queue[0].nbytes <= _SPILL_SHARD):
                item = s.queue.popleft()
                if item.state == "queued":
                    batch.append(item)
                    size += item.nbytes
            values = [item.value for item in batch]
        try:
            swaps = _write_batch(s, values)
        except Exception as err:  # a full disk, most likely: keep the values in memory
            with s.cond:
                # without its traceback: the frames hold the values and maps being written
                s.error = err.with_traceback(None)
                # nothing more is queued after a failure, but values queued before it are
                # pinned too, so that flush() does not wait for a writer that gave up
                for item in [*batch, *s.queue]:
                    if item.state == "queued":
                        item.state = "pinned"
                        s.queued -= item.nbytes
                s.queue.clear()
                s.cond.notify_all()
            continue
        with s.cond:
            for item, swap in zip(batch, swaps):
                if item.state != "queued":  # replaced or closed while it was being written
                    continue
                s.queued -= item.nbytes
                if not swap:
                    item.state = "pinned"  # nothing that can spill (e.g. CUDA tensors only)
                elif item.handed_out:
                    # the caller may be computing with it right now: swap in its own thread
                    item.state = "written"
                    s.deferred.append((item, swap))
                else:
                    _swap(s, item, swap)
            s.cond.notify_all()


def _write_batch(s: _State, values: list[Any]) -> list[_Swap]:
    """Write the tensors of ``values`` into one new shard; return how to point them at it."""
    if s.directory is None:
        if s.parent is not None:
            os.makedirs(s.parent, exist_ok=True)
        s.directory = tempfile.mkdtemp(prefix="tensorsnap-spill-", dir=s.parent)
    plans = []
    spans: list[Span] = []
    for value in values:
        tensors = [t for t in tensors_in(value) if t.device.type == "cpu"]
        versions = [t._version for t in tensors]
        value_spans, placements = plan_spans(tensors)
        for span in value_spans:
            span.name = str(s.blobs)
            s.blobs += 1
        plans.append((tensors, versions, len(spans), placements))
        spans.extend(value_spans)
    if not spans:
        return [[] for _ in values]
    path = os.path.join(s.directory, f"spill-{s.shards:06d}.safetensors")
    s.shards += 1
    try:
        size = write_shard(path, spans, fsync=False)
    except BaseException:  # a partial shard is never mapped: remove it
        if os.path.lexists(path):
            os.unlink(path)
        raise
    data_start = size - sum(span.nbytes for span in spans)
    storage = map_file(path, size)
    refs = [
        BlobRef(path, size, data_start, sp.name, sp.offset, sp.nbytes, sp.dtype, sp.crc32)
        for sp in spans
    ]
    swaps: list[_Swap] = []
    for tensors, versions, first, placements in plans:
        swap: _Swap = []
        for t, version, (index, offset) in zip(tensors, versions, placements):
            if index is None:
                continue
            ref = refs[first + index]
            start = data_start + ref.offset + offset
            swap.append((t, version, storage, start // t.element_size(), ref, offset))
        swaps.append(swap)
    return swaps


def _swap(s: _State, item: _Item, swap: _Swap) -> None:
    """Point the value's tensors at the file; the memory they held is freed with them."""
    if any(t._version != version for t, version, *_ in swap):
        item.state = "pinned"  # changed in place while it was written: keep it as it is now
        return
    swapped = []
    with torch.no_grad():
        for t, _, storage, offset, ref, blob_offset in swap:
            try:
                t.set_(storage, offset, t.shape, t.stride())
            except RuntimeError:  # e.g. a tensor autograd forbids changing: it stays in memory
                continue
            swapped.append((t, ref, blob_offset))
    # views share one version counter, which every set_ bumps: read it after the last one
    for t, ref, blob_offset in swapped:
        s.located[id(t)] = (t, t._version, ref, blob_offset)
        item.located.append(id(t))
    item.state = "disk"
    s.ram -= item.nbytes


def _apply_deferred(s: _State) -> None:
    deferred, s.deferred = s.deferred, []
    for item, swap in deferred:
        if item.state == "written":
            _swap(s, item, swap)


def _shutdown(s: _State) -> None:
    with s.cond:
        s.closed = True
        for item in s.items.values():
            item.value = None
            item.state = "dropped"
        s.items.clear()
        s.order.clear()
        s.queue.clear()
        s.deferred.clear()
        s.located.clear()
        s.ram = s.queued = 0
        s.error = None
        s.cond.notify_all()
    thread = s.thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()
    if s.directory is not None:
        shutil.rmtree(s.directory, ignore_errors=True)
