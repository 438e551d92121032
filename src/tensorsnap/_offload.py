"""Device-to-host copies that do not stop the host: a ring of pinned staging memory per device.

A blocking ``t.cpu()`` makes the host wait for the device at every value, so the device runs
dry while the host waits and a forward that copies its values is serialized. Here a copy is
queued instead, in three steps:

1. With ``clone=True`` (a capture, where the model goes on writing into its tensors) the source
   is first cloned on the current stream, the producer's: the clone is ordered after the op that
   made the value and before any later in-place write. An event recorded there marks it made.
2. A side stream of the device waits for that event and copies the bytes, non-blocking, into a
   free region of the device's pinned ring; a second event marks the copy done. The entry holds
   the source until then, so the caching allocator cannot hand its memory to a new tensor while
   the side stream still reads it.
3. Later the host waits for the second event (by then it has usually passed), copies the region
   into the pageable destination, drops the source and frees the region.

Step 3 runs when the ring has no room for the next copy (the oldest copies are completed until it
has), when ``drain`` or ``wait_for`` is called, and, without waiting, for copies already done
(``event.query()``) each time one is queued. A region is never handed out again before the copy
into it finished and its bytes were copied out: regions are freed in the order they were taken,
and only by completing the copy that holds them.

The device-specific steps are a small backend (``staging``, ``mark``, ``copy``, ``done``,
``wait``) looked up in :data:`BACKENDS` by device type; the tests register a backend for the CPU
whose copies run only when they are waited for, which drives the same ring, in the same order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["BACKENDS", "CudaBackend", "Offload", "PendingStore"]

# Pinned bytes per device that copies in flight may use.
_ARENA = 64 * 2**20
# Larger copies go through the ring in pieces of at most this size, so that the host copies one
# piece out while the device fills the next.
_CHUNK = 16 * 2**20


class CudaBackend:
    """Pinned staging and non-blocking copies on a side stream of one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    @staticmethod
    def available() -> bool:
        return torch.cuda.is_available()

    @staticmethod
    def staging(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    @staticmethod
    def mark(device: torch.device) -> Any:
        """An event on ``device``'s current stream of this thread: what is queued there so far."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        """Copy ``src`` into pinned ``dst`` on the side stream once ``after`` has passed."""
        stream = self.stream
        stream.wait_event(after)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    @staticmethod
    def done(event: Any) -> bool:
        return bool(event.query())

    @staticmethod
    def wait(event: Any) -> None:
        with _sync_allowed():
            event.synchronize()


# device type -> backend class; a device type not listed is copied the blocking way
BACKENDS: dict[str, Any] = {"cuda": CudaBackend}


@contextmanager
def _sync_allowed() -> Iterator[None]:
    """A wait the design intends (a full ring, a drain), also under ``set_sync_debug_mode``."""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


class _Entry:
    """One queued copy: its event, its ring region, where its bytes go, and its source."""

    __slots__ = ("dst", "event", "hi", "lo", "ring", "source")

    def __init__(self, event: Any, ring: _Ring, lo: int, hi: int, dst: torch.Tensor, source: Any):
        self.event = event
        self.ring = ring
        self.lo = lo
        self.hi = hi
        self.dst = dst
        self.source = source


class _Ring:
    """The pinned buffer of one device, handed out in regions in the order copies are queued."""

    def __init__(self, backend: Any, nbytes: int) -> None:
        self.backend = backend
        self.buffer: torch.Tensor = backend.staging(nbytes)
        self.size = nbytes
        self.busy: deque[_Entry] = deque()  # oldest first, laid out in that order around the ring

    def place(self, nbytes: int) -> int | None:
        """Where a region of ``nbytes`` fits without touching a busy one, or None."""
        if not self.busy:
            return 0
        head, tail = self.busy[0].lo, self.busy[-1].hi
        if self.busy[-1].lo < head:  # wrapped: the free space is between the newest and oldest
            return tail if head - tail >= nbytes else None
        if self.size - tail >= nbytes:
            return tail
        return 0 if head >= nbytes else None


class Offload:
    """Device-to-host copies queued through per-device pinned rings; see the module docstring.

    Not thread-safe: one thread queues and completes (a capture's thread, or a spill writer).

    Args:
        clone: Clone each source on the current stream before copying it (the source may be
            written after ``copy`` returns); not needed when nothing writes it until ``drain``.
        arena: Pinned bytes per device.
        chunk: Largest piece of one copy (at most half the arena).

    Example:
        >>> import torch
        >>> offload = Offload(clone=True)
        >>> Offload.handles(torch.device("cpu"))  # only devices with a backend
        False
    """

    def __init__(self, *, clone: bool, arena: int = _ARENA, chunk: int = _CHUNK) -> None:
        self.clone = clone
        self.arena = arena
        self.chunk = max(1, min(chunk, arena // 2))
        self._backends: dict[torch.device, Any] = {}
        self._rings: dict[torch.device, _Ring] = {}
        self._entries: deque[_Entry] = deque()  # every queued copy, oldest first
        self.issued = 0  # copies queued so far
        self.completed = 0  # copies whose bytes are in their destination (always the oldest)

    @staticmethod
    def handles(device: torch.device) -> bool:
        """Whether copies from ``device`` go through a ring (a backend is registered for it)."""
        return device.type in BACKENDS

    @staticmethod
    def available() -> bool:
        """Whether any registered backend can run here."""
        return any(backend.available() for backend in BACKENDS.values())

    @staticmethod
    def mark(device: torch.device) -> Any:
        """An event for ``after=``: the work queued so far on ``device``'s current stream."""
        return BACKENDS[device.type].mark(device)

    @property
    def busy(self) -> bool:
        """Whether some copy has not reached its destination yet."""
        return self.completed < self.issued

    def copy(
        self, dst: torch.Tensor, src: torch.Tensor, *, after: Any = None, fresh: bool = False
    ) -> None:
        """Queue a copy of ``src``'s bytes into ``dst``; ``dst`` is not readable until completed.

        Args:
            dst: A contiguous CPU tensor (pageable) with as many bytes as ``src``.
            src: A contiguous tensor on a device :meth:`handles`.
            after: An event from :meth:`mark` that the copy must wait for (the point where the
                source was made); by default the current stream's work so far.
            fresh: ``src`` is a temporary nobody else writes (a cast): it is not cloned.
        """
        if not (dst.is_contiguous() and src.is_contiguous()) or dst.nbytes != src.nbytes:
            raise ValueError("Offload.copy needs contiguous tensors of the same size in bytes")
        nbytes = src.nbytes
        if nbytes == 0:
            return
        ring = self._ring(src.device)
        if self.clone and not fresh:
            src = src.clone()  # on the current stream: the value now, whatever is written later
            after = None
        if after is None:
            after = ring.backend.mark(src.device)
        src_bytes, dst_bytes = _bytes(src), _bytes(dst)
        for start in range(0, nbytes, self.chunk):
            stop = min(start + self.chunk, nbytes)
            lo = ring.place(stop - start)
            while lo is None:  # the ring is full: finish the oldest copies until this fits
                self._complete_oldest()
                lo = ring.place(stop - start)
            region = ring.buffer[lo : lo + stop - start]
            event = ring.backend.copy(region, src_bytes[start:stop], after)
            entry = _Entry(event, ring, lo, lo + stop - start, dst_bytes[start:stop], src)
            ring.busy.append(entry)
            self._entries.append(entry)
            self.issued += 1
        self.reap()

    def reap(self) -> None:
        """Complete, without waiting, the oldest copies that are already done."""
        entries = self._entries
        while entries and entries[0].ring.backend.done(entries[0].event):
            self._finish(entries.popleft())

    def wait_for(self, issued: int) -> None:
        """Complete every copy among the first ``issued`` queued (the host waits for them)."""
        while self.completed < issued:
            self._complete_oldest()

    def drain(self) -> None:
        """Complete every queued copy: all destinations are readable afterwards."""
        while self._entries:
            self._complete_oldest()

    def release(self) -> None:
        """Complete every copy and let go of the pinned rings (a later copy makes new ones).

        A snapshot outlives its block; its rings must not: pinned memory is scarce.
        """
        self.drain()
        self._rings.clear()
        self._backends.clear()

    def _complete_oldest(self) -> None:
        entry = self._entries.popleft()
        entry.ring.backend.wait(entry.event)
        self._finish(entry)

    def _finish(self, entry: _Entry) -> None:
        ring = entry.ring
        if ring.busy[0] is not entry:  # regions are freed in order; anything else is a bug
            raise RuntimeError("tensorsnap offload: a staging region was freed out of order")
        entry.dst.copy_(ring.buffer[entry.lo : entry.hi])
        ring.busy.popleft()
        entry.source = entry.dst = None  # type: ignore[assignment]
        self.completed += 1

    def _ring(self, device: torch.device) -> _Ring:
        ring = self._rings.get(device)
        if ring is None:
            backend = BACKENDS[device.type](device)
            self._backends[device] = backend
            ring = self._rings[device] = _Ring(backend, self.arena)
        return ring


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The memory of a contiguous tensor as a flat uint8 tensor (any dtype, bool and complex)."""
    flat = torch.empty(0, dtype=torch.uint8, device=t.device)
    return flat.set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (t.nbytes,), (1,))


class PendingStore:
    """A store in front of another that passes each value on once its queued copies are done.

    The store behind (memory or spill) therefore never sees a copy whose bytes are still on
    their way: a spill writer cannot write them early, and ``get`` waits for just the copies up
    to the value asked for. Values reach the store behind in the order they were put.
    """

    def __init__(self, inner: Any, offload: Offload) -> None:
        self.inner = inner
        self.offload = offload
        self._waiting: deque[tuple[int, str, Any, int]] = deque()  # (copies before it, ...)
        self._last: dict[str, int] = {}  # key -> copies queued before its latest waiting put
        self._count: dict[str, int] = {}  # key -> how many of its puts are waiting

    def put(self, key: str, value: Any, nbytes: int) -> None:
        self._pass_on()
        issued = self.offload.issued
        if not self._waiting and issued <= self.offload.completed:
            self.inner.put(key, value, nbytes)
            return
        self._waiting.append((issued, key, value, nbytes))
        self._last[key] = issued
        self._count[key] = self._count.get(key, 0) + 1

    def get(self, key: str) -> Any:
        self._ready(key)
        return self.inner.get(key)

    def _peek(self, key: str) -> Any:
        self._ready(key)
        peek = getattr(self.inner, "_peek", self.inner.get)
        return peek(key)

    def _locate(self, t: torch.Tensor) -> Any:
        locate = getattr(self.inner, "_locate", None)
        return None if locate is None else locate(t)

    def flush(self) -> None:
        """Complete every copy and pass every value on (then flush the store behind).

        The capture calls it when its block ends, after which no copy comes: the pinned rings
        are let go.
        """
        self.offload.release()
        self._pass_on()
        flush = getattr(self.inner, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        self.offload.release()  # nothing may still be copying into memory being dropped
        self._waiting.clear()
        self._last.clear()
        self._count.clear()
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # the store behind's own attributes (a spill store's memory, spill_dir, max_memory)
        if name in ("inner", "offload", "_waiting", "_last", "_count"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _ready(self, key: str) -> None:
        issued = self._last.get(key)
        if issued is not None:
            self.offload.wait_for(issued)
        self._pass_on()

    def _pass_on(self) -> None:
        offload = self.offload
        if self._waiting and offload.busy:
            offload.reap()
        done = offload.completed
        waiting = self._waiting
        while waiting and waiting[0][0] <= done:
            _, key, value, nbytes = waiting.popleft()
            left = self._count[key] - 1
            if left:
                self._count[key] = left
            else:
                del self._count[key], self._last[key]
            self.inner.put(key, value, nbytes)
