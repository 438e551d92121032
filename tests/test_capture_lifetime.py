"""A snapshot's memory goes back when its last reference goes, without waiting for the cyclic GC.

A capture session holds its snapshot, and its function mode, graph runner and lazy copier hold
methods of the session: unless the block breaks those cycles, every snapshot (activations of a
whole forward) stays allocated until Python's cyclic collector happens to run, and a loop of
captures or an ``extract`` holds many at once. Each test runs with the collector off.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from conftest import tiny_gpt2, token_ids

import tensorsnap
from tensorsnap._snapshot import Snapshot


def _unreachable_snapshots() -> list[Snapshot]:
    # gc.get_objects() also lists objects that only a cycle keeps: garbage not yet collected
    return [o for o in gc.get_objects() if type(o) is Snapshot]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"ops": True},
        {"ops": True, "graph": True},
        {"ops": True, "lazy": True},
        {"grads": True, "saved": True},
        {"inputs": True, "stats": True},
        {"nonfinite": "raise", "dtype": torch.float16},
        {"ops": True, "max_memory": "64KB"},
    ],
    ids=["modules", "ops", "graph", "lazy", "grads-saved", "inputs-stats", "nonfinite", "spill"],
)
def test_a_snapshot_is_freed_with_its_last_reference(
    options: dict[str, Any], no_cyclic_gc: None, tmp_path: Any
) -> None:
    model = tiny_gpt2()
    ids = token_ids(2, 8)
    if "max_memory" in options:
        options = dict(options, spill_dir=str(tmp_path))
    grad = bool(options.get("grads"))
    for _ in range(3):  # graph mode: the third block runs the compiled graph
        with torch.set_grad_enabled(grad), tensorsnap.capture(model, **options) as snap:
            out = model(input_ids=ids)
            if grad:
                out.logits.sum().backward()
    key = "transformer.h.0.mlp"
    value = weakref.ref(snap[key] if "stats" not in options else snap)
    whole = weakref.ref(snap)
    del snap
    assert whole() is None, "the snapshot outlived its last reference"
    assert value() is None, f"{key}'s copy outlived the snapshot"
    assert not _unreachable_snapshots()


def test_extract_leaves_no_batch_snapshot_for_the_cyclic_gc(
    no_cyclic_gc: None, tmp_path: Any
) -> None:
    model = tiny_gpt2()
    batches = [{"input_ids": token_ids(2, 8, seed=s)} for s in range(3)]
    tensorsnap.extract(
        model, batches, out=tmp_path / "out", include=["transformer.h.*"], progress=False
    )
    assert not _unreachable_snapshots()
