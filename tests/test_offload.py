"""Queued device-to-host copies (capture(device="cpu")) and spilling copies kept on a device.

Without a GPU the ring is driven by a backend registered for the CPU whose copies run late: a
copy runs only when its event is waited for, or when a seeded coin says the device got ahead. So
a region reused before its copy finished, a destination read before its copy ran, or a source
read after the model wrote it again all give wrong bytes (or trip the backend's own check),
exactly where the real device would. The same code paths run: the copy engine, the pending store,
the deferred NaN/Inf checks, the spill writer's staging and the read back. The last tests run on
a CUDA device, where there is one.
"""

from __future__ import annotations

import gc
import os
import random
import weakref
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tensorsnap
from tensorsnap import _offload
from tensorsnap._offload import Offload, PendingStore
from tensorsnap._snapshot import Record, Snapshot
from tensorsnap._spill import SpillStore

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Event:
    def __init__(self, run: Any, region: tuple[int, int] | None) -> None:
        self.run = run
        self.region = region
        self.done = False


class LateBackend:
    """A 'device' whose copies run later: when waited for, or when the coin says so."""

    ahead = 0.0  # chance that a query finds the device done (tests set it)
    rng = random.Random(0)
    copies = 0
    instances: list[LateBackend] = []

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.queue: deque[_Event] = deque()
        self.buffer: torch.Tensor | None = None
        LateBackend.instances.append(self)

    @staticmethod
    def available() -> bool:
        return True

    def staging(self, nbytes: int) -> torch.Tensor:
        # garbage, so that a region read before its copy ran shows
        self.buffer = torch.full((nbytes,), 0xA5, dtype=torch.uint8)
        return self.buffer

    @staticmethod
    def mark(device: torch.device) -> Any:
        return _Event(None, None)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> _Event:
        lo = dst.data_ptr()
        hi = lo + dst.nbytes
        for earlier in self.queue:
            if earlier.region is not None and earlier.region[0] < hi and lo < earlier.region[1]:
                raise AssertionError("a pinned region was reused before its copy finished")
        # like the device: the source is read when the copy runs, not when it is queued
        event = _Event(lambda: dst.copy_(src), (lo, hi))
        self.queue.append(event)
        LateBackend.copies += 1
        return event

    def done(self, event: _Event) -> bool:
        if not event.done and self.rng.random() < self.ahead:
            self.wait(event)
        return event.done

    def wait(self, event: _Event) -> None:
        while not event.done:
            oldest = self.queue.popleft()  # a stream runs its copies in order
            oldest.run()
            oldest.done = True


@pytest.fixture
def late(monkeypatch: pytest.MonkeyPatch) -> type[LateBackend]:
    """Copies from the CPU go through the ring, as copies from a GPU do."""
    monkeypatch.setattr(_offload, "BACKENDS", {"cpu": LateBackend})
    LateBackend.ahead = 0.0
    LateBackend.rng = random.Random(0)
    LateBackend.copies = 0
    LateBackend.instances = []
    return LateBackend


def _bits(t: torch.Tensor) -> bytes:
    c = t.detach().contiguous()
    return bytes(c.view(torch.uint8).reshape(-1).tolist()) if c.numel() else b""


# -- the ring ------------------------------------------------------------------------------


@pytest.mark.parametrize("ahead", [0.0, 0.3, 1.0])
def test_the_ring_never_reuses_a_region_before_its_copy_finished(
    late: type[LateBackend], ahead: float
) -> None:
    late.ahead = ahead
    rng = random.Random(1)
    offload = Offload(clone=False, arena=4096, chunk=1024)
    pairs = []
    for _ in range(300):  # ~100 times the arena, in sizes that wrap it at every position
        n = rng.choice([1, 3, 16, 100, 700, 1024, 1500, 2048, 5000])
        src = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32)
        dst = torch.full((n,), -1, dtype=torch.int32)
        offload.copy(dst, src)
        pairs.append((dst, src.clone()))
        assert offload.issued >= offload.completed
    offload.drain()
    assert not offload.busy and offload.completed == offload.issued
    assert all(torch.equal(dst, want) for dst, want in pairs)
    # the arena held 4096 bytes: the host waited only when it was full, never for all of it
    assert offload.issued > 300


