"""tensorsnap.extract against a plain ``no_grad`` loop and against the disk's raw write speed.

    python benchmarks/bench_extract.py [--repeat 3] [--dir /path/on/local/disk]
        [--sections tokens,disk,staging,background,read,whole,rss] [--quick]

Every figure is a ratio against a baseline measured in the same run (medians of interleaved
repeats), plus the bytes written per second:

1. ``tokens``: ``extract(per_token=True)`` of a GPT-2-sized model (12 layers, d=768, 12 heads,
   vocabulary 50257) over padded batches, the residual stream (the 12 block outputs) in fp32 and
   bf16, against the same batches through ``with torch.no_grad(): model(**batch)``. Goal
   <= 1.1x where the disk keeps up.
2. ``disk``: a per-token extract whose bytes outrun the disk (the same model's embedding stage
   alone: almost no compute per byte), against the raw sequential write bandwidth of the same
   directory: a dd-style loop written here (one reused buffer, ``os.write`` of 8 MiB chunks,
   one ``fsync`` at the end, as ``dd bs=8M conv=fsync``) writing the same number of bytes.
   Goal >= 0.9x. Beside it, stricter baselines (the same loop asking the kernel to start
   writing back each chunk, ``sync_file_range``, and also fdatasyncing from a thread while it
   writes, as the extract does) and the extract without its flusher thread and without
   writeback (what each buys).
3. ``staging``: the ``disk`` workload with the row copier's staging buffers reused across
   batches (the default) and allocated fresh per batch, interleaved: what the reuse buys, with
   the page faults of each run (fresh pages the kernel had to supply).
   ``background``: the same with each batch written by a writer thread while the next one runs,
   and written in the loop (the default decides by the cores present).
4. ``read``: random-access batches from the rows of ``tensorsnap.load(out)[key]`` (the sparse
   autoencoder pattern ``acts[torch.randint(n, (4096,))]``) right after opening (pages come
   from the page cache) and once mapped, against the same gathers from a copy in memory.
5. ``whole``/``rss``: whole-value extract of a 4-layer MLP against a plain loop, and the peak
   RSS of extractions over two dataset sizes 10x apart (it should stay flat).
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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

import tensorsnap
from tensorsnap import _rows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import gpt2

_CHUNK = 8 * 2**20


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def raw_write(path: str, nbytes: int, writeback: bool = False, flush: bool = False) -> float:
    """Seconds to write ``nbytes`` sequentially to a new file and fsync it (dd-style); with
    ``writeback``, the kernel is asked to start writing each chunk as soon as it is written;
    with ``flush``, a thread fdatasyncs the file every ``_stream._FLUSH_BYTES`` while the
    writes go on, one at a time, as the extract's flusher does."""
    from tensorsnap import _stream

    chunk = memoryview(os.urandom(_CHUNK))  # one buffer, written again and again
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    flusher = ThreadPoolExecutor(1) if flush else None
    flushing: Future[None] | None = None
    try:
        start = time.perf_counter()
        left = nbytes
        unflushed = 0
        while left > 0:
            done = os.write(fd, chunk[: min(_CHUNK, left)])
            if writeback:
                _stream._writeback(fd, nbytes - left, done)
            left -= done
            unflushed += done
            due = flusher is not None and unflushed >= _stream._FLUSH_BYTES
            if due and (flushing is None or flushing.done()):
                assert flusher is not None
                flushing = flusher.submit(_stream._flush, [fd])
                unflushed = 0
        if flushing is not None:
            flushing.result()
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        if flusher is not None:
            flusher.shutdown(wait=True)
        os.close(fd)
        os.unlink(path)


def gpt2_sized(n_layer: int = 12) -> nn.Module:
    """GPT-2 small's shape (random weights, nothing downloaded), without the LM head."""
    torch.manual_seed(0)
    model = gpt2(
        n_layer=n_layer,
        n_embd=768,
        n_head=12,
        vocab_size=50257,
        n_positions=1024,
        attn_implementation="sdpa",
    )
    return model.transformer.eval()  # type: ignore[no-any-return]


