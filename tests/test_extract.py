"""tensorsnap.extract: captures over many batches, streamed into one bundle.

References are independent of extract: plain forward hooks that clone (conftest) run batch by
batch and concatenated by hand with ``torch.cat``; resumed runs are compared byte for byte with
an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import torch
from conftest import reference_outputs, tiny_gpt2, token_ids
from torch import nn

import tensorsnap
from tensorsnap import TensorSnapError, _stream


class Pair(NamedTuple):
    low: torch.Tensor
    high: torch.Tensor


class Net(nn.Module):
    """Linear layers, an in-place ReLU, a nested output, an optional keyword input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> Any:
        h = self.fc1(x)
        if scale is not None:
            h = h * scale
        h = self.act(h)
        y = self.fc2(h)
        return {"y": y, "pair": Pair(y.min(dim=1).values, y.max(dim=1).values), "n": 3}


def data(count: int = 5, rows: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows + i % 3, 6, generator=g) for i in range(count)]


def by_hand(model: nn.Module, batches: list[Any]) -> dict[str, list[Any]]:
    """Module outputs per batch from plain cloning hooks (no tensorsnap involved)."""
    found: dict[str, list[Any]] = {}
    for batch in batches:
        with torch.no_grad(), reference_outputs(model) as outputs:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, tuple):
                model(*batch)
            else:
                model(batch)
        for key, value in outputs.items():
            found.setdefault(key, []).append(value)
    return found


def run(model: nn.Module, batches: Any, out: Any, **options: Any) -> tensorsnap.Snapshot:
    return tensorsnap.extract(model, batches, out=out, progress=False, **options)


def files(path: Any) -> dict[str, bytes]:
    found = {}
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            found[name] = f.read()
    return found


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "generator"])
def test_equals_per_batch_hook_outputs_concatenated(tmp_path: Any, kind: str) -> None:
    model = Net()
    xs = data()
    scales = [torch.full((1, 8), 0.5 + i) for i in range(len(xs))]
    batches: list[Any]
    if kind == "tuple":
        batches = [(x, s) for x, s in zip(xs, scales)]
    elif kind == "dict":
        batches = [{"x": x, "scale": s} for x, s in zip(xs, scales)]
    else:
        batches = list(xs)
    expected = by_hand(model, batches)
    source = (b for b in batches) if kind == "generator" else batches
    got = run(model, source, tmp_path / "out")

    assert list(got) == ["fc1", "act", "fc2", ""]
    for key in ["fc1", "act", "fc2"]:
        assert torch.equal(got[key], torch.cat(expected[key])), key
    root = got[""]
    assert type(root) is dict and root["n"] == 3
    assert torch.equal(root["y"], torch.cat([v["y"] for v in expected[""]]))
    assert type(root["pair"]) is Pair
    assert torch.equal(root["pair"].high, torch.cat([v["pair"].high for v in expected[""]]))
    rows = sum(len(x) for x in xs)
    record = got.records[2]
    assert (record.key, record.shape, record.dtype) == ("fc2", (rows, 4), torch.float32)
    assert record.nbytes == rows * 4 * 4
    # fc1's output was copied before the in-place ReLU changed it
    assert (got["fc1"] < 0).any() and not (got["act"] < 0).any()


def test_ops_inputs_and_call_counters_restart_each_batch(tmp_path: Any) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.lin(self.lin(x)))

    torch.manual_seed(0)
    model = Twice()
    xs = [torch.randn(2, 3), torch.randn(5, 3)]
    got = run(model, xs, tmp_path / "out", ops=True, inputs=True)
    assert list(got) == [":in", "lin:in", "lin/linear", "lin", "lin#1:in", "lin#1/linear",
                         "lin#1", "/relu", ""]  # fmt: skip
    with torch.no_grad():
        first = [model.lin(x) for x in xs]
        second = [model.lin(f) for f in first]
    assert torch.equal(got["lin"], torch.cat(first))
    assert torch.equal(got["lin#1"], torch.cat(second))
    assert torch.equal(got["/relu"], torch.relu(torch.cat(second)))
    assert type(got["lin#1:in"]) is tuple and torch.equal(got["lin#1:in"][0], torch.cat(first))