def test_the_ring_check_can_fail(late: type[LateBackend], monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring that hands out the same region again at once is caught (the check above is real)."""
    monkeypatch.setattr(_offload._Ring, "place", lambda self, n: 0)
    offload = Offload(clone=False, arena=4096, chunk=1024)
    offload.copy(torch.empty(64, dtype=torch.uint8), torch.ones(64, dtype=torch.uint8))
    with pytest.raises(AssertionError, match="reused before its copy finished"):
        offload.copy(torch.empty(64, dtype=torch.uint8), torch.ones(64, dtype=torch.uint8))


def test_a_destination_is_written_only_once_its_copy_ran(late: type[LateBackend]) -> None:
    offload = Offload(clone=False, arena=1024, chunk=256)
    src = torch.arange(100, dtype=torch.float32)
    dst = torch.zeros(100)
    offload.copy(dst, src)
    assert offload.busy and torch.equal(dst, torch.zeros(100))  # nothing has run yet
    offload.wait_for(offload.issued)
    assert torch.equal(dst, src) and not offload.busy


def test_clone_takes_the_value_when_queued_and_holds_no_source_after(
    late: type[LateBackend],
) -> None:
    offload = Offload(clone=True, arena=1024, chunk=256)
    src = torch.arange(64, dtype=torch.float32)
    dst = torch.zeros(64)
    offload.copy(dst, src)
    src.mul_(-1)  # the model writes it in place before the device ran the copy
    (entry,) = offload._entries
    held = weakref.ref(entry.source)
    offload.drain()
    assert torch.equal(dst, torch.arange(64, dtype=torch.float32))
    gc.collect()
    assert held() is None  # the clone is let go once its copy finished


def test_copies_must_be_contiguous_and_of_one_size(late: type[LateBackend]) -> None:
    offload = Offload(clone=False)
    with pytest.raises(ValueError, match="contiguous tensors of the same size"):
        offload.copy(torch.empty(4), torch.ones(4, 2).t())
    with pytest.raises(ValueError, match="contiguous tensors of the same size"):
        offload.copy(torch.empty(4), torch.ones(5))


def test_the_pending_store_passes_values_on_in_order_once_their_copies_ran(
    late: type[LateBackend],
) -> None:
    class Log:
        def __init__(self) -> None:
            self.puts: list[tuple[str, Any]] = []

        def put(self, key: str, value: Any, nbytes: int) -> None:
            self.puts.append((key, value if value is None else value.clone()))

        def get(self, key: str) -> Any:
            return [v for k, v in self.puts if k == key][-1]

        def close(self) -> None:
            pass

    offload = Offload(clone=True, arena=1024, chunk=256)
    log = Log()
    store = PendingStore(log, offload)
    values: dict[str, list[float]] = {}
    for i, key in enumerate(["a", "b", "a", "c"]):  # 'a' twice: the later one wins
        src = torch.full((50,), float(i))
        dst = torch.empty(50)
        offload.copy(dst, src)
        store.put(key, dst, dst.nbytes)
        values.setdefault(key, []).append(float(i))
    store.put("d", None, 0)  # no copies of its own, but it comes after the others
    assert log.puts == []  # nothing reached the store behind with its bytes on their way
    assert torch.equal(store.get("b"), torch.full((50,), 1.0))
    assert [k for k, _ in log.puts] == ["a", "b"]  # up to b, in order
    store.flush()
    assert [k for k, _ in log.puts] == ["a", "b", "a", "c", "d"]
    assert torch.equal(store.get("a"), torch.full((50,), 2.0))
    assert all(v is None or v.unique().numel() == 1 for _, v in log.puts)


# -- capture(device="cpu") -------------------------------------------------------------------


class Writes(nn.Module):
    """In-place writes after every value it makes: a copy taken late would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.fc1(x))  # ReLU rewrites fc1's output
        y = self.fc2(h)
        parts = y.split(4, dim=-1)  # views of one storage: they stay views of one copy
        out = y * 2
        y.mul_(-1)  # after fc2's output and the split were captured
        return out, parts[1]


