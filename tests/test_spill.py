"""SpillStore keeps memory near its budget and reads spilled values back unchanged."""

from __future__ import annotations

import collections
import errno
import gc
import os
import time
from typing import Any

import pytest
import torch

import tensorsnap
from tensorsnap import _spill
from tensorsnap._errors import BundleError, TensorSnapError
from tensorsnap._snapshot import Record, Snapshot
from tensorsnap._spill import SpillStore

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps"
)

Out = collections.namedtuple("Out", "hidden attn")


def value(i: int, n: int = 2500) -> tuple[Out, dict[str, Any]]:
    base = torch.full((n,), float(i))
    return Out(base, base[::5]), {"i": i}  # 10 kB, two views of one storage


def fill(store: SpillStore, count: int, n: int = 2500) -> Snapshot:
    snap = Snapshot(store=store)
    for i in range(count):
        snap._add(Record(f"k{i}", "m", i, None, "output", None, None, n * 4), value(i, n))
    return snap


def check(snap: Snapshot, count: int, n: int = 2500) -> None:
    for i in range(count):
        out, extra = snap[f"k{i}"]
        assert type(out) is Out and extra == {"i": i}
        assert torch.equal(out.hidden, torch.full((n,), float(i)))
        assert torch.equal(out.attn, torch.full((n // 5,), float(i)))
        # views stay views of one storage
        assert out.attn.untyped_storage().data_ptr() == out.hidden.untyped_storage().data_ptr()


def test_under_budget_nothing_is_written() -> None:
    store = SpillStore(max_memory=10**6, spill_dir=None)
    snap = fill(store, 20)
    assert store.memory == 200_000 and store.spill_dir is None
    check(snap, 20)
    store.close()


def test_over_budget_the_oldest_values_spill_and_read_back(tmp_path: Any) -> None:
    store = SpillStore(max_memory=35_000, spill_dir=str(tmp_path))
    snap = fill(store, 20)
    store.flush()
    assert store.memory <= 35_000
    directory = store.spill_dir
    assert directory is not None and os.path.dirname(directory) == str(tmp_path)
    assert os.listdir(directory)
    # the newest values are still plain memory, the oldest are mapped from the spill files
    newest = snap["k19"][0].hidden
    oldest = snap["k0"][0].hidden
    assert not _is_file_backed(newest) and _is_file_backed(oldest)
    check(snap, 20)
    assert snap["k3"] is snap["k3"]  # the same object every time, as with MemoryStore
    store.close()
    assert not os.path.exists(directory) and os.path.exists(tmp_path)
    # tensors handed out before close stay readable
    assert torch.equal(oldest, torch.full((2500,), 0.0))


def _is_file_backed(t: torch.Tensor) -> bool:
    """Whether the tensor's memory is a mapping of a spill file (read from /proc/self/maps)."""
    address = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return len(fields) >= 6 and "tensorsnap-spill-" in fields[5]
    return False


def test_zero_budget_spills_everything() -> None:
    store = SpillStore(max_memory=0, spill_dir=None)
    snap = fill(store, 10)
    store.flush()
    assert store.memory == 0
    check(snap, 10)
    store.close()


def test_memory_stays_near_the_budget_while_the_writer_is_slow(monkeypatch: Any) -> None:
    real = _spill.write_shard

    def slow(*args: Any, **kwargs: Any) -> int:
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(_spill, "write_shard", slow)
    store = SpillStore(max_memory=50_000, spill_dir=None)
    snap = Snapshot(store=store)
    peak = 0
    for i in range(300):  # 3 MB through a 50 kB budget
        snap._add(Record(f"k{i}", "m", i, None, "output", None, None, 10_000), value(i))
        peak = max(peak, store.memory)
    # budget + max(slack (1 MiB minimum), one value)
    assert peak <= 50_000 + 2**20 + 10_000
    store.flush()
    check(snap, 300)
    store.close()


def test_garbage_collection_removes_the_spill_dir() -> None:
    store = SpillStore(max_memory=0, spill_dir=None)
    snap = fill(store, 3)
    store.flush()
    directory = store.spill_dir
    assert directory is not None and os.path.isdir(directory)
    del snap, store
    gc.collect()
    assert not os.path.exists(directory)


def test_save_links_spilled_shards_instead_of_rewriting(tmp_path: Any) -> None:
    store = SpillStore(max_memory=0, spill_dir=str(tmp_path / "spill"))
    snap = fill(store, 6)
    store.flush()
    spilled = {
        os.stat(os.path.join(store.spill_dir or "", f)).st_ino
        for f in os.listdir(store.spill_dir or "")
    }
    snap.save(tmp_path / "b")
    shards = [f for f in os.listdir(tmp_path / "b") if f.endswith(".safetensors")]
    assert shards and {os.stat(tmp_path / "b" / f).st_ino for f in shards} <= spilled
    store.close()  # the bundle keeps its own links to the files
    check(tensorsnap.load(tmp_path / "b"), 6)


def test_save_after_changing_a_spilled_value_writes_the_change(tmp_path: Any) -> None:
    store = SpillStore(max_memory=0, spill_dir=None)
    snap = fill(store, 3)
    store.flush()
    snap["k1"][0].hidden.add_(100)  # copy-on-write: the spill file keeps the old bytes
    snap.save(tmp_path / "b")
    loaded = tensorsnap.load(tmp_path / "b")
    assert torch.equal(loaded["k1"][0].hidden, torch.full((2500,), 101.0))
    assert torch.equal(loaded["k2"][0].hidden, torch.full((2500,), 2.0))
    store.close()


def test_a_value_changed_while_it_is_written_stays_in_memory() -> None:
    store = SpillStore(max_memory=15_000, spill_dir=None)
    snap = fill(store, 1)
    held = snap["k0"]  # handed out: it is swapped only in the caller's thread
    snap._add(Record("k1", "m", 1, None, "output", None, None, 10_000), value(1))
    store._state.cond.acquire()
    try:  # wait for the writer to finish k0 without letting put/get apply the swap
        while store._state.queued:
            store._state.cond.wait()
    finally:
        store._state.cond.release()
    held[0].hidden.add_(1)  # in place, after it was written
    assert snap["k0"] is held and torch.equal(held[0].hidden, torch.full((2500,), 1.0))
    assert not _is_file_backed(held[0].hidden)  # the stale file copy was not swapped in
    store.close()


def test_full_spill_disk_raises_and_keeps_values(monkeypatch: Any) -> None:
    def full(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_spill, "write_shard", full)
    store = SpillStore(max_memory=0, spill_dir=None)
    snap = fill(store, 1)
    # put never raises the writer's failure (it runs inside the model's forward): flush does
    snap._add(Record("k1", "m", 1, None, "output", None, None, 10_000), value(1))
    with pytest.raises(BundleError, match=r"could not spill values to .*No space left.*spill_dir="):
        store.flush()
    check(snap, 2)
    store.flush()  # reported once
    store.close()


def test_replacing_a_value_frees_its_memory() -> None:
    store = SpillStore(max_memory=10**6, spill_dir=None)
    store.put("a", torch.ones(100), 400)
    store.put("a", torch.zeros(10), 40)
    assert store.memory == 40 and torch.equal(store.get("a"), torch.zeros(10))
    store.close()


def test_bad_budget_and_closed_store() -> None:
    with pytest.raises(TensorSnapError, match=r"max_memory=-1: expected a number of bytes"):
        SpillStore(max_memory=-1, spill_dir=None)
    store = SpillStore(max_memory=0, spill_dir=None)
    store.close()
    with pytest.raises(TensorSnapError, match="spill store was closed"):
        store.put("a", torch.ones(1), 4)


def test_an_unusable_default_temp_dir_is_named_as_the_default(
    tmp_path: Any, monkeypatch: Any
) -> None:
    (tmp_path / "file").write_text("not a directory")
    bad = str(tmp_path / "file" / "tmp")
    monkeypatch.setattr(_spill.tempfile, "gettempdir", lambda: bad)
    with pytest.raises(
        BundleError,
        match=rf"the default temporary directory '{bad}' \(spill_dir=None\) cannot hold spill "
        r"files \(.*\); pass spill_dir= a writable directory with free space, or set the TMPDIR",
    ):
        SpillStore(max_memory=0, spill_dir=None)
