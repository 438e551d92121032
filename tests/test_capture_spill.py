"""capture(max_memory=..., spill_dir=...): values beyond the budget spill to disk, transparently."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

import tensorsnap


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True)) for _ in range(8))
    )


def _run(model: nn.Module, x: torch.Tensor, **options: object) -> tensorsnap.Snapshot:
    with tensorsnap.capture(model, ops=True, grads=True, **options) as snap:  # type: ignore[arg-type]
        model(x).sum().backward()
    return snap


def test_spilled_capture_equals_an_in_memory_capture(tmp_path: Path) -> None:
    model = _model()
    x = torch.randn(32, 64, requires_grad=True)
    reference = _run(model, x)
    spill = tmp_path / "spill"
    snap = _run(model, x, max_memory="40KB", spill_dir=str(spill))
    assert list(snap) == list(reference)
    assert snap.records == reference.records
    for key in reference:
        a, b = snap[key], reference[key]
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), key
        else:
            assert all((p is None and q is None) or torch.equal(p, q) for p, q in zip(a, b)), key
    # most of the ~260 KB captured went to files in the spill directory
    spilled = sum(f.stat().st_size for f in spill.rglob("*") if f.is_file())
    assert spilled > 150_000
    # a spilled snapshot saves and loads like any other
    snap.save(tmp_path / "bundle")
    loaded = tensorsnap.load(tmp_path / "bundle")
    assert torch.equal(loaded["0.1"], reference["0.1"])
    snap.close()
    assert not any(p.is_file() for p in spill.rglob("*"))  # cleaned when closed


def test_a_spilled_value_is_still_the_value_when_produced(tmp_path: Path) -> None:
    class Writes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            y += 1  # the module output captured above must not see this
            return y

    model = Writes()
    x = torch.randn(64, 16)
    with torch.no_grad(), tensorsnap.capture(model, max_memory=0, spill_dir=str(tmp_path)) as snap:
        out = model(x)
    with torch.no_grad():
        assert torch.equal(snap["fc"], model.fc(x))
    assert torch.equal(snap[""], out)
    assert os.listdir(tmp_path)  # the spill directory was used
    snap.close()
