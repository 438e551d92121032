"""The HTML report: statistics against numpy, one self-contained page, and (when chromium is
installed) the page's sorting script run in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from html import escape as html_escape
from html import unescape as html_unescape
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tensorsnap
from tensorsnap._diff import leaves
from tensorsnap._report import STATE, group, rows, stored_bytes, tensor_stats, write_report
from tensorsnap._snapshot import Record, Snapshot, human_bytes


def _snap(**values: object) -> Snapshot:
    snap = Snapshot()
    for key, value in values.items():
        snap._add(Record(key, key, 0, None, "output", None, None, 0), value)
    return snap


def test_tensor_stats_match_numpy() -> None:
    data = np.array([0.0, 1.5, -2.0, np.nan, np.inf, 0.0, 4.0], dtype=np.float32)
    s = tensor_stats(torch.from_numpy(data))
    finite = data[np.isfinite(data)].astype(np.float64)
    assert s.numel == 7 and s.nans == 1 and s.infs == 1 and s.zeros == 2
    assert s.mean == pytest.approx(finite.mean())
    assert s.std == pytest.approx(finite.std())
    assert (s.min, s.max) == (-2.0, 4.0)
    assert s.zero_fraction == pytest.approx(2 / 7)
    assert sum(s.hist) == finite.size
    empty = tensor_stats(torch.tensor([np.nan]))
    assert np.isnan(empty.mean) and empty.hist == ()


def test_rows_one_per_leaf_in_order() -> None:
    snap = _snap(a=torch.ones(2), out={"logits": torch.zeros(3), "hidden": (torch.ones(1), 7)})
    labels = [r.label for r in rows(snap)]
    assert labels == ["a", "out ['logits']", "out ['hidden'][0]", "out ['hidden'][1]"]
    assert rows(snap)[-1].stats is None and rows(snap)[-1].text == "7"


def _page(tmp_path: Path, **kwargs: object) -> str:
    torch.manual_seed(0)
    snap = _snap(
        embed=torch.randn(4, 8),
        relu=torch.relu(torch.randn(4, 8)),
        broken=torch.tensor([1.0, float("nan"), float("inf"), -3.0]),
    )
    path = write_report(snap, tmp_path / "sub" / "r.html", title="t<1>", **kwargs)  # type: ignore[arg-type]
    return Path(path).read_text()


def _embedded(html: str, name: str) -> Any:
    found = re.search(rf'<script type="application/json" id="{name}">(.*?)</script>', html)
    assert found is not None, name
    return json.loads(found.group(1))


def test_page_is_self_contained(tmp_path: Path) -> None:
    html = _page(tmp_path)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<title>t&lt;1&gt;</title>" in html  # escaped
    # nothing fetched from elsewhere: no URLs in src/href, no external scripts, no images
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<script src" not in html and "<img" not in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html
    # the NaN/Inf row is flagged; the summary counts them and names the first such key
    assert "1 NaN and 1 Inf elements; first non-finite: " in html
    assert '<a href="#row-2"><code>broken</code></a> (1 NaN, 1 Inf of 4 elements)' in html
    broken = re.search(r'<tr class="bad" id="row-2".*?</tr>', html)
    assert broken is not None and "broken" in broken.group(0)
    assert 'data-v="-3.0"' in broken.group(0)  # min over finite elements


def test_embedded_data_matches_numpy(tmp_path: Path) -> None:
    html = _page(tmp_path)
    torch.manual_seed(0)
    embed = torch.randn(4, 8).numpy().astype(np.float64)
    rows_data = {r["k"]: r for r in _embedded(html, "ts-rows")}
    assert rows_data["embed"]["min"] == pytest.approx(embed.min())
    assert rows_data["embed"]["max"] == pytest.approx(embed.max())
    counts, _ = np.histogram(embed, bins=32, range=(embed.min(), embed.max()))
    assert sum(rows_data["embed"]["hist"]) == 32 and rows_data["embed"]["hist"] == counts.tolist()
    assert (rows_data["broken"]["nans"], rows_data["broken"]["infs"]) == (1, 1)
    layers = _embedded(html, "ts-layers")
    points = layers["sets"]["module outputs"]
    assert [p["k"] for p in points] == ["embed", "relu", "broken"]
    assert points[0]["v"]["mean"] == pytest.approx(embed.mean())
    assert points[0]["v"]["std"] == pytest.approx(embed.std())
    assert points[2]["bad"] is True and "bad" not in points[0]
    # the page opens with the first non-finite key's histogram, then module outputs
    assert _embedded(html, "ts-hist-initial") == [2, 0, 1]


def test_cache_tensors_are_kept_apart_from_activations(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from conftest import tiny_gpt2, token_ids

    model = tiny_gpt2()
    with tensorsnap.capture(model) as snap:
        out = model(token_ids())
    table = rows(snap)
    state = [r for r in table if group(r) == STATE]
    # every tensor of the returned cache, and nothing else, is state
    cache_tensors = [t for _, t in leaves(out.past_key_values) if isinstance(t, torch.Tensor)]
    root_state = [r for r in state if r.record.key == "" and r.shape is not None]
    assert len(root_state) == len(cache_tensors) > 0
    assert all(r.record.key in ("", "transformer") for r in state)
    assert all(group(r) == "module outputs" for r in table if r.path == "" and r.shape)
    html = Path(write_report(snap, tmp_path / "r.html")).read_text()
    sets = _embedded(html, "ts-layers")["sets"]
    assert all("cache" not in p["k"] for p in sets["module outputs"])
    assert len(sets[STATE]) == sum(1 for r in state if r.stats is not None)
    assert "cache and state tensors" in html


def test_totals_agree_with_ls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tensorsnap._cli import main

    # views keep the span of their base: the stored bytes are more than the tensors' own
    from tensorsnap._demo import TinyGPT, example_input

    model = TinyGPT()
    with tensorsnap.capture(model, ops=True) as snap:
        model(example_input())
    snap.save(tmp_path / "b")
    assert main(["ls", str(tmp_path / "b"), "--no-stats"]) == 0
    footer = capsys.readouterr().out.strip().splitlines()[-1]
    loaded = tensorsnap.load(tmp_path / "b")
    table = rows(loaded, stats=False)
    total = stored_bytes(loaded, table)
    assert footer == f"{len(loaded)} keys, {total}"
    held = sum(r.nbytes for r in loaded.records)
    own = sum(t.numel() * t.element_size() for k in loaded for _, t in leaves(loaded[k]))
    assert held > own  # the case this test is about
    assert (
        total
        == f"{human_bytes(held)} stored (tensors {human_bytes(own)}; views keep their base's span)"
    )
    assert main(["report", str(tmp_path / "b"), "-o", str(tmp_path / "r.html")]) == 0
    assert f"{len(table)} leaves, {html_escape(total)}" in (tmp_path / "r.html").read_text()


def test_page_with_diff(tmp_path: Path) -> None:
    other = _snap(
        embed=torch.zeros(4, 8), relu=torch.zeros(4, 8), broken=torch.zeros(4), extra=torch.ones(1)
    )
    html = _page(tmp_path, against=other, against_source="/x/other")
    assert "<h2>Diff against <code>/x/other</code></h2>" in html
    assert "first diverging key: &#x27;embed&#x27;" in html
    assert "Only in the other: <code>extra</code>" in html
    points = _embedded(html, "ts-diff")["sets"]["error per key"]
    assert [p["k"] for p in points][:2] == ["embed", "relu"]
    torch.manual_seed(0)
    assert points[0]["v"]["max abs"] == pytest.approx(float(torch.randn(4, 8).abs().max()))
    assert points[0]["bad"] is True
    assert '<tr class="first bad">' in html


def test_report_needs_no_plotting_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = write_report(_snap(a=torch.ones(1)), tmp_path / "r.html")
    assert "ts-layers" in Path(path).read_text()


def test_keys_cannot_break_out_of_the_page(tmp_path: Path) -> None:
    snap = _snap(**{"</script><script>alert(1)</script>": torch.ones(2)})
    html = Path(write_report(snap, tmp_path / "r.html")).read_text()
    assert "<script>alert(1)" not in html
    assert _embedded(html, "ts-rows")[0]["k"] == "</script><script>alert(1)</script>"


# -- a real browser ---------------------------------------------------------------------------

_ERRORS = """<script>window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
</script>"""

# Appended to a copy of the page: click "max" twice (descending), then write the key order and
# any script error into the DOM, which --dump-dom prints after scripts ran.
_PROBE = """<script>
try {
  var th = Array.prototype.find.call(document.querySelectorAll("#stats th"),
                                     function (h) { return h.textContent === "max"; });
  th.click(); var asc = keys(); th.click(); var desc = keys();
  document.getElementById("filter").value = "EL";
  document.getElementById("filter").dispatchEvent(new Event("input"));
  var shown = keys(true);
  out("asc=" + asc + ";desc=" + desc + ";shown=" + shown + ";errors=" + window.__errors.join("|"));
} catch (e) { out("error=" + e); }
function keys(visible) {
  return Array.prototype.filter.call(document.querySelectorAll("#stats tbody tr"),
      function (r) { return !visible || r.style.display !== "none"; })
    .map(function (r) { return r.cells[1].textContent; }).join(",");
}
function out(text) { var p = document.createElement("pre"); p.id = "probe"; p.textContent = text;
  document.body.appendChild(p); }
