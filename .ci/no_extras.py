"""CI step: tensorsnap installed with no extras into a fresh venv saves, loads, spills and diffs.

The declared dependencies (torch only) must be enough for the core. The fresh venv has no numpy,
no safetensors, no rich: pip installs ``tensorsnap`` (not editable) and what it and torch declare,
nothing else. torch 2.13.0 itself is linked from the CI venv instead of being unpacked again (it
is the same wheel from local disk; unpacking it takes minutes on a busy machine); pip still
checks it and installs torch's own requirements. ``--full`` installs torch with pip as well.

Usage: python .ci/no_extras.py [--full] (run from the repository root, inside the CI venv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from importlib import metadata

TORCH = "torch==2.13.0"

SMOKE = textwrap.dedent(
    """
    import importlib.util, os, sys, tempfile
    for name in ("numpy", "safetensors", "rich", "matplotlib"):
        if importlib.util.find_spec(name) is not None:
            sys.exit(f"{name} is installed: this is not a no-extras environment")
    import torch, tensorsnap
    root = tempfile.mkdtemp()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    with tensorsnap.capture(model, ops=True, max_memory=0) as snap:  # spills everything
        model(x)
    snap.save(os.path.join(root, "a"))
    with tensorsnap.capture(model, ops=True) as again:
        model(x)
    again.save(os.path.join(root, "b"))
    a = tensorsnap.load(os.path.join(root, "a"))
    assert torch.equal(a["0"], model[0](x).detach()), "loaded values differ"
    result = tensorsnap.diff(os.path.join(root, "a"), os.path.join(root, "b"))
    assert result.first_diverging is None and len(result.keys) == len(a), result
    acts = tensorsnap.extract(model, [x, x], out=os.path.join(root, "e"), progress=False)
    assert acts["2"].shape == (6, 2)
    print(f"no extras: saved, loaded, spilled, extracted and diffed {len(a)} keys")
    """
)


def main() -> int:
    full = "--full" in sys.argv[1:]
    work = tempfile.mkdtemp(prefix="tensorsnap-no-extras-")
    try:
        venv = os.path.join(work, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        python = os.path.join(venv, "bin", "python")
        if not full:
            _link_torch(python)
        pip = [python, "-m", "pip", "install", "-q", "--no-cache-dir", "--no-compile"]
        subprocess.run([*pip, TORCH, "."], check=True)
        done = subprocess.run([python, "-c", SMOKE], cwd=work)
        return done.returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _link_torch(python: str) -> None:
    """Link the CI venv's torch distribution (its top-level packages and metadata) into the
    fresh venv's site-packages; its requirements are left for pip to install."""
    dist = metadata.distribution("torch")
    if dist.version.split("+")[0] != TORCH.split("==")[1]:
        raise SystemExit(f"the CI venv has torch {dist.version}, expected {TORCH}")
    here = sysconfig.get_paths()["purelib"]
    there = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
    for name in sorted(tops):
        if os.path.exists(os.path.join(here, name)):
            os.symlink(os.path.join(here, name), os.path.join(there, name))


if __name__ == "__main__":
    sys.exit(main())
