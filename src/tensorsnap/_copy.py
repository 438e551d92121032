"""The copy engine: detached, independent, alias-preserving copies of tensors inside any structure.

Everything tensorsnap keeps goes through :class:`Copier`. It walks a structure the way
``copy.deepcopy`` does (same memo, same reduce protocol, so types come back exactly), but copies
tensors itself:

* a tensor becomes a detached tensor with fresh storage, the same strides and bitwise the same
  values, also when it is a non-leaf (where ``Tensor.__deepcopy__`` raises);
* tensors that share a storage are copied together: each distinct *span* of a source storage that
  the structure's tensors can reach is copied once, and every tensor is rebuilt as a view of the
  copy with its own offset and strides. Views stay views of one new base; a small slice of a huge
  base copies only what the slice can reach; an expanded (stride-0) view stays unmaterialized.
"""

from __future__ import annotations

import copyreg
import gc
import sys
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import _validate
from ._dtensor import copy_distributed, is_distributed
from ._errors import TensorSnapError, attr, format_path
from ._offload import Offload
from ._tree import extent

__all__ = [
    "Copier",
    "copies_as_model_output",
    "copies_from_attributes",
    "snapshot",
]

_MISSING = object()

# Objects that copy.deepcopy returns as they are, plus torch's immutable descriptors.
_ATOMIC: frozenset[type] = frozenset(
    {
        type(None),
        int,
        float,
        bool,
        complex,
        str,
        bytes,
        type,
        range,
        type(Ellipsis),
        type(NotImplemented),
        types.BuiltinFunctionType,
        types.FunctionType,
        types.CodeType,
        weakref.ref,
        property,
        torch.dtype,
        torch.device,
        torch.layout,
        torch.memory_format,
        torch.Size,
        type(torch.per_tensor_affine),  # torch.qscheme
    }
)

# Round merged spans down to this many bytes so that views of any dtype stay element-aligned.
_SPAN_ALIGN = 16
# Integer dtypes by width in bytes, for copying raw bytes (integers: copies are bitwise).
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
# Device-to-host copies above this size go through double-buffered pinned staging.
_STAGING_CHUNK = 32 * 2**20


