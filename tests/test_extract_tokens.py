"""extract(..., per_token=True): token rows of (B, S, ...) values, padding dropped, ids kept.

The reference is independent of tensorsnap: plain forward hooks that clone every module's output
(conftest.reference_outputs), cut with boolean mask indexing (``value[mask.bool()]``, which
gives rows batch-major) and concatenated by hand with ``torch.cat``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import reference_outputs, tiny_bert, tiny_gpt2, token_ids
from torch import nn

import tensorsnap
from tensorsnap import TensorSnapError


def padded_batches(right: bool = True, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Batches of varying (B, S) with padding (right or left) and one all-padding sequence."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b, s in [(3, 8), (2, 5), (4, 7)]:
        ids = token_ids(b, s, seed=seed + b)
        lengths = torch.randint(1, s + 1, (b,), generator=g)
        lengths[-1] = 0 if b == 4 else lengths[-1]  # a sequence that is all padding
        mask = torch.zeros(b, s, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            if right:
                mask[i, :n] = 1
            elif n:
                mask[i, -n:] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def rows_by_hand(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], keys: list[str]
) -> dict[str, torch.Tensor]:
    """Each key's rows and the kept ids, from cloning hooks and boolean mask indexing."""
    found: dict[str, list[torch.Tensor]] = {"input_ids": []}
    for batch in batches:
        with torch.no_grad(), reference_outputs(model) as outputs:
            model(**batch)
        mask = batch.get("attention_mask")
        keep = (
            torch.ones(batch["input_ids"].shape, dtype=torch.bool) if mask is None else mask.bool()
        )
        found["input_ids"].append(batch["input_ids"][keep])
        for key in keys:
            value = outputs[key]
            tensor = value if isinstance(value, torch.Tensor) else value[0]
            found.setdefault(key, []).append(tensor[keep])
    return {key: torch.cat(parts) for key, parts in found.items()}


GPT2_KEYS = ["transformer.wte", "transformer.h.0", "transformer.h.1.mlp.c_fc", "lm_head"]


@pytest.mark.parametrize("right", [True, False], ids=["right-padded", "left-padded"])
def test_gpt2_rows_match_hooks_and_mask(tmp_path: Any, right: bool) -> None:
    model = tiny_gpt2()
    batches = padded_batches(right)
    expected = rows_by_hand(model, batches, GPT2_KEYS)
    got = tensorsnap.extract(
        model, batches, out=tmp_path / "acts", include=GPT2_KEYS, per_token=True, progress=False
    )
    assert list(got) == ["input_ids", *GPT2_KEYS]
    kept = sum(int(b["attention_mask"].sum()) for b in batches)
    assert got["input_ids"].shape == (kept,) and got["input_ids"].dtype == torch.long
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert got["transformer.h.0"].shape == (kept, 64)
    assert got["lm_head"].shape == (kept, 100)
    record = got.records[0]
    assert (record.key, record.module, record.kind) == ("input_ids", "", "input")


def test_bert_model_output_keeps_its_class(tmp_path: Any) -> None:
    model = tiny_bert()
    batches = padded_batches()
    keys = ["embeddings", "encoder", "encoder.layer.1.output"]
    got = tensorsnap.extract(
        model, batches, out=tmp_path / "acts", include=keys, per_token=True, progress=False
    )
    expected = rows_by_hand(model, batches, keys)
    encoder = got["encoder"]
    with torch.no_grad(), reference_outputs(model) as outputs:
        model(**batches[0])
    assert type(encoder) is type(outputs["encoder"])  # a ModelOutput keeps its class
    assert list(encoder) == ["last_hidden_state"]
    assert torch.equal(encoder.last_hidden_state, expected["encoder"])
    for key in ("embeddings", "encoder.layer.1.output"):
        assert torch.equal(got[key], expected[key]), key


class Tupled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> Any:
        h = self.emb(input_ids)
        return (h, None, 3, {"twice": h, "neg": -h})


