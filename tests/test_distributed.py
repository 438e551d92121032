"""capture and save under torch.distributed: 2 CPU processes on the gloo backend.

One ``mp.spawn`` (a file:// store, no ports) runs every scenario, because each start costs
seconds; the workers write collective bundles and a per-scenario error file, and the tests
below compare what they saved with a single-process capture of the same model and inputs made
here, in the pytest process, with no process group.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import tensorsnap
from tensorsnap._errors import BundleError

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this torch build has no gloo backend", allow_module_level=True)

WORLD = 2
SCENARIOS = ("ddp", "fsdp2", "fsdp1", "tp", "tp_gather", "save_errors", "extract", "extract_tokens")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) * 2) + 1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = MLP()
        self.b = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def make_model() -> Net:
    torch.manual_seed(1)
    return Net()


def full_input() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 8)


def rank_input(rank: int) -> torch.Tensor:
    """Data parallel: each rank runs its own slice of the batch."""
    return full_input()[2 * rank : 2 * rank + 2]


def run_captured(model: nn.Module, x: torch.Tensor, **options: Any) -> tensorsnap.Snapshot:
    with tensorsnap.capture(model, ops=True, grads=True, **options) as snap:
        model(x).sum().backward()
    return snap


# -- the workers (run in the spawned processes) ---------------------------------------------------


def _ddp(rank: int, path: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    run_captured(DistributedDataParallel(make_model()), rank_input(rank)).save(path)


def _fsdp2(rank: int, path: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model.a)
    fully_shard(model.b)
    fully_shard(model)
    run_captured(model, rank_input(rank)).save(path)


def _fsdp1(rank: int, path: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = FullyShardedDataParallel(
        make_model(), device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({MLP})
    )
    run_captured(model, rank_input(rank)).save(path)


def _tensor_parallel() -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (WORLD,))
    plan: dict[str, Any] = {}
    for name in ("a", "b"):
        plan[f"{name}.fc1"] = ColwiseParallel()
        plan[f"{name}.fc2"] = RowwiseParallel()
    return parallelize_module(make_model(), mesh, plan)


def _tp(rank: int, path: str) -> None:
    snap = run_captured(_tensor_parallel(), full_input())
    from torch.distributed.tensor import DTensor, Partial, Shard

    # in memory: DTensors with their placements, copied without a collective
    assert isinstance(snap["a.fc1"], DTensor) and snap["a.fc1"].placements == (Shard(1),)
    assert isinstance(snap["a.fc2"], DTensor) and snap["a.fc2"].placements[0].is_partial()
    assert isinstance(snap["a.fc2"].placements[0], Partial)
    snap.save(path)
    # a RowwiseParallel module returns an AsyncCollectiveTensor (an all-reduce in flight): the
    # copy waits for it and is a plain tensor with the reduced value
    outer = nn.Sequential(_tensor_parallel().get_submodule("a.fc2"))
    h = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    with tensorsnap.capture(outer) as snap:
        out = outer(h.chunk(WORLD, -1)[rank])
    assert type(out) is not torch.Tensor, type(out)  # still in flight when the hook ran
    assert type(snap[""]) is torch.Tensor
    torch.testing.assert_close(snap[""], make_model().a.fc2(h).detach())


def _tp_gather(rank: int, path: str) -> None:
    run_captured(_tensor_parallel(), full_input(), gather=True).save(path)


def _save_errors(rank: int, path: str) -> None:
    snap = run_captured(make_model(), rank_input(rank))
    snap.save(path)
    # a second save to the same path fails on every rank, and nobody hangs
    try:
        snap.save(path)
    except BundleError as err:
        assert "already exists" in str(err), err
    else:
        raise AssertionError("saving over an existing bundle did not raise")
    # collective=False writes this rank's snapshot alone, as a single-process bundle
    snap.save(f"{path}-alone-{rank}", collective=False)


def extract_batches(rank: int) -> list[torch.Tensor]:
    """Data-parallel extract: rank r gets batches r, r + 2, ... as a DistributedSampler would."""
    torch.manual_seed(5)
    batches = [torch.randn(3, 8) for _ in range(6)]
    return batches[rank::WORLD]


def _extract(rank: int, path: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    tensorsnap.extract(model, extract_batches(rank), out=path, progress=False)
    # a finished run is returned unchanged with resume=True, on every rank
    again = tensorsnap.extract(model, extract_batches(rank), out=path, progress=False, resume=True)
    assert again["b"].shape == (3 * 6, 8), again["b"].shape


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(50, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(input_ids)) * attention_mask[..., None]


def token_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Padded token batches; rank r gets batches r, r + 2, ... as a DistributedSampler would."""
    g = torch.Generator().manual_seed(7)
    batches = []
    for i in range(5):
        ids = torch.randint(0, 50, (3, 4 + i), generator=g)
        mask = (torch.arange(4 + i) < torch.randint(0, 5 + i, (3, 1), generator=g)).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches[rank::WORLD]


