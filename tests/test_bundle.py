"""Bundles round-trip snapshots: every dtype bitwise, structures, views, records, lazily."""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import json
import math
import os
import struct
import zlib
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import tensorsnap
from tensorsnap import _bundle, _ranks, _shards
from tensorsnap._errors import BundleError, BundleWarning
from tensorsnap._snapshot import Record, Snapshot


class Pair(NamedTuple):
    left: Any
    right: Any


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: Any
    label: str = "f"


def make(values: dict[str, Any]) -> Snapshot:
    """A snapshot built by hand, as a capture would fill it."""
    snap = Snapshot()
    for i, (key, value) in enumerate(values.items()):
        is_tensor = isinstance(value, torch.Tensor)
        snap._add(
            Record(
                key=key,
                module=key.split("/")[0],
                call=i,
                op="relu" if "/" in key else None,
                kind="op" if "/" in key else "output",
                shape=tuple(value.shape) if is_tensor else None,
                dtype=value.dtype if is_tensor else None,
                nbytes=value.nbytes if is_tensor else 0,
            ),
            value,
        )
    return snap


def raw(t: torch.Tensor) -> bytes:
    """The bytes of every element, in logical order (independent of layout)."""
    if t.numel() == 0:
        return b""
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.reshape(-1))
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    count = math.prod(shape) * dtype.itemsize
    data = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        data = data % 2
    return data.view(dtype).reshape(shape)


DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.complex32,
    torch.complex64,
    torch.complex128,
]


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bitwise(tmp_path: Any, dtype: torch.dtype) -> None:
    value = random_tensor(dtype, (3, 5), seed=DTYPES.index(dtype))
    expected = raw(value)
    make({"x": value}).save(tmp_path / "b")
    got = tensorsnap.load(tmp_path / "b")["x"]
    assert got.dtype == dtype and got.shape == (3, 5) and got.stride() == (5, 1)
    assert raw(got) == expected
    # the shard is a plain safetensors file: read the blob with safetensors itself
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_bytes())
    blob = manifest["records"][0]["blobs"][0]
    with safe_open(str(tmp_path / "b" / "shard-00000.safetensors"), "pt") as f:
        stored = f.get_tensor(blob["name"])
    stored_bytes = bytes(stored.view(torch.uint8).numpy().tobytes())
    assert stored_bytes[: len(expected)] == expected
    assert set(stored_bytes[len(expected) :]) <= {0}  # padding only
    native = dtype in _shards.NATIVE
    assert stored.dtype == (dtype if native else torch.uint8)


def test_float_payloads_and_signed_zero(tmp_path: Any) -> None:
    value = torch.tensor([0.0, -0.0, math.inf, -math.inf], dtype=torch.float32)
    payloads = bytearray(struct.pack("<2I", 0x7FC00001, 0xFFA00000))  # NaNs with payloads
    value = torch.cat([value, torch.frombuffer(payloads, dtype=torch.float32)])
    make({"x": value}).save(tmp_path / "b")
    assert raw(tensorsnap.load(tmp_path / "b")["x"]) == raw(value)


def test_records_and_order_round_trip(tmp_path: Any) -> None:
    values = {"z": torch.ones(2), "a/relu": torch.zeros(3, dtype=torch.int64), "m": (1, 2)}
    snap = make(values)
    snap.save(tmp_path / "b")
    loaded = tensorsnap.load(tmp_path / "b")
    assert list(loaded) == ["z", "a/relu", "m"]
    assert loaded.records == snap.records
    assert loaded.records[1].dtype is torch.int64 and loaded.records[2].shape is None


