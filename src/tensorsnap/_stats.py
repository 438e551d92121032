"""Statistics instead of copies: ``capture(model, stats=True)`` keeps a small record per tensor.

Each tensor a capture selects is reduced, on its own device and without waiting for the
result, to one small vector of float64 statistics and one 64-bit hash of its bytes. The vectors
of many keys are read back together (one host transfer per device) when the block ends, when
more than ``_PENDING`` of them wait, or when a value is read inside the block; a run on CUDA
therefore never waits for the GPU once per key. What is kept is O(keys): a full ``ops=True``
capture of a model whose activations would not fit in memory fits.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from ._errors import TensorSnapError

__all__ = ["Stats", "StatsReducer", "StatsStore", "stats_of", "stats_session"]

# Pending reductions read back at once when this many wait (bounds device memory held by them).
_PENDING = 8192
# Elements reduced at once: bounds the float64 temporaries of huge tensors.
_CHUNK = 2**24
# Words hashed at once, each with its own weight from a table of this length per device.
_BLOCK = 2**20
_M64 = 2**64


def _signed(value: int) -> int:
    return value - _M64 if value >= 2**63 else value


# splitmix64's constants, as torch's signed int64 (arithmetic wraps modulo 2**64 on every device)
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
# objects whose attributes are code, not data
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.MethodType, torch.nn.Module)
_DIGEST = re.compile(r"[0-9a-f]{16}")
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Stats:
    """Statistics of one captured tensor, kept by ``capture(model, stats=True)`` instead of it.

    ``min``, ``max``, ``mean``, ``std`` (population), ``absmax`` and ``norm`` (L2) are taken
    over the finite elements (NaN when there is none); ``nan`` and ``inf`` count the others.
    Complex tensors are described by their real and imaginary parts together, integer and bool
    tensors by their values as numbers. ``digest`` is a 64-bit hash (16 hex digits) of the
    tensor's bytes in row-major order: equal digests with equal shape and dtype mean bitwise
    equal values up to hash collisions: it is a weighted sum of one 32-bit term per word (an
    element, or half of an 8-byte one; a bijection of the word at its position), so a change to
    a single word always changes it,
    and changes to several collide by chance about once in 2**32 (not 2**64); it does not
    depend on the device or on the strides.

    Example:
        >>> import torch, tensorsnap
        >>> model = torch.nn.Linear(3, 2)
        >>> with tensorsnap.capture(model, stats=True) as snap:
        ...     _ = model(torch.ones(4, 3))
        >>> s = snap[""]
        >>> s.shape, s.dtype, s.nan
        ((4, 2), torch.float32, 0)
    """

    __slots__ = ("_batch", "_fields", "_pending", "dtype", "shape")

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        fields: tuple[float, float, float, float, float, float, int, int, str] | None = None,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._fields = fields
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch: _Batch | None = None

    def _values(self) -> tuple[float, float, float, float, float, float, int, int, str]:
        if self._fields is None:
            if self._batch is None:  # pragma: no cover - every pending record has a batch
                raise RuntimeError("statistics were never computed")
            self._batch.resolve()
        if self._fields is None:  # pragma: no cover
            raise RuntimeError("statistics were never computed")
        return self._fields

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def min(self) -> float:
        return self._values()[0]

    @property
    def max(self) -> float:
        return self._values()[1]

    @property
    def mean(self) -> float:
        return self._values()[2]

    @property
    def std(self) -> float:
        return self._values()[3]

    @property
    def absmax(self) -> float:
        return self._values()[4]

    @property
    def norm(self) -> float:
        return self._values()[5]

    @property
    def nan(self) -> int:
        return self._values()[6]

    @property
    def inf(self) -> int:
        return self._values()[7]

    @property
    def digest(self) -> str:
        return self._values()[8]

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (dtype as its name, floats as floats, NaN as None)."""
        values = self._values()
        out: dict[str, Any] = {
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        for name, value in zip(_FIELDS, values):
            if isinstance(value, float) and not math.isfinite(value):
                out[name] = None if math.isnan(value) else (math.inf if value > 0 else -math.inf)
            else:
                out[name] = value
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Stats):
            return NotImplemented
        mine, theirs = self._values(), other._values()
        same_floats = all(
            x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(mine[:6], theirs[:6])
        )
        return (
            self.shape == other.shape
            and self.dtype == other.dtype
            and same_floats
            and mine[6:] == theirs[6:]
        )

    def __hash__(self) -> int:
        return hash((self.shape, self.dtype, self.digest))

    def __repr__(self) -> str:
        if self._fields is None and self._batch is not None and not self._batch.items:
            return f"Stats(shape={self.shape}, dtype={self.dtype}, pending)"  # pragma: no cover
        v = self._values()
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"Stats(shape={self.shape}, dtype={dtype}, min={v[0]:.4g}, max={v[1]:.4g}, "
            f"mean={v[2]:.4g}, std={v[3]:.4g}, absmax={v[4]:.4g}, norm={v[5]:.4g}, "
            f"nan={v[6]}, inf={v[7]}, digest={v[8]!r})"
        )