def _extract_tokens(rank: int, path: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(TokenNet())
    options: dict[str, Any] = dict(out=path, include=["emb", "fc"], per_token=True, progress=False)
    tensorsnap.extract(model, token_batches(rank), **options)
    again = tensorsnap.extract(model, token_batches(rank), resume=True, **options)
    assert list(again) == ["input_ids", "emb", "fc"], list(again)


_WORKERS: dict[str, Callable[[int, str], None]] = {
    "ddp": _ddp,
    "fsdp2": _fsdp2,
    "fsdp1": _fsdp1,
    "tp": _tp,
    "tp_gather": _tp_gather,
    "save_errors": _save_errors,
    "extract": _extract,
    "extract_tokens": _extract_tokens,
}


def _worker(rank: int, root: str) -> None:
    import datetime
    import warnings

    # torch.distributed warns about things these tiny CPU models do on purpose (FSDP1 on CPU,
    # TP without a GPU); the workers' warnings are not the code under test
    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/store",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for name in SCENARIOS:
            path = os.path.join(root, name)
            try:
                _WORKERS[name](rank, path)
            except ImportError as err:
                _note(root, name, rank, f"SKIP {err}")
            except Exception:
                _note(root, name, rank, traceback.format_exc())
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _note(root: str, name: str, rank: int, text: str) -> None:
    with open(os.path.join(root, f"{name}.rank{rank}.log"), "w") as f:
        f.write(text)


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import torch.multiprocessing as mp

    root = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(root,), nprocs=WORLD, join=True)
    yield root


def scenario(runs: str, name: str) -> str:
    """The scenario's bundle path, after failing or skipping as its workers did."""
    for rank in range(WORLD):
        log = os.path.join(runs, f"{name}.rank{rank}.log")
        if os.path.exists(log):
            with open(log) as f:
                text = f.read()
            if text.startswith("SKIP "):
                pytest.skip(f"this torch build lacks it: {text[5:]}")
            pytest.fail(f"rank {rank} of {name!r} failed:\n{text}")
    return os.path.join(runs, name)


def reference(x: torch.Tensor) -> tensorsnap.Snapshot:
    """The same model and input captured in this process, with no wrapper and no group."""
    return run_captured(make_model(), x)


def assert_same(got: tensorsnap.Snapshot, want: tensorsnap.Snapshot) -> None:
    assert list(got) == list(want)
    for key in want:
        a, b = got[key], want[key]
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, msg=key)
        else:  # :grad_in tuples
            assert type(a) is type(b) and len(a) == len(b), key
            for u, v in zip(a, b):
                if v is None:
                    assert u is None, key
                else:
                    torch.testing.assert_close(u, v, msg=key)


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp1"])
def test_data_parallel_matches_single_process(runs: str, name: str) -> None:
    path = scenario(runs, name)
    for rank in range(WORLD):
        got = tensorsnap.load(path, rank=rank)
        assert not any("module." in k or "_fsdp_wrapped_module" in k for k in got)
        assert_same(got, reference(rank_input(rank)))


