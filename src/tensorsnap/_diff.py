"""Comparing two snapshots key by key: where does a second run start to differ from the first?

``diff(a, b)`` walks the keys of ``a`` in execution order, compares each value with the value
under the same key in ``b`` leaf by leaf (nested values are flattened into paths such as
``['hidden'][0]``), and reports per key the largest absolute and relative error, the first key
whose values diverge, keys present on one side only, and shape, dtype or structure mismatches.
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

__all__ = ["DiffResult", "KeyDiff", "diff", "leaves"]

# Elements compared at once: bounds the float64 temporaries for huge tensors.
_CHUNK = 2**22
# Rows shown by ``str(result)``; the rest are counted.
_SHOWN = 20


@dataclasses.dataclass(frozen=True)
class KeyDiff:
    """How the values under one key compare.

    Attributes:
        key: The key.
        close: True when the structure and shapes match and every element is within tolerance
            (NaNs in the same places count as equal). Dtypes may still differ.
        max_abs: Largest ``|a - b|`` over all tensor elements (``inf`` where a NaN or Inf sits
            on one side only), or None when no tensor elements could be compared.
        max_rel: Largest ``|a - b| / |b|`` (``inf`` where ``b`` is 0 and ``a`` is not), or None.
        mismatched: Number of tensor elements outside tolerance.
        numel: Number of tensor elements compared.
        worst: Path inside the value of the leaf holding ``max_abs`` (``""`` for a plain tensor).
        problems: Human-readable shape, dtype, structure or value mismatches, each naming the
            path inside the value.
        dtype_mismatch: True when some leaf has a different dtype on each side.
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


class DiffResult:
    """The outcome of :func:`diff`.

    Attributes:
        rtol: Relative tolerance used.
        atol: Absolute tolerance used.
        keys: One :class:`KeyDiff` per key present on both sides, in the order of ``a``.
        only_a: Keys present only in ``a``, in ``a``'s order.
        only_b: Keys present only in ``b``, in ``b``'s order.
        first_diverging: The first key (in ``a``'s execution order) whose values are not close,
            or None.
        equal: True when both sides have the same keys, every value is close and no dtype
            differs.
    """

    def __init__(
        self,
        keys: list[KeyDiff],
        only_a: list[str],
        only_b: list[str],
        rtol: float,
        atol: float,
    ) -> None:
        self.rtol = rtol
        self.atol = atol
        self.keys: tuple[KeyDiff, ...] = tuple(keys)
        self.only_a: tuple[str, ...] = tuple(only_a)
        self.only_b: tuple[str, ...] = tuple(only_b)
        self._by_key = {k.key: k for k in self.keys}
        self.first_diverging: str | None = next((k.key for k in self.keys if not k.close), None)
        self.equal = (
            not self.only_a
            and not self.only_b
            and all(k.close and not k.dtype_mismatch for k in self.keys)
        )

    def __getitem__(self, key: str) -> KeyDiff:
        try:
            return self._by_key[key]
        except KeyError:
            raise TensorSnapError(
                f"key {key!r} was not compared: it is not present on both sides"
            ) from None

    @property
    def differing(self) -> tuple[KeyDiff, ...]:
        """The compared keys that are not close or whose dtypes differ, in ``a``'s order."""
        return tuple(k for k in self.keys if not k.close or k.dtype_mismatch)

    def summary(self) -> str:
        """One line: how many keys were compared, how many differ, where divergence starts."""
        if self.equal:
            return f"equal: {len(self.keys)} keys within rtol={self.rtol:g}, atol={self.atol:g}"
        parts = [f"{len(self.differing)} of {len(self.keys)} compared keys differ"]
        if self.only_a:
            parts.append(f"{len(self.only_a)} only in a")
        if self.only_b:
            parts.append(f"{len(self.only_b)} only in b")
        line = "different: " + ", ".join(parts)
        if self.first_diverging is not None:
            line += f"; first diverging key: {self.first_diverging!r}"
        return line + f" (rtol={self.rtol:g}, atol={self.atol:g})"

    def __str__(self) -> str:
        lines = [self.summary()]
        rows = self.differing
        if rows:
            table = [("key", "max abs", "max rel", "mismatched", "problem")]
            for k in rows[:_SHOWN]:
                table.append(
                    (
                        k.key or '""',
                        format_error(k.max_abs),
                        format_error(k.max_rel),
                        f"{k.mismatched}/{k.numel}",
                        "; ".join(k.problems[:2]),
                    )
                )
            widths = [max(len(row[i]) for row in table) for i in range(5)]
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