</script>"""


def _in_chromium(page: Path, probe_script: str, tmp_path: Path) -> str:
    """Open ``page`` with ``probe_script`` appended in headless Chromium; the probe's output."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    probe = tmp_path / "probe.html"
    text = page.read_text().replace("</body></html>", probe_script + "</body></html>")
    # installed before the page's own scripts: any error they throw is reported by the probe
    text = text.replace("<head>", "<head>" + _ERRORS, 1)
    probe.write_text(text)
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1200,900",
                f"--user-data-dir={profile}",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found is not None, done.stderr[-2000:]
    return html_unescape(found.group(1))


def test_sorting_and_filter_in_headless_chromium(tmp_path: Path) -> None:
    snap = _snap(
        small=torch.tensor([0.0, 1.0]),  # max 1
        big=torch.tensor([5.0, 100.0]),  # max 100
        middle=torch.tensor([-1.0, 7.0]),  # max 7
        level=torch.tensor([2.0]),  # max 2
    )
    page = Path(write_report(snap, tmp_path / "r.html"))
    assert _in_chromium(page, _PROBE, tmp_path) == (
        "asc=small,level,middle,big;desc=big,middle,level,small;shown=level;errors="
    )


# Hover, zoom and pick on the per-layer chart, switch its set, filter the table by group and
# click a row: each step writes what the page shows (tooltip text, zoom range, histograms).
_CHART_PROBE = """<script>
try {
  var box = document.querySelector('div.chartbox[data-spec="ts-layers"]');
  var svg = box.querySelector("svg.chart"), chart = box.chart, log = [];
  function fire(type, i) {
    var r = svg.getBoundingClientRect(), scale = r.width / Number(svg.getAttribute("width"));
    svg.dispatchEvent(new MouseEvent(type, {clientX: r.left + chart.X(i) * scale,
                                            clientY: r.top + 120, bubbles: true}));
  }
  function tip() {
    var bad = box.querySelector(".tip div.bad");
    return box.querySelector(".tip-key").textContent + (bad ? " (" + bad.textContent + ")" : "");
  }
  function hists() {
    return Array.prototype.map.call(document.querySelectorAll("#hist-grid .hist-key"),
                                    function (k) { return k.textContent; }).join(",");
  }
  fire("mousemove", 1); log.push("hover1=" + tip());
  fire("mousedown", 1); fire("mousemove", 3); fire("mouseup", 3);
  log.push("view=" + chart.view.join("-"));
  fire("mousemove", 3); log.push("hover3=" + tip());
  log.push("initial=" + hists());
  var set = box.querySelector("select.set");
  set.value = "cache and state"; set.dispatchEvent(new Event("change"));
  fire("mousemove", 1); log.push("state1=" + tip());
  fire("mousedown", 1); fire("mouseup", 1);
  document.querySelector("#row-7 td").click();
  log.push("picked=" + hists());
  var group = document.getElementById("group");
  group.value = "cache and state"; group.dispatchEvent(new Event("change"));
  log.push("rows=" + keys(true) + " (" + document.getElementById("shown").textContent + ")");
  var add = document.getElementById("hist-add");
  document.getElementById("hist-clear").click();
  add.value = "block/relu"; add.dispatchEvent(new Event("change"));
  log.push("added=" + hists());
  log.push("errors=" + window.__errors.join("|"));
  out(log.join("\\n"));
} catch (e) { out("error=" + e + " " + e.stack); }
function keys(visible) {
  return Array.prototype.filter.call(document.querySelectorAll("#stats tbody tr"),
      function (r) { return !visible || r.style.display !== "none"; })
    .map(function (r) { return r.cells[1].textContent; }).join(",");
}
function out(text) { var p = document.createElement("pre"); p.id = "probe"; p.textContent = text;
  document.body.appendChild(p); }
</script>"""


