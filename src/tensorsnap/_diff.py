"""Comparing two snapshots key by key: where does a second run start to differ from the first?

``diff(a, b)`` pairs the keys of ``a`` with those of ``b`` (by name, by a map of module paths,
by a callable or by aligning the two runs' structure, :mod:`._match`), walks the pairs in
``a``'s execution order and compares each pair's values leaf by leaf: by path when both have
the same structure, else by tensor leaves in order and shape (a ``(output, weights)`` tuple
against a plain tensor). It reports per key the largest absolute and relative error, a
scale-free error (relative L2 and SQNR), the first key whose values diverge, and keys on one
side only. Statistics records (``capture(stats=True)``) compare by digest (bitwise equality)
and otherwise by the error bounds their numbers imply.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
from collections.abc import Iterator, Mapping
from os import PathLike
from typing import Any

import torch

from ._errors import TensorSnapError, format_path
from ._match import Match, pair_keys, records_of
from ._stats import Stats, stats_of

__all__ = ["DiffResult", "KeyDiff", "default_tolerance", "diff", "format_error", "leaves"]

# Elements compared at once: bounds the float64 temporaries for huge tensors.
_CHUNK = 2**22
# Rows shown by ``str(result)``; the rest are counted.
_SHOWN = 20
# torch.testing.assert_close's defaults (rtol, atol) per dtype; the lower precision of the two
# sides decides. float8 has none there: its epsilon is the relative tolerance.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex32: (1e-3, 1e-5),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}
for _name, _tol in (("float8_e4m3fn", 0.125), ("float8_e5m2", 0.25)):
    if hasattr(torch, _name):
        _TOLERANCES[getattr(torch, _name)] = (_tol, 1e-3)
# rel L2 at or above this on every compared key, with none close: the runs look unrelated
_UNRELATED = 0.5


@dataclasses.dataclass(frozen=True)
class KeyDiff:
    """How the values under one pair of keys compare.

    Attributes:
        key: The key in ``a``.
        close: True when the paired leaves have the same shapes and every element is within
            tolerance (NaNs in the same places count as equal). Dtypes may still differ.
        max_abs: Largest ``|a - b|`` over the paired tensor elements (``inf`` where a NaN or
            Inf sits on one side only), or None when no tensor elements could be compared. For
            statistics records that are not bitwise equal, a lower bound (see ``bound``).
        max_rel: Largest ``|a - b| / |b|`` (``inf`` where ``b`` is 0 and ``a`` is not), or None.
        mismatched: Number of tensor elements outside tolerance.
        numel: Number of tensor elements compared.
        worst: Path inside the value of the leaf holding ``max_abs`` (``""`` for a plain tensor).
        problems: Human-readable shape, dtype, structure or value mismatches, each naming the
            path inside the value.
        dtype_mismatch: True when some paired leaf has a different dtype on each side.
        key_b: The key in ``b`` it was paired with (the same as ``key`` when paired by name).
        how: How the pair was found: ``"name"``, ``"map 'h.*' -> 'blocks.*'"``,
            ``"callable"`` or ``"auto: ..."`` with the evidence.
        rel_l2: ``||a - b|| / ||b||`` over the paired elements (scale-free: it can be read
            along the execution order even where every key is outside tolerance); ``inf``
            where ``b`` is all zeros and ``a`` is not, None without elements.
        sqnr: Signal-to-quantization-noise ratio ``10 log10(||b||^2 / ||a - b||^2)`` in dB
            (``inf`` for equal values), or None.
        rtol: Relative tolerance applied (the largest over the leaves).
        atol: Absolute tolerance applied (the largest over the leaves).
        notes: Leaves paired by position, leaves left unpaired, statistics compared by bounds:
            information, not differences.
        bound: True when errors come from statistics records, so that ``max_abs`` and
            ``rel_l2`` are lower bounds.
    """

    key: str
    close: bool
    max_abs: float | None
    max_rel: float | None
    mismatched: int
    numel: int
    worst: str
    problems: tuple[str, ...]
    dtype_mismatch: bool
    key_b: str = ""
    how: str = "name"
    rel_l2: float | None = None
    sqnr: float | None = None
    rtol: float = 0.0
    atol: float = 0.0
    notes: tuple[str, ...] = ()
    bound: bool = False

    def to_record(self) -> dict[str, Any]:
        """The fields as a plain dict (floats may be ``inf``)."""
        record = dataclasses.asdict(self)
        record["problems"] = list(self.problems)
        record["notes"] = list(self.notes)
        return record


class DiffResult:
    """The outcome of :func:`diff`.

    Attributes:
        rtol: The relative tolerance passed, or None when each leaf used its dtype's default.
        atol: The absolute tolerance passed, or None likewise.
        keys: One :class:`KeyDiff` per paired key, in the order of ``a``.
        only_a: Keys of ``a`` that were not paired, in ``a``'s order (never a divergence).
        only_b: Keys of ``b`` that were not paired, in ``b``'s order.
        pairs: ``(key_a, key_b, how)`` for every pair, in ``a``'s order.
        first_diverging: The first key (in ``a``'s execution order) whose values are not close,
            or None.
        first_diverging_b: Its partner in ``b``.
        origin: The module of ``a`` where the divergence starts: the module of the first
            diverging key, or, when that key is a module's input (``P:in``), the module whose
            code called it (P's parent); None without divergence.
        unrelated: True when the two sides look unrelated: nothing pairs, or no compared key is
            close and every one is off by at least half its size (rel L2 >= 0.5).
        equal: True when every key pairs, every value is close and no dtype differs.
    """

    def __init__(
        self,
        keys: list[KeyDiff],
        only_a: list[str],
        only_b: list[str],
        rtol: float | None,
        atol: float | None,
        origins: Mapping[str, str] | None = None,
    ) -> None:
        self.rtol = rtol
        self.atol = atol
        self.keys: tuple[KeyDiff, ...] = tuple(keys)
        self.only_a: tuple[str, ...] = tuple(only_a)
        self.only_b: tuple[str, ...] = tuple(only_b)
        self.pairs: tuple[tuple[str, str, str], ...] = tuple((k.key, k.key_b, k.how) for k in keys)
        self._by_key = {k.key: k for k in self.keys}
        first = next((k for k in self.keys if not k.close), None)
        self.first_diverging: str | None = first.key if first else None
        self.first_diverging_b: str | None = first.key_b if first else None
        self.origin: str | None = (origins or {}).get(first.key) if first else None
        self.equal = (
            not self.only_a
            and not self.only_b
            and all(k.close and not k.dtype_mismatch for k in self.keys)
        )
        errors = [k.rel_l2 for k in self.keys if k.rel_l2 is not None]
        sides = bool(self.keys or self.only_a) and bool(self.keys or self.only_b)
        self.unrelated = sides and (
            not self.keys
            or (
                not any(k.close for k in self.keys)
                and all(e >= _UNRELATED for e in errors)
                and len(errors) >= min(3, len(self.keys))
            )
        )

    def __getitem__(self, key: str) -> KeyDiff:
        try:
            return self._by_key[key]
        except KeyError:
            raise TensorSnapError(
                f"key {key!r} was not compared: it was not paired with a key of b "
                "(see result.only_a; diff(..., match='auto') pairs runs whose names differ)"
            ) from None

    @property
    def differing(self) -> tuple[KeyDiff, ...]:
        """The compared keys that are not close or whose dtypes differ, in ``a``'s order."""
        return tuple(k for k in self.keys if not k.close or k.dtype_mismatch)

    def _tolerance_text(self) -> str:
        if self.rtol is None and self.atol is None:
            return "tolerances per dtype"
        return f"rtol={_g(self.rtol)}, atol={_g(self.atol)}"

    def summary(self) -> str:
        """One line: how many keys were compared, how many differ, where divergence starts."""
        tolerance = self._tolerance_text()
        if self.equal:
            return f"equal: {len(self.keys)} keys within {tolerance}"
        parts = [f"{len(self.differing)} of {len(self.keys)} compared keys differ"]
        if self.only_a:
            parts.append(f"{len(self.only_a)} only in a")
        if self.only_b:
            parts.append(f"{len(self.only_b)} only in b")
        line = "different: " + ", ".join(parts)
        if self.first_diverging is not None:
            line += f"; first diverging key: {self.first_diverging!r}"
            if self.first_diverging_b != self.first_diverging:
                line += f" (b: {self.first_diverging_b!r})"
        line += f" ({tolerance})"
        if self.unrelated:
            if not self.keys:
                line += (
                    "; the two runs look unrelated: no key pairs (for a port with other module "
                    "names pass match='auto' or a map of module paths)"
                )
            else:
                line += (
                    "; the two runs look unrelated: no compared key is close and every one is "
                    "off by half its size or more (other weights, inputs or models?)"
                )
        return line

    def to_records(self) -> list[dict[str, Any]]:
        """One plain dict per compared key (the :class:`KeyDiff` fields), in ``a``'s order.

        Ready for ``pandas.DataFrame(result.to_records())``; floats may be ``inf``.
        """
        return [k.to_record() for k in self.keys]

    def to_dict(self) -> dict[str, Any]:
        """Everything in the result as plain data (what ``tensorsnap diff --json`` prints)."""
        return {
            "equal": self.equal,
            "summary": self.summary(),
            "rtol": self.rtol,
            "atol": self.atol,
            "first_diverging": self.first_diverging,
            "first_diverging_b": self.first_diverging_b,
            "origin": self.origin,
            "unrelated": self.unrelated,
            "only_a": list(self.only_a),
            "only_b": list(self.only_b),
            "keys": self.to_records(),
        }

    def __str__(self) -> str:
        lines = [self.summary()]
        rows = self.differing
        if rows:
            renamed = any(k.key_b != k.key for k in rows)
            table = [("key", "max abs", "max rel", "rel l2", "mismatched", "problem")]
            for k in rows[:_SHOWN]:
                name = k.key or '""'
                if renamed:
                    name += f" -> {k.key_b or chr(34) * 2}"
                table.append(
                    (
                        name,
                        format_error(k.max_abs),
                        format_error(k.max_rel),
                        format_error(k.rel_l2),
                        f"{k.mismatched}/{k.numel}",
                        "; ".join(k.problems[:2]),
                    )
                )
            widths = [max(len(row[i]) for row in table) for i in range(6)]
            for row in table:
                cells = (cell.ljust(w) for cell, w in zip(row, widths))
                lines.append("  " + "  ".join(cells).rstrip())
            if len(rows) > _SHOWN:
                lines.append(f"  ... and {len(rows) - _SHOWN} more")
        for side, keys in (("a", self.only_a), ("b", self.only_b)):
            if keys:
                shown = ", ".join(repr(k) for k in keys[:_SHOWN])
                more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
                lines.append(f"only in {side}: {shown}{more}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<DiffResult {self.summary()}>"


def _g(value: float | None) -> str:
    return "default" if value is None else f"{value:g}"


def format_error(value: float | None) -> str:
    """An error value for tables: ``-`` for None, ``inf``, or 3 significant digits."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


def default_tolerance(x: torch.dtype, y: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing ``x`` with ``y``: the lower precision's defaults."""
    if not (x.is_floating_point or x.is_complex) and not (y.is_floating_point or y.is_complex):
        return 0.0, 0.0  # integers and bools compare exactly
    candidates = [
        _TOLERANCES.get(d, (1e-7, 1e-7)) for d in (x, y) if d.is_floating_point or d.is_complex
    ]
    return max(c[0] for c in candidates), max(c[1] for c in candidates)


def leaves(value: Any, parts: tuple[object, ...] = ()) -> Iterator[tuple[tuple[object, ...], Any]]:
    """Every leaf of a nested value with its path, containers in their own order.

    Tuples, lists, mappings and dataclasses are containers; tensors and everything else are
    leaves. The path is a tuple of items and attribute names, as :func:`format_path` renders.
    """
    if isinstance(value, (torch.Tensor, Stats)):
        yield parts, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from leaves(item, (*parts, i))
    elif isinstance(value, Mapping):
        for k, item in value.items():
            yield from leaves(item, (*parts, k))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from leaves(getattr(value, field.name), (*parts, field.name))
    elif _is_object(value):
        # an object with attributes (a transformers cache): compared by its attributes, keyed
        # as a bundle stores it (a plain dict of them), so live and loaded values line up
        for k, item in vars(value).items():
            if isinstance(k, str):
                yield from leaves(item, (*parts, k))
    else:
        yield parts, value


def _is_object(value: Any) -> bool:
    if isinstance(value, (type, enum.Enum, types.FunctionType, types.ModuleType, torch.nn.Module)):
        return False
    return isinstance(getattr(value, "__dict__", None), dict)


class _Errors:
    """Running maxima and sums over the paired leaves of one key."""

    def __init__(self) -> None:
        self.max_abs: float | None = None
        self.max_rel: float | None = None
        self.mismatched = 0
        self.numel = 0
        self.worst = ""
        self.err_sq = 0.0
        self.ref_sq = 0.0
        self.rtol = 0.0
        self.atol = 0.0
        self.bound = False

    def add(self, found: _Found, numel: int, path: str) -> None:
        if self.max_abs is None or found.max_abs > self.max_abs:
            self.max_abs = found.max_abs
            self.worst = path
        self.max_rel = found.max_rel if self.max_rel is None else max(self.max_rel, found.max_rel)
        self.mismatched += found.mismatched
        self.numel += numel
        self.err_sq += found.err_sq
        self.ref_sq += found.ref_sq
        self.rtol = max(self.rtol, found.rtol)
        self.atol = max(self.atol, found.atol)
        self.bound = self.bound or found.bound

    def rel_l2(self) -> float | None:
        if self.max_abs is None:
            return None
        if self.err_sq == 0:
            return 0.0
        if math.isinf(self.err_sq) or self.ref_sq == 0:
            return math.inf
        return math.sqrt(self.err_sq / self.ref_sq)

    def sqnr(self) -> float | None:
        rel = self.rel_l2()
        if rel is None:
            return None
        if rel == 0:
            return math.inf
        if math.isinf(rel):
            return -math.inf
        return -20.0 * math.log10(rel)


@dataclasses.dataclass
class _Found:
    max_abs: float
    max_rel: float
    mismatched: int
    err_sq: float
    ref_sq: float
    rtol: float
    atol: float
    bound: bool = False


def _dense(t: torch.Tensor) -> torch.Tensor:
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.dequantize()
    return t


def _compare_tensors(
    x: torch.Tensor, y: torch.Tensor, rtol: float | None, atol: float | None
) -> _Found:
    """Errors of ``x`` against the reference ``y`` and the elements outside tolerance.

    With ``rtol``/``atol`` None, each takes the lower precision's default, and the absolute
    tolerance grows to ``rtol`` times the RMS of ``y``: rounding in a lower precision errs
    relative to the tensor's scale, not to each element (a sum that cancels to near 0 is as
    rounded as its terms).
    """
    x, y = _dense(x), _dense(y)
    y = y.to(x.device)
    exact = not (x.is_floating_point() or x.is_complex() or y.is_floating_point() or y.is_complex())
    wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    d_rtol, d_atol = default_tolerance(x.dtype, y.dtype)
    r = d_rtol if rtol is None else rtol
    a_tol = d_atol if atol is None else atol
    if atol is None and not exact and flat_y.numel():
        squares = 0.0
        for start in range(0, flat_y.numel(), _CHUNK):  # in chunks, as below: bounded memory
            part = flat_y[start : start + _CHUNK].to(wide).abs()
            squares += float(torch.where(torch.isfinite(part), part, 0.0).square().sum())
        a_tol = max(a_tol, r * math.sqrt(squares / flat_y.numel()))
    if exact:
        r = a_tol = 0.0
    max_abs = max_rel = 0.0
    err_sq = ref_sq = 0.0
    mismatched = 0
    for start in range(0, flat_x.numel(), _CHUNK):
        a = flat_x[start : start + _CHUNK]
        b = flat_y[start : start + _CHUNK]
        if exact:
            # integers and bools: compare exactly in their own (promoted) dtype
            same = a == b
            a, b = a.to(torch.float64), b.to(torch.float64)
        else:
            a, b = a.to(wide), b.to(wide)
            # equal infinities and NaNs in the same places count as equal
            same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        err = (a - b).abs()
        err = torch.where(same, 0.0, err)
        err = torch.nan_to_num(err, nan=math.inf, posinf=math.inf)  # NaN or Inf on one side
        scale = b.abs()
        rel = torch.where(err == 0, 0.0, err / scale)
        rel = torch.nan_to_num(rel, nan=math.inf, posinf=math.inf)
        if exact:
            bad = ~same
        else:
            finite = torch.isfinite(a) & torch.isfinite(b)
            bad = ~same & ~((err <= a_tol + r * scale) & finite)
        if err.numel():
            max_abs = max(max_abs, float(err.max()))
            max_rel = max(max_rel, float(rel.max()))
            err_sq += float(err.square().sum())
            ref_sq += float(torch.where(torch.isfinite(scale), scale, 0.0).square().sum())
        mismatched += int(bad.sum())
    # across two precisions the lower one's rounding errs like noise over the whole tensor,
    # and a few elements past the elementwise bound are no divergence when the tensor's
    # relative L2 error is within rtol (a NaN or Inf on one side makes err_sq infinite)
    mixed = rtol is None and atol is None and x.dtype != y.dtype and not exact
    noise = mixed and ref_sq > 0 and math.isfinite(err_sq) and err_sq <= r * r * ref_sq
    if noise:
        mismatched = 0
    return _Found(max_abs, max_rel, mismatched, err_sq, ref_sq, r, a_tol)


def _compare_stats(x: Any, y: Any, rtol: float | None, atol: float | None) -> _Found:
    """Two statistics records (or one and a tensor): exact by digest, else bounded.

    ``|max_a - max_b|``, ``|min_a - min_b|``, ``|mean_a - mean_b|``, ``|std_a - std_b|`` and
    ``|norm_a - norm_b| / sqrt(n)`` are each at most ``max |a - b|``, and
    ``|norm_a - norm_b| <= ||a - b||``; so the largest of them bounds the errors from below,
    and the key is provably outside tolerance when the bound exceeds ``atol + rtol * absmax``.
    """
    sx = x if isinstance(x, Stats) else stats_of(x)
    sy = y if isinstance(y, Stats) else stats_of(y)
    d_rtol, d_atol = default_tolerance(sx.dtype, sy.dtype)
    r = d_rtol if rtol is None else rtol
    a_tol = d_atol if atol is None else atol
    numel = sx.numel
    if sx.dtype == sy.dtype and sx.digest == sy.digest:
        return _Found(0.0, 0.0, 0, 0.0, sy.norm**2 if math.isfinite(sy.norm) else 0.0, r, a_tol)
    if atol is None and numel:
        a_tol = max(a_tol, r * sy.norm / math.sqrt(numel))
    diffs = [
        abs(sx.min - sy.min),
        abs(sx.max - sy.max),
        abs(sx.mean - sy.mean),
        abs(sx.std - sy.std),
        abs(sx.norm - sy.norm) / math.sqrt(numel) if numel else 0.0,
    ]
    finite = [d for d in diffs if not math.isnan(d)]
    lower = max(finite, default=0.0)
    if sx.nan != sy.nan or sx.inf != sy.inf:
        lower = math.inf
    exact = not (sx.dtype.is_floating_point or sx.dtype.is_complex)
    if exact and sx.dtype == sy.dtype:
        # integers and bools of one dtype: other bytes are other values, at least 1 apart
        # (statistics alone miss a permutation such as [1, 2, 3] against [3, 2, 1])
        lower = max(lower, 1.0)
    limit = 0.0 if exact else a_tol + r * (sy.absmax if math.isfinite(sy.absmax) else 0.0)
    # NaNs on both sides in equal numbers: no statistic shows whether they stand in the same
    # places, and the digests say the bytes differ, so closeness cannot be claimed
    hidden = sx.nan > 0 and sx.dtype == sy.dtype
    provably = lower > limit or (exact and lower > 0) or hidden
    norm_gap = abs(sx.norm - sy.norm) if math.isfinite(sx.norm - sy.norm) else math.inf
    rel = (
        lower / sy.absmax
        if sy.absmax and math.isfinite(sy.absmax)
        else (0.0 if not lower else math.inf)
    )
    ref_sq = sy.norm**2 if math.isfinite(sy.norm) else 0.0
    return _Found(lower, rel, 1 if provably else 0, norm_gap**2, ref_sq, r, a_tol, bound=True)


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, Stats))


def _pair_leaves(
    la: list[tuple[tuple[object, ...], Any]], lb: list[tuple[tuple[object, ...], Any]]
) -> tuple[list[tuple[str, str, Any, Any]], list[str]] | None:
    """Tensor leaves of two differently structured values, paired in order by shape.

    Returns the pairs ``(path_a, path_b, x, y)`` and notes on the leaves left unpaired, or
    None when the two values have the same paths (then they compare path by path).
    """
    if [p for p, _ in la] == [p for p, _ in lb]:
        return None
    ta = [(format_path("", list(p)), v) for p, v in la if _is_array(v)]
    tb = [(format_path("", list(p)), v) for p, v in lb if _is_array(v)]
    pairs: list[tuple[str, str, Any, Any]] = []
    notes: list[str] = []
    used: set[int] = set()
    cursor = 0
    for path, x in ta:
        found = next(
            (
                j
                for j in range(cursor, len(tb))
                if j not in used and _squeezed(tb[j][1].shape) == _squeezed(x.shape)
            ),
            None,
        )
        if found is None:
            notes.append(f"a{path or ' (the value)'} {_shape(x)} has no leaf of that shape in b")
            continue
        used.add(found)
        cursor = found + 1
        pairs.append((path, tb[found][0], x, tb[found][1]))
    for j, (path, y) in enumerate(tb):
        if j not in used:
            notes.append(f"b{path or ' (the value)'} {_shape(y)} is not paired")
    return pairs, notes


def _squeezed(shape: Any) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _shape(x: Any) -> str:
    return "(" + ", ".join(map(str, x.shape)) + ("," if len(x.shape) == 1 else "") + ")"


def _compare_pair(
    x: Any, y: Any, where: str, rtol: float | None, atol: float | None
) -> tuple[_Found | None, list[str], bool]:
    """One pair of array leaves: the errors, problems, and whether the dtypes differ."""
    problems: list[str] = []
    if tuple(x.shape) != tuple(y.shape):
        if _squeezed(x.shape) != _squeezed(y.shape):
            return None, [f"shape {tuple(x.shape)} vs {tuple(y.shape)}{where}"], False
        if isinstance(y, torch.Tensor):
            y = y.reshape(x.shape)  # (1, S, D) against (S, D): the same elements
    mismatch = x.dtype != y.dtype
    if mismatch:
        problems.append(
            f"dtype {str(x.dtype).removeprefix('torch.')} vs "
            f"{str(y.dtype).removeprefix('torch.')}{where}"
        )
    if isinstance(x, Stats) or isinstance(y, Stats):
        found = _compare_stats(x, y, rtol, atol)
        if found.mismatched:
            problems.append(f"statistics differ beyond tolerance{where}")
    else:
        found = _compare_tensors(x, y, rtol, atol)
        if found.mismatched:
            problems.append(f"{found.mismatched} of {x.numel()} elements differ{where}")
    return found, problems, mismatch


def _compare_key(
    key: str,
    va: Any,
    vb: Any,
    rtol: float | None,
    atol: float | None,
    key_b: str | None = None,
    how: str = "name",
) -> KeyDiff:
    la = list(leaves(va))
    lb = list(leaves(vb))
    problems: list[str] = []
    notes: list[str] = []
    errors = _Errors()
    dtype_mismatch = False
    structure_ok = True

    def compare(x: Any, y: Any, path: str) -> None:
        nonlocal dtype_mismatch, structure_ok
        found, more, mismatch = _compare_pair(x, y, f" at {path}" if path else "", rtol, atol)
        problems.extend(more)
        dtype_mismatch = dtype_mismatch or mismatch
        if found is None:
            structure_ok = False
        else:
            errors.add(found, math.prod(x.shape), path)

    paired = _pair_leaves(la, lb)
    if paired is not None:
        pairs, notes = paired
        if not pairs and (any(_is_array(v) for _, v in la) or any(_is_array(v) for _, v in lb)):
            problems.append("no tensor leaves of the same shape on both sides")
            structure_ok = False
        elif pairs and (len(la) > 1 or len(lb) > 1):
            notes.insert(
                0,
                "paired by tensor leaves: "
                + ", ".join(f"a{pa or ''} ~ b{pb or ''}" for pa, pb, _, _ in pairs[:6])
                + (" ..." if len(pairs) > 6 else ""),
            )
        for pa, _, x, y in pairs:
            compare(x, y, pa)
    else:
        for (parts, x), (_, y) in zip(la, lb):
            path = format_path("", list(parts))
            where = f" at {path}" if path else ""
            if _is_array(x) and _is_array(y):
                if tuple(x.shape) != tuple(y.shape) and _squeezed(x.shape) == _squeezed(y.shape):
                    notes.append(
                        f"shapes {_shape(x)} and {_shape(y)}{where} differ by dims of size 1"
                    )
                compare(x, y, path)
            elif _is_array(x) or _is_array(y):
                problems.append(f"{type(x).__name__} vs {type(y).__name__}{where}")
                structure_ok = False
            elif not _same_plain(x, y):
                problems.append(f"{x!r} vs {y!r}{where}"[:200])
                structure_ok = False
    if errors.bound:
        notes.append("compared by statistics: max abs and rel l2 are lower bounds")
    return KeyDiff(
        key=key,
        close=structure_ok and errors.mismatched == 0,
        max_abs=errors.max_abs,
        max_rel=errors.max_rel,
        mismatched=errors.mismatched,
        numel=errors.numel,
        worst=errors.worst,
        problems=tuple(problems),
        dtype_mismatch=dtype_mismatch,
        key_b=key if key_b is None else key_b,
        how=how,
        rel_l2=errors.rel_l2(),
        sqnr=errors.sqnr(),
        rtol=errors.rtol,
        atol=errors.atol,
        notes=tuple(notes),
        bound=errors.bound,
    )


def _same_plain(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    try:
        return bool(x == y)
    except Exception:  # objects whose == raises or is ambiguous are compared by identity
        return x is y


def _as_snapshot(value: Any, side: str) -> Mapping[str, Any]:
    if isinstance(value, (str, PathLike)):
        from ._bundle import load

        return load(value)
    if isinstance(value, Mapping):
        return value
    raise TensorSnapError(
        f"diff({side}=...) takes a Snapshot, a mapping of keys to values or a bundle path; "
        f"got {type(value).__name__}"
    )


def _origins(snap: Mapping[str, Any]) -> dict[str, str]:
    """Per key of ``a``, the module where a divergence first seen at that key starts."""
    out = {}
    for r in records_of(snap):
        if r.kind in ("input", "kwargs"):
            # the input already differs: the code that made it ran in the caller
            out[r.key] = r.module.rsplit(".", 1)[0] if "." in r.module else ""
        else:
            out[r.key] = r.module
    return out


def diff(
    a: Mapping[str, Any] | str | PathLike[str],
    b: Mapping[str, Any] | str | PathLike[str],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    match: Match = None,
) -> DiffResult:
    """Compare two snapshots (or bundles) key by key, in ``a``'s execution order.

    An element is close when ``|a - b| <= atol + rtol * |b|`` (``torch.isclose``'s rule, so
    ``b`` is the reference); NaNs in the same places and equal infinities count as equal, and a
    NaN or Inf on one side only is a difference. Integer and bool tensors must be equal exactly.
    By default the tolerances follow the lower precision of the two leaves
    (``torch.testing.assert_close``'s defaults: float32 ``rtol=1.3e-6``, bfloat16 ``1.6e-2``,
    float16 ``1e-3``, float64 ``1e-7``), and ``atol`` grows to ``rtol`` times the RMS of ``b``'s
    leaf, since rounding errs relative to a tensor's scale; and leaves of two different dtypes
    are also close when their relative L2 error is within ``rtol``, however a few elements fall.
    So a faithful bf16 run against an fp32 run is not reported diverging. Passing
    ``rtol``/``atol`` applies them as given to every leaf. Each key also gets a scale-free
    error (``rel_l2``, ``sqnr``), to read where error grows even when everything is outside
    tolerance.

    Nested values are compared leaf by leaf: by path when both have the same structure (the
    container types are not compared, so a tuple and a list with equal items match), else by
    tensor leaves in order and shape, so that ``(output, attn_weights)`` pairs with a plain
    tensor and a ``ModelOutput`` with a tensor of its logits; unpaired leaves are notes.
    Statistics records (``capture(stats=True)``) compare by digest when both sides have one,
    else by the error bounds the statistics imply (``KeyDiff.bound``).

    Args:
        a: A :class:`Snapshot`, any mapping of keys to values, or the path of a bundle.
        b: The same for the other side (the reference for relative errors).
        rtol: Relative tolerance (default: per dtype, as above).
        atol: Absolute tolerance (default: per dtype, as above).
        match: How keys pair: None (same names), a dict of ``a``'s module paths to ``b``'s
            where each ``*`` stands for one dotted segment and is carried over in order
            (``{"transformer.h.*.mlp": "blocks.*.ffn"}``; the first pattern matching the
            whole path wins, else the first matching a leading part of it, whose rest carries
            over; ``#n``, ``/op`` and ``:kind`` suffixes carry over; keys no pattern matches pair
            by name), a callable ``key_a -> key_b | None``, or ``"auto"``, which aligns the two
            runs by call-tree shape, execution order, output shapes and dtypes, values and op
            names (``result.pairs`` says how each pair was found). Unpaired keys are listed in
            ``only_a``/``only_b`` and never count as a divergence.

    Returns:
        A :class:`DiffResult`; ``result.equal``, ``result.first_diverging`` and ``print(result)``
        answer the usual questions; ``result.to_records()`` gives plain rows for scripts.

    Raises:
        TensorSnapError: A side is neither a mapping nor a bundle path, a bundle cannot be read,
            a tolerance is negative, or ``match`` is not one of the forms above.

    Example:
        >>> import torch, tensorsnap
        >>> a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([3.0])}
        >>> b = {"x": torch.tensor([1.0, 2.5]), "y": torch.tensor([3.0])}
        >>> result = tensorsnap.diff(a, b)
        >>> result.equal, result.first_diverging, result["x"].max_abs
        (False, 'x', 0.5)
        >>> ported = {"blocks.0.ffn": torch.tensor([1.0]), "blocks.1.ffn": torch.tensor([2.0])}
        >>> ref = {"h.0.mlp": torch.tensor([1.0]), "h.1.mlp": torch.tensor([2.5])}
        >>> tensorsnap.diff(ported, ref, match={"blocks.*.ffn": "h.*.mlp"}).first_diverging_b
        'h.1.mlp'
    """
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is None:
            continue
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or math.isnan(tol) or tol < 0:
            raise TensorSnapError(
                f"{name} must be a number >= 0 (or None for the default), got {tol!r}"
            )
    sa, sb = _as_snapshot(a, "a"), _as_snapshot(b, "b")
    pairs, only_a, only_b = pair_keys(sa, sb, match)
    r = None if rtol is None else float(rtol)
    t = None if atol is None else float(atol)
    compared = [_compare_key(ka, sa[ka], sb[kb], r, t, kb, how) for ka, kb, how in pairs]
    return DiffResult(compared, only_a, only_b, r, t, _origins(sa))
