"""Reading a snapshot at a glance: per-tensor statistics, and one self-contained HTML report.

The report is a single page with no external resources and no plotting library: a sortable,
filterable statistics table, per-layer charts and histograms drawn as SVG in the browser by an
inline script (``_report.js``) from statistics embedded as JSON, and, given a second snapshot,
the diff against it. Cache and state tensors (a transformers ``past_key_values``) are grouped
apart from activations.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch

from ._diff import DiffResult, format_error, leaves
from ._errors import format_path
from ._snapshot import Record, human_bytes
from ._stats import Stats as SnapStats

__all__ = [
    "STATE",
    "Row",
    "Stats",
    "first_nonfinite",
    "group",
    "rows",
    "stored_bytes",
    "tensor_stats",
    "write_report",
]

_ROOT = '""'  # how the root module's key is shown
# The diff chart's log axis: 1e-8 (agreement) to 1e-1 (a tenth of the value off).
_DIFF_FLOOR, _DIFF_CEILING = 1e-8, 1e-1
# Bins of every histogram (table sparklines and plots).
_BINS = 32
# Histograms the page opens with (module outputs sampled evenly in execution order); any other
# key's histogram can be added on the page.
_INITIAL_HISTOGRAMS = 8


@dataclasses.dataclass(frozen=True)
class Stats:
    """Statistics of one tensor; mean, std, min and max are over its finite elements.

    Complex tensors are described by their magnitudes. ``hist`` holds ``_BINS`` counts between
    ``min`` and ``max`` (empty when there is no finite element).
    """

    numel: int
    mean: float
    std: float
    min: float
    max: float
    zeros: int
    nans: int
    infs: int
    hist: tuple[int, ...]

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def tensor_stats(t: torch.Tensor, *, hist: bool = True) -> Stats:
    """Statistics of ``t`` computed in float64 (NaN where there is no finite element)."""
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.dequantize()
    if t.is_complex():
        t = t.abs()
    x = t.detach().reshape(-1).to(torch.float64)
    numel = x.numel()
    nans = int(torch.isnan(x).sum())
    infs = int(torch.isinf(x).sum())
    zeros = int((x == 0).sum())
    finite = x[torch.isfinite(x)] if nans or infs else x
    if finite.numel() == 0:
        nan = math.nan
        return Stats(numel, nan, nan, nan, nan, zeros, nans, infs, ())
    low, high = float(finite.min()), float(finite.max())
    mean = float(finite.mean())
    std = float(finite.std(correction=0))
    counts: tuple[int, ...] = ()
    if hist:
        top = high if high > low else low + 1.0
        counts = tuple(int(c) for c in torch.histc(finite, bins=_BINS, min=low, max=top))
    return Stats(numel, mean, std, low, high, zeros, nans, infs, counts)


@dataclasses.dataclass(frozen=True)
class Row:
    """One leaf of one key: a tensor with its statistics, or a plain value (``stats`` None)."""

    index: int
    record: Record
    path: str
    shape: tuple[int, ...] | None
    dtype: str
    nbytes: int
    stats: Stats | None
    text: str

    @property
    def label(self) -> str:
        key = self.record.key or '""'
        return f"{key} {self.path}" if self.path else key


def rows(snap: Mapping[str, Any], *, stats: bool = True, hist: bool = True) -> list[Row]:
    """One :class:`Row` per leaf of every key of ``snap``, in execution order."""
    records = _records(snap)
    result: list[Row] = []
    for index, record in enumerate(records):
        value = snap[record.key]
        if next(iter(leaves(value)), None) is None:
            # an empty container (the inputs of a call that got none are ()): one row, so that
            # every key is listed
            text = repr(value)
            text = text if len(text) <= 60 else text[:57] + "..."
            result.append(Row(index, record, "", None, type(value).__name__, 0, None, text))
            continue
        for parts, leaf in leaves(value):
            path = format_path("", list(parts))
            if isinstance(leaf, SnapStats):  # capture(stats=True): its numbers, no tensor
                dtype = str(leaf.dtype).removeprefix("torch.")
                kept = Stats(
                    leaf.numel, leaf.mean, leaf.std, leaf.min, leaf.max, 0, leaf.nan, leaf.inf, ()
                )
                result.append(
                    Row(index, record, path, leaf.shape, dtype, 0, kept if stats else None, "")
                )
                continue
            if isinstance(leaf, torch.Tensor):
                dtype = str(leaf.dtype).removeprefix("torch.")
                nbytes = leaf.numel() * leaf.element_size()
                s = tensor_stats(leaf, hist=hist) if stats else None
                result.append(Row(index, record, path, tuple(leaf.shape), dtype, nbytes, s, ""))
            else:
                text = repr(leaf)
                text = text if len(text) <= 60 else text[:57] + "..."
                result.append(Row(index, record, path, None, type(leaf).__name__, 0, None, text))
    return result


def _records(snap: Mapping[str, Any]) -> list[Record]:
    records = getattr(snap, "records", None)
    if records is not None:  # a Snapshot, a loaded bundle, or a subset of one (ls -k)
        return list(records)
    # plain mappings (tests, hand-built comparisons) get minimal records
    return [Record(k, k, 0, None, "output", None, None, 0) for k in snap]


def first_nonfinite(table: list[Row]) -> Row | None:
    """The first row, in execution order, whose tensor holds a NaN or Inf."""
    return next((r for r in table if r.stats and (r.stats.nans or r.stats.infs)), None)


# -- grouping ---------------------------------------------------------------------------------

_GROUPS = {
    "output": "module outputs",
    "op": "op outputs",
    "grad": "gradients",
    "op_grad": "op gradients",
    "grad_in": "input gradients",
    "input": "module inputs",
    "kwargs": "module inputs",
    "saved": "saved for backward",
}
STATE = "cache and state"
# A leaf whose path inside its value names a cache (transformers' past_key_values, a Cache
# object's layers, a 'present' tuple) is state carried between steps, not an activation: its
# values (keys and values of every earlier position) would crowd the per-layer plots.
_STATE_PATH = re.compile(r"cache|past_key_values?|\bpresents?\b|\bpast\b", re.IGNORECASE)


def group(row: Row) -> str:
    """What a row is, for the report's plots and filters: a kind's plural, or ``STATE``."""
    if row.path and _STATE_PATH.search(row.path):
        return STATE
    return _GROUPS.get(row.record.kind, row.record.kind)


def stored_bytes(snap: Mapping[str, Any], table: list[Row]) -> str:
    """The total that ``ls``, ``capture`` and the report print: bytes the copies hold.

    A view is stored with the span of its base it can reach, so the copies can hold more than
    the tensors' own elements; then both are said.
    """
    held = sum(r.nbytes for r in _records(snap))
    own = sum(r.nbytes for r in table)
    if own == held:
        return human_bytes(held)
    return f"{human_bytes(held)} stored (tensors {human_bytes(own)}; views keep their base's span)"


# -- HTML ------------------------------------------------------------------------------------


def write_report(
    snap: Mapping[str, Any],
    path: str | PathLike[str],
    *,
    title: str = "tensorsnap report",
    source: str = "",
    against: Mapping[str, Any] | None = None,
    against_source: str = "",
    rtol: float | None = None,
    atol: float | None = None,
    match: Any = None,
    blame: Any = None,
) -> str:
    """Write one self-contained HTML page describing ``snap`` (and its diff with ``against``).

    The page needs no network and no library: its charts are SVG drawn by a small inline
    script from data embedded in the page (hover names the key, drag zooms, a click adds the
    key's histogram), and its tables sort and filter in place.

    Args:
        snap: The snapshot to describe.
        path: Where the page goes (parent directories are created).
        title: The page title.
        source: Where ``snap`` came from, shown in the header (a bundle path).
        against: A second snapshot; adds the diff of ``snap`` against it.
        against_source: Where ``against`` came from.
        rtol: Relative tolerance of the diff (default: per dtype, as ``diff``).
        atol: Absolute tolerance of the diff (default: per dtype).
        match: How the diff pairs keys, as ``diff(match=...)`` (``"auto"``, a map, a callable).
        blame: A :class:`~tensorsnap._blame.BlameResult` whose culprits the diff marks.

    Returns:
        The absolute path of the page.

    Raises:
        TensorSnapError: A bundle cannot be read.
    """
    from . import __version__
    from ._diff import diff

    table = rows(snap)
    result = diff(snap, against, rtol=rtol, atol=atol, match=match) if against is not None else None
    parts = [
        _HEAD.replace("%TITLE%", html.escape(title)),
        f"<h1>{html.escape(title)}</h1>",
        _summary(snap, table, source, __version__),
    ]
    if result is not None:
        parts.append(_diff_section(result, against_source, snap, against, blame))
    parts.append("<h2>Per-layer statistics</h2>")
    parts.append(_layer_plot(table) or "<p>No tensors with statistics to plot.</p>")
    parts.append(_histograms(table))
    parts.append(_stats_table(table))
    parts.append(_data("ts-rows", _row_data(table)))
    parts.append("<script>\n" + _script() + "\n</script>")
    parts.append("</body></html>\n")
    target = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return target


def _script() -> str:
    # beside this module so that it can be read and linted as JavaScript; inlined in the page
    with open(os.path.join(os.path.dirname(__file__), "_report.js"), encoding="utf-8") as f:
        return f.read().replace("</", "<\\/")


def _data(name: str, value: Any) -> str:
    """``value`` as JSON in the page; '<' escaped, so no key can end the script element."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return f'<script type="application/json" id="{name}">{text}</script>'


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _summary(snap: Mapping[str, Any], table: list[Row], source: str, version: str) -> str:
    nans = sum(r.stats.nans for r in table if r.stats)
    infs = sum(r.stats.infs for r in table if r.stats)
    kinds: dict[str, int] = {}
    for record in _records(snap):
        kinds[record.kind] = kinds.get(record.kind, 0) + 1
    kind_text = ", ".join(f"{n} {k}" for k, n in kinds.items())
    src = f"<code>{html.escape(source)}</code>, " if source else ""
    out = [
        f'<p class="meta">{src}{len(snap)} keys ({html.escape(kind_text)}), '
        f"{len(table)} leaves, {html.escape(stored_bytes(snap, table))}; tensorsnap {version}, "
        f"torch {html.escape(torch.__version__)}</p>"
    ]
    bad = first_nonfinite(table)
    if bad is not None and bad.stats is not None:
        n = table.index(bad)
        out.append(
            f'<p class="bad">{nans} NaN and {infs} Inf elements; first non-finite: '
            f'<a href="#row-{n}"><code>{html.escape(bad.label)}</code></a> '
            f"({bad.stats.nans} NaN, {bad.stats.infs} Inf of {bad.stats.numel} elements)</p>"
        )
    else:
        out.append('<p class="ok">0 NaN and 0 Inf elements</p>')
    state = [r for r in table if group(r) == STATE and r.shape is not None]
    if state:
        out.append(
            f'<p class="meta">{len(state)} cache and state tensors '
            f"({human_bytes(sum(r.nbytes for r in state))}) are kept apart from the "
            "activations: the plots and the table show them as the group "
            f"&ldquo;{STATE}&rdquo;.</p>"
        )
    return "\n".join(out)


def _diff_section(
    result: DiffResult,
    against_source: str,
    snap: Mapping[str, Any] | None = None,
    against: Mapping[str, Any] | None = None,
    blame: Any = None,
) -> str:
    src = f" against <code>{html.escape(against_source)}</code>" if against_source else ""
    status = "ok" if result.equal else "bad"
    out = [
        f"<h2>Diff{src}</h2>",
        f'<p class="{status}">{html.escape(result.summary())}</p>',
    ]
    culprits = set(getattr(blame, "culprits", ()) or ())
    if result.first_diverging is not None:
        first = next(k for k in result.keys if k.key == result.first_diverging)
        origin = f"; it starts in module <code>{html.escape(result.origin or _ROOT)}</code>"
        out.append(
            f'<p class="bad">First divergence: <code>{html.escape(first.key or _ROOT)}</code> '
            f"(paired with <code>{html.escape(first.key_b or _ROOT)}</code>, "
            f"{html.escape(first.how)}){origin if result.origin is not None else ''}.</p>"
        )
    if culprits:
        listed = ", ".join(f"<code>{html.escape(k or _ROOT)}</code>" for k in blame.culprits)
        out.append(f'<p class="bad">Culprits (blame): {listed}</p>')
    plot = _diff_plot(result)
    if plot:
        out.append(plot)
    head = (
        "#", "key", "paired with", "how", "rel l2", "max abs", "max rel", "mismatched",
        "a: mean ± std", "b: mean ± std", "problems and notes",
    )  # fmt: skip
    body = []
    for i, k in enumerate(result.keys):
        cls = []
        if k.key == result.first_diverging:
            cls.append("first")
        if not k.close or k.dtype_mismatch or k.key_b in culprits or k.key in culprits:
            cls.append("bad")
        texts = [*k.problems[:3], *k.notes[:2]]
        problems = "; ".join(texts) + (" ..." if len(k.problems) + len(k.notes) > 5 else "")
        cells = [
            _td(i, str(i)),
            _td(k.key, k.key or _ROOT, "key"),
            _td(k.key_b, k.key_b or _ROOT, "key"),
            _td(k.how, k.how, "text"),
            _td(_num(k.rel_l2), format_error(k.rel_l2)),
            _td(_num(k.max_abs), format_error(k.max_abs)),
            _td(_num(k.max_rel), format_error(k.max_rel)),
            _td(k.mismatched, f"{k.mismatched}/{k.numel}"),
            _side(snap, k.key),
            _side(against, k.key_b),
            _td(problems, problems, "text"),
        ]
        body.append(f'<tr class="{" ".join(cls)}">' + "".join(cells) + "</tr>")
    out.append(_table("diff", head, body))
    for side, keys in (("this snapshot", result.only_a), ("the other", result.only_b)):
        if keys:
            listed = ", ".join(f"<code>{html.escape(k or _ROOT)}</code>" for k in keys)
            out.append(f"<p>Only in {side}: {listed}</p>")
    return "\n".join(out)


def _side(snap: Mapping[str, Any] | None, key: str) -> str:
    """One side's first tensor of ``key`` as ``mean ± std``, for the side-by-side columns."""
    if snap is None or key not in snap:
        return _td("", "-")
    for _, leaf in leaves(snap[key]):
        if isinstance(leaf, SnapStats):
            mean, std = leaf.mean, leaf.std
        elif isinstance(leaf, torch.Tensor):
            s = tensor_stats(leaf, hist=False)
            mean, std = s.mean, s.std
        else:
            continue
        return _td(_num(mean), f"{_fmt(mean)} ± {_fmt(std)}")
    return _td("", "-")


def _stats_table(table: list[Row]) -> str:
    head = (
        "#",
        "key",
        "kind",
        "shape",
        "dtype",
        "bytes",
        "mean",
        "std",
        "min",
        "max",
        "zeros",
        "NaN",
        "Inf",
        "histogram",
    )
    body = []
    groups: dict[str, int] = {}
    for n, r in enumerate(table):
        g = group(r)
        groups[g] = groups.get(g, 0) + 1
        shape = "x".join(map(str, r.shape)) if r.shape is not None else "-"
        kind = r.record.kind + (" (state)" if g == STATE else "")
        cells = [
            _td(r.index, str(r.index)),
            _td(r.label, r.label, "key"),
            _td(kind, kind),
            _td(math.prod(r.shape) if r.shape is not None else -1, shape),
            _td(r.dtype, r.dtype),
        ]
        s = r.stats
        cls = ""
        if s is None:
            cells.append(_td(r.nbytes, human_bytes(r.nbytes)))
            cells.append(f'<td colspan="8" class="text">{html.escape(r.text)}</td>')
        else:
            cells += [
                _td(r.nbytes, human_bytes(r.nbytes)),
                _td(s.mean, _fmt(s.mean)),
                _td(s.std, _fmt(s.std)),
                _td(s.min, _fmt(s.min)),
                _td(s.max, _fmt(s.max)),
                _td(s.zero_fraction, f"{100 * s.zero_fraction:.1f}%"),
                _td(s.nans, str(s.nans)),
                _td(s.infs, str(s.infs)),
                f"<td>{_sparkline(s.hist)}</td>",
            ]
            if s.nans or s.infs:
                cls = ' class="bad"'
        attrs = f' id="row-{n}" data-i="{n}" data-group="{html.escape(g, quote=True)}"'
        body.append(f"<tr{cls}{attrs}>" + "".join(cells) + "</tr>")
    options = "".join(
        f'<option value="{html.escape(g, quote=True)}">{html.escape(g)} ({c})</option>'
        for g, c in groups.items()
    )
    return (
        "<h2>Statistics</h2>\n"
        "<p>Statistics are over finite elements (complex tensors by magnitude). Click a column "
        "to sort, a row to add its histogram; "
        '<input id="filter" placeholder="filter keys (substring)" size="32"> '
        f'<select id="group"><option value="">all groups ({len(table)})</option>{options}'
        f'</select> <span id="shown">{len(table)}</span> rows shown</p>\n'
        + _table("stats", head, body)
    )


def _table(name: str, head: tuple[str, ...], body: list[str]) -> str:
    ths = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (
        f'<table class="sortable" id="{name}"><thead><tr>{ths}</tr></thead>'
        f"<tbody>\n" + "\n".join(body) + "\n</tbody></table>"
    )


def _td(value: object, text: str, cls: str = "") -> str:
    if isinstance(value, float) and math.isnan(value):
        value = ""
    attr = f' class="{cls}"' if cls else ""
    v = html.escape(str(value), quote=True)
    return f'<td data-v="{v}"{attr}>{html.escape(text)}</td>'


def _num(value: float | None) -> float | str:
    return "" if value is None else value


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.4g}"


