"""What importing costs: ``import tensorsnap`` adds only its own modules to torch's import, and
the command line answers ``--help`` and ``--version`` without importing torch.

Checked in fresh interpreters by the modules they loaded (deterministic), not by timing; the
times are printed by ``benchmarks/bench_import.py``, which CI runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules(code: str) -> set[str]:
    """The top-level names of the modules a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, check=True
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_import_tensorsnap_adds_only_its_own_modules_to_torch() -> None:
    floor = _modules("import torch")
    loaded = _modules(
        "import tensorsnap\nfor name in tensorsnap.__all__: getattr(tensorsnap, name)"
    )
    extra = loaded - floor
    assert "tensorsnap._capture" in extra and "tensorsnap._bundle" in extra  # the probe works
    foreign = {
        name
        for name in extra
        if name.split(".")[0] != "tensorsnap" and name.split(".")[0] not in sys.stdlib_module_names
    }
    # no rich, matplotlib, safetensors, transformers or numpy; torch submodules that a plain
    # 'import torch' does not load would show up here too
    assert foreign == set()


def test_import_tensorsnap_alone_does_not_import_torch() -> None:
    loaded = _modules("import tensorsnap\nassert tensorsnap.__version__")
    assert "torch" not in loaded


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["capture", "--help"], ["report", "--help"], []]
)
def test_help_and_version_do_not_import_torch(argv: list[str]) -> None:
    code = f"from tensorsnap._cli import main\nmain({argv!r})"
    loaded = _modules(code)
    assert "tensorsnap._cli" in loaded
    assert "torch" not in loaded and "rich" not in loaded


def test_python_m_tensorsnap_version_imports_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tensorsnap", "--version"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and done.stdout.startswith("tensorsnap ")
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "tensorsnap._cli" in imported and "torch" not in imported
