"""``capture(nonfinite="raise")``: find the first captured value that holds a NaN or an Inf.

Reading a device's answer on the host waits for the device: one ``bool(t.sum().isfinite())``
per captured value would stop the host at every value and serialize the whole forward. So
only CPU values (and layouts without a plain strided storage) are checked when they are
captured; a value on an accelerator gets one reduction queued on its stream (``aminmax``: a NaN
reaches both ends, an Inf is one of them, nothing overflows), and the results are read
together, one sync per device, at boundaries: when a call of the captured model returns, when
a backward pass ends, and when the block ends. The first value that failed is named exactly as
the immediate check names it, and the keys captured after it are dropped, so the snapshot holds
what it would have held had the block stopped there.

Host copies whose bytes are still on their way (``capture(device="cpu")`` queues its
device-to-host copies, see :mod:`._offload`) are checked at the same boundaries, after the
offload completed them: reading them at once would read memory not yet written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import _tree
from ._dtensor import local
from ._errors import NonFiniteError
from ._ops import quiet

__all__ = ["FiniteCheck"]

# CPU values are checked at once: reading a CPU result costs no sync (the tests set this to run
# the deferred path on the CPU)
_DEFER_CPU = False
_strided = torch.strided

# a graph task's id while a backward pass runs, else -1
_graph_task = torch._C._current_graph_task_id


class FiniteCheck:
    """The checks of one capture session, and the values on devices not read back yet."""

    def __init__(self, snapshot: Any) -> None:
        self.snapshot = snapshot
        # (key, the (min, max) pairs of its device tensors, its host tensors not yet arrived),
        # in capture order
        self._pending: list[
            tuple[str, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]
        ] = []
        self._task = -1  # the backward pass whose end will read the pending checks
        self.offload: Any = None  # set by the recorder when host copies arrive later

    def check(self, key: str, value: Any) -> None:
        """Check ``value`` (captured under ``key``) now, or queue its check on its device.

        Raises:
            NonFiniteError: A CPU value holds a NaN or Inf (named, unless a value captured
                before it on a device turns out to be the first).
        """
        ends: list[tuple[torch.Tensor, torch.Tensor]] = []
        host: list[torch.Tensor] = []
        offload = self.offload
        for t in _tree.tensors(value):
            t = local(t)  # a DTensor's own reduction would be a collective: check this rank's
            if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
                continue
            if t.is_cpu and offload is not None and offload.busy:
                host.append(t)  # its bytes may still be on their way: check it after they came
                continue
            if (t.is_cpu and not _DEFER_CPU) or t.layout is not _strided or t.is_nested:
                if _finite_now(t):
                    continue
                self.read()  # a value still queued on a device may be the first
                raise self.error(key)
            ends.append(_extremes(t))
        if not ends and not host:
            return
        self._pending.append((key, ends, host))
        task = _graph_task()
        if task != -1 and task != self._task:
            # read this backward pass's checks when it ends; raising there stops backward()
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def read(self) -> None:
        """Read the queued checks (one sync per device); raise for the first value that failed.

        Raises:
            NonFiniteError: Naming that value's key; the keys captured after it are dropped.
        """
        first = self.first()
        if first is not None:
            self.snapshot._drop_after(first)
            raise self.error(first)

    def first(self) -> str | None:
        """The key of the first queued value that failed, or None; the queue is emptied."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        for index, (_, ends, _) in enumerate(pending):
            for low, high in ends:
                items = by_device.setdefault(low.device, [])
                items.append((index, low))
                items.append((index, high))
        first: int | None = None
        for device, items in by_device.items():
            with _sync_allowed(device), quiet():  # our reads are no ops of the model's
                # stack promotes mixed dtypes; NaN and Inf survive the promotion
                finite = torch.stack([end for _, end in items]).isfinite().tolist()
            for (index, _), ok in zip(items, finite):
                if not ok:
                    first = index if first is None else min(first, index)
                    break
        if any(host for _, _, host in pending):
            self.offload.drain()  # the host copies' bytes are all there after this
            for index, (_, _, host) in enumerate(pending):
                if first is not None and index >= first:
                    break
                if not all(_finite_now(t) for t in host):
                    first = index
                    break
        return None if first is None else pending[first][0]

    def error(self, key: str) -> NonFiniteError:
        return NonFiniteError(
            f"{key!r} is the first captured value with a NaN or Inf; the values captured "
            "up to it are in the snapshot (pass inputs=True to see each module's inputs)",
            key=key,
            snapshot=self.snapshot,
        )

    def _backward_ended(self) -> None:
        self._task = -1
        self.read()


def _finite_now(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, read at once (a sync on an accelerator)."""
    if t.element_size() == 1:  # float8: no reductions of its own; float32 holds every range
        t = t.float()
    # a finite sum proves every element finite at the cost of one reduction; only an Inf/NaN
    # sum (or an overflow) needs the elementwise check
    return bool(t.sum().isfinite()) or bool(torch.isfinite(t).all())


def _extremes(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side (min, max) of ``t``'s real numbers, queued on the current stream; no sync.

    Both are finite exactly when every element is: aminmax propagates a NaN to both, and an Inf
    is the min or the max. Unlike a sum, it cannot overflow a finite tensor into an Inf.
    """
    t = t.detach()  # a live value (lazy=True) must not get a graph node that keeps it alive
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    elif t.element_size() == 1:
        t = t.float()
    low, high = torch.aminmax(t)
    return low, high


@contextmanager
def _sync_allowed(device: torch.device) -> Iterator[None]:
    """The one intended sync of a boundary, also under ``torch.cuda.set_sync_debug_mode``.

    The checks may have been queued on other streams than the one reading them (a block that
    enters ``torch.cuda.stream(s)`` inside it, a backward pass on the forward's streams): the
    whole device is waited for, so the read sees every one finished.
    """
    mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)