_FIELDS = ("min", "max", "mean", "std", "absmax", "norm", "nan", "inf", "digest")


class _Batch:
    """Reductions still on their devices, read back together."""

    def __init__(self) -> None:
        self.items: list[Stats] = []
        # the CUDA streams reductions were queued on: the read must wait for each of them
        self.streams: dict[int, Any] = {}

    def queued(self, device: torch.device) -> None:
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            self.streams.setdefault(id(stream), stream)

    def resolve(self) -> None:
        items, self.items = self.items, []
        streams, self.streams = list(self.streams.values()), {}
        by_device: dict[torch.device, list[Stats]] = {}
        for s in items:
            if s._pending is not None:
                by_device.setdefault(s._pending[0].device, []).append(s)
        for device, group in by_device.items():
            if device.type == "cuda":
                # a block may end on another stream than the model ran on (the stack and the
                # copy below run on the current one): order them after every queued reduction
                here = torch.cuda.current_stream(device)
                for stream in streams:
                    if stream.device == device and stream != here:
                        here.wait_stream(stream)
            floats = torch.stack([s._pending[0] for s in group if s._pending]).cpu().tolist()
            words = torch.stack([s._pending[1] for s in group if s._pending]).cpu().tolist()
            for s, f, w in zip(group, floats, words):
                s._fields = _finish(s.numel, f, w)
                s._pending = None
                s._batch = None


def _finish(numel: int, f: list[float], w: list[int]) -> Any:
    nan, nonfinite, total, squares, low, high = f
    count = numel - int(nonfinite)
    if count == 0:
        low = high = mean = std = absmax = math.nan
    else:
        mean = total / count
        std = math.sqrt(max(squares / count - mean * mean, 0.0))
        absmax = max(abs(low), abs(high))
    norm = math.sqrt(squares) if count else (0.0 if numel == 0 else math.nan)
    digest = f"{(w[0] ^ (numel * 0x9E3779B1)) % _M64:016x}"
    return (low, high, mean, std, absmax, norm, int(nan), int(nonfinite) - int(nan), digest)


def _mix(z: torch.Tensor) -> torch.Tensor:
    # splitmix64's finalizer (arithmetic shifts: a fixed bijection-like mixing on every device)
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    return z ^ (z >> 31)


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in row-major order as integer words: one per element of 1, 2 or 4
    bytes, two per element of 8 bytes."""
    t = t.contiguous()
    if t.is_complex():
        t = torch.view_as_real(t)
    size = t.element_size()
    if t.dtype == torch.bool or size not in _WORDS:
        return t.reshape(-1).view(torch.uint8)
    return t.reshape(-1).view(_WORDS[min(size, 4)])


def _reduce(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 statistics vector and the int64 hash of ``t``, left on its device."""
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    floats = _moments_if_finite(flat) if flat.device.type == "cpu" else None
    if floats is None:
        floats = _moments(flat)
    words = _words(t)
    digest = torch.zeros((), dtype=torch.int64, device=t.device)
    table = _table(t.device)
    for block, start in enumerate(range(0, words.numel(), _BLOCK)):
        w = words[start : start + _BLOCK]
        if w.dtype != torch.int32:
            w = w.to(torch.int32)
        weights = table[: w.numel()]
        # per element a bijection of its word (xor, then times an odd number), made
        # nonlinear by a shift; int32 arithmetic wraps the same way on every device
        z = (w ^ weights) * (weights | 1)
        z = z ^ ((z >> 16) & 0xFFFF)  # a logical shift: the xorshift stays a bijection
        digest = digest + z.sum(dtype=torch.int64) * _signed((2 * block + 1) * _MIX2 % _M64)
    return floats, digest.reshape(1)


