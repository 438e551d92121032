"""What op-level capture costs: ``capture(model, ops=True)`` against a plain forward.

Run: ``python benchmarks/bench_ops.py`` (``--repeats N``, ``--models mlp,gpt2``,
``--profile`` for a cProfile summary of the capture, ``--torchlens`` to time
``torchlens.trace`` on the same models in a separate process, when torchlens is installed).

Every figure is a ratio to the plain forward under ``no_grad`` measured in the same run,
interleaved (one call of each variant per round) and reduced to the median. One thread.

Columns:
  capture   ``with capture(model, ops=True): model(x)``, everything selected
  floor     the plain forward plus cloning, into fresh memory, as many bytes in as many
            storages as that capture copies (the least any copying recorder must do)
  /floor    capture / floor: the recorder's own overhead
  +nonfin   ``nonfinite="raise"`` on top of the capture, as a ratio to the capture
  lazy      ``capture(model, ops=True, lazy=True)``: references kept, copies only before a
            tracked write or at the end for values others can still reach (and its /floor)
  skeleton  the interception alone: the plain forward under a function mode that only calls
            through, with process-wide module pre- and post-hooks that only push and pop
  naive     the least a Python-level recorder does, as a ratio to the floor: the skeleton,
            plus a clone of every op result and module output stored under an f-string key
            (no records, selection, threads, wrappers, tuples or checks)

  compiled  ``torch.compile(model, backend="eager")``: dynamo's graph run as eager code, no
            capture (what graph mode starts from)
  graph     ``capture(model, ops=True, graph=True)`` once its graph is compiled and checked
            (and its /floor); a model whose calls graph mode runs eagerly says so below the
            table, with the reason

After the table, ``--graph-costs`` prints graph mode's one-time cost (the first block checks
the graph's keys against an eager run, the second compiles it; both against a plain call)
and ``extract`` throughput over 16 batches with and without ``graph=True``, against a plain
``no_grad`` loop over the same batches.

The skeleton and naive columns are not tensorsnap: they show how much of the floor-relative
cost is the interception itself, which any recorder built on a function mode and module hooks
pays.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _models import gpt2_tiny
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode

import tensorsnap
from tensorsnap import _tree

# -- the models -------------------------------------------------------------------------------


def _mlp() -> tuple[nn.Module, tuple[Any, ...]]:
    layers: list[nn.Module] = [nn.Linear(256, 512), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    layers.append(nn.Linear(512, 10))
    return nn.Sequential(*layers), (torch.randn(32, 256),)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class _ResNet18(nn.Module):
    """torchvision's resnet18, written out (torchvision does not import everywhere)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        blocks = [
            nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1))
            for cin, cout, stride in widths
        ]
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet18() -> tuple[nn.Module, tuple[Any, ...]]:
    try:
        import torchvision

        model: nn.Module = torchvision.models.resnet18()
    except Exception:  # torchvision missing or broken: the same network, hand-built
        model = _ResNet18()
    return model, (torch.randn(1, 3, 224, 224),)


def _encoder() -> tuple[nn.Module, tuple[Any, ...]]:
    layer = nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True)
    model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    return model, (torch.randn(8, 128, 256),)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]] = {
    "mlp": _mlp,
    "resnet18": _resnet18,
    "gpt2-tiny": gpt2_tiny,
    "encoder": _encoder,
}


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    torch.manual_seed(0)
    model, args = MODELS[name]()
    return model.eval(), args


# -- references: the interception alone, and a naive recorder ---------------------------------


class _Through(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **kwargs) if kwargs else func(*args)


