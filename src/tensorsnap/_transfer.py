"""Device-to-host copies that overlap the model's work: a side stream, pinned memory, fences.

``extract(..., per_token=True)`` cuts token rows on the device and copies them into host
staging buffers. Made on the model's own stream, each copy would run between its kernels, and
waiting for it would stop the host from queueing the next batch; made on a side stream into
pinned memory, the copies of batch ``i`` run while the device computes the rest of batch ``i``
and batch ``i + 1``, and the host waits for them (a :class:`Fence`) only when it writes their
bytes. Three rules keep every value right:

* a copy starts only after the work the producer's stream had queued when it was asked for
  (the side stream waits for it), so it reads the value as it was when it was captured;
* its source is private: a tensor nothing else writes (the caller cuts or clones it first),
  so a later in-place op of the model cannot change it while the copy is in flight, and the
  caching allocator does not hand its memory to another tensor before the copy has read it
  (``record_stream``);
* a staging buffer is written again only after the fence of the copy into it was waited for
  (the caller writes each batch before it reuses that batch's buffers).

:func:`transfers_for` picks the implementation; every other device pair copies synchronously
(``None``). Tests substitute an implementation that runs the copies as late as a real stream
may, to check the rules on a machine without an accelerator.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["CudaTransfers", "Fence", "Transfers", "transfers_for"]


class Fence(Protocol):
    """What the host waits on before it reads the bytes of the copies queued before it."""

    def synchronize(self) -> None: ...


class Transfers(Protocol):
    """Asynchronous copies from one device into host memory."""

    #: whether host staging buffers should be pinned (page-locked) for these copies
    pins: bool

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Queue ``dst.copy_(src)``; ``src`` must be private (see the module's rules)."""

    def fence(self) -> Fence | None:
        """A fence covering every copy queued so far (None if none was)."""


class CudaTransfers:
    """Copies from one CUDA device on a side stream of its own, into pinned host memory."""

    pins = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._queued = False

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        producer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(producer)  # after the kernels that made src
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        # src's memory goes back to the allocator when Python drops it; it must not be handed
        # to the producer's next kernels before the side stream has read it
        src.record_stream(self.stream)
        self._queued = True

    def fence(self) -> Fence | None:
        if not self._queued:
            return None
        self._queued = False
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


def transfers_for(source: torch.device, target: torch.device) -> Transfers | None:
    """Asynchronous copies from ``source`` into ``target``, or None to copy synchronously."""
    if source.type == "cuda" and target.type == "cpu":
        return CudaTransfers(source)
    return None
