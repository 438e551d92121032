"""The command line's diff --json and --match, blame, and report --against, end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import tensorsnap
from tensorsnap._cli import main

_FACTORY = """
from torch import nn


def reference():
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))


def candidate(act="relu"):
    middle = nn.GELU() if act == "gelu" else nn.ReLU()
    return nn.Sequential(nn.Linear(3, 8), middle, nn.Linear(8, 2))
"""


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    name = f"tsblame_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _two_runs(tmp_path: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    port = torch.nn.ModuleDict()  # another naming of the same network, with one change
    port.add_module("fc_in", torch.nn.Linear(3, 4))
    port.add_module("fc_out", torch.nn.Linear(4, 2))
    port.fc_in.load_state_dict(ref[0].state_dict())
    port.fc_out.load_state_dict(ref[2].state_dict())
    with torch.no_grad():
        port.fc_out.bias.add_(0.5)

    class Port(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = port

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body.fc_out(torch.relu(self.body.fc_in(x)))

    x = torch.randn(5, 3)
    model = Port()
    with torch.no_grad():
        with tensorsnap.capture(ref) as a:
            ref(x)
        with tensorsnap.capture(model) as b:
            model(x)
    a.save(tmp_path / "ref")
    b.save(tmp_path / "port")
    return str(tmp_path / "ref"), str(tmp_path / "port")


def test_diff_json_with_a_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref, port = _two_runs(tmp_path)
    mapping = json.dumps({"body.fc_in": "0", "body.fc_out": "2"})
    assert main(["diff", port, ref, "--match", mapping, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["first_diverging"] == "body.fc_out" and data["first_diverging_b"] == "2"
    by_key = {k["key"]: k for k in data["keys"]}
    assert by_key["body.fc_in"]["close"] and by_key["body.fc_in"]["key_b"] == "0"
    assert by_key["body.fc_out"]["max_abs"] == pytest.approx(0.5, rel=1e-5)
    # the map from a file, and "auto", find the same
    (tmp_path / "map.json").write_text(mapping)
    assert main(["diff", port, ref, "--match", str(tmp_path / "map.json")]) == 1
    text = capsys.readouterr().out
    assert "body.fc_out -> 2" in text and "first diverging key: 'body.fc_out'" in text
    assert main(["diff", port, ref, "--match", "auto", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_diverging_b"] == "2"
    assert main(["diff", port, ref, "--match", "{not json"]) == 2
    assert "--match '{not json' is not valid JSON" in capsys.readouterr().err


def test_diff_json_writes_infinities_as_strings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorsnap._snapshot import Record, Snapshot

    for name, value in (("a", torch.tensor([1.0, 1.0])), ("b", torch.tensor([1.0, 0.0]))):
        snap = Snapshot()
        snap._add(Record("x", "x", 0, None, "output", (2,), value.dtype, 8), value)
        snap.save(tmp_path / name)
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["keys"][0]["max_rel"] == "inf"
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "1.8e+308" not in capsys.readouterr().out


def test_blame_names_the_module_and_exits_1(
    factory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ref, cand = f"{factory}:reference", f"{factory}:candidate"
    argv = ["blame", ref, cand, "--input", "randn:4x3"]
    assert main([*argv, "--cand-arg", "act='gelu'", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["culprits"] == ["1"]
    assert main(argv) == 0  # the same network: no culprit
    assert "no culprit" in capsys.readouterr().out
    assert main([*argv, "--candidate-dtype", "bfloat16"]) == 0
    assert main([*argv, "--candidate-dtype", "int8"]) == 2
    assert "not a floating-point torch dtype" in capsys.readouterr().err


def test_report_against_shows_pairs_and_the_error_axis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref, port = _two_runs(tmp_path)
    out = tmp_path / "r.html"
    assert main(["report", port, "--against", ref, "--match", "auto", "-o", str(out)]) == 0
    page = out.read_text()
    assert "First divergence: <code>body.fc_out</code>" in page
    assert "paired with" in page and "auto: shape" in page
    assert "1e-8 to 1e-1" in page and '"range":[-8.0,-1.0]' in page


def test_ls_report_and_diff_read_a_stats_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    x = torch.randn(6, 3)
    with torch.no_grad():
        with tensorsnap.capture(model, stats=True) as stats:
            model(x)
        with tensorsnap.capture(model) as copies:
            model(x)
    stats.save(tmp_path / "s")
    copies.save(tmp_path / "c")
    assert main(["ls", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    expected_min = float(copies["0"].min())
    assert f"{expected_min:.4g}" in text and "6x4" in text
    assert main(["diff", str(tmp_path / "s"), str(tmp_path / "c")]) == 0  # digests agree
    assert "equal: 3 keys" in capsys.readouterr().out
    out = tmp_path / "s.html"
    assert (
        main(["report", str(tmp_path / "s"), "--against", str(tmp_path / "c"), "-o", str(out)]) == 0
    )
    assert "equal: 3 keys" in out.read_text()