class _Naive(TorchFunctionMode):
    """Clones each op's tensor result into ``store`` under ``module/op#count``."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.stack: list[tuple[str, dict[str, int]]] = []
        self.store: dict[str, Any] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **kwargs) if kwargs else func(*args)
        if type(result) is torch.Tensor and self.stack:
            name, counts = self.stack[-1]
            op = func.__name__
            count = counts.get(op, 0)
            counts[op] = count + 1
            self.store[f"{name}/{op}#{count}"] = result.clone()
        return result

    def pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append((self.names.get(id(module), "?"), {}))

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        name, _ = self.stack.pop()
        with torch._C.DisableTorchFunction():
            if type(output) is torch.Tensor:
                self.store[name] = output.clone()
            else:
                self.store[name] = tensorsnap.snapshot(output)


def _hooked(pre: Callable[..., Any], post: Callable[..., Any], run: Callable[[], Any]) -> Any:
    handles = [
        module_hooks.register_module_forward_pre_hook(pre),
        module_hooks.register_module_forward_hook(post),
    ]
    try:
        return run()
    finally:
        for handle in handles:
            handle.remove()


# -- timing -----------------------------------------------------------------------------------


def _floor_sources(model: nn.Module, args: tuple[Any, ...]) -> tuple[list[torch.Tensor], int]:
    """One uint8 tensor per distinct storage that a full op capture copies, and its key count."""
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as snap:
        model(*args)
    sizes: dict[int, int] = {}
    for key in snap:
        for t in _tree.tensors(snap[key]):
            storage = t.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
    return [torch.ones(n, dtype=torch.uint8) for n in sizes.values()], len(snap)


def _variants(model: nn.Module, args: tuple[Any, ...]) -> dict[str, Callable[[], Any]]:
    sources, _ = _floor_sources(model, args)

    def plain() -> Any:
        return model(*args)

    def floor() -> Any:
        out = model(*args)
        return out, [s.clone() for s in sources]

    def capture() -> Any:
        with tensorsnap.capture(model, ops=True) as snap:
            model(*args)
        return snap

    def nonfinite() -> Any:
        with tensorsnap.capture(model, ops=True, nonfinite="raise") as snap:
            model(*args)
        return snap

    compiled_model = torch.compile(model, backend="eager")

    def compiled() -> Any:
        return compiled_model(*args)

    def graph() -> Any:
        with tensorsnap.capture(model, ops=True, graph=True) as snap:
            model(*args)
        return snap

    def lazy() -> Any:
        with tensorsnap.capture(model, ops=True, lazy=True) as snap:
            model(*args)
        return snap

    stack: list[nn.Module] = []

    def push(module: nn.Module, args: Any) -> None:
        stack.append(module)

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    def skeleton() -> Any:
        with _Through():
            return _hooked(push, pop, lambda: model(*args))

    names = {id(m): n for n, m in model.named_modules()}

    def naive() -> Any:
        with _Naive(names) as mode:
            _hooked(mode.pre, mode.post, lambda: model(*args))
        return mode.store

    return {
        "plain": plain,
        "floor": floor,
        "capture": capture,
        "nonfinite": nonfinite,
        "lazy": lazy,
        "skeleton": skeleton,
        "naive": naive,
        "compiled": compiled,
        "graph": graph,
    }


def _inner_count(fn: Callable[[], Any], target_s: float = 0.02) -> int:
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(200, int(target_s / max(once, 1e-6))))


def measure(name: str, repeats: int) -> dict[str, float]:
    model, args = build(name)
    with torch.no_grad():
        variants = _variants(model, args)
        for fn in variants.values():  # warm up
            fn()
            fn()
        inner = _inner_count(variants["plain"])
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(repeats):
            for label, fn in variants.items():
                gc.collect()
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[label].append((time.perf_counter() - start) / inner)
    med = {label: statistics.median(ts) for label, ts in times.items()}
    return {
        "plain_ms": med["plain"] * 1e3,
        "capture": med["capture"] / med["plain"],
        "floor": med["floor"] / med["plain"],
        "vs_floor": med["capture"] / med["floor"],
        "nonfinite": med["nonfinite"] / med["capture"],
        "lazy": med["lazy"] / med["plain"],
        "lazy_floor": med["lazy"] / med["floor"],
        "skeleton": med["skeleton"] / med["plain"],
        "naive_floor": med["naive"] / med["floor"],
        "compiled": med["compiled"] / med["plain"],
        "graph": med["graph"] / med["plain"],
        "graph_floor": med["graph"] / med["floor"],
        "keys": float(_floor_sources(model, args)[1]),
    }


def graph_fallback(name: str) -> str | None:
    """Why graph mode runs this model's calls eagerly (None: it runs the graph)."""
    from tensorsnap._graph import _compiled

    model, args = build(name)
    with torch.no_grad():
        for _ in range(2):
            with tensorsnap.capture(model, ops=True, graph=True):
                model(*args)
    compiled = _compiled.get(model)
    return None if compiled is None else compiled.eager


def graph_costs(name: str) -> dict[str, float]:
    """Seconds of the first two graph-mode blocks of a fresh model, and a plain call's."""
    model, args = build(name)
    with torch.no_grad():
        model(*args)
        start = time.perf_counter()
        model(*args)
        plain = time.perf_counter() - start
        blocks = []
        for _ in range(2):
            start = time.perf_counter()
            with tensorsnap.capture(model, ops=True, graph=True):
                model(*args)
            blocks.append(time.perf_counter() - start)
    return {"plain_s": plain, "check_s": blocks[0], "compile_s": blocks[1]}