def test_chart_hover_zoom_and_histogram_picks_in_headless_chromium(tmp_path: Path) -> None:
    torch.manual_seed(0)
    snap = Snapshot()
    values: list[tuple[str, str, object]] = [
        ("embed", "output", torch.randn(4, 8)),
        ("block/relu", "op", torch.relu(torch.randn(4, 8))),
        ("block", "output", torch.tensor([1.0, float("nan"), 2.0, 3.0])),
        ("head", "output", torch.randn(4, 3)),
        (
            "",
            "output",
            {
                "logits": torch.randn(4, 3),
                "past_key_values": ((torch.ones(2, 2), torch.zeros(2, 2)),),
            },
        ),
        ("head:grad", "grad", torch.randn(4, 3)),
    ]
    for key, kind, value in values:
        snap._add(Record(key, key.split(":")[0].split("/")[0], 0, None, kind, None, None, 0), value)
    page = Path(write_report(snap, tmp_path / "r.html"))
    lines = _in_chromium(page, _CHART_PROBE, tmp_path).splitlines()
    logits, k0, k1 = (
        "\"\" ['logits']",
        "\"\" ['past_key_values'][0][0]",
        "\"\" ['past_key_values'][0][1]",
    )
    assert lines == [
        "hover1=block (1 NaN, 0 Inf of 4)",  # module outputs: embed, block, head, logits
        "view=1-3",
        f"hover3={logits}",
        f"initial=block,embed,head,{logits}",  # the first non-finite key, then module outputs
        f"state1={k1}",
        f"picked=block,embed,head,{logits},{k1},head:grad",  # a chart point, then a table row
        f"rows={k0},{k1} (2)",
        "added=block/relu",
        "errors=",
    ]