def test_nested_values_keep_structure_and_non_tensor_parts(tmp_path: Any) -> None:
    model = Tupled()
    batches = padded_batches()
    got = tensorsnap.extract(model, batches, out=tmp_path / "acts", per_token=True, progress=False)
    keep = [b["attention_mask"].bool() for b in batches]
    rows = torch.cat([model.emb.weight[b["input_ids"][k]] for b, k in zip(batches, keep)])
    value = got[""]
    assert type(value) is tuple and value[1] is None and value[2] == 3
    assert torch.equal(value[0], rows) and torch.equal(value[3]["twice"], rows)
    assert torch.equal(value[3]["neg"], -rows)


def test_without_a_mask_every_position_is_a_row(tmp_path: Any) -> None:
    model = tiny_gpt2()
    batches: list[dict[str, torch.Tensor]] = [
        {"input_ids": token_ids(2, 6, seed=1)},
        {
            "input_ids": token_ids(3, 4, seed=2),
            "attention_mask": torch.ones(3, 4, dtype=torch.long),
        },
    ]
    keys = [*GPT2_KEYS, "transformer.drop"]
    got = tensorsnap.extract(
        model, batches, out=tmp_path / "acts", include=keys, per_token=True, progress=False
    )
    expected = rows_by_hand(model, batches, keys)
    assert got["input_ids"].shape == (2 * 6 + 3 * 4,)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # by transformers' own account too: hidden_states[0] (B, S, D) is (B * S, D), batch-major
    first = batches[0]
    with torch.no_grad():
        hidden = model(**first, output_hidden_states=True).hidden_states[0]
    assert torch.equal(got["transformer.drop"][:12], hidden.reshape(12, 64))
    assert torch.equal(got["input_ids"][:12], first["input_ids"].reshape(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_stores_cast_rows(tmp_path: Any, dtype: torch.dtype) -> None:
    model = tiny_gpt2()
    batches = padded_batches()
    got = tensorsnap.extract(
        model,
        batches,
        out=tmp_path / "acts",
        include=GPT2_KEYS,
        per_token=True,
        dtype=dtype,
        device="cpu",
        progress=False,
    )
    expected = rows_by_hand(model, batches, GPT2_KEYS)
    assert got["input_ids"].dtype == torch.long  # token ids are never cast
    assert torch.equal(got["input_ids"], expected["input_ids"])
    for key in GPT2_KEYS:
        assert got[key].dtype == dtype
        assert torch.equal(got[key], expected[key].to(dtype)), key


class Odd(nn.Module):
    """Values whose rows are cut by every path of the row copier: a contiguous output, one that
    an in-place op rewrites right after it is produced, and a transposed one (not a view once
    flattened)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 6)
        self.lin = nn.Linear(6, 5)
        self.act = nn.ReLU(inplace=True)
        self.flip = Transposed()

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        h = self.lin(self.emb(input_ids))
        h = self.act(h)  # rewrites lin's output in place
        return self.flip(h)


def _assert_odd_rows(model: nn.Module, batches: list[Any], tmp_path: Any, dtype: Any) -> None:
    """A per-token extract of ``Odd`` equals its hook-and-mask rows, cast to ``dtype``."""
    got = tensorsnap.extract(
        model, batches, out=tmp_path / "acts", per_token=True, dtype=dtype, progress=False
    )
    expected = rows_by_hand(model, batches, ["emb", "lin", "act", "flip", ""])
    for key, value in expected.items():
        want = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        assert torch.equal(got[key], want), key
    # the Linear's rows were taken (or their copy queued) before the in-place ReLU ran:
    # negative values survive
    assert bool((got["lin"] < 0).any()) and not bool((got["act"] < 0).any())


class Transposed(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h.transpose(0, 1).contiguous() * 2).transpose(0, 1)  # (B, S, D), S-major memory


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("mask", ["runs", "scattered", "none"])
def test_every_cutting_path_against_hooks(tmp_path: Any, dtype: Any, mask: str) -> None:
    model = Odd()
    g = torch.Generator().manual_seed(0)
    batches = []
    for b, s in [(4, 300), (3, 200)]:  # scattered masks give more runs than are cut one by one
        ids = torch.randint(0, 100, (b, s), generator=g)
        if mask == "runs":
            m = (torch.arange(s) < torch.randint(0, s, (b, 1), generator=g)).long()
        else:
            m = torch.randint(0, 2, (b, s), generator=g)
        batch = {"input_ids": ids, "attention_mask": m.bool() if mask == "scattered" else m}
        if mask == "none":
            del batch["attention_mask"]
        batches.append(batch)
    _assert_odd_rows(model, batches, tmp_path, dtype)


def test_max_memory_spills_and_keeps_values(tmp_path: Any) -> None:
    model = tiny_gpt2()
    batches = padded_batches()
    got = tensorsnap.extract(
        model,
        batches,
        out=tmp_path / "acts",
        include=GPT2_KEYS,
        per_token=True,
        max_memory="4KB",
        progress=False,
    )
    expected = rows_by_hand(model, batches, GPT2_KEYS)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# -- errors --------------------------------------------------------------------------------


def test_pooled_values_raise_naming_every_key_and_the_exclude(tmp_path: Any) -> None:
    model = tiny_bert()
    with pytest.raises(TensorSnapError) as info:
        tensorsnap.extract(
            model,
            padded_batches(),
            out=tmp_path / "acts",
            include=["encoder.layer.0", "pooler", "pooler.dense", "embeddings.*"],
            per_token=True,
            progress=False,
        )
    text = str(info.value)
    assert "batch 0" in text and "(B, S) = (3, 8)" in text
    assert "snap['pooler'] is a tensor of shape (3, 64)" in text
    assert "snap['embeddings.position_embeddings'] is a tensor of shape (1, 8, 64)" in text
    assert "exclude=['embeddings.position_embeddings', 'pooler.dense', 'pooler']" in text
    # the exclude it proposes works
    got = tensorsnap.extract(
        model,
        padded_batches(),
        out=tmp_path / "again",
        include=["encoder.layer.0", "pooler", "pooler.dense", "embeddings.*"],
        exclude=["embeddings.position_embeddings", "pooler.dense", "pooler"],
        per_token=True,
        progress=False,
    )
    assert "pooler" not in got and got["encoder.layer.0"].shape[1] == 64


def test_a_nested_value_names_the_path_inside_it(tmp_path: Any) -> None:
    model = tiny_gpt2()
    with pytest.raises(TensorSnapError, match=r"snap\['transformer.h.0.attn'\]\[1\] is a tensor"):
        tensorsnap.extract(
            model,
            padded_batches(),
            out=tmp_path / "acts",
            include="transformer.h.0.attn",
            per_token=True,
            progress=False,
        )


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([token_ids()], r"batch 0 is a list; per_token=True needs each batch to be a Mapping"),
        ({"x": token_ids()}, r"batch\['input_ids'\] is missing"),
        ({"input_ids": token_ids()[0]}, r"batch\['input_ids'\] is a torch.int64 tensor of shape"),
        (
            {"input_ids": token_ids(), "attention_mask": torch.ones(2, 7)},
            r"batch\['attention_mask'\] is shape \(2, 7\), expected a tensor of input_ids' shape",
        ),
        (
            {"input_ids": token_ids(), "attention_mask": torch.full((2, 8), 2)},
            r"holds values other than 0 and 1 \(e.g. \[2, 2, 2\]\)",
        ),
    ],
    ids=["not-a-mapping", "no-ids", "1-d-ids", "mask-shape", "mask-values"],
)
def test_bad_batches_raise(tmp_path: Any, batch: Any, message: str) -> None:
    with pytest.raises(TensorSnapError, match=message):
        tensorsnap.extract(
            tiny_gpt2(), [batch], out=tmp_path / "acts", per_token=True, progress=False
        )


def test_per_token_must_be_a_bool(tmp_path: Any) -> None:
    with pytest.raises(TensorSnapError, match=r"per_token='yes': pass True"):
        tensorsnap.extract(
            tiny_gpt2(),
            [],
            out=tmp_path / "acts",
            per_token="yes",  # type: ignore[arg-type]
            progress=False,
        )
    assert not os.path.exists(tmp_path / "acts")


class HasInputIds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_ids = nn.Embedding(10, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.input_ids(input_ids)


def test_a_module_named_input_ids_must_be_excluded(tmp_path: Any) -> None:
    batches = [{"input_ids": torch.randint(0, 10, (2, 3))}]
    with pytest.raises(TensorSnapError, match=r"exclude it \(exclude=\['input_ids'\]\)"):
        tensorsnap.extract(
            HasInputIds(), batches, out=tmp_path / "a", per_token=True, progress=False
        )
    got = tensorsnap.extract(
        HasInputIds(), batches, out=tmp_path / "b", exclude="input_ids", per_token=True,
        progress=False,
    )  # fmt: skip
    assert torch.equal(got["input_ids"], batches[0]["input_ids"].reshape(-1))
    assert got[""].shape == (6, 3)


# -- resume --------------------------------------------------------------------------------


def interrupted(batches: list[Any], after: int) -> Iterator[Any]:
    for i, batch in enumerate(batches):
        if i == after:
            raise KeyboardInterrupt
        yield batch


def test_resume_continues_without_losing_or_repeating_a_row(tmp_path: Any) -> None:
    model = tiny_gpt2()
    batches = padded_batches() + padded_batches(right=False, seed=9)
    out = tmp_path / "acts"
    with pytest.raises(KeyboardInterrupt):
        tensorsnap.extract(
            model, interrupted(batches, 4), out=out, include=GPT2_KEYS, per_token=True,
            progress=False,
        )  # fmt: skip
    with pytest.raises(TensorSnapError, match="option 'per_token' differs"):
        tensorsnap.extract(model, batches, out=out, include=GPT2_KEYS, resume=True, progress=False)
    got = tensorsnap.extract(
        model, batches, out=out, include=GPT2_KEYS, per_token=True, resume=True, progress=False
    )
    expected = rows_by_hand(model, batches, GPT2_KEYS)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    again = tensorsnap.extract(
        model, batches, out=out, include=GPT2_KEYS, per_token=True, resume=True, progress=False
    )
    assert torch.equal(again["transformer.h.0"], expected["transformer.h.0"])


def test_old_journals_without_per_token_resume_as_whole_values() -> None:
    from tensorsnap import _extract

    options = _extract._options(None, None, False, False, None)
    saved = {"options": {k: v for k, v in options.items() if k != "per_token"}, "model": {}}
    _extract._check_same("out", saved, options, {})  # no per_token saved: it was False
    with pytest.raises(TensorSnapError, match="option 'per_token' differs"):
        _extract._check_same("out", saved, {**options, "per_token": True}, {})


# -- the writer thread -----------------------------------------------------------------------


def shard_bytes(path: Any) -> dict[str, bytes]:
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    return {n: (path / n).read_bytes() for n in names}


@pytest.mark.parametrize("per_token", [True, False])
def test_a_writer_thread_writes_the_same_bytes(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, per_token: bool
) -> None:
    from tensorsnap import _stream

    model = tiny_gpt2()
    batches = padded_batches() + padded_batches(right=False, seed=9)
    if not per_token:  # whole values: one sequence length for every batch
        batches = [{"input_ids": token_ids(2, 6, seed=i)} for i in range(5)]
    options: dict[str, Any] = dict(include=GPT2_KEYS, per_token=per_token, progress=False)
    files = {}
    for background in (False, True):
        monkeypatch.setattr(_stream, "BACKGROUND", background)
        out = tmp_path / f"bg-{background}"
        got = tensorsnap.extract(model, batches, out=out, **options)
        files[background] = shard_bytes(out)
        if per_token:
            expected = rows_by_hand(model, batches, GPT2_KEYS)
            for key, value in expected.items():
                assert torch.equal(got[key], value), key
    assert files[True] == files[False] and len(files[True]) == len(GPT2_KEYS) + per_token


def test_a_writer_thread_resumes_after_an_interruption(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorsnap import _stream

    monkeypatch.setattr(_stream, "BACKGROUND", True)
    model = tiny_gpt2()
    batches = padded_batches() + padded_batches(right=False, seed=9)
    out = tmp_path / "acts"
    options: dict[str, Any] = dict(include=GPT2_KEYS, per_token=True, progress=False)
    with pytest.raises(KeyboardInterrupt):
        tensorsnap.extract(model, interrupted(batches, 5), out=out, **options)
    got = tensorsnap.extract(model, batches, out=out, resume=True, **options)
    expected = rows_by_hand(model, batches, GPT2_KEYS)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# -- device-to-host copies left in flight (tensorsnap._transfer) --------------------------------


class Deferred:
    """Device copies run as late as a real side stream may run them: only when a fence after
    them is waited for, reading their sources then. A copy's destination is poisoned (all bits
    set: NaN, -1) when it is queued, so bytes read before the wait are wrong; a source that the
    model writes in place after the copy was queued gives the later value; and queueing a copy
    into a staging buffer that a copy still in flight writes fails at once."""

    pins = False

    def __init__(self) -> None:
        self.queue: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ran = 0  # copies run so far (a prefix of the queue, as on one stream)
        self.fenced = 0
        self.waited_in: set[str] = set()  # threads that waited for fences

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        for pending, _ in self.queue[self.ran :]:
            if pending.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr():
                raise AssertionError("a staging buffer was reused while a copy into it ran")
        dst.view(torch.uint8).fill_(0xFF)
        self.queue.append((dst, src))

    def fence(self) -> Any:
        if self.fenced == len(self.queue):
            return None
        self.fenced = upto = len(self.queue)
        deferred = self

        class Fence:
            def synchronize(self) -> None:
                import threading

                deferred.waited_in.add(threading.current_thread().name.split("_")[0])
                for dst, src in deferred.queue[deferred.ran : upto]:
                    dst.copy_(src)
                deferred.ran = max(deferred.ran, upto)

        return Fence()


def deferred_copies(monkeypatch: pytest.MonkeyPatch) -> Deferred:
    """Every value's rows go through one Deferred, as rows from a CUDA device would."""
    from tensorsnap import _rows

    fake = Deferred()
    monkeypatch.setattr(_rows, "transfers_for", lambda source, target: fake)
    return fake


@pytest.mark.parametrize("background", [False, True], ids=["loop", "writer-thread"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("mask", ["runs", "none"])
def test_copies_left_in_flight_give_the_hooks_values(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, background: bool, dtype: Any, mask: str
) -> None:
    from tensorsnap import _stream

    monkeypatch.setattr(_stream, "BACKGROUND", background)
    fake = deferred_copies(monkeypatch)
    model = Odd()
    g = torch.Generator().manual_seed(1)
    batches = []
    for b, s in [(4, 30), (3, 20), (4, 30), (2, 10)]:
        batch = {"input_ids": torch.randint(0, 100, (b, s), generator=g)}
        if mask == "runs":
            lengths = torch.randint(0, s + 1, (b, 1), generator=g)
            batch["attention_mask"] = (torch.arange(s) < lengths).long()
        batches.append(batch)
    _assert_odd_rows(model, batches, tmp_path, dtype)
    # every value of every batch (ids and 5 modules) went through the deferred copies, and
    # the fences were waited for where the bytes are written
    assert len(fake.queue) == 6 * len(batches) and fake.ran == len(fake.queue)
    assert fake.waited_in == ({"tensorsnap-extract"} if background else {"MainThread"})


def test_gpt2_rows_through_copies_left_in_flight(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = deferred_copies(monkeypatch)
    model = tiny_gpt2()
    batches = padded_batches() + padded_batches(right=False, seed=9)
    expected = rows_by_hand(model, batches, GPT2_KEYS)
    got = tensorsnap.extract(
        model, batches, out=tmp_path / "acts", include=GPT2_KEYS, per_token=True, progress=False
    )
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert len(fake.queue) == (len(GPT2_KEYS) + 1) * len(batches)


def test_with_max_memory_each_copy_is_waited_for_as_it_is_made(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = deferred_copies(monkeypatch)
    queued = Deferred.copy

    def copy_then_check(self: Deferred, dst: torch.Tensor, src: torch.Tensor) -> None:
        assert self.ran == len(self.queue)  # the copy before was waited for
        queued(self, dst, src)

    monkeypatch.setattr(Deferred, "copy", copy_then_check)
    model = tiny_gpt2()
    batches = padded_batches()
    got = tensorsnap.extract(
        model,
        batches,
        out=tmp_path / "acts",
        include=GPT2_KEYS,
        per_token=True,
        max_memory="4KB",  # values spill as they are stored: their bytes must be there
        progress=False,
    )
    expected = rows_by_hand(model, batches, GPT2_KEYS)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert fake.ran == len(fake.queue) == (len(GPT2_KEYS) + 1) * len(batches)


def test_the_row_copier_returns_fences_and_copies_a_private_source() -> None:
    from tensorsnap import _rows

    fake = Deferred()
    rows = _rows.RowCopier()
    rows._transfers[torch.device("cpu")] = fake
    ids = token_ids(2, 3, seed=0)
    live = torch.randn(2, 3, 4)
    before = live.clone()
    ids_rows = rows.begin(_rows.positions({"input_ids": ids}, 0))
    got = rows.copy_value(live, "snap['x']")
    live.mul_(2)  # the model writes its value in place after it was captured
    fences = rows.end()
    assert len(fences) == 1 and bool(got.isnan().all())  # in flight: nothing is there yet
    fences[0].synchronize()
    assert torch.equal(got, before.reshape(6, 4)) and torch.equal(ids_rows, ids.reshape(6))
    assert rows.end() == [] and fake.fence() is None  # nothing queued since


# -- writeback started per batch (_stream._writeback) -------------------------------------------


@pytest.mark.parametrize("background", [False, True], ids=["loop", "writer-thread"])
def test_writeback_is_asked_for_every_byte_once_in_order(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    from tensorsnap import _stream

    monkeypatch.setattr(_stream, "BACKGROUND", background)
    monkeypatch.setattr(_stream, "_WRITEBACK_BYTES", 600)
    asked: dict[str, list[tuple[int, int]]] = {}
    real = _stream._writeback

    def record(fd: int, offset: int, nbytes: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        assert os.fstat(fd).st_size >= offset + nbytes  # only bytes already written
        asked.setdefault(name, []).append((offset, nbytes))
        real(fd, offset, nbytes)

    monkeypatch.setattr(_stream, "_writeback", record)
    model = tiny_gpt2()
    batches = padded_batches() + padded_batches(right=False, seed=9)
    out = tmp_path / "acts"
    got = tensorsnap.extract(
        model, batches, out=out, include=GPT2_KEYS, per_token=True, progress=False
    )
    expected = rows_by_hand(model, batches, GPT2_KEYS)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # the activations' shards (the token ids' one holds less than 600 bytes in all)
    assert len(asked) == len(GPT2_KEYS)
    for name, ranges in asked.items():
        # contiguous from the data's start, each at least the threshold, and what is left
        # after the last less than it (plus the blob padding the end adds)
        starts = [_stream._DATA_START] + [offset + n for offset, n in ranges[:-1]]
        assert [offset for offset, _ in ranges] == starts, name
        assert all(n >= 600 for _, n in ranges), name
        left = (out / name).stat().st_size - (ranges[-1][0] + ranges[-1][1])
        assert 0 <= left < 600 + 16, name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_sync_file_range_is_found_and_accepts_a_written_range(tmp_path: Any) -> None:
    from tensorsnap import _stream

    assert _stream._SYNC_FILE_RANGE is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 10000)
        assert _stream._SYNC_FILE_RANGE(fd, 0, 10000, _stream._SYNC_FILE_RANGE_WRITE) == 0
        assert _stream._SYNC_FILE_RANGE(-1, 0, 10000, _stream._SYNC_FILE_RANGE_WRITE) == -1
    finally:
        os.close(fd)