def extract_rates(name: str, batches: int = 16, repeats: int = 3) -> dict[str, float]:
    """Batches per second of extract(ops=True) with and without graph=True, and of a plain
    no_grad loop over the same batches (medians of interleaved runs, each on a fresh out)."""
    import tempfile

    model, args = build(name)
    data = [args for _ in range(batches)]
    times: dict[str, list[float]] = {"plain": [], "eager": [], "graph": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(repeats + 1):  # the first round warms up (and compiles the graph)
            for label in times:
                start = time.perf_counter()
                if label == "plain":
                    with torch.no_grad():
                        for batch in data:
                            model(*batch)
                else:
                    out = os.path.join(tmp, f"{label}-{run}")
                    tensorsnap.extract(
                        model, data, out=out, ops=True, graph=label == "graph", progress=False
                    )
                if run:
                    times[label].append(time.perf_counter() - start)
    med = {label: statistics.median(ts) for label, ts in times.items()}
    return {label: batches / t for label, t in med.items()}


def profile(name: str, lines: int = 14) -> str:
    model, args = build(name)
    with torch.no_grad():
        for _ in range(3):
            with tensorsnap.capture(model, ops=True):
                model(*args)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            with tensorsnap.capture(model, ops=True):
                model(*args)
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


# -- torchlens, in its own process (it wraps torch functions for the rest of the process) -----


def _torchlens_child(name: str, repeats: int) -> None:
    import torchlens as tl

    model, args = build(name)
    with torch.no_grad():
        plain = lambda: model(*args)  # noqa: E731
        traced = lambda: tl.trace(model, args[0])  # noqa: E731
        traced()
        plain()
        times: dict[str, list[float]] = {"plain": [], "trace": []}
        for _ in range(repeats):
            for label, fn in (("plain", plain), ("trace", traced)):
                gc.collect()
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
    ratio = statistics.median(times["trace"]) / statistics.median(times["plain"])
    print(json.dumps({"model": name, "torchlens": ratio}))


def torchlens_ratio(name: str, repeats: int) -> float | None:
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--torchlens-child", name, "--repeats", str(repeats)],
            capture_output=True,
            text=True,
            timeout=900,
            env=os.environ.copy(),
        )
    except subprocess.TimeoutExpired:
        return None
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            return float(json.loads(line)["torchlens"])
    sys.stderr.write(f"torchlens on {name} failed:\n{done.stderr[-2000:]}\n")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--torchlens", action="store_true")
    parser.add_argument("--torchlens-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--graph-costs", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    if options.torchlens_child:
        _torchlens_child(options.torchlens_child, options.repeats)
        return

    goals = {"mlp": 1.5, "resnet18": 1.1, "gpt2-tiny": 1.5, "encoder": 1.1}
    header = f"{'model':<10} {'plain ms':>9} {'keys':>5} {'capture':>8} {'floor':>6} "
    header += f"{'/floor':>7} {'goal':>5} {'+nonfin':>8} {'lazy':>6} {'/floor':>7}"
    header += f" {'skeleton':>9} {'naive':>6} {'compiled':>9} {'graph':>6} {'/floor':>7}"
    if options.torchlens:
        header += f" {'torchlens':>10}"
    print(f"torch {torch.__version__}, 1 thread, {options.repeats} interleaved repeats, medians")
    print(header)
    for name in options.models.split(","):
        r = measure(name, options.repeats)
        row = (
            f"{name:<10} {r['plain_ms']:>9.2f} {int(r['keys']):>5} {r['capture']:>7.2f}x "
            f"{r['floor']:>5.2f}x {r['vs_floor']:>6.2f}x {goals[name]:>4.1f}x "
            f"{r['nonfinite']:>7.2f}x {r['lazy']:>5.2f}x {r['lazy_floor']:>6.2f}x"
            f" {r['skeleton']:>8.2f}x {r['naive_floor']:>5.2f}x"
            f" {r['compiled']:>8.2f}x {r['graph']:>5.2f}x {r['graph_floor']:>6.2f}x"
        )
        if options.torchlens:
            tl = torchlens_ratio(name, max(3, options.repeats // 3))
            row += f" {tl:>9.1f}x" if tl is not None else f" {'-':>10}"
        print(row, flush=True)
    for name in options.models.split(","):
        reason = graph_fallback(name)
        if reason is not None:
            print(f"graph mode runs {name} eagerly: {reason}")
    if options.graph_costs:
        print("\ngraph mode's one-time cost (s) and extract throughput (batches/s, 16 batches)")
        for name in options.models.split(","):
            c = graph_costs(name)
            e = extract_rates(name)
            print(
                f"{name:<10} plain call {c['plain_s']:.3f}  first block (check) "
                f"{c['check_s']:.2f}  second (compile) {c['compile_s']:.2f}  |  extract "
                f"plain loop {e['plain']:.1f}/s, eager capture {e['eager']:.1f}/s "
                f"({e['eager'] / e['plain']:.2f}x), graph {e['graph']:.1f}/s "
                f"({e['graph'] / e['plain']:.2f}x)",
                flush=True,
            )
    if options.profile:
        for name in options.models.split(","):
            print(f"\n== cProfile: capture(ops=True) on {name}, 20 calls, by own time ==")
            print(profile(name))


if __name__ == "__main__":
    main()
