"""The same rank-aware capture, save and extract under a real ``torchrun`` (2 CPU processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import tensorsnap

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this torch build has no gloo backend", allow_module_level=True)

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import torch, torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    import tensorsnap

    warnings.simplefilter("ignore")  # torch.distributed's notes about CPU runs, not under test
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(3)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)))
    torch.manual_seed(4)
    data = torch.randn(8, 6)
    mine = data[4 * rank : 4 * rank + 4]
    with tensorsnap.capture(model, grads=True) as snap:
        model(mine).sum().backward()
    snap.save(sys.argv[1] + "/capture")
    tensorsnap.extract(model, list(mine.split(2)), out=sys.argv[1] + "/extract", progress=False)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def test_capture_save_and_extract_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        str(script),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    torch.manual_seed(4)
    data = torch.randn(8, 6)
    model = _model()
    with pytest.raises(tensorsnap.TensorSnapError, match="rank="):
        tensorsnap.load(tmp_path / "capture")
    for rank in range(2):
        mine = data[4 * rank : 4 * rank + 4]
        with tensorsnap.capture(model, grads=True) as ref:
            model(mine).sum().backward()
        got = tensorsnap.load(tmp_path / "capture", rank=rank)
        assert list(got) == list(ref)  # no `module.` prefixes from the DDP wrapper
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
    # data-parallel extract: rank 0's rows, then rank 1's
    acts = tensorsnap.load(tmp_path / "extract")
    with torch.no_grad():  # batch by batch, as the ranks ran it
        expected = torch.cat([model[1](model[0](batch)) for batch in data.split(2)])
    torch.testing.assert_close(acts["1"], expected, rtol=0, atol=0)
