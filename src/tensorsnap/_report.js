// The report's interactive parts: charts (hover names the key, drag to zoom, click to pick a
// histogram), the histogram panel, and the statistics table (sort, filter by text and group).
// Plain DOM and SVG, no library and nothing fetched: the page works offline as one file. The
// data sits in <script type="application/json"> blocks written by _report.py.
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, parent) {
    var node = tag.charAt(0) === "#" ? document.createTextNode(tag.slice(1))
      : (["svg", "path", "rect", "line", "text", "circle", "polygon", "g", "title"]
        .indexOf(tag) >= 0 ? document.createElementNS(NS, tag) : document.createElement(tag));
    for (var name in attrs || {}) {
      if (name === "text") node.textContent = attrs[name];
      else node.setAttribute(name, attrs[name]);
    }
    if (parent) parent.appendChild(node);
    return node;
  }

  function json(id) {
    var node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "-";
    if (v === 0) return "0";
    var a = Math.abs(v);
    return (a >= 1e4 || a < 1e-3) ? v.toExponential(3) : String(Number(v.toPrecision(4)));
  }

  // -- charts: points in execution order, several series, hover / zoom / pick -----------------

  var COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2"];

  function Chart(box, spec) {
    this.box = box;
    this.spec = spec;
    this.sets = Object.keys(spec.sets).filter(function (k) { return spec.sets[k].length; });
    this.set = this.sets[0];
    this.mode = 0;
    this.view = null;
    var self = this, bar = el("div", {"class": "controls"}, box);
    if (this.sets.length > 1) {
      el("#show ", null, bar);
      var pick = el("select", {"class": "set"}, bar);
      this.sets.forEach(function (name) {
        el("option", {value: name, text: name + " (" + spec.sets[name].length + ")"}, pick);
      });
      pick.addEventListener("change", function () { self.set = pick.value; self.view = null; self.draw(); });
    }
    if (spec.modes.length > 1) {
      var mode = el("select", {"class": "mode"}, bar);
      spec.modes.forEach(function (m, i) { el("option", {value: String(i), text: m.name}, mode); });
      mode.addEventListener("change", function () { self.mode = Number(mode.value); self.draw(); });
    }
    var reset = el("button", {type: "button", text: "reset zoom"}, bar);
    reset.addEventListener("click", function () { self.view = null; self.draw(); });
    el("span", {"class": "hint", text: " hover names a key; drag to zoom; click adds its histogram"}, bar);
    this.svg = el("svg", {"class": "chart", height: "370"}, box);
    this.tip = el("div", {"class": "tip"}, box);
    this.tip.style.display = "none";
    this.draw();
    this.svg.addEventListener("mousemove", function (e) { self.move(e); });
    this.svg.addEventListener("mouseleave", function () {
      self.tip.style.display = "none";
      self.guide(null);
      self.drag = null;  // a drag that leaves the plot is dropped, not finished later
      if (self.sel) self.sel.setAttribute("width", 0);
    });
    this.svg.addEventListener("mousedown", function (e) { self.drag = self.index(e); e.preventDefault(); });
    this.svg.addEventListener("mouseup", function (e) { self.release(e); });
    this.svg.addEventListener("dblclick", function () { self.view = null; self.draw(); });
  }

  Chart.prototype.points = function () { return this.spec.sets[this.set]; };

  Chart.prototype.value = function (p, field) {
    var v = p.v[field];
    if (v === null || v === undefined) return null;
    if (this.spec.modes[this.mode].log) return v > 0 ? Math.log10(v) : null;
    return v;
  };

  Chart.prototype.draw = function () {
    var svg = this.svg, pts = this.points(), mode = this.spec.modes[this.mode];
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var width = Math.max(480, this.box.clientWidth || 900), height = 370;
    svg.setAttribute("width", String(width));
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    var v = this.view || [0, pts.length - 1];
    this.view = v;
    var L = 64, R = 12, T = 22, B = 120;
    this.frame = {L: L, R: R, T: T, B: B, w: width - L - R, h: height - T - B};
    var f = this.frame, self = this, lo = Infinity, hi = -Infinity;
    for (var i = v[0]; i <= v[1]; i++) {
      mode.series.forEach(function (s) {
        [s.f, s.lo, s.hi].forEach(function (field) {
          if (!field) return;
          var y = self.value(pts[i], field);
          if (y !== null && isFinite(y)) { lo = Math.min(lo, y); hi = Math.max(hi, y); }
        });
      });
    }
    if (mode.range) { lo = mode.range[0]; hi = mode.range[1]; }  // a fixed axis (the diff's)
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (hi === lo) { hi += 0.5; lo -= 0.5; }
    var pad = (hi - lo) * 0.05;
    lo -= pad; hi += pad;
    var span = Math.max(1, v[1] - v[0]);
    function X(i) { return L + (v[1] === v[0] ? f.w / 2 : (i - v[0]) / span * f.w); }
    function Y(y) { return T + (hi - y) / (hi - lo) * f.h; }
    this.X = X;
    // y grid and labels at round numbers (powers of ten on a log axis)
    var raw = (hi - lo) / 5, step = Math.pow(10, Math.floor(Math.log10(raw)));
    step *= raw / step >= 5 ? 5 : (raw / step >= 2 ? 2 : 1);
    if (mode.log) step = Math.max(1, Math.round(step));
    for (var yv = Math.ceil(lo / step) * step; yv <= hi; yv += step) {
      var yy = Y(yv);
      el("line", {x1: L, x2: L + f.w, y1: yy, y2: yy, "class": "grid"}, svg);
      el("text", {x: L - 6, y: yy + 4, "text-anchor": "end", "class": "tick",
        text: mode.log ? "1e" + Math.round(yv) : fmt(Math.abs(yv) < step / 1e6 ? 0 : yv)}, svg);
    }
    // x labels: every point when few are shown, else an even sample; hover names the rest
    var every = Math.max(1, Math.ceil((v[1] - v[0] + 1) / 40));
    for (var j = v[0]; j <= v[1]; j += every) {
      var label = pts[j].k.length > 26 ? "\u2026" + pts[j].k.slice(-25) : pts[j].k;
      el("text", {x: 0, y: 0, "class": "tick", "text-anchor": "end",
        transform: "translate(" + (X(j) + 3) + "," + (T + f.h + 8) + ") rotate(-60)", text: label}, svg);
    }
    mode.series.forEach(function (s, n) {
      var color = s.color || COLORS[n % COLORS.length];
      if (s.type === "band") {
        var up = [], down = [];
        for (var i = v[0]; i <= v[1]; i++) {
          var a = self.value(pts[i], s.lo), b = self.value(pts[i], s.hi);
          if (a !== null && b !== null) { up.push(X(i) + "," + Y(b)); down.unshift(X(i) + "," + Y(a)); }
        }
        if (up.length) el("polygon", {points: up.concat(down).join(" "), fill: color, "fill-opacity": "0.2"}, svg);
        return;
      }
      if (s.type === "dots") {
        for (var k = v[0]; k <= v[1]; k++) {
          var yd = self.value(pts[k], s.f);
          if (yd !== null) {
            el("circle", {cx: X(k), cy: Y(yd), r: 2.5, fill: pts[k].bad ? "#c0392b" : color}, svg);
          }
        }
        return;
      }
      var d = "", pen = "M";
      for (var m = v[0]; m <= v[1]; m++) {
        var y = self.value(pts[m], s.f);
        if (y === null) { pen = "M"; continue; }
        d += pen + X(m).toFixed(1) + "," + Y(y).toFixed(1);
        pen = "L";
      }
      el("path", {d: d, fill: "none", stroke: color, "stroke-width": s.type === "dash" ? 1 : 1.6,
        "stroke-dasharray": s.type === "dash" ? "4 3" : "none"}, svg);
    });
    // a NaN or Inf is marked where it happened, above the plot, whatever the series show
    for (var q = v[0]; q <= v[1]; q++) {
      if (pts[q].bad && this.spec.markBad) {
        el("polygon", {"class": "bad-mark", points: (X(q) - 4) + "," + (T) + " " + (X(q) + 4) + ","
          + T + " " + X(q) + "," + (T + 7)}, svg);
      }
    }
    var legend = el("g", {}, svg), lx = L + 6;
    mode.series.forEach(function (s, n) {
      var c = s.color || COLORS[n % COLORS.length];
      el("rect", {x: lx, y: 6, width: 10, height: 10, fill: c, "fill-opacity": s.type === "band" ? 0.3 : 1}, legend);
      var txt = el("text", {x: lx + 14, y: 15, "class": "tick", text: s.name}, legend);
      lx += 24 + 7 * s.name.length;
      return txt;
    });
    el("rect", {x: L, y: T, width: f.w, height: f.h, "class": "frame"}, svg);
    this.sel = el("rect", {x: 0, y: T, width: 0, height: f.h, "class": "selection"}, svg);
    this.line = el("line", {x1: 0, x2: 0, y1: T, y2: T + f.h, "class": "guide"}, svg);
    this.line.style.display = "none";
  };

  Chart.prototype.index = function (e) {
    var box = this.svg.getBoundingClientRect(), f = this.frame, v = this.view;
    var scale = box.width ? (Number(this.svg.getAttribute("width")) / box.width) : 1;
    var x = (e.clientX - box.left) * scale;
    var i = Math.round(v[0] + (x - f.L) / f.w * (v[1] - v[0]));
    return Math.max(v[0], Math.min(v[1], i));
  };

  Chart.prototype.guide = function (i) {
    if (!this.line) return;
    if (i === null) { this.line.style.display = "none"; return; }
    this.line.style.display = "";
    this.line.setAttribute("x1", this.X(i));
    this.line.setAttribute("x2", this.X(i));
  };

  Chart.prototype.move = function (e) {
    var i = this.index(e), p = this.points()[i];
    this.guide(i);
    if (this.drag !== undefined && this.drag !== null) {
      var a = Math.min(this.drag, i), b = Math.max(this.drag, i);
      this.sel.setAttribute("x", this.X(a));
      this.sel.setAttribute("width", Math.max(0, this.X(b) - this.X(a)));
    }
    var tip = this.tip;
    while (tip.firstChild) tip.removeChild(tip.firstChild);
    el("div", {"class": "tip-key", text: p.k}, tip);
    if (p.d) el("div", {text: p.d}, tip);
    (this.spec.tip || []).forEach(function (field) {
      if (field in p.v) el("div", {text: field + ": " + fmt(p.v[field])}, tip);
    });
    if (p.bad && p.note) el("div", {"class": "bad", text: p.note}, tip);
    tip.style.display = "block";
    var box = this.box.getBoundingClientRect();
    var left = e.clientX - box.left + 14;
    if (left + 260 > box.width) left = Math.max(0, e.clientX - box.left - 274);
    tip.style.left = left + "px";
    tip.style.top = (e.clientY - box.top + 12) + "px";
  };

  Chart.prototype.release = function (e) {
    var start = this.drag, end = this.index(e);
    this.drag = null;
    this.sel.setAttribute("width", 0);
    if (start === undefined || start === null) return;
    if (Math.abs(end - start) >= 1) {
      this.view = [Math.min(start, end), Math.max(start, end)];
      this.draw();
    } else if (this.points()[end].i !== undefined) {
      addHistogram(this.points()[end].i, true);
    }
  };

  // -- histograms: any key's, picked from the charts, the table or the search box -------------

  var ROWS = json("ts-rows") || [];
  var shown = [];

  function byIndex(i) {
    for (var n = 0; n < ROWS.length; n++) if (ROWS[n].i === i) return ROWS[n];
    return null;
  }

  function addHistogram(i, scroll) {
    var row = byIndex(i), panel = document.getElementById("histograms");
    if (!row || !panel || !row.hist.length) return;
    if (shown.indexOf(i) < 0) { shown.push(i); drawHistograms(); }
    if (scroll) {
      var card = document.getElementById("hist-" + i);
      if (card && card.scrollIntoView) card.scrollIntoView({block: "nearest"});
    }
  }

  function drawHistograms() {
    var grid = document.getElementById("hist-grid");
    if (!grid) return;
    while (grid.firstChild) grid.removeChild(grid.firstChild);
    shown.forEach(function (i) {
      var row = byIndex(i), card = el("figure", {"class": "hist", id: "hist-" + i}, grid);
      var cap = el("figcaption", {}, card);
      var close = el("button", {type: "button", "class": "close", title: "remove", text: "\u00d7"}, cap);
      close.addEventListener("click", function () {
        shown.splice(shown.indexOf(i), 1);
        drawHistograms();
      });
      el("span", {"class": "hist-key", text: row.k}, cap);
      el("span", {"class": "hist-meta", text: " " + row.kind + ", " + row.shape + " " + row.dtype
        + (row.nans || row.infs ? ", " + row.nans + " NaN, " + row.infs + " Inf" : "")}, cap);
      var w = 280, h = 120, top = Math.max.apply(null, row.hist) || 1, n = row.hist.length;
      var svg = el("svg", {width: w, height: h + 18, viewBox: "0 0 " + w + " " + (h + 18)}, card);
      var edge = row.max > row.min ? row.max : row.min + 1;
      row.hist.forEach(function (c, b) {
        var bh = c ? Math.max(1, h * c / top) : 0;
        var bar = el("rect", {x: b * w / n, y: h - bh, width: w / n - 0.5, height: bh, "class": "bar"}, svg);
        var a = row.min + (edge - row.min) * b / n, z = row.min + (edge - row.min) * (b + 1) / n;
        el("title", {text: "[" + fmt(a) + ", " + fmt(z) + "): " + c}, bar);
      });
      el("text", {x: 0, y: h + 14, "class": "tick", text: fmt(row.min)}, svg);
      el("text", {x: w, y: h + 14, "class": "tick", "text-anchor": "end", text: fmt(row.max)}, svg);
    });
    var empty = document.getElementById("hist-empty");
    if (empty) empty.style.display = shown.length ? "none" : "";
  }

  function setupHistograms() {
    var panel = document.getElementById("histograms");
    if (!panel) return;
    var input = document.getElementById("hist-add"), list = document.getElementById("hist-keys");
    ROWS.forEach(function (r) { if (r.hist.length) el("option", {value: r.k}, list); });
    function add() {
      for (var n = 0; n < ROWS.length; n++) {
        if (ROWS[n].k === input.value) { addHistogram(ROWS[n].i, true); input.value = ""; return; }
      }
    }
    input.addEventListener("change", add);
    input.addEventListener("keydown", function (e) { if (e.key === "Enter") add(); });
    document.getElementById("hist-clear").addEventListener("click", function () {
      shown = [];
      drawHistograms();
    });
    (json("ts-hist-initial") || []).forEach(function (i) { if (shown.indexOf(i) < 0) shown.push(i); });
    drawHistograms();
  }

  // -- tables: sort by a column, filter the statistics by key text and group ------------------

  function setupTables() {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.querySelectorAll("th"), function (th, col) {
        th.addEventListener("click", function () { sortBy(table, th, col); });
      });
    });
    var filter = document.getElementById("filter"), group = document.getElementById("group");
    function apply() {
      var q = filter ? filter.value.toLowerCase() : "", g = group ? group.value : "";
      var shownRows = 0;
      Array.prototype.forEach.call(document.querySelectorAll("#stats tbody tr"), function (r) {
        var ok = r.cells[1].textContent.toLowerCase().indexOf(q) >= 0
          && (!g || r.getAttribute("data-group") === g);
        r.style.display = ok ? "" : "none";
        if (ok) shownRows++;
      });
      var count = document.getElementById("shown");
      if (count) count.textContent = String(shownRows);
    }
    if (filter) filter.addEventListener("input", apply);
    if (group) group.addEventListener("change", apply);
    var stats = document.getElementById("stats");
    if (stats) stats.addEventListener("click", function (e) {
      var tr = e.target.closest ? e.target.closest("tbody tr") : null;
      if (tr && tr.hasAttribute("data-i")) addHistogram(Number(tr.getAttribute("data-i")), true);
    });
  }

  function sortBy(table, th, col) {
    var body = table.tBodies[0], asc = !th.classList.contains("asc");
    Array.prototype.forEach.call(table.querySelectorAll("th"), function (h) {
      h.classList.remove("asc", "desc");
    });
    th.classList.add(asc ? "asc" : "desc");
    function val(row) {
      var cell = row.cells[col];
      if (!cell) return "";
      var v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
      var n = parseFloat(v);
      return v !== "" && !isNaN(n) && isFinite(Number(v)) ? n : (v === "inf" ? Infinity : v);
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = val(a), y = val(b);
      if (x === "" && y !== "") return 1;  // empty cells last, both ways
      if (y === "" && x !== "") return -1;
      var c = (typeof x === "number" && typeof y === "number") ? x - y
        : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }

  setupTables();
  setupHistograms();
  var charts = [];
  Array.prototype.forEach.call(document.querySelectorAll("div.chartbox"), function (box) {
    var spec = json(box.getAttribute("data-spec"));
    if (spec) { box.chart = new Chart(box, spec); charts.push(box.chart); }
  });
  var pending = null;  // redraw at the new width once the window stops resizing
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(function () { charts.forEach(function (c) { c.draw(); }); }, 150);
  });
  window.tensorsnapReport = {addHistogram: addHistogram, shown: function () { return shown.slice(); }};
})();