def _sparkline(counts: tuple[int, ...]) -> str:
    if not counts:
        return ""
    top = max(counts) or 1
    width, height = 2, 18
    bars = "".join(
        f'<rect x="{i * width}" y="{height - max(1, round(height * c / top)) if c else height}" '
        f'width="{width - 0.3:.1f}" height="{max(1, round(height * c / top)) if c else 0}"/>'
        for i, c in enumerate(counts)
    )
    return (
        f'<svg width="{len(counts) * width}" height="{height}" class="spark" '
        f'role="img" aria-label="histogram">{bars}</svg>'
    )


# -- charts (drawn in the browser by _report.js from the data written here) -------------------

# The series of the per-layer chart: values as they are, or magnitudes on a log axis (where
# gradients and small activations are readable).
_LAYER_MODES = [
    {
        "name": "values",
        "log": False,
        "series": [
            {"type": "band", "lo": "mean-std", "hi": "mean+std", "name": "mean ± std"},
            {"type": "line", "f": "mean", "name": "mean"},
            {"type": "dash", "f": "min", "name": "min"},
            {"type": "dash", "f": "max", "name": "max"},
        ],
    },
    {
        "name": "magnitudes (log axis)",
        "log": True,
        "series": [
            {"type": "line", "f": "std", "name": "std"},
            {"type": "dash", "f": "max |x|", "name": "max |x|"},
        ],
    },
]