def _reference(model: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    found: dict[str, list[torch.Tensor]] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        outs = output if isinstance(output, tuple) else (output,)
        found[names[id(module)]] = [t.detach().clone() for t in outs]

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return found


@pytest.mark.parametrize("ahead", [0.0, 0.5])
def test_offloaded_capture_equals_a_plain_hook_that_clones(
    late: type[LateBackend], ahead: float
) -> None:
    late.ahead = ahead
    torch.manual_seed(0)
    model = Writes()
    x = torch.randn(8, 16)
    want = _reference(model, x)
    with torch.no_grad(), tensorsnap.capture(model, ops=True, device="cpu") as snap:
        model(x)
    assert late.copies > 0  # the copies went through the ring
    assert sorted(k for k in snap if "/" not in k) == sorted(want)
    for key, tensors in want.items():
        got = snap[key] if isinstance(snap[key], tuple) else (snap[key],)
        assert [_bits(t) for t in got] == [_bits(t) for t in tensors], key
    parts = snap["/split"]  # run by the root module
    assert len({p.untyped_storage().data_ptr() for p in parts}) == 1  # one copy, four views
    assert all(torch.equal(p, q) for p, q in zip(parts, want["fc2"][0].split(4, dim=-1)))


def test_offloaded_capture_with_a_cast_and_views(late: type[LateBackend]) -> None:
    base = torch.randn(6, 8)
    value = {"t": base.t(), "rows": base[1:4], "base": base, "cl": torch.randn(2, 3, 4, 5)}
    value["cl"] = value["cl"].contiguous(memory_format=torch.channels_last)

    class Emit(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return value

    emit = Emit()
    for dtype in (None, torch.float16):
        with tensorsnap.capture(emit, device="cpu", dtype=dtype) as snap:
            emit(base)
        got = snap[""]
        for key, t in value.items():
            expect = t if dtype is None else t.to(dtype)
            assert got[key].stride() == t.stride() and _bits(got[key]) == _bits(expect), key
        ptr = got["base"].untyped_storage().data_ptr()
        assert got["t"].untyped_storage().data_ptr() == ptr
        assert got["rows"].untyped_storage().data_ptr() == ptr


def test_a_value_read_inside_the_block_waits_for_its_copy(late: type[LateBackend]) -> None:
    model = Writes()
    x = torch.randn(4, 16)
    want = _reference(model, x)
    with torch.no_grad(), tensorsnap.capture(model, device="cpu") as snap:
        model(x)
        inside = snap["fc1"].clone()  # read before the block ends
    assert _bits(inside) == _bits(want["fc1"][0])


def test_offloaded_nonfinite_checks_wait_for_the_bytes(late: type[LateBackend]) -> None:
    class NaNAt(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(-(x.abs() + 1.0))

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), NaNAt(), nn.Linear(8, 8))
    raised = pytest.raises(tensorsnap.NonFiniteError, match=r"'2' is the first captured value")
    with (
        raised,
        torch.no_grad(),
        tensorsnap.capture(model, device="cpu", nonfinite="raise") as snap,
    ):
        model(torch.randn(3, 8))
    assert list(snap) == ["0", "1", "2"]
    # a finite run passes: the checks read the copies' bytes, not the ring's garbage
    finite = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with torch.no_grad(), tensorsnap.capture(finite, device="cpu", nonfinite="raise") as snap:
        finite(torch.randn(3, 8))
    assert list(snap) == ["0", "1", ""]


def test_offloaded_gradients_and_saved_tensors(late: type[LateBackend]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(5, 8)
    grads: dict[str, torch.Tensor] = {}
    outs: list[torch.Tensor] = []
    for i, m in enumerate(model):
        x_ref = x if i == 0 else outs[-1]
        outs.append(m(x_ref))
        outs[-1].register_hook(lambda g, k=f"{i}:grad": grads.__setitem__(k, g.clone()))
    outs[-1].sum().backward()
    with tensorsnap.capture(model, grads=True, saved=True, device="cpu") as snap:
        model(x).sum().backward()
    for key, g in grads.items():
        assert _bits(snap[key]) == _bits(g), key
    assert any(r.kind == "saved" for r in snap.records)


def test_offload_with_spilling_keeps_the_budget_and_the_values(
    late: type[LateBackend], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(12)))
    x = torch.randn(32, 64)
    want = _reference(model, x)
    with (
        torch.no_grad(),
        tensorsnap.capture(model, device="cpu", max_memory=20_000, spill_dir=str(tmp_path)) as snap,
    ):
        model(x)
    assert snap._store.memory <= 20_000  # type: ignore[attr-defined]
    for key, tensors in want.items():
        assert _bits(snap[key]) == _bits(tensors[0]), key


# -- spilling copies kept on a device ----------------------------------------------------------


def _spill_values(count: int) -> list[tuple[Any, ...]]:
    values = []
    for i in range(count):
        base = torch.arange(2500, dtype=torch.float32) + i
        values.append((base, base[::5], {"i": i, "half": base[:10].half()}))
    return values


@pytest.mark.parametrize("ahead", [0.0, 1.0])
def test_device_copies_spill_and_read_back_on_their_device(
    late: type[LateBackend], ahead: float, tmp_path: Path
) -> None:
    late.ahead = ahead
    store = SpillStore(max_memory=30_000, spill_dir=str(tmp_path))
    snap = Snapshot(store=store)
    values = _spill_values(20)
    want = [(v[0].clone(), v[1].clone(), v[2]["half"].clone()) for v in values]
    originals = [weakref.ref(v[0]) for v in values]
    for i, v in enumerate(values):
        snap._add(Record(f"k{i}", "m", i, None, "output", None, None, 10_020), v)
    del values, v
    store.flush()
    assert store.memory <= 30_000 and os.listdir(store.spill_dir or "")
    gc.collect()
    # the store let go of the spilled device tensors: their memory went back to the device
    assert sum(ref() is None for ref in originals) >= 15
    for i, (base, strided, half) in enumerate(want):
        got = snap[f"k{i}"]
        assert type(got) is tuple and got[2]["i"] == i
        assert _bits(got[0]) == _bits(base) and _bits(got[1]) == _bits(strided)
        assert _bits(got[2]["half"]) == _bits(half) and got[1].stride() == (5,)
        # views of one storage come back as views of one copy
        assert got[1].untyped_storage().data_ptr() == got[0].untyped_storage().data_ptr()
    # a read gives a new copy each time: writing into one leaves the snapshot as it was
    first = snap["k0"]
    first[0].add_(1000)
    assert _bits(snap["k0"][0]) == _bits(want[0][0])
    # a spilled device value saves and loads like any other
    snap.save(tmp_path / "bundle")
    loaded = tensorsnap.load(tmp_path / "bundle")
    assert all(_bits(loaded[f"k{i}"][0]) == _bits(want[i][0]) for i in range(20))
    store.close()


def test_a_device_value_written_while_it_spills_stays_in_memory(late: type[LateBackend]) -> None:
    store = SpillStore(max_memory=15_000, spill_dir=None)
    snap = Snapshot(store=store)
    snap._add(Record("k0", "m", 0, None, "output", None, None, 10_000), torch.zeros(2500))
    held = snap["k0"]  # handed out: its swap is left to this thread
    snap._add(Record("k1", "m", 1, None, "output", None, None, 10_000), torch.ones(2500))
    with store._state.cond:
        while store._state.queued:
            store._state.cond.wait()
    held.add_(1)  # in place, after its bytes were written
    assert snap["k0"] is held and torch.equal(held, torch.ones(2500))
    store.close()


def test_capture_spills_device_copies(late: type[LateBackend], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        *(nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True)) for _ in range(6))
    )
    x = torch.randn(32, 64)
    want = _reference(model, x)
    with (
        torch.no_grad(),
        tensorsnap.capture(model, max_memory="30KB", spill_dir=str(tmp_path)) as snap,
    ):
        model(x)
    assert snap._store.memory <= 30_000  # type: ignore[attr-defined]
    assert late.copies > 0  # the spill writer staged the 'device' bytes
    for key, tensors in want.items():
        assert _bits(snap[key]) == _bits(tensors[0]), key