def test_zero_dim_values_are_stacked_and_first_dims_concatenated_as_they_are(
    tmp_path: Any,
) -> None:
    class Stats(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            # a 0-dim value, and one whose first dim is not the batch
            return x.sum(), x.mean(dim=0, keepdim=True)

    xs = data(4)
    got = run(Stats(), xs, tmp_path / "out")
    total, mean = got[""]
    assert total.shape == (4,)
    assert torch.equal(total, torch.stack([x.sum() for x in xs]))
    assert torch.equal(mean, torch.cat([x.mean(dim=0, keepdim=True) for x in xs]))


def test_dtype_include_exclude(tmp_path: Any) -> None:
    model = Net()
    xs = data(3)
    got = run(model, xs, tmp_path / "a", include=["fc*"], exclude="fc2", dtype=torch.float16)
    assert list(got) == ["fc1"]
    expected = torch.cat(by_hand(model, xs)["fc1"])
    assert got["fc1"].dtype == torch.float16
    assert torch.equal(got["fc1"], expected.to(torch.float16))
    with pytest.raises(TensorSnapError, match=r"'fc3' matched no key"):
        run(model, xs, tmp_path / "b", include="fc3")


def test_train_and_eval_modes_are_left_alone(tmp_path: Any) -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    model.train()
    model[2].eval()
    xs = data(3)
    torch.manual_seed(7)
    expected = by_hand(model, xs)
    torch.manual_seed(7)
    got = run(model, xs, tmp_path / "out")
    assert [m.training for m in model.modules()] == [True, True, True, False]
    # dropout ran in training mode, drawing the same random masks as the hand-made run
    assert (got["1"] == 0).float().mean() > 0.2
    assert torch.equal(got["1"], torch.cat(expected["1"]))
    assert torch.is_grad_enabled()  # no_grad ended with the run


def test_empty_batches_are_refused_and_leave_nothing(tmp_path: Any) -> None:
    # an empty bundle would later be returned by resume=True as if it were the real result
    with pytest.raises(TensorSnapError, match=r"batches= is empty, so there is nothing"):
        run(Net(), [], tmp_path / "out")
    with pytest.raises(TensorSnapError, match=r"batches= yielded no batch"):
        run(Net(), iter([]), tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    (tmp_path / "mine").mkdir()  # an empty directory the user made stays, empty
    with pytest.raises(TensorSnapError, match=r"batches= yielded no batch"):
        run(Net(), (b for b in []), tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == []
    got = run(Net(), data(2), tmp_path / "out")  # the path is free again
    assert got["fc1"].shape == (9, 8)


def test_tiny_gpt2_over_dict_batches(tmp_path: Any) -> None:
    model = tiny_gpt2()
    batches = [{"input_ids": token_ids(2, 8, seed=s), "use_cache": False} for s in range(3)]
    expected = by_hand(model, batches)
    got = run(model, batches, tmp_path / "out", ops=True, exclude="*:*")
    assert "transformer.h.1.attn/softmax" in got
    for key in ["transformer.h.0.mlp", "transformer.h.1.attn.c_attn", "lm_head"]:
        assert torch.equal(got[key], torch.cat(expected[key])), key
    logits = got[""]["logits"]
    assert logits.shape == (6, 8, 100)
    assert torch.equal(logits, torch.cat([v["logits"] for v in expected[""]]))


# -- errors --------------------------------------------------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) if x.shape[0] > 4 else y


def test_missing_and_new_keys_name_key_and_batch(tmp_path: Any) -> None:
    model = Branchy()
    small, big = torch.randn(3, 6), torch.randn(6, 6)
    with pytest.raises(TensorSnapError, match=r"key 'b' is missing from batch 2 .*exclude"):
        run(model, [big, big, small], tmp_path / "a")
    with pytest.raises(TensorSnapError, match=r"key 'b' appears in batch 1 but not in the first"):
        run(model, [small, big], tmp_path / "b")
    got = run(model, [small, big], tmp_path / "c", exclude="b")
    assert got["a"].shape == (9, 6)


class Echo(nn.Module):
    def forward(self, *args: Any) -> Any:
        return args


def test_shape_and_dtype_differences_beyond_dim_0_name_key_and_batch(tmp_path: Any) -> None:
    model = nn.Identity()
    batches = [torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 5)]
    with pytest.raises(
        TensorSnapError, match=r"batch 2: snap\[''\] is torch.float32 of shape \(2, 5\), the "
        r"first batch had torch.float32 of shape \(\*, 3\)"
    ):  # fmt: skip
        run(model, batches, tmp_path / "a")
    with pytest.raises(TensorSnapError, match=r"batch 1: snap\[''\] is torch.int64"):
        run(model, [torch.zeros(2), torch.zeros(2, dtype=torch.long)], tmp_path / "b")
    with pytest.raises(TensorSnapError, match=r"batch 1: snap\[''\]\[1\] differs in structure"):
        run(Echo(), [(torch.zeros(1), 1), (torch.zeros(1), 2)], tmp_path / "c")


def test_existing_out_and_option_changes_are_refused(tmp_path: Any) -> None:
    model = Net()
    xs = data(3)
    out = tmp_path / "out"
    run(model, xs, out, include="fc*", ops=True)
    before = files(out)

    def untouched() -> Iterator[torch.Tensor]:
        raise AssertionError("a finished bundle must not run the batches again")
        yield  # pragma: no cover

    again = run(model, untouched(), out, include="fc*", ops=True, resume=True)
    assert files(out) == before
    assert torch.equal(again["fc1"], tensorsnap.load(out)["fc1"])
    with pytest.raises(TensorSnapError, match=r"already holds a finished bundle; pass resume=True"):
        run(model, xs, out, include="fc*", ops=True)
    changes: list[tuple[dict[str, Any], str]] = [
        ({"include": "fc1", "ops": True}, "include"),
        ({"include": "fc*", "exclude": "x", "ops": True}, "exclude"),
        ({"include": "fc*"}, "ops"),
        ({"include": "fc*", "ops": True, "inputs": True}, "inputs"),
        ({"include": "fc*", "ops": True, "dtype": torch.bfloat16}, "dtype"),
    ]
    for options, name in changes:
        with pytest.raises(TensorSnapError, match=rf"option '{name}' differs"):
            run(model, xs, out, resume=True, **options)
    with pytest.raises(TensorSnapError, match=r"another model \(option 'model'"):
        run(Branchy(), xs, out, include="fc*", ops=True, resume=True)
    assert files(out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TensorSnapError, match=r"not empty and is not an extract output"):
        run(model, xs, tmp_path / "other", resume=True)


def test_an_interrupted_out_does_not_load_and_refuses_a_fresh_run(tmp_path: Any) -> None:
    model = Net()

    def failing() -> Iterator[torch.Tensor]:
        yield from data(3)
        raise RuntimeError("data loader broke")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="data loader broke"):
        run(model, failing(), out)
    with pytest.raises(TensorSnapError, match=r"unfinished tensorsnap.extract .*resume=True"):
        tensorsnap.load(out)
    with pytest.raises(TensorSnapError, match=r"unfinished extract \(3 batches done\)"):
        run(model, data(5), out)
    # the three batches done are kept: only the last two run again
    seen = []

    def counted() -> Iterator[torch.Tensor]:
        for i, x in enumerate(data(5)):
            seen.append(i)
            yield x

    calls = []
    handle = model.fc1.register_forward_hook(lambda *a: calls.append(1))
    got = run(model, counted(), out, resume=True)
    handle.remove()
    assert seen == [0, 1, 2, 3, 4] and len(calls) == 2
    assert torch.equal(got["fc2"], torch.cat(by_hand(model, data(5))["fc2"]))
    with pytest.raises(RuntimeError):
        run(model, failing(), tmp_path / "out2")
    with pytest.raises(TensorSnapError, match=r"batches ended after 2, but the interrupted run"):
        run(model, data(2), tmp_path / "out2", resume=True)


def test_resuming_with_other_batches_is_refused_and_the_right_ones_still_resume(
    tmp_path: Any,
) -> None:
    model = Net()
    batches = data(5)

    def failing(items: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        yield from items[:3]
        raise RuntimeError("data loader broke")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="data loader broke"):
        run(model, failing(batches), out)
    shuffled = [batches[1], batches[0], *batches[2:]]  # same shapes, same count, other order
    with pytest.raises(TensorSnapError, match=r"the first 3 batches are not those .* same order"):
        run(model, shuffled, out, resume=True)
    changed = [*batches[:2], batches[2] + 1e-6, *batches[3:]]  # one value differs
    with pytest.raises(TensorSnapError, match=r"the first 3 batches are not those"):
        run(model, changed, out, resume=True)
    got = run(model, batches, out, resume=True)  # the refusals changed nothing
    assert torch.equal(got["fc2"], torch.cat(by_hand(model, batches)["fc2"]))


def test_a_refused_resume_names_inputs_the_model_changes_in_place(tmp_path: Any) -> None:
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 2))
    out = tmp_path / "out"

    def shared() -> list[torch.Tensor]:
        x = data(1)[0]
        return [x, x, x]  # one tensor, rewritten by the in-place ReLU of every batch

    def interrupted(batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        yield from batches[:2]
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        run(model, interrupted(shared()), out)
    with pytest.raises(TensorSnapError, match=r"changes in place and that later batches reuse"):
        run(model, shared(), out, resume=True)


def test_dict_batches_with_plain_values_have_a_stable_checksum() -> None:
    from tensorsnap._extract import inputs_crc32

    def batch(text: str) -> dict[str, Any]:
        return {"ids": torch.arange(6).view(2, 3), "text": [text, "b"], "flag": True, "x": object()}

    assert inputs_crc32(batch("a"), 0) == inputs_crc32(batch("a"), 0)  # object() by type only
    assert inputs_crc32(batch("a"), 0) != inputs_crc32(batch("c"), 0)
    ids = torch.arange(6)
    assert inputs_crc32(ids.view(2, 3), 0) != inputs_crc32(ids.view(3, 2), 0)  # same bytes
    assert inputs_crc32(ids, 0) != inputs_crc32(ids.float(), 0)
    assert inputs_crc32({"a": ids, "b": ids}, 0) != inputs_crc32({"b": ids, "a": ids}, 0)
    # a large input counts by samples: a change at a sampled element shows, and the checksum
    # is the same for a contiguous tensor and a transposed copy of its transpose
    big = torch.randn(1024, 512)
    changed = big.clone()
    changed[0, 0] += 1
    assert inputs_crc32(big, 0) != inputs_crc32(changed, 0)
    assert inputs_crc32(big, 0) == inputs_crc32(big.t().contiguous().t(), 0)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_inputs_without_plain_values_are_accepted_and_large_ones_sampled_in_place(
    tmp_path: Any,
) -> None:
    from tensorsnap._extract import inputs_crc32

    class Graph(nn.Module):
        """A graph layer taking a sparse adjacency matrix."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 4)

        def forward(self, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.sparse.mm(adjacency, self.lin(x))

    adjacency = torch.eye(5).to_sparse()
    batches = [(adjacency, x[:5]) for x in data(3, rows=5)]
    got = run(Graph(), batches, tmp_path / "graph")
    assert got["lin"].shape == (15, 4)
    complex_values = torch.randn(3, dtype=torch.complex64)
    unusual = [
        torch.eye(3).to_sparse_csr(),
        torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
        torch.empty(3, device="meta"),
        complex_values.conj(),
        torch.randn(1, 4096).expand(4096, 4096),  # 64 MiB seen, 16 KiB stored
    ]
    two = pytest.importorskip("torch.testing._internal.two_tensor")
    cyclic: list[Any] = [torch.ones(2)]
    cyclic.append(cyclic)
    unusual += [
        two.TwoTensor(torch.randn(2), torch.randn(2)),  # a wrapper subclass: no .numpy()
        cyclic,  # a batch that refers to itself
        10**5000,  # more digits than int-to-str allows
    ]
    for value in unusual:
        assert inputs_crc32({"x": value}, 0) == inputs_crc32({"x": value}, 0)
    assert inputs_crc32(complex_values.conj(), 0) == inputs_crc32(
        complex_values.conj().resolve_conj(), 0
    )
    # a large conjugate view is sampled as its values, not materialised
    wide = torch.randn(1, 1 << 18, dtype=torch.complex64).expand(4, -1)
    assert inputs_crc32(wide.conj(), 0) == inputs_crc32(wide.conj().resolve_conj().clone(), 0)
    assert inputs_crc32({"a": 1}, 0) != inputs_crc32(["a", 1], 0)

    class Unwrap(nn.Module):
        def forward(self, x: Any) -> torch.Tensor:
            return x.a + x.b

    extracted = run(Unwrap(), [two.TwoTensor(torch.ones(2), torch.ones(2))], tmp_path / "two")
    assert torch.equal(extracted[""], torch.full((2,), 2.0))


def test_a_journal_without_an_inputs_checksum_still_resumes(tmp_path: Any) -> None:
    import json

    model = Net()
    batches = data(5)

    def failing() -> Iterator[torch.Tensor]:
        yield from batches[:3]
        raise RuntimeError("data loader broke")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        run(model, failing(), out)
    journal = out / "extract-journal.json"
    state = json.loads(journal.read_text())
    assert isinstance(state.pop("inputs_crc32"), int)
    journal.write_text(json.dumps(state))  # as a journal written before the checksum existed
    got = run(model, batches, out, resume=True)
    assert torch.equal(got["fc2"], torch.cat(by_hand(model, batches)["fc2"]))


# -- kill -9 and resume ----------------------------------------------------------------------------


def gpt_batches(count: int = 6) -> list[dict[str, Any]]:
    return [{"input_ids": token_ids(2, 6, seed=s), "use_cache": False} for s in range(count)]


def killed_run(out: Any, setup: Any, model: nn.Module) -> None:
    """Run extract in a forked child that ``setup`` arranges to SIGKILL itself part way."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            signal.alarm(60)
            torch.set_num_threads(1)  # no OpenMP pool in a forked child
            setup()
            run(model, gpt_batches(), out, ops=True, resume=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def kill_at_call(module: Any, name: str, n: int) -> Any:
    real = getattr(module, name)
    count = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return lambda: setattr(module, name, wrapper)


def kill_at_batch(n: int) -> Any:
    real = gpt_batches

    def batches(count: int = 6) -> Iterator[dict[str, Any]]:
        for i, batch in enumerate(real(count)):
            if i == n:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    return lambda: setattr(sys.modules[__name__], "gpt_batches", batches)


def test_kill_9_at_any_moment_then_resume_is_bitwise_equal(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(_stream, "_COMMIT_SECONDS", 0.0)  # journal after every batch
    model = tiny_gpt2(n_layer=1)
    got_reference = run(model, gpt_batches(), tmp_path / "reference", ops=True)
    reference = files(tmp_path / "reference")
    # 102 shards: each batch is 102 writes, then (here) 102 fsyncs and a journal entry
    moments = {
        "before the first batch": [kill_at_batch(0)],
        "between batches": [kill_at_batch(4)],
        "writing batch data": [kill_at_call(_stream, "write_all", 250)],
        "fsyncing for a journal entry": [kill_at_call(os, "fsync", 150)],
        "renaming a journal entry": [kill_at_call(os, "replace", 3)],
        "sealing the shards": [kill_at_call(os, "pwrite", 5)],
        "renaming the manifest": [kill_at_call(os, "replace", 8)],
        "removing the journal": [kill_at_call(os, "unlink", 1)],
        "twice": [kill_at_batch(2), kill_at_call(_stream, "write_all", 150)],
    }
    for moment, setups in moments.items():
        out = tmp_path / moment.replace(" ", "-")
        for setup in setups:
            killed_run(out, setup, model)
        if moment == "removing the journal":  # the manifest was in place: complete
            assert torch.equal(tensorsnap.load(out)["lm_head"], got_reference["lm_head"])
        else:
            with pytest.raises(TensorSnapError, match=r"unfinished tensorsnap\.extract"):
                tensorsnap.load(out)
        got = run(model, gpt_batches(), out, ops=True, resume=True)
        assert files(out) == reference, moment
        assert torch.equal(got["lm_head"], got_reference["lm_head"])


# -- memory --------------------------------------------------------------------------------------


def test_peak_memory_does_not_grow_with_the_number_of_batches(tmp_path: Any) -> None:
    script = textwrap.dedent(
        """
        import sys, torch, tensorsnap
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.ReLU())
        def batches(n):
            for i in range(n):
                yield torch.randn(128, 64)
        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        tensorsnap.extract(model, batches(3), out=sys.argv[1] + "/warm", progress=False,
                           max_memory="20MB")
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        snap = tensorsnap.extract(model, batches(200), out=sys.argv[1] + "/big",
                                  progress=False, max_memory="20MB")
        print(status("VmHWM") - base, snap["0"].shape[0])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    growth, rows = map(int, result.stdout.split())
    assert rows == 200 * 128  # 600 MB of copies went through: 30x the budget
    assert growth < 20e6, f"peak RSS grew by {growth / 1e6:.1f} MB"