def _chart(name: str, spec: dict[str, Any]) -> str:
    return f'<div class="chartbox" data-spec="{name}"></div>\n' + _data(name, spec)


def _point(n: int, r: Row) -> dict[str, Any]:
    s = r.stats
    if s is None:  # pragma: no cover - callers pass rows with statistics
        raise ValueError(r.label)
    shape = "x".join(map(str, r.shape or ()))
    values = {
        "mean": _finite(s.mean),
        "std": _finite(s.std),
        "min": _finite(s.min),
        "max": _finite(s.max),
        "mean-std": _finite(s.mean - s.std),
        "mean+std": _finite(s.mean + s.std),
        "max |x|": _finite(max(abs(s.min), abs(s.max))),
    }
    point: dict[str, Any] = {"k": r.label, "i": n, "d": f"{r.record.kind}, {shape} {r.dtype}"}
    point["v"] = values
    if s.nans or s.infs:
        point["bad"] = True
        point["note"] = f"{s.nans} NaN, {s.infs} Inf of {s.numel}"
    return point


def _layer_plot(table: list[Row]) -> str:
    sets: dict[str, list[dict[str, Any]]] = {}
    for g in [*dict.fromkeys(_GROUPS.values()), STATE]:
        sets[g] = []
    for n, r in enumerate(table):
        if r.stats is not None and r.stats.numel:
            sets.setdefault(group(r), []).append(_point(n, r))
    if not any(sets.values()):
        return ""
    spec = {
        "sets": sets,
        "modes": _LAYER_MODES,
        "tip": ["mean", "std", "min", "max"],
        "markBad": True,
    }
    return (
        "<p>One point per tensor in execution order (gradients in backward order); a red "
        "mark above the plot is a tensor holding a NaN or Inf.</p>\n" + _chart("ts-layers", spec)
    )


