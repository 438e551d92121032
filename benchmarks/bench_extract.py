"""tensorsnap.extract against a plain ``no_grad`` inference loop over the same batches.

    python benchmarks/bench_extract.py [--batches 200] [--repeat 3] [--dir /path/on/local/disk]

1. throughput: wall time of ``extract`` (module outputs, or a selection) over N batches divided
   by the time of ``with torch.no_grad(): model(batch)`` over the same batches (goal: <= 1.2x
   writing to a local disk), and the MB/s written;
2. peak RSS (VmHWM, reset with /proc/self/clear_refs, each run in its own process) of
   extractions over two dataset sizes, 10x apart: it should stay flat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

import tensorsnap


def model_and_batches(count: int, rows: int = 64) -> tuple[nn.Module, list[torch.Tensor]]:
    """A 4-layer MLP (512 -> 2048 -> 512 blocks): ~1 MB of module outputs per batch row block."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)]
    model = nn.Sequential(*layers).eval()
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randn(rows, 512, generator=gen) for _ in range(count)]


def plain(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(batch)


def bench_throughput(count: int, repeat: int, work: str) -> None:
    model, batches = model_and_batches(count)
    plain(model, batches[:5])  # warm up
    print(f"{count} batches of {tuple(batches[0].shape)}, 4-layer MLP 512-2048-512, {work}")
    print(f"{'selection':<28} {'plain s':>8} {'extract s':>10} {'ratio':>6} {'MB':>7} {'MB/s':>7}")
    selections: list[tuple[str, dict[str, Any]]] = [
        ("block outputs (*.2 etc)", {"include": ["2", "5", "8", "11"]}),
        ("all module outputs", {}),
    ]
    for label, options in selections:
        base_times, times, written = [], [], 0
        for i in range(repeat):
            start = time.perf_counter()
            plain(model, batches)
            base_times.append(time.perf_counter() - start)
            out = os.path.join(work, f"run-{label[:5]}-{i}")
            start = time.perf_counter()
            tensorsnap.extract(model, batches, out=out, progress=False, **options)
            times.append(time.perf_counter() - start)
            written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
            shutil.rmtree(out)
        base, best = min(base_times), min(times)
        print(
            f"{label:<28} {base:8.3f} {best:10.3f} {best / base:6.2f} {written / 1e6:7.0f} "
            f"{written / 1e6 / best:7.0f}"
        )


_RSS_SCRIPT = """
import sys, torch, tensorsnap
sys.path.insert(0, sys.argv[3])
from bench_extract import model_and_batches
count, out = int(sys.argv[1]), sys.argv[2]
model, _ = model_and_batches(1)
def batches(n):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        yield torch.randn(64, 512, generator=gen)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
tensorsnap.extract(model, batches(3), out=out + "-warm", progress=False)
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
tensorsnap.extract(model, batches(count), out=out, progress=False, max_memory="64MB")
print(base, status("VmHWM"))
"""


def bench_rss(count: int, work: str) -> None:
    print("\npeak RSS of extract (own process; max_memory='64MB')")
    print(
        f"{'batches':>8} {'written MB':>11} {'RSS before MB':>14} {'peak MB':>8} {'growth MB':>10}"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    for n in (count // 10, count):
        out = os.path.join(work, f"rss-{n}")
        result = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(n), out, here],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        base, peak = map(int, result.stdout.split())
        written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{n:8d} {written / 1e6:11.0f} {base / 1e6:14.0f} {peak / 1e6:8.0f} "
              f"{(peak - base) / 1e6:10.1f}")  # fmt: skip
        shutil.rmtree(out)
        shutil.rmtree(out + "-warm")


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-extract-", dir=args.dir)
    try:
        bench_throughput(args.batches, args.repeat, work)
        bench_rss(args.batches, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