def padded(count: int, batch: int, seq: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches whose sequences fill half to all of ``seq`` (~75% real tokens)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 50257, (batch, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (batch, 1), generator=g)
        batches.append({"input_ids": ids, "attention_mask": (torch.arange(seq) < lengths).long()})
    return batches


def plain(model: nn.Module, batches: list[Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    return time.perf_counter() - start


def timed_extract(
    model: nn.Module, batches: list[Any], out: str, **options: Any
) -> tuple[float, int]:
    start = time.perf_counter()
    tensorsnap.extract(model, batches, out=out, progress=False, per_token=True, **options)
    seconds = time.perf_counter() - start
    written = folder_bytes(out)
    shutil.rmtree(out)
    return seconds, written


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved(repeat: int, *runs: Callable[[], float]) -> list[list[float]]:
    """Each run ``repeat`` times, one after the other in turn (drift hits every run alike)."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for i, run in enumerate(runs):
            times[i].append(run())
    return times


# -- 1. per-token extract of a GPT-2-sized model vs the plain loop ----------------------------


def bench_tokens(work: str, repeat: int, quick: bool) -> None:
    model = gpt2_sized(2 if quick else 12)
    layers = len(model.h)
    batches = padded(3 if quick else 4, 4, 128)
    kept = sum(int(b["attention_mask"].sum()) for b in batches)
    plain(model, batches[:1])  # warm up
    print(
        f"\n1. per-token extract, GPT-2-sized ({layers} layers, d=768), {len(batches)} batches of"
        f" (4, 128), {kept} real tokens; residual stream (the {layers} block outputs); {work}"
    )
    print(f"{'dtype':<9} {'plain s':>8} {'extract s':>10} {'ratio':>6} {'MB':>7} {'MB/s':>7}")
    include = [f"h.{i}" for i in range(layers)]
    for dtype in (None, torch.bfloat16):
        written = [0]

        def run_extract(dtype: Any = dtype, written: list[int] = written) -> float:
            seconds, written[0] = timed_extract(
                model, batches, os.path.join(work, "tokens"), include=include, dtype=dtype
            )
            return seconds

        base, ext = interleaved(repeat, lambda: plain(model, batches), run_extract)
        b, e = median(base), median(ext)
        name = "fp32" if dtype is None else "bf16"
        print(
            f"{name:<9} {b:8.3f} {e:10.3f} {e / b:6.3f} {written[0] / 1e6:7.1f} "
            f"{written[0] / 1e6 / e:7.1f}"
        )


# -- 2. a per-token extract that outruns the disk vs the raw write bandwidth ------------------


def disk_workload(quick: bool) -> tuple[nn.Module, list[Any], dict[str, Any]]:
    """The GPT-2-sized model's embedding stage alone (no blocks): token and position
    embeddings, dropout and the final LayerNorm, ~9 KB per token for almost no compute, so that
    the bytes, not the model, set the pace."""
    model = gpt2_sized(0)
    batches = padded(4 if quick else 8, 32, 256, seed=2)
    return model, batches, {"exclude": ["wpe", ""]}


def bench_disk(work: str, repeat: int, quick: bool) -> None:
    from tensorsnap import _stream

    model, batches, options = disk_workload(quick)
    timed_extract(model, batches[:1], os.path.join(work, "warm"), **options)
    load = os.getloadavg()[0]
    print(
        f"\n2. per-token extract that outruns the disk: the GPT-2-sized embedding stage (wte, "
        f"drop, ln_f), {len(batches)} batches of (32, 256); vs a dd-style write of the same "
        f"bytes; {work}"
    )
    written = [0]

    def run_extract(writeback: bool = True, flush: bool = True) -> float:
        real = _stream._SYNC_FILE_RANGE
        if not writeback:
            _stream._SYNC_FILE_RANGE = None
        _stream.FLUSH = flush
        try:
            out = os.path.join(work, "disk")
            seconds, written[0] = timed_extract(model, batches, out, **options)
        finally:
            _stream._SYNC_FILE_RANGE = real
            _stream.FLUSH = None
        return seconds

    run_extract()  # learn the byte count for the raw baseline
    raw_path = os.path.join(work, "raw.bin")
    runs: dict[str, Callable[[], float]] = {
        "plain no_grad loop (no writes)": lambda: plain(model, batches),
        "raw: dd-style write (the baseline)": lambda: raw_write(raw_path, written[0]),
        "raw + writeback per chunk": lambda: raw_write(raw_path, written[0], writeback=True),
        "raw + writeback + flusher": lambda: raw_write(
            raw_path, written[0], writeback=True, flush=True
        ),
        "extract (default)": run_extract,
        "extract without the flusher": lambda: run_extract(flush=False),
        "extract without writeback": lambda: run_extract(writeback=False),
    }
    times = dict(zip(runs, interleaved(repeat, *runs.values())))
    raw = median(times["raw: dd-style write (the baseline)"])
    gb = written[0] / 1e9
    print(f"{'':<36} {'median s':>9} {'vs raw':>7} {'MB/s':>6}  each repeat vs the median raw")
    for label, values in times.items():
        m = median(values)
        if label.startswith("plain"):
            print(f"{label:<36} {m:9.3f}")
            continue
        spread = ", ".join(f"{raw / x:.2f}" for x in values)
        print(f"{label:<36} {m:9.3f} {raw / m:7.3f} {gb * 1e3 / m:6.0f}  {spread}")
    print(
        f"   ({gb:.2f} GB; 'vs raw' is MB/s over the dd-style write's (goal >= 0.9x for the "
        f"extract); load average {load:.2f} before, {os.getloadavg()[0]:.2f} after; "
        "'writeback': sync_file_range per chunk; 'flusher': fdatasync from a thread every "
        f"{_stream._FLUSH_BYTES >> 20} MiB, one at a time, as the extract does)"
    )


# -- 3. staging buffers reused vs fresh -----------------------------------------------------


def bench_staging(work: str, repeat: int, quick: bool) -> None:
    model, batches, options = disk_workload(quick)
    print(
        "\n3. staging buffers reused across batches (default) vs allocated per batch, the "
        "workload of 2"
    )
    print(
        f"{'dtype':<9} {'reused s':>9} {'fresh s':>8} {'fresh/reused':>13} "
        f"{'faults reused':>14} {'faults fresh':>13}"
    )
    for dtype in (None, torch.bfloat16):
        faults: dict[bool, list[float]] = {True: [], False: []}

        def run(reuse: bool, dtype: Any = dtype, faults: dict[bool, list[float]] = faults) -> float:
            _rows.REUSE_STAGING = reuse
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            try:
                out = os.path.join(work, "staging")
                return timed_extract(model, batches, out, dtype=dtype, **options)[0]
            finally:
                _rows.REUSE_STAGING = True
                faults[reuse].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

        reused, fresh = interleaved(repeat, lambda: run(True), lambda: run(False))
        r, f = median(reused), median(fresh)
        print(
            f"{'fp32' if dtype is None else 'bf16':<9} {r:9.3f} {f:8.3f} {f / r:13.3f} "
            f"{median(faults[True]):14.0f} {median(faults[False]):13.0f}"
        )
    print(
        "   (faults: minor page faults per run, 4 KiB each; a run's fresh staging would add "
        "one per page of rows, the model's own temporaries fault as glibc's dynamic mmap and "
        "trim thresholds decide, which is what moves these figures: see docs/performance.md)"
    )
    # the copy alone: rows of a (16, 256, 3072) activation cut by a mask, 20 times
    x = torch.randn(16, 256, 3072)
    mask = (torch.arange(256) < torch.randint(128, 257, (16, 1))).reshape(-1)
    kept = mask.nonzero().reshape(-1)
    buf = torch.empty(len(kept), 3072)

    def cut(into: torch.Tensor | None) -> float:
        start = time.perf_counter()
        for _ in range(20):
            dst = into if into is not None else torch.empty(len(kept), 3072)
            torch.index_select(x.flatten(0, 1), 0, kept, out=dst)
        return time.perf_counter() - start

    warm, cold = interleaved(repeat, lambda: cut(buf), lambda: cut(None))
    gb = 20 * buf.nbytes / 1e9
    print(
        f"   the cut alone ({buf.nbytes / 1e6:.0f} MB of rows): into a reused buffer "
        f"{gb / median(warm):.1f} GB/s, into fresh memory {gb / median(cold):.1f} GB/s"
    )


# -- 3b. the writer thread on and off ---------------------------------------------------------


def bench_background(work: str, repeat: int, quick: bool) -> None:
    from tensorsnap import _stream

    model, batches, options = disk_workload(quick)
    auto = _stream.background_writes()
    print(
        "\n3b. batches written by a writer thread while the next runs vs in the loop, the "
        f"workload of 2 (on by default here: {auto}, with {os.cpu_count()} CPUs)"
    )
    print(f"{'':<9} {'thread s':>9} {'loop s':>8} {'loop/thread':>12}")

    def run(background: bool) -> float:
        _stream.BACKGROUND = background
        try:
            return timed_extract(model, batches, os.path.join(work, "bg"), **options)[0]
        finally:
            _stream.BACKGROUND = None

    thread, loop = interleaved(repeat, lambda: run(True), lambda: run(False))
    t, lo = median(thread), median(loop)
    print(f"{'fp32':<9} {t:9.3f} {lo:8.3f} {lo / t:12.3f}")


# -- 4. reading rows back: random-access batches ------------------------------------------


def bench_read(work: str, repeat: int, quick: bool) -> None:
    model, batches, _ = disk_workload(quick)
    out = os.path.join(work, "read")
    tensorsnap.extract(model, batches, out=out, include="ln_f", per_token=True, progress=False)
    size = folder_bytes(out)
    print(
        f"\n4. random-access batches of 4096 rows from load(out)[key] ({size / 1e6:.0f} MB, "
        "rows of 768 fp32): memory-mapped vs a copy in memory"
    )
    print(f"{'':<34} {'GB/s':>6} {'vs memory':>10}")
    g = torch.Generator().manual_seed(0)
    count = 8 if quick else 25

    def gathers(acts: torch.Tensor) -> float:
        picks = [torch.randint(len(acts), (4096,), generator=g) for _ in range(count)]
        start = time.perf_counter()
        for pick in picks:
            acts[pick]
        return time.perf_counter() - start

    row_bytes = 768 * 4
    gb = count * 4096 * row_bytes / 1e9
    results = {}
    for _ in range(repeat):
        fresh = tensorsnap.load(out, verify=False)["ln_f"]  # a new map each time
        results.setdefault("mapped, first touch", []).append(gathers(fresh))
        for _ in range(2):  # touch every page once, then read again
            fresh.sum()
        results.setdefault("mapped, pages touched", []).append(gathers(fresh))
        copy = fresh.clone()
        results.setdefault("in memory", []).append(gathers(copy))
        del fresh, copy
    memory = gb / median(results["in memory"])
    for label, times in results.items():
        rate = gb / median(times)
        print(f"{label:<34} {rate:6.2f} {rate / memory:10.2f}")
    shutil.rmtree(out)


# -- 5. whole values: a 4-layer MLP, and the peak RSS ------------------------------------------


def mlp_and_batches(count: int, rows: int = 64) -> tuple[nn.Module, list[torch.Tensor]]:
    """A 4-layer MLP (512 -> 2048 -> 512 blocks)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)]
    model = nn.Sequential(*layers).eval()
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randn(rows, 512, generator=gen) for _ in range(count)]


