"""benchmarks/gpu_check.py: what can be checked of it without a GPU.

On a CUDA machine the script is run by hand (docs/gpu.md); here its no-CUDA path, its table and
exit status, and its device-independent checks on the CPU (the same code the GPU run uses).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> Any:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_it_says_so_and_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gpu_check: no CUDA device here (torch ")
    assert done.stdout.rstrip().endswith("nothing to check")


def test_the_checks_pass_on_the_cpu_and_print_one_table(
    gpu_check: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gpu_check.main(["--device", "cpu", "--quick", "--only", "capture,snapshot"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("gpu_check: all passed")
    rows = [line.split() for line in out.splitlines()[3:-1]]
    results = {(r[0], r[1]): r for r in rows}
    assert len(rows) >= 20
    assert all("FAIL" not in r for r in rows)
    # the capture checks ran on both models, against their references
    for model in ("tiny", "gpt2"):
        done = [r for r in rows if r[:2] == ["capture", model]]
        assert sum("ok" in r for r in done) >= 10, done
    assert ("snapshot", "device=None,") in results


def test_a_failed_check_is_a_row_and_exit_status_1(
    gpu_check: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = gpu_check.tensorsnap.snapshot

    def off_by_one_bit(obj: Any, **options: Any) -> Any:
        copy = real(obj, **options)
        copy["half"].view(torch.int16).add_(1)  # a wrong last bit must be caught
        return copy

    monkeypatch.setattr(gpu_check.tensorsnap, "snapshot", off_by_one_bit)
    code = gpu_check.main(["--device", "cpu", "--only", "snapshot device=None"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL    half: values differ" in out
    assert out.rstrip().endswith("gpu_check: 1 of 1 checks failed")


def test_a_sync_inside_a_guard_is_reported_with_where_it_happened(gpu_check: Any) -> None:
    # the message torch raises under set_sync_debug_mode("error")
    ctx = gpu_check.Context(device=torch.device("cpu"), quick=True, repeats=1)

    def syncs() -> str:
        raise RuntimeError("called a synchronizing CUDA operation")

    gpu_check._attempt(ctx, "capture", "fake", syncs)
    (row,) = ctx.rows
    assert row[2] == "FAIL" and row[3].startswith("host sync at test_gpu_check.py:")
    assert ctx.failed == 1