def _histograms(table: list[Row]) -> str:
    """The histogram panel, opened with a few module outputs and the first non-finite key."""
    with_hist = [n for n, r in enumerate(table) if r.stats and r.stats.hist]
    outputs = [n for n in with_hist if group(table[n]) == "module outputs"] or with_hist
    chosen = outputs
    if len(outputs) > _INITIAL_HISTOGRAMS:
        step = (len(outputs) - 1) / (_INITIAL_HISTOGRAMS - 1)
        chosen = [outputs[round(i * step)] for i in range(_INITIAL_HISTOGRAMS)]
    bad = first_nonfinite(table)
    if bad is not None and bad.stats and bad.stats.hist:
        chosen = [table.index(bad), *[n for n in chosen if table[n] is not bad]]
    return (
        '<h2>Histograms</h2>\n<div id="histograms"><p>Add a key: '
        '<input id="hist-add" list="hist-keys" size="48" placeholder="type or pick a key">'
        '<datalist id="hist-keys"></datalist> <button type="button" id="hist-clear">clear'
        "</button> (or click a point in a plot, or a row of the table; hover a bar for its "
        'bin and count)</p><p id="hist-empty">No histograms picked.</p>'
        '<div id="hist-grid"></div></div>\n' + _data("ts-hist-initial", chosen)
    )


