"""What ``capture(model, stats=True)`` costs, against a plain forward and the copying capture.

Run: ``python benchmarks/bench_stats.py`` (``--repeats N``, ``--models gpt2-tiny,resnet18``,
``--device cuda``, ``--check-sync`` to assert on CUDA that no reduction waits for the GPU).

All variants run under ``no_grad`` in eval mode, one CPU thread, interleaved (one call of each
per round), reduced to the median of per-round ratios to the plain forward of the same round.
Models are bench_ops.py's (GPT-2 tiny, a hand-built ResNet-18 when torchvision is missing, the
4-layer encoder with PyTorch's fast path off so that its submodules run).

Columns:
  plain     the forward alone, in ms
  copy      ``capture(model)``: every module output copied
  stats     ``capture(model, stats=True)``: every module output reduced to a Stats record
  copy+ops  ``capture(model, ops=True)``
  stats+ops ``capture(model, ops=True, stats=True)``
  kept      bytes the snapshot holds: copies vs stats records (tensor bytes; records are O(keys))
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from bench_ops import build

import tensorsnap


def _variants(model: torch.nn.Module, args: tuple[Any, ...]) -> dict[str, Callable[[], Any]]:
    def plain() -> Any:
        return model(*args)

    def run(**options: Any) -> Callable[[], Any]:
        def go() -> Any:
            with tensorsnap.capture(model, **options) as snap:
                model(*args)
            return snap

        return go

    return {
        "plain": plain,
        "copy": run(),
        "stats": run(stats=True),
        "copy+ops": run(ops=True),
        "stats+ops": run(ops=True, stats=True),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, repeats: int, device: str) -> dict[str, float]:
    model, args = build(name)
    model.to(device)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    variants = _variants(model, args)
    ratios: dict[str, list[float]] = {k: [] for k in variants if k != "plain"}
    plain_ms: list[float] = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(repeats):
            times = {}
            for key, fn in variants.items():
                gc.collect()
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[key] = time.perf_counter() - start
            plain_ms.append(times["plain"] * 1e3)
            for key in ratios:
                ratios[key].append(times[key] / times["plain"])
        copies, records = variants["copy+ops"](), variants["stats+ops"]()
    result = {"plain_ms": statistics.median(plain_ms)}
    result.update({k: statistics.median(v) for k, v in ratios.items()})
    result["copy_bytes"] = float(copies.nbytes)
    result["keys"] = float(len(records))
    return result


def check_sync(name: str) -> None:
    """On CUDA: a stats capture makes no synchronizing call until its block ends."""
    model, args = build(name)
    model.cuda()
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad():
        torch.cuda.set_sync_debug_mode("error")
        try:
            session = tensorsnap.capture(model, ops=True, stats=True)
            snap = session.__enter__()
            model(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        session.__exit__(None, None, None)
    print(f"{name}: {len(snap)} keys reduced on the GPU with no synchronizing call in the block")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default="gpt2-tiny,resnet18,encoder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check-sync", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    torch.backends.mha.set_fastpath_enabled(False)
    names = options.models.split(",")
    if options.check_sync:
        for name in names:
            check_sync(name)
        return
    print(f"torch {torch.__version__}, {options.device}, {options.repeats} rounds, medians")
    head = f"{'model':10} {'plain ms':>9} {'copy':>6} {'stats':>6} {'copy+ops':>9} {'stats+ops':>9}"
    print(head + "  kept (copy+ops vs stats+ops)")
    for name in names:
        r = measure(name, options.repeats, options.device)
        print(
            f"{name:10} {r['plain_ms']:9.2f} {r['copy']:6.2f} {r['stats']:6.2f} "
            f"{r['copy+ops']:9.2f} {r['stats+ops']:9.2f}  "
            f"{r['copy_bytes'] / 1e6:.1f} MB vs {int(r['keys'])} records"
        )


if __name__ == "__main__":
    main()
