"""The DataLoader recipe of docs/training-data.md, importable by spawned DataLoader workers.

Each process opens the bundle itself (on first use), so that a worker started by ``spawn`` or
``forkserver`` maps the same files instead of receiving a pickled copy of the tensor.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import tensorsnap


def memory_kb(pid: int | None = None) -> dict[str, int]:
    """RssAnon, RssFile and RssShmem of a process, in kB (Linux /proc)."""
    found = {}
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "RssShmem"):
                found[name] = int(value.split()[0])
    return found


def worker_memory() -> torch.Tensor:
    """(worker id, RssAnon in kB) of the calling DataLoader worker, sent back with each row."""
    info = torch.utils.data.get_worker_info()
    return torch.tensor([-1 if info is None else info.id, memory_kb()["RssAnon"]])


class TokenRows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Rows of one key of a per-token extract, opened lazily in each process."""

    def __init__(self, path: str | os.PathLike[str], key: str) -> None:
        self.path, self.key = os.fspath(path), key
        self._acts: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self.rows = tensorsnap.load(self.path).records[0].shape[0]  # input_ids comes first

    def _open(self) -> None:
        bundle = tensorsnap.load(self.path)
        self._acts, self._ids = bundle[self.key], bundle["input_ids"]

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> Any:
        if self._acts is None:
            self._open()
        assert self._acts is not None and self._ids is not None
        return i, self._acts[i], self._ids[i], worker_memory()

    def __getstate__(self) -> dict[str, Any]:  # a worker opens the files itself
        return {**self.__dict__, "_acts": None, "_ids": None}