_TABLES: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    """Pseudo-random int32 weights, one per position of a block, made once per device."""
    table = _TABLES.get(device)
    if table is None:
        index = torch.arange(_BLOCK, dtype=torch.int64, device=device)
        table = _mix(index * _GOLDEN + 1).to(torch.int32)
        _TABLES[device] = table
    return table


def _moments_if_finite(flat: torch.Tensor) -> torch.Tensor | None:
    """On the CPU, where reading a number waits for nothing: the unmasked statistics when every
    element is finite (a finite float64 sum proves it), else None for the masked path."""
    if flat.numel() == 0 or flat.numel() > _CHUNK:
        return None
    total = flat.sum(dtype=torch.float64)
    if not bool(torch.isfinite(total)):
        return None
    low, high = torch.aminmax(flat)
    squares = flat.to(torch.float64).square().sum()
    zero = torch.zeros((), dtype=torch.float64)
    return torch.stack([zero, zero, total, squares, low.to(torch.float64), high.to(torch.float64)])


def _moments(flat: torch.Tensor) -> torch.Tensor:
    """NaN count, non-finite count, sum, sum of squares, min and max over the finite elements."""
    device = flat.device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    nan = nonfinite = total = squares = zero
    low = torch.full((), math.inf, dtype=torch.float64, device=device)
    high = torch.full((), -math.inf, dtype=torch.float64, device=device)
    for start in range(0, flat.numel(), _CHUNK):
        x = flat[start : start + _CHUNK].to(torch.float64)
        finite = torch.isfinite(x)
        nan = nan + torch.isnan(x).sum()
        nonfinite = nonfinite + (~finite).sum()
        clean = torch.where(finite, x, 0.0)
        total = total + clean.sum()
        squares = squares + torch.dot(clean, clean)
        low = torch.minimum(low, torch.where(finite, x, math.inf).amin())
        high = torch.maximum(high, torch.where(finite, x, -math.inf).amax())
    return torch.stack([nan, nonfinite, total, squares, low, high])


def _dense(t: torch.Tensor) -> torch.Tensor:
    from ._dtensor import local

    if type(t) is not torch.Tensor:
        t = local(t)
        if type(t) is not torch.Tensor:
            t = t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.dequantize()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


class StatsReducer:
    """What a ``stats=True`` capture uses instead of the copy engine: values to Stats trees."""

    def __init__(self) -> None:
        self.batch = _Batch()

    def reduce(self, t: torch.Tensor) -> Stats:
        """A Stats record of ``t`` whose numbers are read back later, with many others."""
        record = Stats(tuple(t.shape), t.dtype)
        if t.is_meta or t.is_nested:
            record._fields = (math.nan,) * 6 + (0, 0, "")
            return record
        with torch.no_grad():
            record._pending = _reduce(_dense(t))
        record._batch = self.batch
        self.batch.queued(t.device)
        self.batch.items.append(record)
        if len(self.batch.items) >= _PENDING:
            self.batch.resolve()
        return record

    def copy_value(self, value: Any, root: str = "") -> Any:
        """``value`` with every tensor replaced by its :class:`Stats`.

        Containers keep their types and plain leaves stay as they are; an object with
        attributes (a transformers cache) becomes a dict of them, as a bundle brings it back.
        """
        return self._map(value, set())

    def _map(self, value: Any, active: set[int]) -> Any:
        if isinstance(value, torch.Tensor):
            return self.reduce(value)
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return value
        if id(value) in active:
            return None  # a reference cycle: statistics need no second visit
        active.add(id(value))
        try:
            return self._container(value, active)
        finally:
            active.discard(id(value))

    def _container(self, value: Any, active: set[int]) -> Any:
        fn = partial(self._map, active=active)
        if isinstance(value, tuple):
            items = [fn(item) for item in value]
            if type(value) is tuple:
                return tuple(items)
            if hasattr(value, "_fields"):  # namedtuple
                return type(value)(*items)
            return type(value)(items)  # torch.return_types and other structseqs
        if isinstance(value, list):
            return [fn(item) for item in value]
        if type(value) is dict:
            return {k: fn(v) for k, v in value.items()}
        if isinstance(value, Mapping):
            result = copy.copy(value)
            for k, v in value.items():
                result[k] = fn(v)  # type: ignore[index]
            return result
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            result = copy.copy(value)  # type: ignore[arg-type]
            for field in dataclasses.fields(value):
                object.__setattr__(result, field.name, fn(getattr(value, field.name)))
            return result
        attributes = getattr(value, "__dict__", None)
        if type(attributes) is dict and not isinstance(value, _OPAQUE):
            return {k: fn(v) for k, v in attributes.items() if isinstance(k, str)}
        return value

    def flush(self) -> None:
        self.batch.resolve()