def bench_whole(work: str, repeat: int, quick: bool) -> None:
    count = 40 if quick else 200
    model, batches = mlp_and_batches(count)

    def loop() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                model(batch)
        return time.perf_counter() - start

    loop()
    print(f"\n5. whole values: {count} batches of (64, 512), 4-layer MLP 512-2048-512, {work}")
    print(f"{'selection':<28} {'plain s':>8} {'extract s':>10} {'ratio':>6} {'MB':>7} {'MB/s':>7}")
    selections: list[tuple[str, dict[str, Any]]] = [
        ("block outputs (*.2 etc)", {"include": ["2", "5", "8", "11"]}),
        ("all module outputs", {}),
    ]
    for label, options in selections:
        written = [0]

        def run(options: dict[str, Any] = options, written: list[int] = written) -> float:
            out = os.path.join(work, "whole")
            start = time.perf_counter()
            tensorsnap.extract(model, batches, out=out, progress=False, **options)
            seconds = time.perf_counter() - start
            written[0] = folder_bytes(out)
            shutil.rmtree(out)
            return seconds

        base, ext = interleaved(repeat, loop, run)
        b, e = median(base), median(ext)
        print(
            f"{label:<28} {b:8.3f} {e:10.3f} {e / b:6.2f} {written[0] / 1e6:7.0f} "
            f"{written[0] / 1e6 / e:7.0f}"
        )


_RSS_SCRIPT = """
import sys, torch, tensorsnap
sys.path.insert(0, sys.argv[3])
from bench_extract import mlp_and_batches
count, out = int(sys.argv[1]), sys.argv[2]
model, _ = mlp_and_batches(1)
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


def bench_rss(work: str, repeat: int, quick: bool) -> None:
    count = 40 if quick else 200
    print("\n6. peak RSS of a whole-value extract (own process; max_memory='64MB')")
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
        written = folder_bytes(out)
        print(f"{n:8d} {written / 1e6:11.0f} {base / 1e6:14.0f} {peak / 1e6:8.0f} "
              f"{(peak - base) / 1e6:10.1f}")  # fmt: skip
        shutil.rmtree(out)
        shutil.rmtree(out + "-warm")


SECTIONS: dict[str, Callable[[str, int, bool], None]] = {
    "tokens": bench_tokens,
    "disk": bench_disk,
    "staging": bench_staging,
    "background": bench_background,
    "read": bench_read,
    "whole": bench_whole,
    "rss": bench_rss,
}


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="smaller models and datasets")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    work = tempfile.mkdtemp(prefix="bench-extract-", dir=args.dir)
    try:
        for name in chosen:
            SECTIONS[name](work, args.repeat, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