def test_nested_structures_keep_their_types(tmp_path: Any) -> None:
    t = torch.arange(6.0)
    factory_dict: collections.defaultdict[str, list[int]] = collections.defaultdict(list)
    factory_dict["a"].append(1)
    value = {
        "tuple": (t, None, 3),
        "list": [t[1:3], "text", b"\x00\xff"],
        1: Pair(t, {"x": 2.5}),
        (2, "k"): Frozen(x=[True, 1 + 2j], label="L"),
        "ordered": collections.OrderedDict([("b", 1), ("a", t)]),
        "default": factory_dict,
        "set": {1, 2, 3},
        "frozen": frozenset({"x"}),
        "meta": (torch.Size([2, 3]), torch.float16, torch.device("cpu")),
        "floats": (-0.0, math.inf, 1e-310, 2**70),
    }
    make({"v": value}).save(tmp_path / "b")
    got = tensorsnap.load(tmp_path / "b")["v"]
    assert type(got) is dict and list(got) == list(value)
    assert type(got["tuple"]) is tuple and torch.equal(got["tuple"][0], t)
    assert got["tuple"][1:] == (None, 3)
    assert type(got["list"]) is list and got["list"][1:] == ["text", b"\x00\xff"]
    assert torch.equal(got["list"][0], t[1:3])
    assert type(got[1]) is Pair and got[1].right == {"x": 2.5}
    assert got[(2, "k")] == Frozen(x=[True, 1 + 2j], label="L")
    assert type(got[(2, "k")]) is Frozen
    assert type(got["ordered"]) is collections.OrderedDict and list(got["ordered"]) == ["b", "a"]
    assert type(got["default"]) is collections.defaultdict
    assert got["default"].default_factory is list and got["default"] == {"a": [1]}
    assert got["set"] == {1, 2, 3} and got["frozen"] == frozenset({"x"})
    assert got["meta"] == (torch.Size([2, 3]), torch.float16, torch.device("cpu"))
    assert type(got["meta"][0]) is torch.Size
    floats = got["floats"]
    assert math.copysign(1, floats[0]) == -1 and floats[1:] == (math.inf, 1e-310, 2**70)
    # the same tensor object twice comes back as one object
    assert got["tuple"][0] is got[1].left


def test_same_tensor_twice_is_one_object(tmp_path: Any) -> None:
    t = torch.randn(4)
    make({"v": [t, t]}).save(tmp_path / "b")
    got = tensorsnap.load(tmp_path / "b")["v"]
    assert got[0] is got[1]


def gpt2() -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_transformers_model_output_comes_back_as_its_class(tmp_path: Any) -> None:
    model = gpt2()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        out = tensorsnap.snapshot(model(ids, use_cache=False, output_hidden_states=True))
    make({"": out}).save(tmp_path / "b")
    got = tensorsnap.load(tmp_path / "b")[""]
    assert type(got) is type(out)
    assert list(got.keys()) == list(out.keys())
    assert torch.equal(got.logits, out.logits) and torch.equal(got["logits"], out.logits)
    assert type(got.hidden_states) is tuple and len(got.hidden_states) == 3
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, out.hidden_states))
    assert got.loss is None and got.to_tuple()[0] is got.logits


def test_cache_objects_come_back_as_dicts_with_a_warning(tmp_path: Any) -> None:
    model = gpt2()
    with torch.no_grad():
        out = tensorsnap.snapshot(model(torch.randint(0, 50, (1, 4)), use_cache=True))
    make({"": out}).save(tmp_path / "b")
    plain = r"snap\[''\]: transformers\.cache_utils\..* plain dict of its attributes"
    with pytest.warns(BundleWarning, match=plain):
        got = tensorsnap.load(tmp_path / "b")[""]
    assert torch.equal(got.logits, out.logits)
    cache = got["cache"] if "cache" in got else got["past_key_values"]
    assert isinstance(cache, dict)


def shard_bytes(path: Any) -> int:
    return sum(os.path.getsize(path / f) for f in os.listdir(path) if f.endswith(".safetensors"))


def test_views_of_one_storage_are_stored_once(tmp_path: Any) -> None:
    base = torch.randn(256, 1024)  # 1 MiB
    views = (base, base.t(), base[10:20], base[:, ::2], base.view(torch.int32))
    make({"v": views}).save(tmp_path / "b")
    assert base.nbytes <= shard_bytes(tmp_path / "b") < base.nbytes + 4096
    got = tensorsnap.load(tmp_path / "b")["v"]
    for a, b in zip(got, views):
        assert a.dtype == b.dtype and a.stride() == b.stride() and raw(a) == raw(b)
    # still views of one storage: a write through one is seen through the others
    assert all(v.untyped_storage().data_ptr() == got[0].untyped_storage().data_ptr() for v in got)
    got[0][15, 3] = 123.0
    assert got[2][5, 3] == 123.0 and got[1][3, 15] == 123.0


def test_small_slice_of_a_big_tensor_stores_only_the_slice(tmp_path: Any) -> None:
    big = torch.randn(1_000_000)
    make({"v": big[1000:1010]}).save(tmp_path / "b")
    assert shard_bytes(tmp_path / "b") < 1024
    assert torch.equal(tensorsnap.load(tmp_path / "b")["v"], big[1000:1010])


def test_two_distant_slices_store_two_small_blobs(tmp_path: Any) -> None:
    big = torch.randn(1_000_000)
    make({"v": (big[:4], big[-4:])}).save(tmp_path / "b")
    assert shard_bytes(tmp_path / "b") < 1024
    got = tensorsnap.load(tmp_path / "b")["v"]
    assert torch.equal(got[0], big[:4]) and torch.equal(got[1], big[-4:])


