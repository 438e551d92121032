"""The HTML report: statistics against numpy, one self-contained page, and (when chromium is
installed) the page's sorting script run in a real headless browser."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorsnap import TensorSnapError
from tensorsnap._report import rows, tensor_stats, write_report
from tensorsnap._snapshot import Record, Snapshot


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


def test_page_is_self_contained(tmp_path: Path) -> None:
    html = _page(tmp_path)
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<title>t&lt;1&gt;</title>" in html  # escaped
    # nothing fetched from elsewhere: no http(s) URLs in src/href, no external scripts
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<script src" not in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2  # per-layer plot and histograms
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    # the NaN/Inf row is flagged; the summary counts them
    assert "1 NaN and 1 Inf elements" in html
    broken = re.search(r'<tr class="bad">.*?</tr>', html)
    assert broken is not None and "broken" in broken.group(0)
    assert 'data-v="-3.0"' in broken.group(0)  # min over finite elements


def test_page_with_diff(tmp_path: Path) -> None:
    other = _snap(
        embed=torch.zeros(4, 8), relu=torch.zeros(4, 8), broken=torch.zeros(4), extra=torch.ones(1)
    )
    html = _page(tmp_path, against=other, against_source="/x/other")
    assert "<h2>Diff against <code>/x/other</code></h2>" in html
    assert "first diverging key: &#x27;embed&#x27;" in html
    assert "Only in the other: <code>extra</code>" in html
    assert html.count("data:image/png;base64,") == 3  # + the error plot
    assert '<tr class="first bad">' in html


def test_missing_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(TensorSnapError, match=r"pip install 'tensorsnap\[report\]'"):
        write_report(_snap(a=torch.ones(1)), tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


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


def test_sorting_and_filter_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    snap = _snap(
        small=torch.tensor([0.0, 1.0]),  # max 1
        big=torch.tensor([5.0, 100.0]),  # max 100
        middle=torch.tensor([-1.0, 7.0]),  # max 7
        level=torch.tensor([2.0]),  # max 2
    )
    page = Path(write_report(snap, tmp_path / "r.html"))
    probe = tmp_path / "probe.html"
    text = page.read_text().replace("</body></html>", _PROBE + "</body></html>")
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
                f"--user-data-dir={profile}",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout)
    assert found is not None, done.stderr[-2000:]
    assert found.group(1) == (
        "asc=small,level,middle,big;desc=big,middle,level,small;shown=level;errors="
    )
