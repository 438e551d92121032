"""Per-token extracts as training data: a DataLoader with workers over the memory-mapped rows.

Every row must be read exactly once per epoch with ``shuffle=True``, and no process may copy
the file: the rows are file-backed pages of the page cache (RssFile), shared by every process
that maps them, so a copy shows up as anonymous memory (RssAnon). The file is several times
larger than the growth allowed, and a control that does copy it is caught by the same bound.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import torch
from _token_dataset import TokenRows, memory_kb, worker_memory
from torch import nn
from torch.utils.data import DataLoader, Dataset

import tensorsnap

if not sys.platform.startswith("linux") or "RssAnon" not in memory_kb():
    pytest.skip("measures memory through Linux /proc/<pid>/status", allow_module_level=True)

WIDTH = 2048  # fp32 rows of 8 KiB
BATCHES, B, S = 10, 16, 64


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(512, WIDTH)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A per-token extract of ~70 MB, and its expected rows and ids (by hand)."""
    model = Embed().eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(BATCHES):
        # token ids count up, so every row is distinct and names its position
        ids = (torch.arange(B * S).reshape(B, S) + i * B * S) % 512
        lengths = torch.randint(S // 2, S + 1, (B, 1), generator=g)
        batches.append({"input_ids": ids, "attention_mask": (torch.arange(S) < lengths).long()})
    path = str(tmp_path_factory.mktemp("training") / "acts")
    tensorsnap.extract(model, batches, out=path, include="emb", per_token=True, progress=False)
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    return path, model.emb.weight.detach()[ids], ids


def file_kb(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) // 1024


class Rows(Dataset):  # type: ignore[type-arg]
    """The plain recipe: the loaded tensors themselves, inherited by forked workers."""

    def __init__(self, acts: torch.Tensor, ids: torch.Tensor, copy: bool = False) -> None:
        self.acts, self.ids, self.copy = acts, ids, copy

    def __len__(self) -> int:
        return self.acts.shape[0]

    def __getitem__(self, i: int) -> Any:
        if self.copy:  # the control: the worker makes a private copy of the rows first
            self.acts, self.copy = self.acts.clone(), False
        return i, self.acts[i], self.ids[i], worker_memory()


def read_epochs(
    dataset: Dataset,  # type: ignore[type-arg]
    expected: torch.Tensor,
    ids: torch.Tensor,
    epochs: int,
    workers: int,
    context: str | None = None,
) -> tuple[list[torch.Tensor], dict[int, list[int]], int]:
    """Indexes read per epoch (each batch checked against ``expected`` and ``ids`` as it
    arrives, then dropped), each worker's RssAnon reports (kB) and the parent's largest
    RssAnon growth (kB) while reading."""
    loader = DataLoader(
        dataset,
        batch_size=256,
        shuffle=True,
        num_workers=workers,
        multiprocessing_context=context,
        persistent_workers=epochs > 1,
        generator=torch.Generator().manual_seed(0),
    )
    # the rows expected are gathered into one reused buffer: fresh 2 MB blocks per batch would
    # grow the parent's heap by themselves
    want = torch.empty(256, *expected.shape[1:], dtype=expected.dtype)
    before = memory_kb()["RssAnon"]
    peak = before
    orders = []
    reports: dict[int, list[int]] = {}
    for _ in range(epochs):
        seen = []
        for index, rows, got_ids, memory in loader:
            torch.index_select(expected, 0, index, out=want[: len(index)])
            assert torch.equal(rows, want[: len(index)]) and torch.equal(got_ids, ids[index])
            seen.append(index)
            for worker, anon in memory.tolist():
                reports.setdefault(worker, []).append(anon)
            peak = max(peak, memory_kb()["RssAnon"])
        orders.append(torch.cat(seen))
    return orders, reports, peak - before


def test_dataloader_reads_every_row_once_per_epoch_with_memory_flat(
    bundle: tuple[str, torch.Tensor, torch.Tensor],
) -> None:
    path, expected, ids = bundle
    loaded = tensorsnap.load(path)
    acts = loaded["emb"]
    assert acts.shape == expected.shape
    size = file_kb(path)
    allowed = size // 4  # the file is several times the growth allowed
    assert size > 60_000
    parent_before = memory_kb()["RssAnon"]
    orders, reports, parent = read_epochs(
        Rows(acts, loaded["input_ids"]), expected, ids, epochs=2, workers=2
    )
    for order in orders:
        assert torch.equal(order.sort().values, torch.arange(len(acts)))  # each row once
    assert not torch.equal(orders[0], orders[1])  # shuffled, differently each epoch
    assert sorted(reports) == [0, 1]
    assert parent < allowed, f"the parent's RssAnon grew by {parent} kB (file: {size} kB)"
    for worker, anon in reports.items():
        # a forked worker starts with the parent's anonymous pages (shared, copy-on-write)
        grown = max(anon) - parent_before
        assert grown < allowed, f"worker {worker}'s RssAnon grew by {grown} kB (file: {size} kB)"


def test_the_memory_bound_catches_a_worker_that_copies_the_rows(
    bundle: tuple[str, torch.Tensor, torch.Tensor],
) -> None:
    path, expected, ids = bundle
    loaded = tensorsnap.load(path)
    parent_before = memory_kb()["RssAnon"]
    dataset = Rows(loaded["emb"], loaded["input_ids"], copy=True)
    _, reports, _ = read_epochs(dataset, expected, ids, epochs=1, workers=1)
    grown = max(reports[0]) - parent_before
    assert grown > file_kb(path) // 2, grown  # the same measure sees the copy


def test_spawned_workers_open_the_files_themselves(
    bundle: tuple[str, torch.Tensor, torch.Tensor],
) -> None:
    path, expected, ids = bundle
    dataset = TokenRows(path, "emb")
    assert len(dataset) == expected.shape[0]
    orders, reports, parent = read_epochs(
        dataset, expected, ids, epochs=1, workers=1, context="spawn"
    )
    assert torch.equal(orders[0].sort().values, torch.arange(len(dataset)))
    allowed = file_kb(path) // 4
    assert parent < allowed
    for anon in reports.values():
        # a spawned worker has its own baseline: its first report, made after it opened the
        # bundle (and read the whole file once, to check its CRC)
        assert max(anon) - anon[0] < allowed


def test_random_access_batches_gather_the_right_rows(
    bundle: tuple[str, torch.Tensor, torch.Tensor],
) -> None:
    path, expected, ids = bundle
    loaded = tensorsnap.load(path)
    acts, got_ids = loaded["emb"], loaded["input_ids"]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the SAE pattern: acts[torch.randint(n, (4096,))]
        pick = torch.randint(len(acts), (4096,), generator=g)
        assert torch.equal(acts[pick], expected[pick]) and torch.equal(got_ids[pick], ids[pick])
    # numpy reads the same bytes through its own memory map, without tensorsnap
    import json

    import numpy as np

    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    record = next(r for r in manifest["records"] if r["key"] == "emb")
    blob, tensor = record["blobs"][0], record["tensors"][0]
    shard = os.path.join(path, manifest["shards"][blob["shard"]]["file"])
    with open(shard, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
    rows = np.memmap(
        shard,
        dtype=np.float32,
        mode="r",
        offset=start + blob["offset"],
        shape=tuple(tensor["shape"]),
    )
    assert np.array_equal(rows[pick.numpy()], expected[pick].numpy())
