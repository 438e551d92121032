"""Property tests for ``tensorsnap.snapshot``: random nested structures of random tensors.

Every tensor is built as an arbitrary strided view (``set_``) onto a few random storages, so
the cases include overlapping and disjoint slices, transposed and channels_last layouts,
expanded stride-0 views, 0-dim and zero-size tensors and reinterpretations of one storage
as several dtypes. The references are independent of the code under test: expected values are
integer reinterpretations cloned before the call, and aliasing is checked through the raw
byte addresses of every element.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, NamedTuple

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorsnap

SETTINGS = settings(
    max_examples=int(os.environ.get("TENSORSNAP_HYPOTHESIS_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# dtypes that can reinterpret each other's bytes (same item size), grouped by item size
_FAMILIES: dict[int, list[torch.dtype]] = {
    1: [torch.uint8, torch.int8, torch.float8_e4m3fn],
    2: [torch.float16, torch.bfloat16, torch.int16],
    4: [torch.float32, torch.int32],
    8: [torch.float64, torch.int64, torch.complex64],
    16: [torch.complex128],
}
# an integer dtype of each item size, to compare values bit for bit (NaN payloads, -0.0)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass
class Box:
    value: Any
    label: str = "box"


@dataclasses.dataclass(frozen=True)
class FrozenBox:
    value: Any


@dataclasses.dataclass(slots=True)
class SlotBox:
    value: Any
    extra: Any = None


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as integers of the same width, so that equality is bitwise."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.dtype == torch.complex128:
        return torch.view_as_real(t).view(torch.int64)
    return t.view(_BITS[t.element_size()])


def byte_addresses(t: torch.Tensor) -> np.ndarray:
    """The memory address of every byte of every element of ``t``, in element order."""
    itemsize = t.element_size()
    offsets = np.zeros((), dtype=np.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets[..., None] + np.arange(size, dtype=np.int64) * stride
    start = t.untyped_storage().data_ptr() + t.storage_offset() * itemsize
    elements = start + offsets.reshape(-1) * itemsize
    return (elements[:, None] + np.arange(itemsize, dtype=np.int64)).reshape(-1)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of ``t`` (writes go to that storage)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


# -- building random inputs -----------------------------------------------------------------


@st.composite
def storages(draw: st.DrawFn) -> tuple[torch.UntypedStorage, int]:
    """A storage of random bytes and its item size (0 means a bool storage)."""
    kind = draw(st.sampled_from([0, 1, 2, 4, 8, 16]))
    count = draw(st.integers(0, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    nbytes = count * max(kind, 1)
    high = 2 if kind == 0 else 256
    raw = torch.randint(0, high, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.untyped_storage(), kind


@st.composite
def strided_view(draw: st.DrawFn, storage: torch.UntypedStorage, kind: int) -> torch.Tensor | None:
    """An arbitrary strided view that stays inside ``storage``; None if nothing fits."""
    dtype = torch.bool if kind == 0 else draw(st.sampled_from(_FAMILIES[kind]))
    itemsize = max(kind, 1)
    capacity = storage.nbytes() // itemsize
    ndim = draw(st.integers(0, 3))
    shape = draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
    strides = draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim))
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides) if n > 0)
    if 0 in shape:
        extent = 0
    if extent > capacity:
        if 0 not in shape:
            return None
        extent = 0
    offset = draw(st.integers(0, max(capacity - extent, 0)))
    return torch.empty(0, dtype=dtype).set_(storage, offset, shape, strides)


@st.composite
def natural_view(draw: st.DrawFn, base: torch.Tensor) -> torch.Tensor:
    """A view that user code makes every day: slice, transpose, expand, select, permute."""
    how = draw(st.sampled_from(["slice", "transpose", "expand", "select", "flat", "self"]))
    if base.dim() == 0 or base.numel() == 0 or how == "self":
        return base
    if how == "slice":
        dim = draw(st.integers(0, base.dim() - 1))
        start = draw(st.integers(0, base.shape[dim]))
        stop = draw(st.integers(start, base.shape[dim]))
        step = draw(st.integers(1, 3))
        return base[(slice(None),) * dim + (slice(start, stop, step),)]
    if how == "transpose":
        return base.transpose(0, -1)
    if how == "expand":
        return base.unsqueeze(0).expand(3, *base.shape)
    if how == "select":
        return base.select(0, draw(st.integers(0, base.shape[0] - 1)))
    return base.reshape(-1) if base.is_contiguous() else base.unsqueeze(-1)


@st.composite
def tensor_pool(draw: st.DrawFn) -> list[torch.Tensor]:
    """Tensors that share a few storages in every way a model can make them share."""
    pool: list[torch.Tensor] = []
    for storage, kind in draw(st.lists(storages(), min_size=1, max_size=3)):
        for _ in range(draw(st.integers(1, 4))):
            view = draw(strided_view(storage, kind))
            if view is not None:
                pool.append(view)
    for _ in range(draw(st.integers(0, 3))):
        if pool:
            pool.append(draw(natural_view(draw(st.sampled_from(pool)))))
    if draw(st.booleans()):
        # a channels_last activation and a view of it
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        image = torch.randn(2, 3, 4, 5, generator=gen).to(dtype)
        image = image.contiguous(memory_format=torch.channels_last)
        pool += [image, image[:, 1:]]
    if not pool:
        pool.append(torch.empty(0))
    return pool


def build_structure(draw: st.DrawFn, pool: list[torch.Tensor], depth: int = 0) -> Any:
    """A random nested structure whose leaves come from ``pool`` (so tensors repeat)."""
    choices = ["tensor", "tensor", "scalar"]
    if depth < 3:
        choices += ["list", "tuple", "dict", "pair", "box", "frozen", "slots", "ordered"]
    kind = draw(st.sampled_from(choices))
    if kind == "tensor":
        return draw(st.sampled_from(pool))
    if kind == "scalar":
        return draw(
            st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3))
        )
    size = draw(st.integers(0, 3))
    items = [build_structure(draw, pool, depth + 1) for _ in range(max(size, 2))][:size]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    if kind == "dict":
        return {f"k{i}": item for i, item in enumerate(items)}
    if kind == "ordered":
        return collections.OrderedDict((f"k{i}", item) for i, item in enumerate(items))
    items += [None, None]
    if kind == "pair":
        return Pair(items[0], items[1])
    if kind == "box":
        return Box(items[0])
    if kind == "frozen":
        return FrozenBox(items[0])
    return SlotBox(items[0], items[1])


@st.composite
def structures(draw: st.DrawFn) -> tuple[Any, list[torch.Tensor]]:
    pool = draw(tensor_pool())
    obj = build_structure(draw, pool)
    if draw(st.booleans()):
        # the same container reached twice, and every pooled tensor at least once
        obj = [obj, obj, pool]
    return obj, pool


# -- walking a source and its copy side by side ---------------------------------------------


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if dataclasses.is_dataclass(obj):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return []


def paired_tensors(src: Any, res: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Walk both structures; check types, scalars and identity; return the tensor pairs."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward: dict[int, int] = {}
    backward: dict[int, int] = {}
    keep: list[Any] = []

    def walk(a: Any, b: Any) -> None:
        assert type(a) is type(b), (type(a), type(b))
        if isinstance(a, torch.Tensor) or _children(a) or isinstance(a, (list, dict)):
            # identity mirrored: one source object <-> one result object, both ways
            assert forward.setdefault(id(a), id(b)) == id(b)
            assert backward.setdefault(id(b), id(a)) == id(a)
            keep.extend((a, b))
        if isinstance(a, torch.Tensor):
            assert a is not b
            pairs.append((a, b))
            return
        if isinstance(a, dict):
            assert list(a.keys()) == list(b.keys())
        kids_a, kids_b = _children(a), _children(b)
        if not kids_a and not isinstance(a, (list, tuple, dict)):
            assert a == b or (a != a and b != b)
            return
        assert len(kids_a) == len(kids_b)
        for x, y in zip(kids_a, kids_b):
            walk(x, y)

    walk(src, res)
    return pairs


def check_aliasing(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Bytes shared in the source are shared in the copy, and no others; sides are disjoint.

    Each byte of each element has an address in the source and one in the copy; aliasing is
    mirrored exactly when that correspondence is a bijection.
    """
    src = [byte_addresses(a) for a, _ in pairs]
    res = [byte_addresses(b) for _, b in pairs]
    if not pairs or sum(len(x) for x in src) == 0:
        return
    src_all, res_all = np.concatenate(src), np.concatenate(res)
    together = np.unique(np.stack([src_all, res_all], axis=1), axis=0)
    assert len(together) == len(np.unique(src_all)) == len(np.unique(res_all))
    # no result storage overlaps any source storage
    src_ranges = {(a.untyped_storage().data_ptr(), a.untyped_storage().nbytes()) for a, _ in pairs}
    for _, b in pairs:
        lo, n = b.untyped_storage().data_ptr(), b.untyped_storage().nbytes()
        for s_lo, s_n in src_ranges:
            assert n == 0 or s_n == 0 or lo + n <= s_lo or s_lo + s_n <= lo