def test_multi_rank_capture_needs_a_rank(runs: str) -> None:
    path = scenario(runs, "ddp")
    with pytest.raises(BundleError, match=r"one part per rank \(2 ranks\); pass rank="):
        tensorsnap.load(path)
    with pytest.raises(BundleError, match="no part for rank 2"):
        tensorsnap.load(path, rank=2)
    assert sorted(os.listdir(path)) == ["manifest.json", "rank-00000", "rank-00001"]


def test_failed_collective_save_raises_on_every_rank(runs: str) -> None:
    path = scenario(runs, "save_errors")
    assert_same(tensorsnap.load(path, rank=1), reference(rank_input(1)))
    for rank in range(WORLD):
        alone = tensorsnap.load(f"{path}-alone-{rank}")
        assert_same(alone, reference(rank_input(rank)))
    leftovers = [n for n in os.listdir(runs) if "tensorsnap-tmp" in n]
    assert leftovers == []


def _chunk(full: torch.Tensor, part: torch.Tensor, rank: int, key: str) -> torch.Tensor:
    """The slice of ``full`` that a rank's local shard ``part`` should hold."""
    dims = [d for d in range(full.dim()) if full.shape[d] != part.shape[d]]
    assert len(dims) == 1, f"{key}: local {tuple(part.shape)} vs full {tuple(full.shape)}"
    return full.chunk(WORLD, dims[0])[rank]


def test_tensor_parallel_local_shards(runs: str) -> None:
    path = scenario(runs, "tp")
    want = reference(full_input())
    parts = [tensorsnap.load(path, rank=r) for r in range(WORLD)]
    for rank, got in enumerate(parts):
        assert list(got) == list(want)
        for key in want:
            a, b = got[key], want[key]
            if not isinstance(b, torch.Tensor):
                continue
            if a.shape != b.shape:  # a sharded value: this rank's slice
                torch.testing.assert_close(a, _chunk(b, a, rank, key), msg=key)
    # a Partial output: the ranks' locals differ, and their sum is the full value
    partial = [p["a.fc2/linear"] for p in parts]
    torch.testing.assert_close(partial[0] + partial[1], want["a.fc2/linear"])
    assert not torch.equal(parts[0]["a.fc2/linear"], parts[1]["a.fc2/linear"])


@pytest.mark.parametrize("rank", [None, 1])
def test_tensor_parallel_assembled(runs: str, rank: int | None) -> None:
    path = scenario(runs, "tp")
    want = reference(full_input())
    got = tensorsnap.load(path, rank=rank, assemble=True)
    _check_full(got, want, rank or 0)


def test_tensor_parallel_gathered_at_capture(runs: str) -> None:
    path = scenario(runs, "tp_gather")
    want = reference(full_input())
    for rank in range(WORLD):
        _check_full(tensorsnap.load(path, rank=rank), want, rank)


def _check_full(got: tensorsnap.Snapshot, want: tensorsnap.Snapshot, rank: int) -> None:
    """DTensor values are full; values the model itself handled as local shards stay local."""
    assert list(got) == list(want)
    full = 0
    for key in want:
        a, b = got[key], want[key]
        if not isinstance(b, torch.Tensor):
            continue
        if a.shape == b.shape:
            torch.testing.assert_close(a, b, msg=key)
            full += 1
        else:
            torch.testing.assert_close(a, _chunk(b, a, rank, key), msg=key)
    assert full >= 8


# -- without processes: assembling saved shards, data-parallel parts -------------------------------


def test_assemble_two_dim_mesh() -> None:
    from tensorsnap._dtensor import assemble

    full = torch.arange(48.0).reshape(4, 12)
    mesh = [[0, 1, 2], [3, 4, 5]]
    # mesh dim 0 shards rows, mesh dim 1 shards the columns of each row block
    rows = full.chunk(2, 0)
    locals_ = {mesh[i][j]: rows[i].chunk(3, 1)[j] for i in range(2) for j in range(3)}
    layout = {"placements": ["S(0)", "S(1)"], "mesh": mesh, "shape": [4, 12]}
    assert torch.equal(assemble(locals_, layout), full)
    # both mesh dims on dim 1: the outer one splits first, the inner one splits each part
    cols = full.chunk(2, 1)
    nested = {mesh[i][j]: cols[i].chunk(3, 1)[j] for i in range(2) for j in range(3)}
    layout = {"placements": ["S(1)", "S(1)"], "mesh": mesh, "shape": [4, 12]}
    assert torch.equal(assemble(nested, layout), full)
    # partial over mesh dim 0, replicated over mesh dim 1
    halves = {0: full - 1, 3: torch.ones_like(full)}
    partial = {mesh[i][j]: halves[mesh[i][0]] for i in range(2) for j in range(3)}
    layout = {"placements": ["P(sum)", "R"], "mesh": mesh, "shape": [4, 12]}
    assert torch.equal(assemble(partial, layout), full)
    with pytest.raises(ValueError, match=r"ranks \[5\] of its mesh are missing"):
        assemble({r: t for r, t in locals_.items() if r != 5}, layout)