# -- on a CUDA device ------------------------------------------------------------------------


@cuda
def test_cuda_offload_values_are_the_values_when_made() -> None:
    torch.manual_seed(0)
    model = Writes().cuda()
    x = torch.randn(64, 16, device="cuda")
    want = _reference(model, x)
    with torch.no_grad(), tensorsnap.capture(model, ops=True, device="cpu") as snap:
        model(x)
        big = torch.randn(4096, 4096, device="cuda")  # queue work behind the copies
        for _ in range(10):
            big = big @ big
    for key, tensors in want.items():
        got = snap[key] if isinstance(snap[key], tuple) else (snap[key],)
        assert all(t.device.type == "cpu" and not t.is_pinned() for t in got)
        assert [_bits(t) for t in got] == [_bits(t.cpu()) for t in tensors], key


@cuda
def test_cuda_offload_ring_wraps_many_times_without_garbage() -> None:
    offload = Offload(clone=True, arena=2**20, chunk=2**18)
    pairs = []
    for i in range(200):
        src = torch.randn(50_000 + i, device="cuda")
        dst = torch.empty(src.numel())
        offload.copy(dst, src)
        want = src.cpu()
        src.mul_(2)  # queued after the copy: must not reach it
        pairs.append((dst, want))
    offload.drain()
    assert all(torch.equal(d, w) for d, w in pairs)


@cuda
def test_cuda_spill_reads_back_on_the_device_bitwise(tmp_path: Path) -> None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    store = SpillStore(max_memory=0, spill_dir=str(tmp_path))
    kept = []
    with torch.cuda.stream(side):  # made on a side stream, each behind long queued work
        for i in range(6):
            a = torch.randn(2048, 2048, device="cuda")
            for _ in range(20):
                a = torch.tanh(a @ a)
            value = (a, a[::3], {"i": i})
            kept.append(value)
            store.put(f"k{i}", value, a.nbytes)
    store.flush()
    torch.cuda.synchronize()
    assert store.memory == 0
    for i, (a, rows, _) in enumerate(kept):
        got = store.get(f"k{i}")
        assert got[0].device == a.device and got[1].device == a.device and got[2] == {"i": i}
        assert got[1].stride() == rows.stride()
        assert got[1].untyped_storage().data_ptr() == got[0].untyped_storage().data_ptr()
        assert _bits(got[0].cpu()) == _bits(a.cpu()) and _bits(got[1].cpu()) == _bits(rows.cpu())
    store.close()