@given(structures())
@SETTINGS
def test_snapshot_mirrors_structure_values_layout_and_aliasing(case: Any) -> None:
    obj, pool = case
    expected = {id(t): bits(t).clone() for t in pool}
    result = tensorsnap.snapshot(obj)
    pairs = paired_tensors(obj, result)
    for a, b in pairs:
        assert (b.shape, b.dtype, b.device, b.stride()) == (a.shape, a.dtype, a.device, a.stride())
        assert not b.requires_grad and b.grad_fn is None
        assert torch.equal(bits(b), expected[id(a)])
    check_aliasing(pairs)


@given(structures())
@SETTINGS
def test_mutating_either_side_never_changes_the_other(case: Any) -> None:
    obj, pool = case
    expected = {id(t): bits(t).clone() for t in pool}
    result = tensorsnap.snapshot(obj)
    pairs = paired_tensors(obj, result)
    # flipping the lowest bit of every byte keeps bool storages valid and changes every value
    for storage in {a.untyped_storage().data_ptr(): storage_bytes(a) for a, _ in pairs}.values():
        storage.bitwise_xor_(1)
    for a, b in pairs:
        assert torch.equal(bits(b), expected[id(a)])
    source_now = {id(a): bits(a).clone() for a, _ in pairs}
    for storage in {b.untyped_storage().data_ptr(): storage_bytes(b) for _, b in pairs}.values():
        storage.bitwise_xor_(1)
    for a, _ in pairs:
        assert torch.equal(bits(a), source_now[id(a)])


