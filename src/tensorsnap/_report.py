"""Reading a snapshot at a glance: per-tensor statistics, and one self-contained HTML report.

The report is a single page with no external resources: a sortable, filterable statistics table
(small inline script), a per-layer statistics plot and histograms drawn with matplotlib (Agg,
embedded as base64 PNG), and, given a second snapshot, the diff against it. matplotlib is
imported only when a report is written; without it the error says which extra to install.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import os
from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch

from ._diff import DiffResult, format_error, leaves
from ._errors import TensorSnapError, format_path
from ._snapshot import Record, human_bytes

__all__ = ["Row", "Stats", "first_nonfinite", "rows", "tensor_stats", "write_report"]

_ROOT = '""'  # how the root module's key is shown
# Bins of every histogram (table sparklines and plots).
_BINS = 32
# Histograms drawn as plots; more keys are sampled evenly in execution order.
_MAX_HISTOGRAMS = 16


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
        for parts, leaf in leaves(value):
            path = format_path("", list(parts))
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


# -- HTML ------------------------------------------------------------------------------------


def write_report(
    snap: Mapping[str, Any],
    path: str | PathLike[str],
    *,
    title: str = "tensorsnap report",
    source: str = "",
    against: Mapping[str, Any] | None = None,
    against_source: str = "",
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> str:
    """Write one self-contained HTML page describing ``snap`` (and its diff with ``against``).

    Args:
        snap: The snapshot to describe.
        path: Where the page goes (parent directories are created).
        title: The page title.
        source: Where ``snap`` came from, shown in the header (a bundle path).
        against: A second snapshot; adds the diff of ``snap`` against it.
        against_source: Where ``against`` came from.
        rtol: Relative tolerance of the diff.
        atol: Absolute tolerance of the diff.

    Returns:
        The absolute path of the page.

    Raises:
        TensorSnapError: matplotlib is missing (the message names the extra to install), or a
            bundle cannot be read.
    """
    _require_matplotlib()
    from . import __version__
    from ._diff import diff

    table = rows(snap)
    result = diff(snap, against, rtol=rtol, atol=atol) if against is not None else None
    parts = [
        _HEAD.replace("%TITLE%", html.escape(title)),
        f"<h1>{html.escape(title)}</h1>",
        _summary(snap, table, source, __version__),
    ]
    if result is not None:
        parts.append(_diff_section(result, against_source))
    parts.append("<h2>Per-layer statistics</h2>")
    layer_plot = _layer_plot(table)
    parts.append(layer_plot or "<p>No module outputs with finite values to plot.</p>")
    parts.append("<h2>Histograms</h2>")
    parts.append(_histograms(table) or "<p>No tensors with finite values.</p>")
    parts.append(_stats_table(table))
    parts.append(_SCRIPT)
    parts.append("</body></html>\n")
    target = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return target


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise TensorSnapError(
            "the HTML report draws its plots with matplotlib, which is not installed: "
            "pip install 'tensorsnap[report]'"
        ) from err


def _summary(snap: Mapping[str, Any], table: list[Row], source: str, version: str) -> str:
    total = sum(r.nbytes for r in table)
    nans = sum(r.stats.nans for r in table if r.stats)
    infs = sum(r.stats.infs for r in table if r.stats)
    kinds: dict[str, int] = {}
    for record in _records(snap):
        kinds[record.kind] = kinds.get(record.kind, 0) + 1
    kind_text = ", ".join(f"{n} {k}" for k, n in kinds.items())
    alarm = ' class="bad"' if nans or infs else ""
    src = f"<code>{html.escape(source)}</code>, " if source else ""
    return (
        f'<p class="meta">{src}{len(snap)} keys ({html.escape(kind_text)}), '
        f"{len(table)} leaves, {human_bytes(total)}; "
        f"<span{alarm}>{nans} NaN and {infs} Inf elements</span>; tensorsnap {version}, "
        f"torch {html.escape(torch.__version__)}</p>"
    )


def _diff_section(result: DiffResult, against_source: str) -> str:
    src = f" against <code>{html.escape(against_source)}</code>" if against_source else ""
    status = "ok" if result.equal else "bad"
    out = [
        f"<h2>Diff{src}</h2>",
        f'<p class="{status}">{html.escape(result.summary())}</p>',
    ]
    plot = _diff_plot(result)
    if plot:
        out.append(plot)
    head = ("#", "key", "max abs", "max rel", "mismatched", "problems")
    body = []
    for i, k in enumerate(result.keys):
        cls = []
        if k.key == result.first_diverging:
            cls.append("first")
        if not k.close or k.dtype_mismatch:
            cls.append("bad")
        problems = "; ".join(k.problems[:3]) + (" ..." if len(k.problems) > 3 else "")
        cells = [
            _td(i, str(i)),
            _td(k.key, k.key or '""', "key"),
            _td(_num(k.max_abs), format_error(k.max_abs)),
            _td(_num(k.max_rel), format_error(k.max_rel)),
            _td(k.mismatched, f"{k.mismatched}/{k.numel}"),
            _td(problems, problems, "text"),
        ]
        body.append(f'<tr class="{" ".join(cls)}">' + "".join(cells) + "</tr>")
    out.append(_table("diff", head, body))
    for side, keys in (("this snapshot", result.only_a), ("the other", result.only_b)):
        if keys:
            listed = ", ".join(f"<code>{html.escape(k or _ROOT)}</code>" for k in keys)
            out.append(f"<p>Only in {side}: {listed}</p>")
    return "\n".join(out)


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
    for r in table:
        shape = "x".join(map(str, r.shape)) if r.shape is not None else "-"
        cells = [
            _td(r.index, str(r.index)),
            _td(r.label, r.label, "key"),
            _td(r.record.kind, r.record.kind),
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
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return (
        "<h2>Statistics</h2>\n"
        "<p>Statistics are over finite elements (complex tensors by magnitude). Click a column "
        'to sort; <input id="filter" placeholder="filter keys (substring)" size="32"></p>\n'
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


# -- plots ------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    # Figure without pyplot: no global backend switch, no GUI, nothing kept alive afterwards
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _ticks(ax: Any, labels: list[str]) -> None:
    step = max(1, math.ceil(len(labels) / 40))
    positions = list(range(0, len(labels), step))
    ax.set_xticks(positions)
    ax.set_xticklabels([labels[i] for i in positions], rotation=90, fontsize=7)


def _layer_plot(table: list[Row]) -> str:
    outputs = [r for r in table if r.record.kind == "output" and r.stats and r.stats.hist]
    grads = [r for r in table if r.record.kind == "grad" and r.stats and r.stats.hist]
    if not outputs:
        return ""
    panels = 2 if grads else 1
    fig = _figure(max(8.0, min(14.0, 0.2 * len(outputs))), 4.2 * panels)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    ax = axes[0]
    xs = list(range(len(outputs)))
    mean = [r.stats.mean for r in outputs if r.stats]
    std = [r.stats.std for r in outputs if r.stats]
    ax.fill_between(
        xs,
        [m - s for m, s in zip(mean, std)],
        [m + s for m, s in zip(mean, std)],
        alpha=0.25,
        label="mean ± std",
    )
    ax.plot(xs, mean, marker="o", markersize=3, label="mean")
    ax.plot(xs, [r.stats.min for r in outputs if r.stats], "--", linewidth=0.8, label="min")
    ax.plot(xs, [r.stats.max for r in outputs if r.stats], "--", linewidth=0.8, label="max")
    ax.set_title("module outputs, in execution order")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    _ticks(ax, [r.label for r in outputs])
    if grads:
        ax = axes[1]
        gx = list(range(len(grads)))
        ax.plot(gx, [r.stats.std for r in grads if r.stats], marker="o", markersize=3, label="std")
        absmax = [max(abs(r.stats.min), abs(r.stats.max)) for r in grads if r.stats]
        ax.plot(gx, absmax, "--", linewidth=0.8, label="max |g|")
        if all(v > 0 for v in absmax):
            ax.set_yscale("log")
        ax.set_title("gradients w.r.t. module outputs, in backward order")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        _ticks(ax, [r.label for r in grads])
    return _png(fig, "per-layer statistics")


def _histograms(table: list[Row]) -> str:
    chosen = [r for r in table if r.record.kind == "output" and r.stats and r.stats.hist]
    if not chosen:
        chosen = [r for r in table if r.stats and r.stats.hist]
    if not chosen:
        return ""
    if len(chosen) > _MAX_HISTOGRAMS:
        step = (len(chosen) - 1) / (_MAX_HISTOGRAMS - 1)
        chosen = [chosen[round(i * step)] for i in range(_MAX_HISTOGRAMS)]
    columns = min(4, len(chosen))
    lines = math.ceil(len(chosen) / columns)
    fig = _figure(3.2 * columns, 2.4 * lines)
    axes = fig.subplots(lines, columns, squeeze=False)
    for ax in axes.flat[len(chosen) :]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, chosen):
        s = r.stats
        if s is None:  # pragma: no cover - filtered above
            continue
        top = s.max if s.max > s.min else s.min + 1.0
        edges = [s.min + (top - s.min) * i / _BINS for i in range(_BINS + 1)]
        ax.stairs(list(s.hist), edges, fill=True, alpha=0.7)
        ax.set_title(r.label if len(r.label) <= 40 else "..." + r.label[-37:], fontsize=8)
        ax.tick_params(labelsize=7)
    shown = "all" if len(chosen) == len(table) else f"{len(chosen)} sampled"
    return _png(fig, f"histograms of {shown} module outputs")


def _diff_plot(result: DiffResult) -> str:
    keys = [k for k in result.keys if k.max_abs is not None]
    if not keys:
        return ""
    fig = _figure(max(8.0, min(14.0, 0.12 * len(keys))), 4.0)
    ax = fig.subplots()
    xs = list(range(len(keys)))
    finite_cap = max((k.max_abs for k in keys if k.max_abs and math.isfinite(k.max_abs)), default=1)
    values = [
        (k.max_abs if math.isfinite(k.max_abs or 0) else finite_cap * 10) or math.nan for k in keys
    ]
    colors = ["tab:red" if not k.close else "tab:blue" for k in keys]
    ax.scatter(xs, values, c=colors, s=12)
    if any(v == v for v in values):  # at least one non-zero error: a log axis is readable
        ax.set_yscale("log")
    if result.first_diverging is not None:
        index = next(i for i, k in enumerate(keys) if k.key == result.first_diverging)
        ax.axvline(index, color="tab:red", linewidth=0.8, linestyle=":")
    ax.set_title("max |a - b| per key, in execution order (red: outside tolerance; 0 not shown)")
    ax.grid(alpha=0.3)
    _ticks(ax, [k.key or '""' for k in keys])
    return _png(fig, "max abs error per key")


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
tr:hover td { background: #f7f7ff; }
tr.bad td, span.bad, p.bad { color: #b00020; } p.ok { color: #1b6e20; }
tr.first td { background: #ffe9e9; font-weight: 600; }
svg.spark rect { fill: #4e79a7; }
img.plot { max-width: 100%; display: block; margin: .5em 0; }
</style></head><body>"""

# Sorts a table by the clicked column (numbers by value, text alphabetically; a second click
# reverses) and filters the statistics table by key substring. No external resources.
_SCRIPT = """<script>
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var asc = !th.classList.contains("asc");
    table.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(asc ? "asc" : "desc");
    var rows = Array.prototype.slice.call(body.rows);
    function val(row) {
      var cell = row.cells[col];
      if (!cell) return "";
      var v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
      var n = parseFloat(v);
      return v !== "" && !isNaN(n) && isFinite(Number(v)) ? n : (v === "inf" ? Infinity : v);
    }
    rows.sort(function (a, b) {
      var x = val(a), y = val(b);
      if (x === "" && y !== "") return 1;
      if (y === "" && x !== "") return -1;
      var c = (typeof x === "number" && typeof y === "number") ? x - y
        : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
var filter = document.getElementById("filter");
if (filter) filter.addEventListener("input", function () {
  var q = filter.value.toLowerCase();
  document.querySelectorAll("#stats tbody tr").forEach(function (r) {
    r.style.display = r.cells[1].textContent.toLowerCase().indexOf(q) >= 0 ? "" : "none";
  });
});
</script>"""
