"""How fast is ``tensorsnap.snapshot``? Ratios against baselines measured in the same run.

Run ``python benchmarks/bench_snapshot.py`` (``--quick`` for a smoke run with small sizes).

Cases (SPEC section 1, "Fast"):

* one 256 MB float32 tensor, against ``torch.empty_like(t).copy_(t)``: a copy into fresh
  memory, which is what any independent copy must do (goal: within 1.1x);
* a dict of 10,000 tensors of 16 floats, against ``copy.deepcopy`` (goal: at most 0.3x);
* an ``nn.Module`` of 1,500 small Linear layers, against ``copy.deepcopy(module)``;
* a GPT-2 output (tiny config, ``use_cache=True``, hidden states and attentions, under
  ``no_grad`` so that deepcopy works), against the recursive ``detach().clone()`` copier people
  write by hand (which loses types) and against ``copy.deepcopy``.

One thread (``torch.set_num_threads(1)``, change it with ``--threads``): the copies compared
run the same kernels, so extra threads would only add scheduling noise on a shared machine.
The candidates of a case run interleaved, in alternating order, and the table reports medians.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from _models import gpt2

import tensorsnap


def seed_copy(obj: Any) -> Any:
    """The hand-written copier tensorsnap replaces: detach+clone, containers rebuilt as plain."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {key: seed_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [seed_copy(item) for item in obj]
    return copy.deepcopy(obj)


def median_times(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each candidate; runs interleaved, order alternating."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for name in names:  # warm up: first-call costs, allocator pools
        candidates[name]()
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            gc.collect()
            start = time.perf_counter()
            result = candidates[name]()
            times[name].append(time.perf_counter() - start)
            del result
    return {name: statistics.median(values) for name, values in times.items()}


def large_tensor_case(quick: bool, repeats: int) -> list[tuple[str, str, float, float, str]]:
    numel = (16 if quick else 256) * 2**20 // 4
    source = torch.randn(numel)
    medians = median_times(
        {
            "snapshot": lambda: tensorsnap.snapshot(source),
            "empty_like+copy_": lambda: torch.empty_like(source).copy_(source),
        },
        repeats,
    )
    size = f"{numel * 4 / 2**20:.0f} MiB fp32 tensor"
    return [(size, "empty_like+copy_", medians["snapshot"], medians["empty_like+copy_"], "<= 1.1")]


def small_tensors_case(quick: bool, repeats: int) -> list[tuple[str, str, float, float, str]]:
    count = 1_000 if quick else 10_000
    source = {f"t{i}": torch.randn(16) for i in range(count)}
    medians = median_times(
        {
            "snapshot": lambda: tensorsnap.snapshot(source),
            "deepcopy": lambda: copy.deepcopy(source),
        },
        repeats,
    )
    what = f"dict of {count:,} x 16 fp32"
    return [(what, "copy.deepcopy", medians["snapshot"], medians["deepcopy"], "<= 0.3")]


def module_case(quick: bool, repeats: int) -> list[tuple[str, str, float, float, str]]:
    from torch import nn

    layers = 150 if quick else 1_500
    module = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
    medians = median_times(
        {
            "snapshot": lambda: tensorsnap.snapshot(module),
            "deepcopy": lambda: copy.deepcopy(module),
        },
        max(3, repeats // 2),
    )
    what = f"nn.Sequential of {layers:,} Linear"
    return [(what, "copy.deepcopy", medians["snapshot"], medians["deepcopy"], "-")]


def gpt2_case(repeats: int) -> list[tuple[str, str, float, float, str]]:
    torch.manual_seed(0)
    model = gpt2(n_layer=4, n_embd=64, n_positions=128).eval()
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        out = model(ids, use_cache=True, output_hidden_states=True, output_attentions=True)
    medians = median_times(
        {
            "snapshot": lambda: tensorsnap.snapshot(out),
            "seed": lambda: seed_copy(out),
            "deepcopy": lambda: copy.deepcopy(out),
        },
        repeats,
    )
    what = "GPT-2 output (4 layers, cache)"
    return [
        (what, "detach+clone copier", medians["snapshot"], medians["seed"], "-"),
        (what, "copy.deepcopy", medians["snapshot"], medians["deepcopy"], "-"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per candidate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 11)

    rows = large_tensor_case(args.quick, repeats)
    rows += small_tensors_case(args.quick, repeats)
    rows += module_case(args.quick, repeats)
    rows += gpt2_case(repeats)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {repeats} repeats")
    header = ("case", "baseline", "snapshot", "baseline", "ratio", "goal")
    print(
        f"{header[0]:32} {header[1]:20} {header[2]:>10} {header[3]:>10} {header[4]:>6} {header[5]}"
    )
    for what, baseline, ours, theirs, goal in rows:
        print(
            f"{what:32} {baseline:20} {ours * 1e3:8.2f}ms {theirs * 1e3:8.2f}ms "
            f"{ours / theirs:6.2f} {goal}"
        )


if __name__ == "__main__":
    main()
