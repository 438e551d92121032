"""Bundle and spill benchmarks, as ratios against a baseline measured in the same run.

    python benchmarks/bench_bundle.py [--mb 256] [--big-mb 1024] [--repeat 3]

1. save and load throughput against raw ``safetensors.torch.save_file`` / ``load_file`` of the
   same tensors (the bundle fsyncs its files and checks CRC-32s; both are included);
2. time to open a bundle and read one small key, for a small and a large bundle;
3. peak RSS of filling a ``SpillStore`` under a budget against a ``MemoryStore`` (each in its
   own process, ``resource.getrusage``).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import tensorsnap
from tensorsnap._snapshot import Record, Snapshot
from tensorsnap._spill import SpillStore
from tensorsnap._store import MemoryStore


def tensors(total_mb: int, each_mb: int = 4) -> dict[str, torch.Tensor]:
    count = max(1, total_mb // each_mb)
    gen = torch.Generator().manual_seed(0)
    return {f"layer.{i}": torch.randn(each_mb * 2**18, generator=gen) for i in range(count)}


def snapshot_of(values: dict[str, torch.Tensor], store: Any = None) -> Snapshot:
    snap = Snapshot(store=store)
    for key, t in values.items():
        snap._add(Record(key, key, 0, None, "output", tuple(t.shape), t.dtype, t.nbytes), t)
    return snap


def best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_throughput(work: str, mb: int, repeat: int) -> None:
    values = tensors(mb)
    nbytes = sum(t.nbytes for t in values.values())
    snap = snapshot_of(values)
    counter = [0]

    def path(name: str) -> str:
        counter[0] += 1
        return os.path.join(work, f"{name}{counter[0]}")

    def raw_save() -> None:
        save_file(values, path("raw") + ".safetensors")

    def raw_save_fsync() -> None:
        p = path("rawf") + ".safetensors"
        save_file(values, p)
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    def ours_save() -> None:
        snap.save(path("ours"))

    t_raw = best(raw_save, repeat)
    t_raw_f = best(raw_save_fsync, repeat)
    t_ours = best(ours_save, repeat)
    gb = nbytes / 1e9
    print(f"save {nbytes / 1e6:.0f} MB in {len(values)} tensors:")
    print(f"  safetensors save_file          {gb / t_raw:6.2f} GB/s")
    print(f"  safetensors save_file + fsync  {gb / t_raw_f:6.2f} GB/s")
    print(f"  tensorsnap save (fsync, crc32) {gb / t_ours:6.2f} GB/s")
    print(f"  ratio vs save_file {t_raw / t_ours:.2f}x, vs save_file+fsync {t_raw_f / t_ours:.2f}x")

    raw_file = os.path.join(work, "raw1.safetensors")
    bundle = os.path.join(work, f"ours{counter[0]}")

    def raw_load() -> None:
        loaded = load_file(raw_file)
        assert len(loaded) == len(values)

    def ours_load() -> None:
        loaded = tensorsnap.load(bundle)
        for key in loaded:  # maps, checks the CRC (touches every byte) and builds the value
            loaded[key]

    def ours_load_sum() -> None:
        loaded = tensorsnap.load(bundle)
        for key in loaded:
            loaded[key].sum()

    def raw_load_sum() -> None:
        for t in load_file(raw_file).values():
            t.sum()

    t_raw = best(raw_load, repeat)
    t_ours = best(ours_load, repeat)

    def ours_load_sum_unverified() -> None:
        loaded = tensorsnap.load(bundle, verify=False)
        for key in loaded:
            loaded[key].sum()

    t_raw_s = best(raw_load_sum, repeat)
    t_ours_s = best(ours_load_sum, repeat)
    t_ours_u = best(ours_load_sum_unverified, repeat)
    print("load every key (page cache warm):")
    print(f"  safetensors load_file          {gb / t_raw:6.2f} GB/s")
    print(f"  tensorsnap load + snap[k]      {gb / t_ours:6.2f} GB/s   ratio {t_raw / t_ours:.2f}x")
    print(f"  load_file, then sum each       {gb / t_raw_s:6.2f} GB/s")
    print(f"  load + snap[k].sum() each      {gb / t_ours_s:6.2f} GB/s   {t_raw_s / t_ours_s:.2f}x")
    print(f"  same, load(verify=False)       {gb / t_ours_u:6.2f} GB/s   {t_raw_s / t_ours_u:.2f}x")


def bench_open(work: str, sizes: list[int], repeat: int) -> None:
    print("open a bundle of 17 keys and read the small one (median; same keys, more bytes):")
    results = []
    for mb in sizes:
        values = tensors(mb, each_mb=max(1, mb // 16))
        values["small"] = torch.arange(10.0)
        path = os.path.join(work, f"open{mb}")
        snapshot_of(values).save(path)
        del values

        def open_one(path: str = path) -> None:
            assert tensorsnap.load(path)["small"][3] == 3.0

        times = []
        for _ in range(max(repeat, 5)):
            start = time.perf_counter()
            open_one()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results.append(median)
        print(f"  {mb:5d} MB bundle: {median * 1e3:7.2f} ms")
        shutil.rmtree(path)
    ratio = results[-1] / results[0]
    print(f"  ratio largest/smallest: {ratio:.2f}x for {sizes[-1] / sizes[0]:.0f}x the data")


def peak_rss_mb() -> float:
    """Peak RSS of this process. ru_maxrss survives exec on Linux (a child started by a big
    parent reports the parent's peak), so prefer VmHWM, which belongs to this process image."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_child(kind: str, mb: int, budget_mb: int) -> None:
    store: Any = SpillStore(budget_mb * 10**6, None) if kind == "spill" else MemoryStore()
    snap = Snapshot(store=store)
    gen = torch.Generator().manual_seed(0)
    for i in range(mb // 4):
        t = torch.randn(2**20, generator=gen)  # 4 MB, made and handed over as a capture would
        snap._add(Record(f"k{i}", "m", i, None, "output", (2**20,), t.dtype, t.nbytes), t)
        del t
    if isinstance(store, SpillStore):
        store.flush()
    print(f"{peak_rss_mb():.0f}")
    snap.close()


def bench_rss(mb: int, budget_mb: int) -> None:
    print(f"peak RSS while filling a store with {mb} MB (4 MB values), budget {budget_mb} MB:")
    peaks = {}
    for kind in ("baseline", "memory", "spill"):
        size = 0 if kind == "baseline" else mb
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", kind, str(size), str(budget_mb)],
            check=True,
            capture_output=True,
            text=True,
        )
        peaks[kind] = float(out.stdout.strip().splitlines()[-1])
    base = peaks["baseline"]
    for kind in ("memory", "spill"):
        above = peaks[kind] - base
        print(f"  {kind:7s} store: peak RSS {peaks[kind]:6.0f} MB, {above:6.0f} MB above empty")
    ratio = (peaks["spill"] - base) / max(peaks["memory"] - base, 1.0)
    print(f"  spill / memory, above an empty process: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--budget-mb", type=int, default=64)
    parser.add_argument("--rss-child", nargs=3, metavar=("KIND", "MB", "BUDGET"))
    args = parser.parse_args()
    if args.rss_child:
        kind, mb, budget = args.rss_child
        rss_child(kind, int(mb), int(budget))
        return
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench-bundle-", dir=os.environ.get("BENCH_DIR"))
    try:
        print(f"torch {torch.__version__}, tensorsnap {tensorsnap.__version__}, dir {work}")
        bench_throughput(work, args.mb, args.repeat)
        for name in os.listdir(work):
            shutil.rmtree(os.path.join(work, name), ignore_errors=True)
            if os.path.isfile(os.path.join(work, name)):
                os.remove(os.path.join(work, name))
        bench_open(work, [args.big_mb // 10, args.big_mb], args.repeat)
        bench_rss(max(args.mb * 2, 4 * args.budget_mb), args.budget_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