def test_layouts_round_trip_without_materializing(tmp_path: Any) -> None:
    expanded = torch.randn(3, 1).expand(3, 100_000)
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    transposed = torch.randn(7, 9).t()
    conj = torch.randn(3, dtype=torch.complex64).conj()
    make({"e": expanded, "c": channels_last, "t": transposed, "j": conj}).save(tmp_path / "b")
    assert shard_bytes(tmp_path / "b") < 4096
    got = tensorsnap.load(tmp_path / "b")
    assert got["e"].stride() == (1, 0) and torch.equal(got["e"], expanded)
    assert got["c"].stride() == channels_last.stride() and torch.equal(got["c"], channels_last)
    assert got["t"].stride() == (1, 9) and torch.equal(got["t"], transposed)
    assert not got["j"].is_conj() and torch.equal(got["j"], conj.resolve_conj())


def test_zero_dim_zero_size_and_meta(tmp_path: Any) -> None:
    values = {
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "empty_strided": torch.empty(4, 0).t(),
        "meta": torch.empty(2, 3, device="meta"),
    }
    make(values).save(tmp_path / "b")
    got = tensorsnap.load(tmp_path / "b")
    assert got["scalar"].shape == () and got["scalar"].item() == 3.5
    assert got["empty"].shape == (0, 4)
    assert got["empty_strided"].shape == (0, 4)
    assert got["empty_strided"].stride() == values["empty_strided"].stride()
    assert got["meta"].is_meta and got["meta"].shape == (2, 3)


def test_golden_bytes(tmp_path: Any) -> None:
    make({"a": torch.tensor([1.0, 2.0])}).save(tmp_path / "b")
    header = (
        b'{"a@0":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
        b'"__metadata__":{"format":"pt","writer":"tensorsnap-bundle"}}'
    )
    header += b" " * (-(8 + len(header)) % 64)
    data = struct.pack("<2f", 1.0, 2.0) + bytes(8)
    expected = struct.pack("<Q", len(header)) + header + data
    assert (tmp_path / "b" / "shard-00000.safetensors").read_bytes() == expected

    text = (tmp_path / "b" / "manifest.json").read_bytes()
    manifest = json.loads(text)
    digest = manifest.pop("manifest_sha256")
    assert hashlib.sha256(text.replace(digest.encode(), b"0" * 64, 1)).hexdigest() == digest
    assert text.startswith(b'{\n "manifest_sha256": "')
    assert manifest == {
        "format": "tensorsnap-bundle",
        "format_version": 1,
        "tensorsnap_version": tensorsnap.__version__,
        "torch_version": torch.__version__,
        "rank": None,
        "world_size": None,
        "shards": [{"file": "shard-00000.safetensors", "nbytes": len(expected)}],
        "records": [
            {
                "key": "a",
                "module": "a",
                "call": 0,
                "op": None,
                "kind": "output",
                "shape": [2],
                "dtype": "float32",
                "nbytes": 8,
                "blobs": [
                    {
                        "shard": 0,
                        "name": "a@0",
                        "dtype": "float32",
                        "offset": 0,
                        "nbytes": 16,
                        "crc32": zlib.crc32(data),
                    }
                ],
                "tensors": [
                    {
                        "dtype": "float32",
                        "shape": [2],
                        "stride": [1],
                        "blob": 0,
                        "offset": 0,
                        "device": "cpu",
                    }
                ],
                "value": {"type": "tensor", "index": 0},
            }
        ],
    }