class _PathError(TensorSnapError):
    """Raised below the entry point; each container on the way up adds its key to ``parts``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.parts: list[object] = []


class _Span:
    """A byte range ``[lo, hi)`` of one source storage, copied once into ``storage``.

    ``members`` are the result tensors that view it: ``(result, source_byte_offset, itemsize)``.
    """

    __slots__ = ("hi", "lo", "members", "storage")

    def __init__(self, lo: int, hi: int, storage: torch.UntypedStorage, members: list[Any]) -> None:
        self.lo = lo
        self.hi = hi
        self.storage = storage
        self.members = members


class Copier:
    """Copies values with a shared memo, so that aliasing inside one copy is preserved.

    One ``Copier`` serves one logical copy (one ``snapshot`` call, or one captured value): its
    memo maps source objects to their copies exactly as ``copy.deepcopy``'s memo does.
    """

    def __init__(
        self,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        pin_memory: bool = False,
        gather: bool = False,
    ) -> None:
        self.device = _check_device(device)
        # DTensors: copy this rank's local tensor (False), or gather the full tensor (True, a
        # collective: see _dtensor)
        self.gather = gather
        self.dtype = _check_dtype(dtype)
        self.pin_memory = _check_pin(pin_memory, self.device)
        self.memo: dict[int, Any] = {}
        self._keep_alive: list[Any] = []
        # per source storage: its spans, or (copy, byte offset) while one tensor uses it
        self._spans: dict[tuple[Any, ...], list[_Span] | tuple[torch.Tensor, int]] = {}
        # a Parameter's plain copy, and the Parameter that wraps it inside modules
        self._parameters: dict[int, tuple[torch.Tensor, nn.Parameter | None]] = {}
        self._module_depth = 0
        self._sync_devices: set[torch.device] = set()
        # capture(device="cpu"): device-to-host copies queued through pinned rings (see
        # start_offload); None copies the blocking way
        self.offload: Offload | None = None

    # -- entry points ----------------------------------------------------------------------

    def copy_value(self, obj: Any, root: str = "obj") -> Any:
        """Copy ``obj``; errors name the path inside it, starting from ``root``."""
        gc_was_enabled = gc.isenabled()
        # the walk allocates many small objects that cannot form garbage cycles; collecting
        # while it runs only rescans the growing memo (measured: 2x slower on 10k tensors)
        gc.disable()
        try:
            if torch.is_inference_mode_enabled():
                # copies are normal tensors even under inference_mode; inference_mode(False)
                # turns grad mode on, so no_grad must come after it
                with torch.inference_mode(False), torch.no_grad():
                    return self.copy(obj)
            if torch.is_grad_enabled():  # the cheap switch: capture calls this per value
                torch._C._set_grad_enabled(False)
                try:
                    return self.copy(obj)
                finally:
                    torch._C._set_grad_enabled(True)
            return self.copy(obj)
        except _PathError as err:
            path = format_path(root, list(reversed(err.parts)))
            raise TensorSnapError(f"{path}: {err.message}") from err.__cause__
        finally:
            # also after an error: a capture session reuses this copier, and a stale memo
            # would hand out old copies for recycled ids
            self.finish()
            if gc_was_enabled:
                gc.enable()

    def start_offload(self) -> Offload | None:
        """Queue device-to-host copies from now on instead of making each one block the host.

        For a capture with ``device="cpu"``: a copy's bytes arrive later, through the pinned ring
        of :mod:`._offload`, so whoever reads copies must first complete the returned offload's
        copies (its ``drain``/``wait_for``; :class:`._offload.PendingStore` does it for reads).
        None (nothing changes) unless copies go to the CPU, unpinned, and a backend can run.
        """
        if self.device is None or self.device.type != "cpu" or self.pin_memory:
            return None
        if self.offload is None and Offload.available():
            self.offload = Offload(clone=True)
        return self.offload

    def finish(self) -> None:
        """Wait for non-blocking device-to-host copies, then drop the memo.

        Copies queued through ``start_offload``'s offload are not waited for here: the capture
        completes them when they are read, or when its block ends.
        """
        for device in self._sync_devices:
            torch.cuda.synchronize(device)
        self._sync_devices.clear()
        self.memo.clear()
        self._keep_alive.clear()
        self._spans.clear()
        self._parameters.clear()

    # -- the walk ---------------------------------------------------------------------------

    def copy(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in _ATOMIC:
            return obj
        found = self.memo.get(id(obj), _MISSING)
        if found is not _MISSING:
            return found
        handler = _HANDLERS.get(cls)
        if handler is None:
            handler = _HANDLERS[cls] = _handler_for(cls)
        return handler(self, obj)

    def _remember(self, obj: Any, result: Any) -> None:
        self.memo[id(obj)] = result
        # keep the source alive so that its id cannot be reused while the memo exists
        self._keep_alive.append(obj)

    # -- tensors ----------------------------------------------------------------------------

    def copy_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A detached copy of ``t`` with fresh storage, aliased with earlier copies as ``t`` is.

        The caller records it in the memo (a Parameter's copy depends on where it was found).
        """
        if (
            t.layout != torch.strided
            or t.is_quantized
            or t.is_meta
            or t.is_nested
            or t.is_conj()
            or t.is_neg()
        ):
            return self._copy_opaque(t)
        if t.numel() == 0:
            return torch.empty_strided(
                t.shape, t.stride(), dtype=self._target_dtype(t), device=self._target_device(t)
            )
        return self._copy_strided(t)

    def _target_dtype(self, t: torch.Tensor) -> torch.dtype:
        if self.dtype is not None and t.is_floating_point():
            return self.dtype
        return t.dtype

    def _target_device(self, t: torch.Tensor) -> torch.device:
        return self.device if self.device is not None else t.device

    def _copy_opaque(self, t: torch.Tensor) -> torch.Tensor:
        """Tensors without a plain strided storage: clone them as a whole."""
        try:
            result = t.detach().clone()
            if result.is_conj() or result.is_neg():
                result = result.resolve_conj().resolve_neg()
            dtype, device = self._target_dtype(t), self._target_device(t)
            if dtype != result.dtype or device != result.device:
                result = result.to(device=device, dtype=dtype)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            raise _PathError(
                f"cannot copy a {_describe(t)} ({err}); convert it to a plain tensor first, "
                "for example with .to_dense() or .dequantize()"
            ) from err
        return result

    def _copy_strided(self, t: torch.Tensor) -> torch.Tensor:
        """Copy ``t`` alone, or as a view of the span of its storage that holds it."""
        itemsize = t.element_size()
        offset = int(t.storage_offset())
        lo = offset * itemsize
        cast = self.dtype is not None and t.dtype != self.dtype and t.is_floating_point()
        # the storage's address identifies it (cheaper than t.untyped_storage()); a cast copy
        # holds elements of one source dtype only, raw bytes can hold any mix
        base = t.data_ptr() - lo
        key = (t.device, base, t.dtype) if cast else (t.device, base)
        record = self._spans.get(key)
        if record is None:
            if not cast and self.device is None and t.is_contiguous():
                # the common case, a tensor alone in its storage: one clone, and a span only
                # if another tensor of this storage turns up
                result = t.clone()
                self._spans[key] = (result, lo)
                return result
            return self._copy_first(t, key, lo, cast)
        spans = record if isinstance(record, list) else self._promote(key, record)
        hi = lo + extent(t) * itemsize
        for span in spans:
            if span.lo <= lo and hi <= span.hi and (lo - span.lo) % itemsize == 0:
                result = self._view(t, span, lo, itemsize)
                span.members.append((result, lo, itemsize))
                return result
        return self._merge(t, spans, lo, hi, itemsize, cast)

    def _copy_first(
        self, t: torch.Tensor, key: tuple[Any, ...], lo: int, cast: bool
    ) -> torch.Tensor:
        """The first tensor of its storage: copy it densely if it can be, else its span."""
        itemsize = t.element_size()
        hi = lo + extent(t) * itemsize
        spans: list[_Span] = []
        self._spans[key] = spans
        if hi - lo == t.nbytes:
            dense = self._copy_dense(t)
            if dense is not None:
                spans.append(_Span(lo, hi, dense.untyped_storage(), [(dense, lo, itemsize)]))
                return dense
        return self._merge(t, spans, lo, hi, itemsize, cast)

    def _promote(self, key: tuple[Any, ...], record: tuple[torch.Tensor, int]) -> list[_Span]:
        """A second tensor of a storage turned up: give the lone first copy a span."""
        result, lo = record
        span = _Span(
            lo, lo + result.nbytes, result.untyped_storage(), [(result, lo, result.element_size())]
        )
        spans = self._spans[key] = [span]
        return spans

    def _copy_dense(self, t: torch.Tensor) -> torch.Tensor | None:
        """Copy a non-overlapping, dense tensor in one call; None if its layout did not survive."""
        device = self._target_device(t)
        offload = self.offload
        if offload is not None and device.type == "cpu" and offload.handles(t.device):
            if not _is_dense(t):
                return None
            dtype = self._target_dtype(t)
            result = torch.empty_like(t, device=device, dtype=dtype)
            if result.stride() != t.stride():
                return None
            # dense with equal strides: the flat memory holds the same elements on both sides
            src = t.as_strided((t.numel(),), (1,))
            cast = dtype != t.dtype
            offload.copy(
                result.as_strided((t.numel(),), (1,)),
                src.to(dtype) if cast else src,  # a cast on the device is a fresh tensor
                fresh=cast,
            )
            return result
        if self.pin_memory and device.type == "cpu" and t.device.type != "cpu":
            result = torch.empty_like(
                t, device=device, dtype=self._target_dtype(t), pin_memory=True
            )
            result.copy_(t, non_blocking=True)
            self._sync_devices.add(t.device)
        elif device.type == "cpu" and t.device.type == "cuda" and t.nbytes > _STAGING_CHUNK:
            result = torch.empty_like(t, device=device, dtype=self._target_dtype(t))
            _staged_copy(result, t)
        else:
            result = t.to(device=device, dtype=self._target_dtype(t), copy=True)
        if result.stride() != t.stride():
            return None
        return result

    def _view(self, t: torch.Tensor, span: _Span, lo: int, itemsize: int) -> torch.Tensor:
        result = torch.empty(0, dtype=self._target_dtype(t), device=self._target_device(t))
        return result.set_(span.storage, (lo - span.lo) // itemsize, t.shape, t.stride())

    def _merge(
        self,
        t: torch.Tensor,
        spans: list[_Span],
        lo: int,
        hi: int,
        itemsize: int,
        cast: bool,
    ) -> torch.Tensor:
        """Copy the union of ``[lo, hi)`` and every span it overlaps; re-point their members."""
        new_lo, new_hi, overlapping = _absorb(spans, lo, hi, cast)
        span = _Span(new_lo, new_hi, self._copy_bytes(t, new_lo, new_hi, cast), [])
        for old in overlapping:
            spans.remove(old)
            for member, member_lo, member_itemsize in old.members:
                member.set_(
                    span.storage,
                    (member_lo - new_lo) // member_itemsize,
                    member.shape,
                    member.stride(),
                )
                span.members.append((member, member_lo, member_itemsize))
        spans.append(span)
        result = self._view(t, span, lo, itemsize)
        span.members.append((result, lo, itemsize))
        return result

    def _copy_bytes(self, t: torch.Tensor, lo: int, hi: int, cast: bool) -> torch.UntypedStorage:
        """A fresh storage holding source bytes ``[lo, hi)`` (as elements of the target dtype)."""
        device = self._target_device(t)
        storage = t.untyped_storage()
        if cast:
            itemsize = t.element_size()
            count = (hi - lo) // itemsize
            src = torch.empty(0, dtype=t.dtype, device=t.device)
            src.set_(storage, lo // itemsize, (count,), (1,))
            dtype = self._target_dtype(t)
        else:
            # raw bytes in the widest word that fits: a uint8 copy has 8x the elements, which
            # crosses torch's parallel grain size 8x sooner (3 ms instead of 1 us for 48 KB on a
            # busy 2-core machine, waiting for pool threads)
            width = next(w for w in (8, 4, 2, 1) if lo % w == 0 and (hi - lo) % w == 0)
            dtype = _WORDS[width]
            count = (hi - lo) // width
            src = torch.empty(0, dtype=dtype, device=t.device)
            src.set_(storage, lo // width, (count,), (1,))
        offload = self.offload
        if offload is not None and device.type == "cpu" and offload.handles(t.device):
            dst = torch.empty(count, dtype=dtype, device=device)
            cast_src = src.to(dtype) if cast else src
            offload.copy(dst, cast_src, fresh=cast)
            return dst.untyped_storage()
        pin = self.pin_memory and device.type == "cpu" and t.device.type != "cpu"
        dst = torch.empty(count, dtype=dtype, device=device, pin_memory=pin)
        if pin:
            dst.copy_(src, non_blocking=True)
            self._sync_devices.add(t.device)
        elif device.type == "cpu" and t.device.type == "cuda" and dst.nbytes > _STAGING_CHUNK:
            _staged_copy(dst, src)
        else:
            dst.copy_(src)
        return dst.untyped_storage()

    def reserve(self, items: tuple[Any, ...] | list[Any]) -> None:
        """Copy at once the spans that several tensors of one container will share.

        ``x.split(n, dim=-1)`` gives views whose spans interleave: copied one by one, each
        would widen the span and copy it again. Here the union of the overlapping spans of a
        storage is copied once, and the tensors then become views of it as they are reached.
        """
        groups: dict[tuple[Any, ...], list[tuple[int, int, torch.Tensor, bool]]] = {}
        for t in items:
            if (
                type(t) is not torch.Tensor
                or id(t) in self.memo
                or t.layout != torch.strided
                or t.is_nested
                or t.is_quantized
                or t.is_meta
                or t.is_conj()
                or t.is_neg()
                or t.numel() == 0
            ):
                continue
            itemsize = t.element_size()
            lo = int(t.storage_offset()) * itemsize
            cast = self.dtype is not None and t.dtype != self.dtype and t.is_floating_point()
            base = t.data_ptr() - lo
            key = (t.device, base, t.dtype) if cast else (t.device, base)
            if key not in self._spans:  # spans already made are merged the ordinary way
                groups.setdefault(key, []).append((lo, lo + extent(t) * itemsize, t, cast))
        for key, members in groups.items():
            if len(members) < 2:
                continue
            members.sort(key=lambda m: m[0])
            merged: list[list[Any]] = []  # [lo, hi, a tensor, how many]
            for lo, hi, t, cast in members:
                if not cast:
                    lo -= lo % _SPAN_ALIGN
                if merged and lo < merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                    merged[-1][3] += 1
                else:
                    merged.append([lo, hi, t, 1])
            spans = [
                _Span(lo, hi, self._copy_bytes(t, lo, hi, t.dtype != self._target_dtype(t)), [])
                for lo, hi, t, count in merged
                if count > 1
            ]
            if spans:
                self._spans[key] = spans

    def copy_parameter(self, p: nn.Parameter) -> torch.Tensor:
        """Inside an ``nn.Module`` a Parameter stays a Parameter; elsewhere it is a plain tensor.

        Both share one copy, so a Parameter reached from a module and from a dict is copied once.
        """
        plain, wrapped = self._parameters.get(id(p), (None, None))
        if plain is None:
            plain = self.copy_tensor(p)
            self._keep_alive.append(p)
        if self._module_depth == 0:
            self._parameters[id(p)] = (plain, wrapped)
            return plain
        if wrapped is None:
            wrapped = nn.Parameter(plain, requires_grad=p.requires_grad)
            self._add_member(p, plain, wrapped)
        self._parameters[id(p)] = (plain, wrapped)
        return wrapped

    def _add_member(self, source: torch.Tensor, plain: torch.Tensor, new: torch.Tensor) -> None:
        """Track ``new`` beside ``plain`` so that a later merge re-points it too."""
        if source.layout != torch.strided or source.is_meta or plain.numel() == 0:
            return  # not in any span: nothing will re-point it
        itemsize = source.element_size()
        lo = int(source.storage_offset()) * itemsize
        base = source.data_ptr() - lo
        # the keys _copy_strided files a tensor of this storage under, uncast and cast
        for key in ((source.device, base), (source.device, base, source.dtype)):
            record = self._spans.get(key)
            if record is None:
                continue
            spans = record if isinstance(record, list) else self._promote(key, record)
            for span in spans:
                if any(member is plain for member, _, _ in span.members):
                    span.members.append((new, lo, itemsize))
                    return


def _absorb(spans: list[_Span], lo: int, hi: int, cast: bool) -> tuple[int, int, list[_Span]]:
    """The range a new span over ``[lo, hi)`` must cover, and the spans it swallows.

    Spans must stay disjoint: if aligning the start down made the new span reach into a span
    it did not overlap before, two views of the same source bytes could end up in two copies.
    So widen, align and collect until nothing changes.
    """
    while True:
        if not cast:
            lo -= lo % _SPAN_ALIGN
        overlapping = [s for s in spans if s.lo < hi and lo < s.hi]
        new_lo = min([lo, *(s.lo for s in overlapping)])
        new_hi = max([hi, *(s.hi for s in overlapping)])
        if (new_lo, new_hi) == (lo, hi):
            return lo, hi, overlapping
        lo, hi = new_lo, new_hi


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a block of memory exactly once, in some dimension order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _staged_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a large CUDA tensor into pageable CPU memory through two pinned staging buffers.

    The device-to-pinned copy of chunk k+1 runs while the CPU copies chunk k out of the other
    buffer; each buffer is reused only after the CPU has finished reading it. Both tensors must
    be dense (``_copy_dense`` checks extent == numel; strides decide the rest).
    """
    if src.stride() != dst.stride() or not _is_dense(src):
        dst.copy_(src)  # staging works on flat memory laid out alike on both sides
        return
    # dense with equal strides (contiguous, channels_last, transposed): element i of the flat
    # memory is the same element on both sides, so copy the memory, not the logical order
    src_flat = src.as_strided((src.numel(),), (1,))
    dst_flat = dst.as_strided((dst.numel(),), (1,))
    chunk = max(1, _STAGING_CHUNK // src.element_size())
    buffers = [torch.empty(chunk, dtype=src.dtype, pin_memory=True) for _ in range(2)]
    pending: tuple[Any, torch.Tensor, torch.Tensor] | None = None
    for k, start in enumerate(range(0, src_flat.numel(), chunk)):
        length = min(chunk, src_flat.numel() - start)
        buffer = buffers[k % 2][:length]
        buffer.copy_(src_flat[start : start + length], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        if pending is not None:
            pending[0].synchronize()
            pending[2].copy_(pending[1])
        pending = (event, buffer, dst_flat[start : start + length])
    if pending is not None:
        pending[0].synchronize()
        pending[2].copy_(pending[1])


# -- containers ----------------------------------------------------------------------------


def _copy_atomic(c: Copier, x: Any) -> Any:
    return x


def _copy_list(c: Copier, x: list[Any]) -> list[Any]:
    if len(x) > 1 and isinstance(x[0], torch.Tensor) and isinstance(x[1], torch.Tensor):
        c.reserve(x)
    result: list[Any] = []
    c._remember(x, result)
    append = result.append
    try:
        for item in x:
            append(c.copy(item))
    except _PathError as err:
        err.parts.append(len(result))
        raise
    return result


def _copy_tuple(c: Copier, x: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(x) > 1 and isinstance(x[0], torch.Tensor) and isinstance(x[1], torch.Tensor):
        c.reserve(x)
    items = []
    try:
        for item in x:
            items.append(c.copy(item))
    except _PathError as err:
        err.parts.append(len(items))
        raise
    # a cycle through this tuple may already have copied it
    found = c.memo.get(id(x), _MISSING)
    if found is not _MISSING:
        return found
    result = x if all(a is b for a, b in zip(items, x)) else tuple(items)
    c._remember(x, result)
    return result


def _copy_dict(c: Copier, x: dict[Any, Any]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    c._remember(x, result)
    key = None
    try:
        for key, value in x.items():
            result[c.copy(key)] = c.copy(value)
    except _PathError as err:
        err.parts.append(key)
        raise
    return result


def _copy_set(c: Copier, x: set[Any] | frozenset[Any]) -> set[Any] | frozenset[Any]:
    items = [c.copy(item) for item in x]
    result = type(x)(items)
    c._remember(x, result)
    return result


def _copy_method(c: Copier, x: types.MethodType) -> types.MethodType:
    return type(x)(x.__func__, c.copy(x.__self__))


def _copy_custom(c: Copier, x: Any) -> Any:
    """Objects with their own ``__deepcopy__``: let them run it, routing tensors to us."""
    try:
        with _DeepcopyRouter(c):
            result = x.__deepcopy__(c.memo)
    except _PathError:
        raise
    except Exception as err:
        raise _PathError(f"{type(x).__qualname__}.__deepcopy__ failed: {err}") from err
    c._remember(x, result)
    return result


def _copy_reduce(c: Copier, x: Any) -> Any:
    """Everything else goes through the pickle reduce protocol, as copy.deepcopy does."""
    cls = type(x)
    reductor = copyreg.dispatch_table.get(cls)
    try:
        reduced = reductor(x) if reductor is not None else x.__reduce_ex__(4)
    except Exception as err:
        raise _PathError(
            f"cannot copy a {cls.__qualname__} object ({err}); remove it from the structure, "
            "or give its class a __deepcopy__ or __reduce__ method"
        ) from err
    if isinstance(reduced, str):  # a module-level global: copied by reference
        return x
    return _reconstruct(c, x, *reduced)


def _reconstruct(
    c: Copier,
    x: Any,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    state: Any = None,
    listiter: Any = None,
    dictiter: Any = None,
    state_setter: Callable[[Any, Any], None] | None = None,
) -> Any:
    copied_args = _copy_tuple(c, args) if args else args
    found = c.memo.get(id(x), _MISSING)
    if found is not _MISSING:
        return found
    try:
        result = func(*copied_args)
    except Exception as err:
        raise _PathError(f"cannot rebuild a {type(x).__qualname__} object: {err}") from err
    c._remember(x, result)
    if state is not None:
        state = _copy_state(c, state)
        if state_setter is not None:
            state_setter(result, state)
        elif _has_setstate(result):
            result.__setstate__(state)
        else:
            slots = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            if state:
                result.__dict__.update(state)
            if slots:
                for name, value in slots.items():
                    setattr(result, name, value)
    if listiter is not None:
        index = 0
        try:
            for item in listiter:
                result.append(c.copy(item))
                index += 1
        except _PathError as err:
            err.parts.append(index)
            raise
    if dictiter is not None:
        key = None
        try:
            for key, value in dictiter:
                result[c.copy(key)] = c.copy(value)
        except _PathError as err:
            err.parts.append(key)
            raise
    return result


def _has_setstate(obj: Any) -> bool:
    """``hasattr(obj, "__setstate__")``, as deepcopy asks it, without a failed lookup's cost.

    A failed attribute lookup raises and catches an AttributeError (through a Python-level
    ``__getattr__``, if the class has one). When neither the class's MRO nor the instance
    holds the name, and no ``__getattr__``/``__getattribute__`` of the class could make it up,
    the answer is no without a lookup; otherwise the lookup is made. A metaclass plays no part:
    it answers for the class object, never for its instances.
    """
    cls = type(obj)
    if (
        any("__setstate__" in vars(k) or "__getattr__" in vars(k) for k in cls.__mro__)
        or cls.__getattribute__ is not object.__getattribute__
    ):
        return hasattr(obj, "__setstate__")
    own = getattr(obj, "__dict__", None)  # set on the instance itself, which is rare
    return own is not None and "__setstate__" in own


def _copy_state(c: Copier, state: Any) -> Any:
    """Copy an object's ``__dict__`` (or ``(dict, slots)``) so that errors read ``obj.attr``."""
    if type(state) is dict:
        copied = {}
        name = None
        try:
            for name, value in state.items():
                copied[name] = c.copy(value)
        except _PathError as err:
            err.parts.append(attr(name) if isinstance(name, str) else name)
            raise
        return copied
    if type(state) is tuple and len(state) == 2:
        return tuple(_copy_state(c, part) if part is not None else None for part in state)
    return c.copy(state)


def _copy_module(base: Callable[[Copier, Any], Any]) -> Callable[[Copier, Any], Any]:
    """Inside an ``nn.Module``, Parameters stay Parameters (as with ``copy.deepcopy(module)``)."""

    def copy_module(c: Copier, x: nn.Module) -> nn.Module:
        c._module_depth += 1
        try:
            return base(c, x)
        finally:
            c._module_depth -= 1

    return copy_module


def _tensor_handler(
    copy: Callable[[Copier, Any], torch.Tensor], *, memo: bool = True
) -> Callable[[Copier, Any], torch.Tensor]:
    """A handler that names the tensor in errors and (unless told not to) remembers the copy."""

    def handler(c: Copier, x: torch.Tensor) -> torch.Tensor:
        try:
            result = copy(c, x)
        except _PathError:
            raise
        except Exception as err:
            raise _PathError(f"cannot copy a {_describe(x)}: {err}") from err
        if memo:
            c.memo[id(x)] = result
            c._keep_alive.append(x)
        return result

    return handler


_copy_tensor = _tensor_handler(Copier.copy_tensor)
# a Parameter is not memoized: its copy depends on whether a module holds it
_copy_parameter = _tensor_handler(Copier.copy_parameter, memo=False)
# tensor subclasses keep their type: they are cloned as a whole
_copy_tensor_subclass = _tensor_handler(Copier._copy_opaque)
# DTensor and AsyncCollectiveTensor: copied without communicating (see ``_dtensor``)
_copy_distributed = _tensor_handler(copy_distributed)


_HANDLERS: dict[type, Callable[[Copier, Any], Any]] = {
    list: _copy_list,
    tuple: _copy_tuple,
    dict: _copy_dict,
    set: _copy_set,
    frozenset: _copy_set,
    types.MethodType: _copy_method,
    torch.Tensor: _copy_tensor,
    nn.Parameter: _copy_parameter,
}


def _handler_for(cls: type) -> Callable[[Copier, Any], Any]:
    if issubclass(cls, torch.Tensor):
        return _copy_distributed if is_distributed(cls) else _copy_tensor_subclass
    if issubclass(cls, type):  # classes with a metaclass (ABCMeta, EnumMeta) are atomic too
        return _copy_atomic
    base = _copy_custom if hasattr(cls, "__deepcopy__") else _copy_reduce
    if issubclass(cls, nn.Module):
        return _copy_module(base)
    if base is _copy_reduce and is_model_output(cls):
        return _copy_model_output
    return base


def copies_from_attributes(cls: type) -> bool:
    """Whether a copy of a ``cls`` instance is ``cls.__new__(cls)`` given copies of its
    ``__dict__`` and nothing else: the pickle protocol's default, with no method of the class
    (``__deepcopy__``, ``__reduce__``, ``__getstate__``, ``__setstate__``, ``__getnewargs__``,
    ``__slots__``, a ``copyreg`` entry) taking part. Graph mode rebuilds such objects itself."""
    if _HANDLERS.get(cls, _handler_for(cls)) is not _copy_reduce or cls in copyreg.dispatch_table:
        return False
    if issubclass(cls, (tuple, list, dict, set, frozenset)):
        return False
    own = ("__setstate__", "__getattr__", "__getnewargs__", "__getnewargs_ex__")
    return (
        cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and getattr(cls, "__getstate__", None) is getattr(object, "__getstate__", None)
        and cls.__getattribute__ is object.__getattribute__
        and not any(name in vars(k) for k in cls.__mro__[:-1] for name in own)
        and not any(vars(k).get("__slots__") for k in cls.__mro__[:-1])  # ABC's () holds none
    )


def copies_as_model_output(cls: type) -> bool:
    """Whether the copy engine copies a ``cls`` instance as a ``ModelOutput``: a new instance
    given copies of its items and then of its ``__dict__``, no method of the class taking
    part (graph mode rebuilds such objects itself)."""
    return _HANDLERS.get(cls, _handler_for(cls)) is _copy_model_output


def is_model_output(cls: type) -> bool:
    """A transformers ``ModelOutput`` (looked up only if transformers is already imported)."""
    generic = sys.modules.get("transformers.utils.generic")
    model_output = getattr(generic, "ModelOutput", None)
    return isinstance(model_output, type) and issubclass(cls, model_output)


def _copy_model_output(c: Copier, x: Any) -> Any:
    """A ``ModelOutput``: its items and attributes copied as they are.

    Its ``__reduce__`` rebuilds through ``__init__`` and ``__post_init__``, which re-derive the
    items from the fields and then set them again through Python-level ``__setitem__`` and
    ``__setattr__`` overrides: 3x the work of a plain mapping on every model call's output. The
    state is copied directly instead (the same items and attributes, so the same object).
    """
    cls: Any = type(x)
    result = cls.__new__(cls)
    c._remember(x, result)
    key = None
    try:
        for key, value in x.items():
            OrderedDict.__setitem__(result, key, c.copy(value))
    except _PathError as err:
        err.parts.append(key)
        raise
    result.__dict__.update(_copy_state(c, x.__dict__))
    return result


class _DeepcopyRouter(torch.overrides.TorchFunctionMode):
    """Sends ``Tensor.__deepcopy__`` calls made by a user ``__deepcopy__`` to our tensor copy."""

    def __init__(self, copier: Copier) -> None:
        super().__init__()
        self.copier = copier

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is torch.Tensor.__deepcopy__:
            return self.copier.copy(args[0])
        return func(*args, **(kwargs or {}))


# -- options -------------------------------------------------------------------------------


def _describe(t: torch.Tensor) -> str:
    kind = type(t).__name__
    if t.layout != torch.strided:
        kind = f"{str(t.layout).removeprefix('torch.')} {kind}"
    if t.is_quantized:
        kind = f"quantized {kind}"
    return f"{kind} of shape {tuple(t.shape)} and dtype {t.dtype} on {t.device}"


def _check_device(device: torch.device | str | None) -> torch.device | None:
    return _validate.device(device, meta=True)  # capture refuses meta itself


def _check_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TensorSnapError(
            f"dtype={dtype!r} is not a floating-point torch.dtype; dtype= casts floating-point "
            "tensors only, so pass one such as torch.float16, torch.bfloat16 or torch.float32"
        )
    return dtype


def _check_pin(pin_memory: bool, device: torch.device | None) -> bool:
    if not _validate.flag(pin_memory, "pin_memory"):
        return False
    if device is not None and device.type != "cpu":
        raise TensorSnapError(
            f"pin_memory=True pins CPU copies, but device={str(device)!r}; "
            "drop pin_memory or pass device='cpu'"
        )
    if not torch.cuda.is_available():
        warnings.warn(
            "pin_memory=True but no CUDA device is available; copies use ordinary memory",
            stacklevel=4,
        )
        return False
    return True


def snapshot(
    obj: Any,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    pin_memory: bool = False,
) -> Any:
    """Return a deep copy of ``obj`` in which every tensor is detached and owns fresh storage.

    Structure and types are kept exactly (tuple, namedtuple, dict subclasses, dataclasses,
    ``transformers`` model outputs, arbitrary objects through the copy protocol); the same tensor
    twice gives one copy twice, and views of one base become views of one new base.

    Args:
        obj: Any value: a tensor, a nested structure, a model output, an ``nn.Module``.
        device: Where copies are made (default: where each tensor lives). Device-to-host copies
            are non-blocking and synchronized before ``snapshot`` returns.
        dtype: Cast floating-point tensors to this dtype; other tensors keep theirs.
        pin_memory: Put CPU copies of accelerator tensors in pinned memory.

    Returns:
        The copy.

    Raises:
        TensorSnapError: Something inside ``obj`` cannot be copied; the message names its path.

    Example:
        >>> import torch, tensorsnap
        >>> x = torch.ones(3, requires_grad=True) * 2  # a non-leaf: copy.deepcopy raises
        >>> copy = tensorsnap.snapshot({"y": x, "same": x})
        >>> _ = x.detach().add_(1)  # the live tensor changes in place; the copy does not
        >>> copy["y"].tolist(), copy["y"] is copy["same"], copy["y"].requires_grad
        ([2.0, 2.0, 2.0], True, False)
    """
    return Copier(device=device, dtype=dtype, pin_memory=pin_memory).copy_value(obj)
