"""A store that keeps copies in memory up to a budget and spills the oldest ones to disk.

Spilling writes a value's tensors into a safetensors shard (the same layout as a bundle shard)
from a background thread, then points those very tensor objects at a memory map of the file
(``Tensor.set_``): the value keeps its types, identities and views, reads come back from the
page cache or the disk, and the memory the copies held is freed. ``save`` hard-links these
shard files into a bundle instead of writing the bytes again.

Copies kept on an accelerator spill too. Their bytes reach the file through the writer's pinned
staging ring (:mod:`._offload`), ordered after an event that ``put`` recorded on the stream the
value was made on; the store then lets go of the device tensors (their memory returns to the
device) and keeps the value with CPU tensors mapped from the file in their place. Reading such a
key gives a new copy on the device each value was captured on (views of one storage stay views of
one copy), so a spilled value reads back where an unspilled one would; it is a fresh copy at each
read, not the same object.
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
from ._copy import Copier
from ._errors import BundleError, TensorSnapError
from ._manifest import tensors_in
from ._offload import Offload
from ._shards import BlobRef, Span, map_file, plan_spans, write_all, write_shard
from ._tree import tensors as _tensors

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

    __slots__ = ("handed_out", "key", "located", "marks", "nbytes", "origin", "state", "value")

    def __init__(self, key: str, value: Any, nbytes: int, marks: dict[torch.device, Any]) -> None:
        self.key = key
        self.value = value
        self.nbytes = nbytes
        self.state = "ram"
        self.handed_out = False
        self.located: list[int] = []
        # per accelerator the value has tensors on: an event after the work that made them
        self.marks = marks
        # once spilled: the mapped CPU tensors that stand for device tensors, and their devices
        self.origin: list[tuple[torch.Tensor, torch.device]] = []


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
        self.offload: Offload | None = None  # the writer thread's staging of device bytes
        # whether device tensors can be staged here at all (else put skips looking for them)
        self.staging = Offload.available()


class SpillStore:
    """Keeps values in memory up to ``max_memory`` bytes, then spills the oldest to disk.

    ``put`` returns at once while the values in memory fit the budget. Past it, the oldest
    values are queued for a background writer; ``put`` waits only when the writer falls behind
    by more than ``max(slack, the value being put)`` bytes, where ``slack`` is an eighth of the
    budget (between 1 MiB and 64 MiB). Memory therefore stays near ``max_memory`` plus that.

    The budget counts the bytes of every value held in memory, wherever its tensors are: host
    memory and accelerator memory together (not the writer's staging buffers, nor the page
    cache that reads of spilled values come from). Spilled CPU tensors read back transparently
    from a private memory map of their shard, the same objects as before. A value's tensors on a
    CUDA device are copied to the file through pinned staging and their device memory is let go;
    ``get`` then returns a new copy of the value with those tensors back on their devices (see
    the module docstring). Tensors on devices without a staging backend stay where they are.
    The spill files live in a fresh directory
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
            item = _Item(key, value, nbytes, _marks(value) if s.staging else {})
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
        """The value: the same object every time, except where device tensors were spilled.

        Spilled CPU tensors are memory-mapped in place. A value whose device tensors were
        spilled comes back as a new copy at each call, those tensors on their devices again.
        """
        s = self._state
        with s.cond:
            _apply_deferred(s)
            item = s.items[key]
            item.handed_out = True
            value, origin = item.value, item.origin
        return _restore(value, origin) if origin else value

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
        """The value, for ``save``, without marking it handed out (spilled device tensors
        stay the mapped CPU tensors: ``save`` links their blobs rather than copying them)."""
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
        _spill_batch(s, batch)  # in a call of its own: its locals (the values) die with it


def _spill_batch(s: _State, batch: list[_Item]) -> None:
    """Write one batch and swap its values (or keep them in memory if the write failed)."""
    values = [(item.value, item.marks) for item in batch]
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
        return
    del values
    with s.cond:
        for item, swap in zip(batch, swaps):
            if item.state != "queued":  # replaced or closed while it was being written
                continue
            s.queued -= item.nbytes
            if not swap:
                item.state = "pinned"  # nothing that can spill (e.g. on a device without staging)
            elif item.handed_out:
                # the caller may be computing with it right now: swap in its own thread
                item.state = "written"
                s.deferred.append((item, swap))
            else:
                _swap(s, item, swap)
        # before flush() can see the batch done: these would keep device tensors alive
        swap = swaps = None  # type: ignore[assignment]
        s.cond.notify_all()