def test_data_parallel_parts_concatenate_in_rank_order(tmp_path: Any) -> None:
    from tensorsnap import _bundle, _ranks
    from tensorsnap._snapshot import Record, Snapshot

    values = [torch.arange(6.0).reshape(3, 2), torch.arange(6.0, 10.0).reshape(2, 2)]
    for rank, value in enumerate(values):
        snap = Snapshot()
        record = Record("fc", "fc", 0, None, "output", tuple(value.shape), value.dtype, 0)
        snap._add(record._replace(nbytes=value.nbytes), value)
        _bundle.save(snap, tmp_path / "run" / _ranks.part_name(rank), rank=rank, world_size=2)
    _ranks.write_index(tmp_path / "run", 2, concat=True)
    loaded = tensorsnap.load(tmp_path / "run")
    assert torch.equal(loaded["fc"], torch.arange(10.0).reshape(5, 2))
    assert loaded.records[0].shape == (5, 2)
    assert torch.equal(tensorsnap.load(tmp_path / "run", rank=1)["fc"], values[1])
    with pytest.raises(BundleError, match="parts rank-00002 are missing"):
        _ranks.write_index(tmp_path / "run", 3)


def test_data_parallel_extract_concatenates_ranks_in_rank_order(runs: str) -> None:
    path = scenario(runs, "extract")
    got = tensorsnap.load(path)
    model = make_model()
    # the reference: each rank's batches through the unwrapped model, in rank order
    expected: dict[str, list[torch.Tensor]] = {}
    for rank in range(WORLD):
        for batch in extract_batches(rank):
            with torch.no_grad(), tensorsnap.capture(model) as snap:
                model(batch)
            for key in snap:
                expected.setdefault(key, []).append(snap[key])
    assert list(got) == list(expected)
    for key, values in expected.items():
        torch.testing.assert_close(got[key], torch.cat(values), rtol=0, atol=0)
    one = tensorsnap.load(path, rank=1)
    assert one["b"].shape == (9, 8)


def test_data_parallel_per_token_extract_concatenates_token_rows_in_rank_order(runs: str) -> None:
    path = scenario(runs, "extract_tokens")
    got = tensorsnap.load(path)
    model = TokenNet()
    # the reference: each rank's batches through plain cloning hooks, cut by the mask
    expected: dict[str, list[torch.Tensor]] = {"input_ids": [], "emb": [], "fc": []}
    for rank in range(WORLD):
        for batch in token_batches(rank):
            outputs: dict[str, torch.Tensor] = {}
            handles = [
                getattr(model, name).register_forward_hook(
                    lambda m, a, o, name=name, into=outputs: into.__setitem__(name, o.clone())
                )
                for name in ("emb", "fc")
            ]
            with torch.no_grad():
                model(**batch)
            for handle in handles:
                handle.remove()
            keep = batch["attention_mask"].bool()
            expected["input_ids"].append(batch["input_ids"][keep])
            for name in ("emb", "fc"):
                expected[name].append(outputs[name][keep])
    assert list(got) == list(expected)
    for key, values in expected.items():
        assert torch.equal(got[key], torch.cat(values)), key
    one = tensorsnap.load(path, rank=1)
    kept = sum(int(b["attention_mask"].sum()) for b in token_batches(1))
    assert one["fc"].shape == (kept, 4)