class StatsStore:
    """A memory store whose values are Stats trees, resolved together at the end of the block."""

    def __init__(self, reducer: StatsReducer) -> None:
        self._values: dict[str, Any] = {}
        self._reducer = reducer

    def put(self, key: str, value: Any, nbytes: int) -> None:
        self._values[key] = value

    def get(self, key: str) -> Any:
        self._reducer.flush()
        return self._values[key]

    def flush(self) -> None:
        self._reducer.flush()

    def close(self) -> None:
        self._values.clear()


def stats_node(s: Stats) -> dict[str, Any]:
    """A bundle manifest's JSON node for ``s`` (floats as hex strings, exactly)."""
    from ._shards import dtype_name

    v = s._values()
    node: dict[str, Any] = {"type": "stats", "shape": list(s.shape), "dtype": dtype_name(s.dtype)}
    for name, value in zip(_FIELDS[:6], v[:6]):
        node[name] = float.hex(value)
    node.update(nan=v[6], inf=v[7], digest=v[8])
    return node


def stats_from_node(n: dict[str, Any], where: str) -> Stats:
    """The :class:`Stats` a manifest node describes; ValueError naming the field otherwise."""
    from ._shards import dtype_from_name

    shape = n.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"stats field 'shape' is {shape!r}, expected a list of sizes")
    floats = []
    for name in _FIELDS[:6]:
        value = n.get(name)
        if not isinstance(value, str):
            raise ValueError(f"stats field {name!r} is {value!r}, expected a hex float")
        floats.append(float.fromhex(value))
    counts = []
    for name in ("nan", "inf"):
        value = n.get(name)
        if type(value) is not int or value < 0:
            raise ValueError(f"stats field {name!r} is {value!r}, expected a count")
        counts.append(value)
    digest = n.get("digest")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"stats field 'digest' is {digest!r}, expected 16 hex digits")
    dtype = dtype_from_name(n.get("dtype"), where)
    return Stats(tuple(shape), dtype, (*floats, counts[0], counts[1], digest))  # type: ignore[arg-type]


def stats_session(
    lazy: bool, nonfinite: str | None, device: Any, dtype: Any, budget: int | None
) -> tuple[StatsReducer, StatsStore]:
    """The reducer and store of a ``capture(stats=True)``, after checking the other options."""
    for name, value, why in (
        ("lazy", lazy, "defers copies"),
        ("nonfinite", nonfinite, "checks copies (Stats.nan and Stats.inf count NaN and Inf)"),
        ("device", device, "places copies"),
        ("dtype", dtype, "casts copies"),
        ("max_memory", budget, "spills copies to disk"),
    ):
        if value not in (None, False):
            raise TensorSnapError(
                f"capture(stats=True) keeps statistics, not copies, so {name}={value!r} does "
                f"not apply ({name} {why}); drop {name}= or stats=True"
            )
    reducer = StatsReducer()
    return reducer, StatsStore(reducer)


def stats_of(t: torch.Tensor) -> Stats:
    """The :class:`Stats` of one tensor, computed now."""
    reducer = StatsReducer()
    record = reducer.reduce(t)
    reducer.flush()
    return record