@given(tensor_pool())
@SETTINGS
def test_a_lone_view_copies_no_more_than_it_can_reach(pool: list[torch.Tensor]) -> None:
    for t in pool:
        result = tensorsnap.snapshot(t)
        reach = 0
        if t.numel() > 0:
            reach = (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()
        # spans are aligned down to 16 bytes so that views of any dtype stay element-aligned
        assert result.untyped_storage().nbytes() <= reach + 15
        assert result.stride() == t.stride()
        assert torch.equal(bits(result), bits(t))


def element_addresses(t: torch.Tensor) -> np.ndarray:
    """The address of the first byte of every element, in element order."""
    return byte_addresses(t)[:: t.element_size()] if t.numel() else np.zeros(0, np.int64)


@given(structures())
@SETTINGS
def test_dtype_casts_floating_tensors_and_keeps_their_aliasing(case: Any) -> None:
    obj, pool = case
    # every floating dtype widens to float64 exactly, so the reference is torch's own cast
    expected = {
        id(t): t.to(torch.float64) if t.is_floating_point() else bits(t).clone() for t in pool
    }
    result = tensorsnap.snapshot(obj, dtype=torch.float64)
    pairs = paired_tensors(obj, result)
    groups: dict[tuple[int, torch.dtype], list[tuple[np.ndarray, np.ndarray]]] = {}
    for a, b in pairs:
        assert (b.shape, b.stride()) == (a.shape, a.stride())
        if a.is_floating_point():
            assert b.dtype == torch.float64
            want = expected[id(a)]
            assert torch.equal(b.isnan(), want.isnan())
            assert torch.equal(bits(b)[~b.isnan()], bits(want)[~want.isnan()])
        else:
            assert b.dtype == a.dtype
            assert torch.equal(bits(b), expected[id(a)])
        key = (a.untyped_storage().data_ptr(), a.dtype)
        groups.setdefault(key, []).append((element_addresses(a), element_addresses(b)))
    # among tensors of one source dtype and storage, shared elements stay shared, no others
    for members in groups.values():
        src = np.concatenate([s for s, _ in members])
        res = np.concatenate([r for _, r in members])
        together = np.unique(np.stack([src, res], axis=1), axis=0) if len(src) else src
        assert len(together) == len(np.unique(src)) == len(np.unique(res))