def _row_data(table: list[Row]) -> list[dict[str, Any]]:
    out = []
    for n, r in enumerate(table):
        s = r.stats
        if s is None:
            continue
        out.append(
            {
                "i": n,
                "k": r.label,
                "kind": r.record.kind,
                "shape": "x".join(map(str, r.shape or ())) or "scalar",
                "dtype": r.dtype,
                "min": _finite(s.min),
                "max": _finite(s.max),
                "nans": s.nans,
                "infs": s.infs,
                "hist": list(s.hist),
            }
        )
    return out


def _diff_plot(result: DiffResult) -> str:
    points = []
    for k in result.keys:
        if k.max_abs is None:
            continue
        error = k.rel_l2 if k.rel_l2 is not None else k.max_abs
        # drawn within 1e-8 ... 1e-1 (exact agreement at the floor, worse than 10% at the top);
        # the tip gives the real numbers
        shown = (
            min(max(error, _DIFF_FLOOR), _DIFF_CEILING) if math.isfinite(error) else _DIFF_CEILING
        )
        values = {
            "error": shown,
            "rel l2": _finite(k.rel_l2) if k.rel_l2 is not None else None,
            "max abs": _finite(k.max_abs),
            "max rel": _finite(k.max_rel) if k.max_rel is not None else None,
        }
        label = k.key or _ROOT
        if k.key_b != k.key:
            label += f" ~ {k.key_b or _ROOT}"
        point: dict[str, Any] = {"k": label, "v": values, "d": k.how}
        if not k.close:
            point["bad"] = True
            point["note"] = "; ".join(k.problems[:2]) or "outside tolerance"
        points.append(point)
    if not points:
        return ""
    spec = {
        "sets": {"error per key": points},
        "modes": [
            {
                "name": "rel L2, log axis",
                "log": True,
                "range": [math.log10(_DIFF_FLOOR), math.log10(_DIFF_CEILING)],
                "series": [{"type": "dots", "f": "error", "name": "||a - b|| / ||b||"}],
            }
        ],
        "tip": ["rel l2", "max abs", "max rel"],
    }
    return (
        "<p>Error per paired key in execution order: ||a - b|| / ||b|| on a log axis from 1e-8 "
        "to 1e-1 (red: outside tolerance; values beyond the axis sit at its ends). Hover a point "
        "for its keys, how they were paired and the errors; drag to zoom.</p>\n"
        + _chart("ts-diff", spec)
    )


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.meta { color: #555; } code { font-size: .95em; }
table { border-collapse: collapse; font-size: 12px; }
th, td { padding: 2px 8px; border-bottom: 1px solid #e4e4e4; text-align: right; }
td.key, td.text { text-align: left; font-family: ui-monospace, monospace; }
th:nth-child(2) { text-align: left; }
th { position: sticky; top: 0; background: #f3f3f3; cursor: pointer; user-select: none; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
tr:hover td { background: #f7f7ff; } #stats tbody tr { cursor: pointer; }
tr.bad td, span.bad, p.bad, div.bad { color: #b00020; } p.ok { color: #1b6e20; }
tr.first td { background: #ffe9e9; font-weight: 600; }
svg.spark rect { fill: #4e79a7; }
.chartbox { position: relative; max-width: 1400px; }
.controls { margin: .3em 0; } .hint { color: #777; font-size: 12px; }
svg.chart { display: block; user-select: none; }
svg .grid { stroke: #eee; } svg .frame { fill: none; stroke: #ccc; }
svg .tick { font-size: 10px; fill: #555; } svg .guide { stroke: #999; stroke-dasharray: 2 2; }
svg .selection { fill: #4e79a7; fill-opacity: .15; } svg .bad-mark { fill: #c0392b; }
.tip { position: absolute; z-index: 2; max-width: 260px; background: #fff; border: 1px solid #bbb;
  padding: 4px 7px; font-size: 12px; pointer-events: none; box-shadow: 0 1px 4px #0002; }
.tip-key { font-family: ui-monospace, monospace; font-weight: 600; word-break: break-all; }
#hist-grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure.hist { margin: 0; width: 280px; }
figure.hist figcaption { font-size: 12px; word-break: break-all; }
.hist-key { font-family: ui-monospace, monospace; font-weight: 600; } .hist-meta { color: #666; }
figure.hist rect.bar { fill: #4e79a7; } figure.hist rect.bar:hover { fill: #f28e2b; }
button.close { border: none; background: none; cursor: pointer; font-size: 14px; padding: 0 4px; }
</style></head><body>"""