def test_many_values_are_split_into_shards(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(_bundle, "_SHARD_TARGET", 4096)
    values = {f"k{i}": torch.full((300,), float(i)) for i in range(12)}
    make(values).save(tmp_path / "b")
    shards = sorted(f for f in os.listdir(tmp_path / "b") if f.endswith(".safetensors"))
    assert len(shards) == 4  # 1200 bytes each, three per 4096-byte shard

    mapped: list[str] = []
    real_map = _shards.map_file
    monkeypatch.setattr(_shards, "map_file", lambda p, n: mapped.append(p) or real_map(p, n))
    loaded = tensorsnap.load(tmp_path / "b")
    assert mapped == []  # opening reads the manifest only
    assert torch.equal(loaded["k7"], values["k7"])
    assert [os.path.basename(p) for p in mapped] == ["shard-00002.safetensors"]
    assert all(torch.equal(loaded[k], v) for k, v in values.items())
    assert len(mapped) == 4


def test_existing_path_is_refused_and_empty_dir_accepted(tmp_path: Any) -> None:
    snap = make({"x": torch.ones(1)})
    snap.save(tmp_path / "b")
    with pytest.raises(BundleError, match=r"already exists; bundles are never overwritten"):
        snap.save(tmp_path / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="already exists"):
        snap.save(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    snap.save(tmp_path / "empty")
    snap.save(tmp_path / "new" / "parents" / "b")
    assert tensorsnap.load(tmp_path / "new" / "parents" / "b")["x"].item() == 1.0
    assert sorted(os.listdir(tmp_path)) == ["b", "empty", "file", "new"]  # no temp dirs


def test_loaded_snapshot_is_read_only_and_saves_again(tmp_path: Any) -> None:
    make({"x": torch.arange(3), "y": (torch.ones(2),)}).save(tmp_path / "a")
    loaded = tensorsnap.load(tmp_path / "a")
    with pytest.raises(BundleError, match="read-only"):
        loaded._store.put("z", 1, 0)
    loaded.save(tmp_path / "b")
    again = tensorsnap.load(tmp_path / "b")
    assert torch.equal(again["x"], torch.arange(3)) and type(again["y"]) is tuple


def test_loaded_tensors_are_copy_on_write(tmp_path: Any) -> None:
    make({"x": torch.zeros(4)}).save(tmp_path / "b")
    loaded = tensorsnap.load(tmp_path / "b")
    loaded["x"].add_(5)
    assert torch.equal(tensorsnap.load(tmp_path / "b")["x"], torch.zeros(4))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("where", ["write_all", "fsync"])
def test_full_disk_raises_and_leaves_nothing(
    tmp_path: Any, monkeypatch: Any, err: int, where: str
) -> None:
    def full(*args: Any) -> None:
        raise OSError(err, os.strerror(err))

    if where == "fsync":
        monkeypatch.setattr(_bundle.os, "fsync", full)
    else:
        monkeypatch.setattr(_shards, where, full)
    with pytest.raises(BundleError, match=r"no space left on the device while writing the bundle"):
        make({"x": torch.ones(1000)}).save(tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_rank_is_recorded_and_checked(tmp_path: Any) -> None:
    snap = make({"x": torch.ones(2)})
    snap.save(tmp_path / "single")
    with pytest.raises(BundleError, match=r"single process and has no ranks; call .*without rank="):
        tensorsnap.load(tmp_path / "single", rank=0)
    for rank in (0, 1):
        _bundle.save(snap, tmp_path / "multi" / f"rank-{rank:05d}", rank=rank, world_size=2)
    # parts without the index are an unfinished multi-rank save: they never load
    with pytest.raises(
        BundleError, match=r"parts for 2 ranks but no manifest.json.*did not finish"
    ):
        tensorsnap.load(tmp_path / "multi", rank=1)
    _ranks.write_index(tmp_path / "multi", 2)
    with pytest.raises(BundleError, match=r"one part per rank \(2 ranks\); pass rank="):
        tensorsnap.load(tmp_path / "multi")
    assert tensorsnap.load(tmp_path / "multi", rank=1)["x"].sum() == 2
    with pytest.raises(BundleError, match="no part for rank 2"):
        tensorsnap.load(tmp_path / "multi", rank=2)
    with pytest.raises(BundleError, match="rank=-1"):
        tensorsnap.load(tmp_path / "multi", rank=-1)


def test_unsupported_values_are_refused_before_writing(tmp_path: Any) -> None:
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(BundleError, match=r"snap\['s'\]\['a'\]\[1\]: cannot store a .*sparse"):
        make({"s": {"a": [1, sparse]}}).save(tmp_path / "b")
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(BundleError, match="reference cycle"):
        make({"c": cyclic}).save(tmp_path / "b")
    with pytest.raises(BundleError, match=r"cannot store a object object"):
        make({"o": object()}).save(tmp_path / "b")
    assert os.listdir(tmp_path) == []


@st.composite
def views(draw: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    dtype = draw(st.sampled_from([torch.float32, torch.int16, torch.bfloat16, torch.complex64]))
    base = random_tensor(dtype, (draw(st.integers(1, 40)),), seed=draw(st.integers(0, 99)))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, base.numel() - 1))
        length = draw(st.integers(0, base.numel() - start))
        step = draw(st.integers(1, 3))
        view = base[start : start + length : step]
        if draw(st.booleans()) and view.numel() % 2 == 0 and view.numel():
            view = view.view(-1, 2).t() if view.is_contiguous() else view
        out.append(view)
    return base, out


@settings(max_examples=40, deadline=None)
@given(views())
def test_random_views_round_trip(tmp_path_factory: Any, case: Any) -> None:
    _, tensors = case
    path = tmp_path_factory.mktemp("h") / "b"
    make({"v": tensors}).save(path)
    got = tensorsnap.load(path)["v"]
    for a, b in zip(got, tensors):
        assert a.shape == b.shape and a.stride() == b.stride() and raw(a) == raw(b)
