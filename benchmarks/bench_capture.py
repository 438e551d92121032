"""What module-output capture costs: ``capture(model)`` (ops=False) against a plain forward.

Run: ``python benchmarks/bench_capture.py`` (``--repeats N``, ``--models encoder,gpt2``,
``--profile`` for a cProfile summary of the capture).

All variants run under ``no_grad`` in eval mode, one thread, interleaved (one call of each per
round), reduced to the median of per-round ratios to the plain forward of the same round.

Columns:
  plain      the forward alone, in ms
  capture    ``with capture(model): model(x)``: every module output, nothing else
  hooks      the forward with a plain process-wide forward hook that clones each output of
             the model's modules (tensors in containers and in objects such as a KV cache)
  floor      the forward with hooks that only keep references, plus, timed on its own,
             cloning those same tensors into fresh memory: the least a copying recorder does
  /floor     capture / floor: the recorder's own overhead (goal: <= 1.05 encoder, <= 1.2 GPT-2)

The encoder runs as users run it: eval + no_grad takes PyTorch's fused fast path, so each
``TransformerEncoderLayer`` is one kernel whose submodules never run (capture warns; the
warning is silenced here). ``encoder-slow`` is the same model with
``torch.backends.mha.set_fastpath_enabled(False)``, where every submodule runs.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import io
import pstats
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from _models import gpt2_tiny
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import tensorsnap

# -- the models -------------------------------------------------------------------------------


def _encoder() -> tuple[nn.Module, tuple[Any, ...]]:
    layer = nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True)
    model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    return model, (torch.randn(8, 128, 256),)


MODELS: dict[str, tuple[Callable[[], tuple[nn.Module, tuple[Any, ...]]], bool]] = {
    # name: (builder, fast path enabled)
    "encoder": (_encoder, True),
    "encoder-slow": (_encoder, False),
    "gpt2": (gpt2_tiny, True),
}


# -- references -------------------------------------------------------------------------------


def _tensors(value: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Tensors in containers, dataclasses and plain objects (a KV cache), each object once."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        yield value
        return
    if value is None or isinstance(value, (bool, int, float, str, nn.Module)) or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, (tuple, list)):
        items: Any = value
    elif isinstance(value, Mapping):
        items = value.values()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
    else:
        items = getattr(value, "__dict__", {}).values()
    for item in items:
        yield from _tensors(item, seen)


@contextlib.contextmanager
def _hooks(model: nn.Module, on_output: Callable[[Any], None]) -> Iterator[None]:
    # one process-wide hook, as capture uses: hooks on the modules themselves would switch off
    # TransformerEncoderLayer's fast path ("forward pre-/hooks are attached to the module")
    ours = {id(m) for m in model.modules()}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in ours:
            on_output(output)

    handle = register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _variants(model: nn.Module, args: tuple[Any, ...]) -> dict[str, Callable[[], Any]]:
    def plain() -> Any:
        return model(*args)

    def capture() -> Any:
        with tensorsnap.capture(model) as snap:
            model(*args)
        return snap

    def hooks() -> Any:
        kept: list[torch.Tensor] = []
        with _hooks(model, lambda o: kept.extend(t.detach().clone() for t in _tensors(o))):
            model(*args)
        return kept

    def references() -> list[torch.Tensor]:
        kept: list[torch.Tensor] = []
        with _hooks(model, lambda o: kept.extend(_tensors(o))):
            model(*args)
        return kept

    held = references()

    def clones() -> Any:
        return [t.detach().clone() for t in held]

    return {
        "plain": plain,
        "capture": capture,
        "hooks": hooks,
        "refs": references,
        "clones": clones,
    }


def _time(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        result = fn()
        del result
    return (time.perf_counter() - start) / number


def measure(name: str, repeats: int, profile: bool) -> dict[str, float]:
    builder, fastpath = MODELS[name]
    torch.manual_seed(0)
    model, args = builder()
    model.eval()
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", tensorsnap.TensorSnapWarning)
            variants = _variants(model, args)
            for fn in variants.values():  # warm up
                for _ in range(3):
                    fn()
            # calls per timing so that one timing takes ~20 ms
            number = max(1, int(0.02 / max(_time(variants["plain"], 3), 1e-6)))
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(repeats):
                for key, fn in variants.items():
                    gc.collect()
                    times[key].append(_time(fn, number))
            with tensorsnap.capture(model) as snap:
                model(*args)
            keys, nbytes = len(snap), snap.nbytes
            if profile:
                _profile(variants["capture"], number * 5)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    rounds = range(repeats)
    ratio = {
        k: statistics.median(times[k][i] / times["plain"][i] for i in rounds)
        for k in ("capture", "hooks")
    }
    floor = [times["refs"][i] + times["clones"][i] for i in rounds]
    return {
        "plain_ms": statistics.median(times["plain"]) * 1e3,
        "capture": ratio["capture"],
        "hooks": ratio["hooks"],
        "floor": statistics.median(floor[i] / times["plain"][i] for i in rounds),
        "over_floor": statistics.median(times["capture"][i] / floor[i] for i in rounds),
        "over_hooks": statistics.median(times["capture"][i] / times["hooks"][i] for i in rounds),
        "keys": keys,
        "mb": nbytes / 1e6,
    }


def _profile(fn: Callable[[], Any], number: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(number):
        fn()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--profile", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    header = (
        f"{'model':<13} {'keys':>5} {'MB':>6} {'plain ms':>9} {'capture':>8} {'hooks':>7} "
        f"{'floor':>7} {'/floor':>7} {'/hooks':>7}"
    )
    print(f"torch {torch.__version__}, 1 thread, {options.repeats} interleaved rounds, medians")
    print(header)
    print("-" * len(header))
    for name in options.models.split(","):
        r = measure(name, options.repeats, options.profile)
        print(
            f"{name:<13} {r['keys']:>5} {r['mb']:>6.2f} {r['plain_ms']:>9.2f} "
            f"{r['capture']:>8.3f} {r['hooks']:>7.3f} {r['floor']:>7.3f} "
            f"{r['over_floor']:>7.3f} {r['over_hooks']:>7.3f}"
        )


if __name__ == "__main__":
    main()