def _write_batch(s: _State, values: list[tuple[Any, dict[torch.device, Any]]]) -> list[_Swap]:
    """Write the tensors of ``values`` into one new shard; return how to point them at it."""
    if s.directory is None:
        if s.parent is not None:
            os.makedirs(s.parent, exist_ok=True)
        s.directory = tempfile.mkdtemp(prefix="tensorsnap-spill-", dir=s.parent)
    plans = []
    spans: list[Span] = []
    for value, marks in values:
        tensors = [t for t in tensors_in(value) if _staged(t) or t.device.type == "cpu"]
        versions = [t._version for t in tensors]
        value_spans, placements = plan_spans(tensors)
        for span in value_spans:
            span.name = str(s.blobs)
            s.blobs += 1
            if Offload.handles(span.device):
                _stage(s, span, marks.get(span.device))
        plans.append((tensors, versions, len(spans), placements))
        spans.extend(value_spans)
    if s.offload is not None:
        s.offload.release()  # every staged span's bytes are in host memory now
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
    """Point the value's tensors at the file; the memory they held is freed with them.

    A device tensor cannot point at a file: the value is rebuilt with a mapped CPU tensor in
    its place (noted in ``item.origin`` with its device), and the device tensor is let go.
    """
    if any(t._version != version for t, version, *_ in swap):
        item.state = "pinned"  # changed in place while it was written: keep it as it is now
        return
    swapped = []
    standins: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for t, _, storage, offset, ref, blob_offset in swap:
            if _staged(t):
                mapped = torch.empty(0, dtype=t.dtype)
                mapped.set_(storage, offset, t.shape, t.stride())
                standins[id(t)] = mapped
                item.origin.append((mapped, t.device))
                swapped.append((mapped, ref, blob_offset))
                continue
            try:
                t.set_(storage, offset, t.shape, t.stride())
            except RuntimeError:  # e.g. a tensor autograd forbids changing: it stays in memory
                continue
            swapped.append((t, ref, blob_offset))
    if standins:
        item.value = _replace_tensors(item.value, standins)
    # views share one version counter, which every set_ bumps: read it after the last one
    for t, ref, blob_offset in swapped:
        s.located[id(t)] = (t, t._version, ref, blob_offset)
        item.located.append(id(t))
    item.state = "disk"
    s.ram -= item.nbytes


def _staged(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes reach spill files through staging (an accelerator's tensor)."""
    return Offload.handles(t.device)


def _marks(value: Any) -> dict[torch.device, Any]:
    """Events on the current streams of the accelerators that hold ``value``'s tensors."""
    devices = {t.device for t in _tensors(value) if _staged(t)}
    return {device: Offload.mark(device) for device in devices}


def _stage(s: _State, span: Span, after: Any) -> None:
    """Queue the copy of a device span's bytes into host memory, and make the span read there.

    The copy waits for ``after`` (recorded by ``put`` on the stream that made the value); the
    writer drains the staging before the shard is written.
    """
    if s.offload is None:
        s.offload = Offload(clone=False)  # nothing writes a stored copy: no clone needed
    count = span.hi - span.lo
    source = torch.empty(0, dtype=torch.uint8, device=span.device)
    source.set_(span.storage, span.lo, (count,), (1,))
    host = torch.empty(count, dtype=torch.uint8)
    s.offload.copy(host, source, after=after)
    # the span's placements are offsets from its start, which the host copy keeps
    span.storage, span.device, span.lo, span.hi = host.untyped_storage(), host.device, 0, count


def _replace_tensors(value: Any, replacements: dict[int, torch.Tensor]) -> Any:
    """``value`` rebuilt (as the copy engine rebuilds structures) with some tensors replaced.

    Every other tensor stays the object it was.
    """
    copier = Copier()
    for t in _tensors(value):
        copier.memo[id(t)] = replacements.get(id(t), t)
    return copier.copy_value(value)


def _restore(value: Any, origin: list[tuple[torch.Tensor, torch.device]]) -> Any:
    """A new copy of a spilled value with its stand-ins copied back to their devices.

    The stand-ins of one device are copied by one copier, so views of one storage stay views of
    one copy there; the rest of the value (CPU tensors, other leaves) is kept as it is.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for standin, device in origin:
        by_device.setdefault(device, []).append(standin)
    back: dict[int, torch.Tensor] = {}
    for device, standins in by_device.items():
        copies = Copier(device=device).copy_value(standins, root="spilled value")
        back.update((id(m), c) for m, c in zip(standins, copies))
    return _replace_tensors(value, back)


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
    s.offload = None
    if s.directory is not None:
        shutil.rmtree(s.directory, ignore_errors=True)
