"""The capture's own copies of the common values: one tensor, or a tuple or list of tensors.

Most values a capture sees are plain tensors, or tuples of them (``split``, attention outputs).
Copying them here, in a few calls, keeps the per-op cost near that of the clone itself; the
results are what :func:`tensorsnap.snapshot` would make of the same values (the same strides,
the same sharing of storage between the parts of one value), which the tests check. Anything
else (structures, subclasses, sparse or quantized tensors, inference mode) gets None here and
goes to the general copy engine in :mod:`._copy`.
"""

from __future__ import annotations

from typing import Any

import torch

from ._tree import extent

__all__ = ["clone", "clone_items", "storage_bytes"]

_strided = torch.strided
_is_inference_mode = torch.is_inference_mode_enabled


def clone(value: Any) -> torch.Tensor | None:
    """A detached copy of one plain strided tensor, or None for anything else.

    A dense tensor is cloned (``preserve_format`` keeps a dense layout's strides, a transpose's
    too); a view that does not cover its span (a slice, an expanded tensor) gets the span it
    can reach copied once and viewed with its own strides, as ``snapshot`` does.
    """
    if not (
        type(value) is torch.Tensor
        and value.layout is _strided
        and not value.is_nested
        and not _is_inference_mode()
    ):
        return None  # structures, subclasses, sparse, nested, inference: the copy engine's
    if value.requires_grad:  # a clone must not join the graph
        value = value.detach()
    if value.is_contiguous():
        return value.clone()
    reach = extent(value)
    if reach == value.numel():
        copy = value.clone()
        if copy.stride() == value.stride():
            return copy
    if value.is_conj() or value.is_neg() or value.is_quantized or value.is_meta:
        return None
    span = value.as_strided((reach,), (1,), value.storage_offset()).clone()
    return span.as_strided(value.shape, value.stride())


def clone_items(value: tuple[Any, ...] | list[Any]) -> tuple[Any, int]:
    """Copies of a tuple or list of plain tensors (None allowed), and the bytes they hold.

    Tensors whose spans of one storage overlap (``split`` along a last dim) become views of one
    copy of the span they cover together, as ``snapshot`` makes them. ``(None, 0)`` for
    anything else: tensors whose storages only partly coincide, disjoint parts of one storage
    (``chunk`` along dim 0, which ``snapshot`` copies apart), or one tensor twice.
    """
    tensors = [item for item in value if item is not None]
    if not tensors or _is_inference_mode() or len({id(t) for t in tensors}) < len(tensors):
        return None, 0
    storages = set()
    for t in tensors:
        if type(t) is not torch.Tensor or t.layout is not _strided or t.is_nested:
            return None, 0
        storages.add(t.untyped_storage().data_ptr())
    copies: list[torch.Tensor | None]
    if len(storages) == len(tensors):  # each tensor alone in its storage
        copies = [None if item is None else clone(item) for item in value]
        if sum(c is not None for c in copies) < len(tensors):
            return None, 0
        nbytes = sum(storage_bytes(c) for c in copies if c is not None)
    elif len(storages) == 1:
        span, start = _clone_span(tensors)
        if span is None:
            return None, 0
        copies = [
            None
            if item is None
            else span.as_strided(item.shape, item.stride(), item.storage_offset() - start)
            for item in value
        ]
        nbytes = span.nbytes
    else:
        return None, 0
    return (tuple(copies) if type(value) is tuple else copies), nbytes


def storage_bytes(copy: torch.Tensor) -> int:
    """Bytes a copy made here holds: its own, or its span's when it is a view of one."""
    return copy.nbytes if copy._base is None else copy.untyped_storage().nbytes()


def _clone_span(tensors: list[torch.Tensor]) -> tuple[torch.Tensor | None, int]:
    """One flat copy of the elements from the first to the last that ``tensors`` reach.

    Returns the copy and the storage offset it starts at; ``(None, 0)`` unless the tensors'
    spans, in order, each overlap the ones before (a gap or a mere touch would make
    ``snapshot`` copy them apart), and for tensors of mixed dtypes or devices, empty ones, or
    ones with conjugate, negative or quantized bits.
    """
    first = tensors[0]
    spans = []
    for t in tensors:
        if (
            t.dtype != first.dtype
            or t.device != first.device
            or t.numel() == 0
            or t.is_conj()
            or t.is_neg()
        ):
            return None, 0
        offset = int(t.storage_offset())
        spans.append((offset, offset + extent(t)))
    if first.is_quantized or first.is_meta:
        return None, 0
    spans.sort()
    start, end = spans[0]
    for lo, hi in spans[1:]:
        if lo >= end:
            return None, 0
        end = max(end, hi)
    return first.detach().as_strided((end - start,), (1,), start).clone(), start