def format_error(value: float | None) -> str:
    """An error value for tables: ``-`` for None, 3 significant digits otherwise."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.3g}"


def leaves(value: Any, parts: tuple[object, ...] = ()) -> Iterator[tuple[tuple[object, ...], Any]]:
    """Every leaf of a nested value with its path, containers in their own order.

    Tuples, lists, mappings and dataclasses are containers; tensors and everything else are
    leaves. The path is a tuple of items and attribute names, as :func:`format_path` renders.
    """
    if isinstance(value, torch.Tensor):
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
    """Running maxima over the leaves of one key."""

    def __init__(self) -> None:
        self.max_abs: float | None = None
        self.max_rel: float | None = None
        self.mismatched = 0
        self.numel = 0
        self.worst = ""

    def add(self, abs_err: float, rel_err: float, mismatched: int, numel: int, path: str) -> None:
        if self.max_abs is None or abs_err > self.max_abs:
            self.max_abs = abs_err
            self.worst = path
        self.max_rel = rel_err if self.max_rel is None else max(self.max_rel, rel_err)
        self.mismatched += mismatched
        self.numel += numel


def _compare_tensors(
    x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float
) -> tuple[float, float, int]:
    """Max abs error, max rel error and the number of elements outside tolerance."""
    if x.layout != torch.strided:
        x = x.to_dense()
    if y.layout != torch.strided:
        y = y.to_dense()
    if x.is_quantized:
        x = x.dequantize()
    if y.is_quantized:
        y = y.dequantize()
    y = y.to(x.device)
    exact = not (x.is_floating_point() or x.is_complex() or y.is_floating_point() or y.is_complex())
    wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    max_abs = max_rel = 0.0
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
        err = torch.nan_to_num(err, nan=math.inf)  # NaN or Inf on one side only
        scale = b.abs()
        rel = torch.where(err == 0, 0.0, err / scale)
        rel = torch.nan_to_num(rel, nan=math.inf)
        if exact:
            bad = ~same
        else:
            finite = torch.isfinite(a) & torch.isfinite(b)
            bad = ~same & ~((err <= atol + rtol * scale) & finite)
        if err.numel():
            max_abs = max(max_abs, float(err.max()))
            max_rel = max(max_rel, float(rel.max()))
        mismatched += int(bad.sum())
    return max_abs, max_rel, mismatched


def _compare_key(key: str, va: Any, vb: Any, rtol: float, atol: float) -> KeyDiff:
    la = dict(leaves(va))
    lb = dict(leaves(vb))
    problems: list[str] = []
    errors = _Errors()
    dtype_mismatch = False
    structure_ok = True
    for parts, x in la.items():
        path = format_path("", list(parts))
        where = f" at {path}" if path else ""
        if parts not in lb:
            problems.append(f"{path} only in a")
            structure_ok = False
            continue
        y = lb[parts]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                problems.append(f"shape {tuple(x.shape)} vs {tuple(y.shape)}{where}")
                structure_ok = False
                continue
            if x.dtype != y.dtype:
                dtype_mismatch = True
                problems.append(
                    f"dtype {str(x.dtype).removeprefix('torch.')} vs "
                    f"{str(y.dtype).removeprefix('torch.')}{where}"
                )
            abs_err, rel_err, bad = _compare_tensors(x, y, rtol, atol)
            errors.add(abs_err, rel_err, bad, x.numel(), path)
            if bad:
                problems.append(f"{bad} of {x.numel()} elements differ{where}")
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            problems.append(f"{type(x).__name__} vs {type(y).__name__}{where}")
            structure_ok = False
        elif not _same_plain(x, y):
            problems.append(f"{x!r} vs {y!r}{where}"[:200])
            structure_ok = False
    for parts in lb:
        if parts not in la:
            problems.append(f"{format_path('', list(parts))} only in b")
            structure_ok = False
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


def diff(
    a: Mapping[str, Any] | str | PathLike[str],
    b: Mapping[str, Any] | str | PathLike[str],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> DiffResult:
    """Compare two snapshots (or bundles) key by key, in ``a``'s execution order.

    An element is close when ``|a - b| <= atol + rtol * |b|`` (``torch.isclose``'s rule, so
    ``b`` is the reference); NaNs in the same places and equal infinities count as equal, and a
    NaN or Inf on one side only is a difference. Integer and bool tensors must be equal exactly.
    Tensors of different dtypes are compared in float64 and reported as a dtype mismatch.
    Nested values are compared leaf by leaf; container types are not compared, so a tuple and
    a list with equal items match (a bundle may bring some classes back as plain containers).

    Args:
        a: A :class:`Snapshot`, any mapping of keys to values, or the path of a bundle.
        b: The same for the other side (the reference for relative errors).
        rtol: Relative tolerance.
        atol: Absolute tolerance.

    Returns:
        A :class:`DiffResult`; ``result.equal``, ``result.first_diverging`` and ``print(result)``
        answer the usual questions.

    Raises:
        TensorSnapError: A side is neither a mapping nor a bundle path, a bundle cannot be read,
            or a tolerance is negative.

    Example:
        >>> import torch, tensorsnap
        >>> a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([3.0])}
        >>> b = {"x": torch.tensor([1.0, 2.5]), "y": torch.tensor([3.0])}
        >>> result = tensorsnap.diff(a, b)
        >>> result.equal, result.first_diverging, result["x"].max_abs
        (False, 'x', 0.5)
    """
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not isinstance(tol, (int, float)) or math.isnan(tol) or tol < 0:
            raise TensorSnapError(f"{name} must be a number >= 0, got {tol!r}")
    sa, sb = _as_snapshot(a, "a"), _as_snapshot(b, "b")
    keys_b = set(sb)
    compared: list[KeyDiff] = []
    only_a: list[str] = []
    for key in sa:
        if key in keys_b:
            compared.append(_compare_key(key, sa[key], sb[key], float(rtol), float(atol)))
        else:
            only_a.append(key)
    keys_a = set(sa)
    only_b = [key for key in sb if key not in keys_a]
    return DiffResult(compared, only_a, only_b, float(rtol), float(atol))
