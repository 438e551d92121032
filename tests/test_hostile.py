"""Hostile files, failing disks and bad arguments: the right data or a named error, always.

One test (or a few) per defect of issue 12. Bundles are saved by tensorsnap, then edited the way
a damaged disk or a careful forger would (the manifest's digest recomputed), and every outcome is
either the saved values or a ``TensorSnapError`` naming the file, key or parameter.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import tensorsnap
from tensorsnap import BundleError, BundleWarning, TensorSnapError, _manifest, _spill, _stream
from tensorsnap._snapshot import Record, Snapshot

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file semantics")


def make(values: dict[str, Any]) -> Snapshot:
    snap = Snapshot()
    for key, value in values.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        dtype = value.dtype if isinstance(value, torch.Tensor) else None
        snap._add(Record(key, key, 0, None, "output", shape, dtype, 0), value)
    return snap


def rewrite_manifest(path: Any, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit ``path/manifest.json`` and give it a valid digest, as a careful forger would."""
    manifest = json.loads((path / "manifest.json").read_bytes())
    edit(manifest)
    manifest["manifest_sha256"] = "0" * 64
    text = json.dumps(manifest, indent=1).encode()
    digest = hashlib.sha256(text).hexdigest()
    (path / "manifest.json").write_bytes(text.replace(b"0" * 64, digest.encode(), 1))


def finishes_within(seconds: float, call: Callable[[], Any], unblock: str | None = None) -> Any:
    """``call()`` in a thread; fails the test (instead of hanging it) if it does not return.

    ``unblock`` names a FIFO to open for writing afterwards, which releases a reader stuck in
    ``open()`` on it, so that no thread is left blocked.
    """
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("value", call()))
        except BaseException as err:
            outcome.append(("error", err))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    if hung and unblock is not None:
        fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
    assert not hung, f"{call} did not return within {seconds} s"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


# -- 1: a null blob is valid only for zero-size and meta tensors ------------------------------


def test_null_blob_of_a_tensor_with_elements_is_refused(tmp_path: Any) -> None:
    make(
        {"a": torch.arange(4.0), "empty": torch.ones(0, 3), "meta": torch.ones(2, device="meta")}
    ).save(tmp_path / "b")
    loaded = tensorsnap.load(tmp_path / "b")
    assert loaded["empty"].shape == (0, 3) and loaded["meta"].is_meta  # null blobs stay valid

    for shape in ([4], [3 * 2**30]):  # the second would be 12 GiB of heap bytes

        def edit(m: dict[str, Any], shape: list[int] = shape) -> None:
            spec = m["records"][0]["tensors"][0]
            spec["blob"], spec["shape"], spec["stride"] = None, shape, [1]

        path = tmp_path / f"b{shape[0]}"
        make({"a": torch.arange(4.0)}).save(path)
        rewrite_manifest(path, edit)
        with pytest.raises(BundleError, match=r"key 'a': a tensor of shape \[\d+\] has no blob"):
            tensorsnap.load(path)["a"]


def test_blob_index_must_name_a_listed_blob(tmp_path: Any) -> None:
    # -1 would index the last blob from the end: another key's bytes, silently
    make({"a": (torch.arange(4.0), torch.arange(8.0, 12.0))}).save(tmp_path / "b")

    def edit(m: dict[str, Any]) -> None:
        m["records"][0]["tensors"][0]["blob"] = -1

    rewrite_manifest(tmp_path / "b", edit)
    with pytest.raises(BundleError, match=r"key 'a': a tensor names blob -1, which is not listed"):
        tensorsnap.load(tmp_path / "b")["a"]


# -- 2: manifest and journal are read only as regular files of bounded size -------------------


def test_a_fifo_as_manifest_fails_at_once(tmp_path: Any) -> None:
    path = tmp_path / "b"
    path.mkdir()
    os.mkfifo(path / "manifest.json")
    with pytest.raises(BundleError, match=r"manifest\.json is not a regular file"):
        finishes_within(10, lambda: tensorsnap.load(path), unblock=str(path / "manifest.json"))


def test_a_link_to_a_device_or_an_oversized_manifest_is_not_read(
    tmp_path: Any, monkeypatch: Any
) -> None:
    make({"a": torch.ones(2)}).save(tmp_path / "b")
    manifest = tmp_path / "b" / "manifest.json"
    # keep a reader that would read the device from using gigabytes in this test
    monkeypatch.setattr(_manifest, "_MAX_MANIFEST", 10**6)
    os.rename(manifest, tmp_path / "saved.json")
    os.symlink("/dev/zero", manifest)
    with pytest.raises(BundleError, match=r"manifest\.json is a symbolic link; refusing"):
        tensorsnap.load(tmp_path / "b")
    os.unlink(manifest)
    with open(manifest, "wb") as f:
        f.truncate(10**6 + 1)
    with pytest.raises(BundleError, match=r"manifest\.json has 1000001 bytes, more than the"):
        tensorsnap.load(tmp_path / "b")


def test_a_fifo_as_journal_fails_at_once(tmp_path: Any) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "extract-journal.json")

    def resume() -> Any:
        return tensorsnap.extract(Net(), [torch.randn(2, 6)], out=out, progress=False, resume=True)

    with pytest.raises(BundleError, match=r"extract-journal\.json is not a regular file"):
        finishes_within(10, resume, unblock=str(out / "extract-journal.json"))


@pytest.mark.parametrize("constant", ["Infinity", "-Infinity", "NaN"])
def test_a_journal_with_nan_or_infinity_is_refused_by_name(tmp_path: Any, constant: str) -> None:
    out = tmp_path / "out"
    batches = [torch.randn(2, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def failing() -> Any:
        yield from batches[:2]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        tensorsnap.extract(Net(), failing(), out=out, progress=False)
    journal = out / "extract-journal.json"
    text = journal.read_text()
    # a leaf's row count: int(inf) would escape as an OverflowError, int(nan) as a ValueError
    edited = text.replace('"rows":4', f'"rows":{constant}', 1)
    assert edited != text
    journal.write_text(edited)
    with pytest.raises(
        BundleError, match=rf"extract-journal\.json cannot be read \({constant} is not allowed"
    ):
        tensorsnap.extract(Net(), batches, out=out, progress=False, resume=True)


# -- 3: world_size of a multi-rank index ------------------------------------------------------


def _index(path: Any, world_size: Any, parts: list[str]) -> None:
    from tensorsnap._manifest import encode_manifest

    path.mkdir()
    data = encode_manifest(
        [], [], version="0", rank=None, world_size=world_size,
        extra={"parts": parts, "concat": True},
    )  # fmt: skip
    (path / "manifest.json").write_bytes(data)


@pytest.mark.parametrize(
    ("world_size", "parts"),
    [(0, []), (-1, []), (10**8, ["rank-00000", "rank-00001"]), (True, ["rank-00000"])],
)
def test_world_size_is_checked_against_the_parts(
    tmp_path: Any, world_size: Any, parts: Any
) -> None:
    _index(tmp_path / "b", world_size, parts)
    with pytest.raises(BundleError, match=rf"malformed index .*world_size={world_size!r}"):
        tensorsnap.load(tmp_path / "b")


# -- 4 and 5: loading runs no code of the saved classes ---------------------------------------

CALLS: list[str] = []


class LoudDict(dict):  # type: ignore[type-arg]
    def __setitem__(self, key: Any, value: Any) -> None:
        CALLS.append("LoudDict.__setitem__")
        super().__setitem__(key, value)

    def copy(self) -> LoudDict:
        CALLS.append("LoudDict.copy")
        return LoudDict(self)

    def __setattr__(self, name: str, value: Any) -> None:
        CALLS.append("LoudDict.__setattr__")
        super().__setattr__(name, value)


class LoudPair(NamedTuple):
    low: torch.Tensor
    high: torch.Tensor


def _loud_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    CALLS.append("LoudPair.__new__")
    return tuple.__new__(cls, args)


LoudPair.__new__ = _loud_new  # type: ignore[assignment]


class LoudFactoryDict(collections.defaultdict):  # type: ignore[type-arg]
    def __setattr__(self, name: str, value: Any) -> None:
        CALLS.append("LoudFactoryDict.__setattr__")
        super().__setattr__(name, value)


def _model_output() -> Any:
    transformers = pytest.importorskip("transformers")
    base = transformers.modeling_outputs.BaseModelOutput

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        CALLS.append("ModelOutput.__init__")

    return base, init


def test_concatenating_ranks_runs_no_class_code(tmp_path: Any, monkeypatch: Any) -> None:
    from tensorsnap import _bundle, _ranks

    base, init = _model_output()
    values = []
    for rank in range(2):
        t = torch.arange(6.0).reshape(3, 2) + 10 * rank
        out = base(last_hidden_state=t)
        values.append({"d": LoudDict(x=t), "p": LoudPair(t, t + 1), "o": out})
    for rank, value in enumerate(values):
        snap = make({k: tensorsnap.snapshot(v) for k, v in value.items()})
        _bundle.save(snap, tmp_path / "run" / _ranks.part_name(rank), rank=rank, world_size=2)
    _ranks.write_index(tmp_path / "run", 2, concat=True)
    CALLS.clear()
    monkeypatch.setattr(base, "__init__", init)
    monkeypatch.setattr(base, "__post_init__", init)
    monkeypatch.setattr(base, "__setitem__", lambda *a: CALLS.append("ModelOutput.__setitem__"))
    loaded = tensorsnap.load(tmp_path / "run")
    d, p, o = loaded["d"], loaded["p"], loaded["o"]
    assert CALLS == []
    full = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(6.0).reshape(3, 2) + 10])
    assert type(d) is LoudDict and torch.equal(d["x"], full)
    assert type(p) is LoudPair and torch.equal(p.low, full) and torch.equal(p.high, full + 1)
    assert type(o) is base and torch.equal(o.last_hidden_state, full)
    assert torch.equal(o["last_hidden_state"], full)


def test_concatenated_records_describe_the_values(tmp_path: Any) -> None:
    """A data-parallel bundle's records give the shapes its values have once concatenated."""
    from tensorsnap import _bundle, _ranks

    for rank in range(3):
        snap = make({"loss": torch.tensor(1.0 + rank), "h": torch.ones(2 + rank, 4)})
        _bundle.save(snap, tmp_path / "run" / _ranks.part_name(rank), rank=rank, world_size=3)
    _ranks.write_index(tmp_path / "run", 3, concat=True)
    loaded = tensorsnap.load(tmp_path / "run")
    assert torch.equal(loaded["loss"], torch.tensor([1.0, 2.0, 3.0]))  # 0-dim: stacked
    assert torch.equal(loaded["h"], torch.ones(9, 4))
    assert {r.key: r.shape for r in loaded.records} == {"loss": (3,), "h": (9, 4)}


class Hooked(type):
    def __getattr__(cls, name: str) -> Any:
        CALLS.append(f"Hooked.__getattr__({name})")
        raise AttributeError(name)


class NotADataclass(metaclass=Hooked):
    pass


class Gate:
    """An object whose attribute hook would run if a loader walked into it with vars()."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        CALLS.append(f"Gate.__getattr__({name})")
        raise AttributeError(name)


GATE = Gate()


@dataclasses.dataclass
class Point:
    x: torch.Tensor
    y: int


def test_class_lookup_runs_no_attribute_hooks(tmp_path: Any) -> None:
    here = __name__
    make({"p": Point(torch.ones(2), 3)}).save(tmp_path / "b")
    for qualname, plain in (("NotADataclass", "saved fields"), ("GATE.Point", "not imported")):

        def edit(m: dict[str, Any], qualname: str = qualname) -> None:
            m["records"][0]["value"]["class"] = {"module": here, "qualname": qualname}

        path = tmp_path / qualname
        os.system(f"cp -r {tmp_path / 'b'} {path}")
        rewrite_manifest(path, edit)
        CALLS.clear()
        with pytest.warns(BundleWarning, match=plain):
            got = tensorsnap.load(path)["p"]
        assert CALLS == []
        assert torch.equal(got["x"], torch.ones(2)) and got["y"] == 3
    # the class itself still comes back, with no hook involved
    got = tensorsnap.load(tmp_path / "b")["p"]
    assert type(got) is Point and got.y == 3


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("shape", [2**70], r"its record says shape \[1, 2\].* statistics describe \[1180"),
        ("dtype", "float16", r"its record says .* float32, but its statistics .* 'float16'"),
        ("digest", "zz", r"stats field 'digest' is 'zz', expected 16 hex digits"),
    ],
)
def test_stats_nodes_agree_with_their_record(
    tmp_path: Any, field: str, value: Any, message: str
) -> None:
    model = nn.Linear(2, 2)
    with tensorsnap.capture(model, stats=True) as snap:
        model(torch.ones(1, 2))
    snap.save(tmp_path / "b")

    def edit(m: dict[str, Any]) -> None:
        m["records"][0]["value"][field] = value

    rewrite_manifest(tmp_path / "b", edit)
    with pytest.raises(BundleError, match=message):
        tensorsnap.load(tmp_path / "b")[""]


class Disguised:
    """A field default whose ``__class__`` hook would run if the loader used isinstance on it."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        CALLS.append("Disguised.__class__")
        return int


@dataclasses.dataclass
class WithDefault:
    x: torch.Tensor
    y: Any = Disguised()  # noqa: RUF009 - the default is the point


def test_field_defaults_are_inspected_without_their_hooks(tmp_path: Any) -> None:
    make({"w": WithDefault(torch.ones(2), 3)}).save(tmp_path / "b")
    CALLS.clear()
    got = tensorsnap.load(tmp_path / "b")["w"]
    assert CALLS == []
    assert type(got) is WithDefault and torch.equal(got.x, torch.ones(2)) and got.y == 3


@pytest.mark.parametrize("kind", ["_eq__", "_subclasshook__", "_init__", "warn"])
def test_node_types_name_only_node_decoders(tmp_path: Any, kind: str) -> None:
    # "_eq__" would reach the decoder's own __eq__ and load NotImplemented as the value
    make({"a": (torch.ones(1), 2)}).save(tmp_path / "b")

    def edit(m: dict[str, Any]) -> None:
        m["records"][0]["value"]["items"][1]["type"] = kind

    rewrite_manifest(tmp_path / "b", edit)
    with pytest.raises(BundleError, match=rf"key 'a': .*unknown node type '{kind}'"):
        tensorsnap.load(tmp_path / "b")["a"]


def test_default_factory_is_set_without_the_class_setattr(tmp_path: Any) -> None:
    value = LoudFactoryDict(list, a=torch.ones(1))
    make({"d": value}).save(tmp_path / "b")
    CALLS.clear()
    got = tensorsnap.load(tmp_path / "b")["d"]
    assert CALLS == []
    assert type(got) is LoudFactoryDict and got.default_factory is list
    assert torch.equal(got["a"], torch.ones(1))


# -- 6: spill failures ------------------------------------------------------------------------


def test_an_unusable_spill_dir_fails_at_the_start_of_the_block(tmp_path: Any) -> None:
    (tmp_path / "file").write_text("not a directory")
    bad = tmp_path / "file" / "spill"
    ran = []
    refused = pytest.raises(BundleError, match=rf"spill_dir='{bad}' cannot hold spill files")
    with refused, tensorsnap.capture(Net(), max_memory=0, spill_dir=bad):
        ran.append(True)
    assert ran == []


@pytest.mark.parametrize("when", ["during the forward", "after the last value"])
def test_a_spill_write_failure_is_raised_when_the_block_ends(
    tmp_path: Any, monkeypatch: Any, when: str
) -> None:
    """Never inside the model's forward; naming the directory; every value readable."""
    loop_done = threading.Event()

    def failing(path: str, spans: Any, *, fsync: bool) -> int:
        if when == "after the last value":  # the write still pending when the block ends
            loop_done.wait(30)
        with open(path, "wb") as f:  # a partial file, as a full disk leaves it
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(_spill, "write_shard", failing)
    model = Net()
    xs = [torch.randn(3, 6) for _ in range(4)]
    reference = [model(x).detach().clone() for x in xs]
    finished = []
    at_exit = pytest.raises(BundleError, match=rf"could not spill values to {tmp_path}.*No space")
    session = tensorsnap.capture(model, max_memory=0, spill_dir=tmp_path)
    with at_exit, torch.no_grad(), session as snap:
        for x in xs:
            model(x)
        finished.append(True)
        loop_done.set()
    assert finished == [True]  # the forward passes all ran to the end
    calls_so_far = [snap[""], snap["#1"], snap["#2"], snap["#3"]]
    assert all(torch.equal(a, b) for a, b in zip(calls_so_far, reference))
    spill_dirs = [d for d in os.listdir(tmp_path) if d.startswith("tensorsnap-spill-")]
    for d in spill_dirs:
        for name in os.listdir(tmp_path / d):  # no partial shard is left or mapped
            assert (tmp_path / d / name).stat().st_size > len(b"partial")
    snap.close()


# -- 7: extract on a full disk ---------------------------------------------------------------


def test_extract_on_a_full_disk_names_the_output_and_resumes(
    tmp_path: Any, monkeypatch: Any
) -> None:
    batches = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    clean = tensorsnap.extract(Net(), batches, out=tmp_path / "clean", progress=False)
    real = _stream.write_all
    calls = [0]

    def full_after_a_while(fd: int, data: Any) -> None:
        calls[0] += 1
        if calls[0] > 8:  # the first batch and its journal entry are written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(_stream, "write_all", full_after_a_while)
    out = tmp_path / "out"
    with pytest.raises(BundleError, match=rf"extract out={out}: no space is left on the device"):
        tensorsnap.extract(Net(), batches, out=out, progress=False)
    assert ".extract-journal.json.tmp" not in os.listdir(out)
    monkeypatch.setattr(_stream, "write_all", real)  # space freed
    got = tensorsnap.extract(Net(), batches, out=out, progress=False, resume=True)
    for key in clean:
        assert torch.equal(got[key], clean[key]), key


# -- 8: a damaged header length is caught without verify ---------------------------------------


def test_a_shorter_header_length_is_caught_with_verify_off(tmp_path: Any) -> None:
    path = tmp_path / "b"
    # a key name whose header leaves at least 8 bytes of space padding
    for n in range(64):
        shutil_rm(path)
        make({"k" * (n + 1): torch.arange(64.0)}).save(path)
        shard = path / "shard-00000.safetensors"
        data = bytearray(shard.read_bytes())
        length = int.from_bytes(data[:8], "little")
        if data[8 : 8 + length].endswith(b" " * 8):
            break
    data[:8] = (length - 8).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"header does not cover the data exactly"):
        tensorsnap.load(path, verify=False)["k" * (n + 1)]


def shutil_rm(path: Any) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# -- 9: a shard truncated while it is mapped -------------------------------------------------


def test_a_shard_truncated_while_mapped_raises_instead_of_sigbus(tmp_path: Any) -> None:
    # in a child process: on a reader that does not check, this is a SIGBUS that kills it
    script = textwrap.dedent(
        f"""
        import os, torch, tensorsnap
        from tensorsnap._snapshot import Record, Snapshot
        snap = Snapshot()
        for k in ("a", "b"):
            snap._add(Record(k, k, 0, None, "output", None, None, 0), torch.ones(300_000))
        snap.save({str(tmp_path / "b")!r})
        loaded = tensorsnap.load({str(tmp_path / "b")!r})
        assert loaded["a"].sum().item() == 300_000
        shard = os.path.join({str(tmp_path / "b")!r}, "shard-00000.safetensors")
        os.truncate(shard, 4096)
        try:
            loaded["b"].sum()
        except tensorsnap.BundleError as err:
            print("BundleError:", err)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "changed on disk while the bundle was open" in done.stdout
    assert "key 'b'" in done.stdout


# -- 10: save's parent directory ----------------------------------------------------------------


def test_save_names_a_parent_that_cannot_be_created(tmp_path: Any) -> None:
    (tmp_path / "a_file").write_text("x")
    snap = make({"a": torch.ones(2)})
    with pytest.raises(BundleError, match=r"cannot create .*a_file, the parent directory"):
        snap.save(tmp_path / "a_file" / "sub")
    with pytest.raises(BundleError, match=r"cannot create /proc/nope, the parent directory"):
        snap.save("/proc/nope/b")


def test_save_rank_and_world_size_go_together(tmp_path: Any) -> None:
    from tensorsnap import _bundle

    snap = make({"a": torch.ones(1)})
    for rank, world_size in ((0, None), (None, 2), (2, 2), (-1, 2), (True, 2)):
        with pytest.raises(BundleError, match=r"pass both \(ints, 0 <= rank < world_size\)"):
            _bundle.save(snap, tmp_path / "b", rank=rank, world_size=world_size)
    assert not os.path.exists(tmp_path / "b")


def test_a_negative_record_nbytes_is_refused(tmp_path: Any) -> None:
    make({"a": torch.ones(1)}).save(tmp_path / "b")
    rewrite_manifest(tmp_path / "b", lambda m: m["records"][0].update(nbytes=-2))
    with pytest.raises(BundleError, match=r"key 'a': field 'nbytes' is -2, expected a count >= 0"):
        tensorsnap.load(tmp_path / "b")


# -- 11 and 12: bad arguments, refused by name before anything is created ---------------------


def test_extract_takes_patterns_from_a_generator_for_every_batch(tmp_path: Any) -> None:
    batches = [torch.randn(2, 6), torch.randn(3, 6)]
    got = tensorsnap.extract(
        Net(), batches, out=tmp_path / "out", include=(p for p in ["fc1"]), progress=False
    )
    assert list(got) == ["fc1"] and got["fc1"].shape == (5, 8)


def test_extract_without_batches_creates_nothing(tmp_path: Any) -> None:
    with pytest.raises(TensorSnapError, match=r"batches=None: expected an iterable of batches"):
        tensorsnap.extract(Net(), None, out=tmp_path / "out")  # type: ignore[arg-type]
    assert not os.path.exists(tmp_path / "out")
    out = tensorsnap.extract(Net(), [torch.randn(2, 6)], out=tmp_path / "out", progress=False)
    assert out["fc1"].shape == (2, 8)


FLAG = r"{}='no': expected True or False, got str"


@pytest.mark.parametrize("name", ["inputs", "grads", "saved", "lazy", "gather"])
def test_capture_flags_are_bools(name: str) -> None:
    with pytest.raises(TensorSnapError, match=FLAG.format(name)):
        tensorsnap.capture(Net(), **{name: "no"})
    if name in ("inputs", "grads", "saved"):  # names() passes other keywords to the model
        with pytest.raises(TensorSnapError, match=FLAG.format(name)):
            tensorsnap.names(Net(), torch.randn(1, 6), **{name: "no"})


def test_choices_are_taken_with_their_type() -> None:
    with pytest.raises(TensorSnapError, match=r"ops=1: pass True to capture torch-level ops"):
        tensorsnap.capture(Net(), ops=1)
    with pytest.raises(TensorSnapError, match=r"nonfinite=1: pass 'raise'"):
        tensorsnap.capture(Net(), nonfinite=1)
    with pytest.raises(TensorSnapError, match=FLAG.format("pin_memory")):
        tensorsnap.snapshot(torch.ones(1), pin_memory="no")


def test_patterns_sizes_and_paths_are_checked_by_name(tmp_path: Any) -> None:
    with pytest.raises(TensorSnapError, match=r"include=123: expected a glob pattern \(str\)"):
        tensorsnap.capture(Net(), include=123)
    with pytest.raises(TensorSnapError, match=r"exclude=b'fc1': expected a glob pattern"):
        tensorsnap.capture(Net(), exclude=b"fc1")
    with pytest.raises(TensorSnapError, match=r"max_memory='1000.*' is more than 2\*\*63 - 1"):
        tensorsnap.capture(Net(), max_memory="1" + "0" * 400)
    with pytest.raises(TensorSnapError, match=r"spill_dir=123: expected a path"):
        tensorsnap.capture(Net(), spill_dir=123)
    with pytest.raises(TensorSnapError, match=r"path=b'.*': expected a str path, got bytes"):
        tensorsnap.load(os.fsencode(tmp_path))
    with pytest.raises(TensorSnapError, match=r"path=b'.*': expected a str path, got bytes"):
        make({"a": torch.ones(1)}).save(os.fsencode(tmp_path / "x"))
    with pytest.raises(TensorSnapError, match=r"out=b'.*': expected a str path, got bytes"):
        tensorsnap.extract(Net(), [torch.randn(1, 6)], out=os.fsencode(tmp_path / "y"))


def test_meta_device_is_refused_where_values_are_kept(tmp_path: Any) -> None:
    with pytest.raises(TensorSnapError, match=r"device='meta': meta tensors hold no data"):
        tensorsnap.capture(Net(), device="meta")
    with pytest.raises(TensorSnapError, match=r"device=device\(type='meta'\): meta tensors"):
        tensorsnap.extract(Net(), [torch.randn(1, 6)], out=tmp_path, device=torch.device("meta"))
    with pytest.raises(TensorSnapError, match=r"device=123: expected a torch device"):
        tensorsnap.capture(Net(), device=123)
    # snapshot() copies layouts to meta when asked to: structure without data, on purpose
    assert tensorsnap.snapshot(torch.ones(2, 3).t(), device="meta").stride() == (1, 3)


def test_load_flags_and_assemble_on_a_single_process_bundle(tmp_path: Any) -> None:
    make({"a": torch.ones(2)}).save(tmp_path / "b")
    with pytest.raises(TensorSnapError, match=FLAG.format("collective")):
        make({"a": torch.ones(2)}).save(tmp_path / "c", collective="no")
    assert not os.path.exists(tmp_path / "c")
    for name in ("verify", "assemble"):
        with pytest.raises(TensorSnapError, match=FLAG.format(name)):
            tensorsnap.load(tmp_path / "b", **{name: "no"})
    with pytest.raises(BundleError, match=r"saved as one part .* nothing to assemble"):
        tensorsnap.load(tmp_path / "b", assemble=True)


@pytest.mark.parametrize("name", ["resume", "progress", "inputs"])
def test_extract_flags_are_bools(tmp_path: Any, name: str) -> None:
    options: dict[str, Any] = {"progress": False, name: "no"}
    with pytest.raises(TensorSnapError, match=FLAG.format(name)):
        tensorsnap.extract(Net(), [torch.randn(1, 6)], out=tmp_path / "out", **options)
    assert not os.path.exists(tmp_path / "out")


def test_reading_a_closed_snapshot_says_so(tmp_path: Any) -> None:
    model = Net()
    with tensorsnap.capture(model) as snap:
        model(torch.randn(1, 6))
    snap.close()
    with pytest.raises(TensorSnapError, match=r"snap\['fc1'\]: this snapshot was closed"):
        snap["fc1"]
    assert list(snap) == ["fc1", "fc2", ""]  # the keys and records stay
    make({"a": torch.ones(1)}).save(tmp_path / "b")
    loaded = tensorsnap.load(tmp_path / "b")
    loaded.close()
    with pytest.raises(TensorSnapError, match=r"snap\['a'\]: this snapshot was closed"):
        loaded["a"]


# -- 13: the demo replaces only its own output ------------------------------------------------


def test_demo_does_not_replace_a_bundle_it_did_not_write(tmp_path: Any) -> None:
    from tensorsnap import _demo

    mine = make({"mine": torch.arange(3.0)})
    mine.save(tmp_path / "bundle")
    with pytest.raises(TensorSnapError, match=r"bundle is a bundle the demo did not write"):
        _demo.run(tmp_path)
    assert list(tensorsnap.load(tmp_path / "bundle")) == ["mine"]
    # a copied-in marker does not make a foreign bundle the demo's
    (tmp_path / "bundle" / _demo.MARK).write_text("0" * 64 + "\n")
    with pytest.raises(TensorSnapError, match=r"did not write"):
        _demo.run(tmp_path)
    shutil_rm(tmp_path / "bundle")
    _demo.run(tmp_path)
    _, again = _demo.run(tmp_path)  # its own output is replaced
    assert "blocks.0.mlp" in tensorsnap.load(again)


# -- 14: the core needs no numpy --------------------------------------------------------------


def test_save_load_extract_and_spill_work_without_numpy(tmp_path: Any) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys, warnings
        sys.modules["numpy"] = None  # as if it were not installed: torch then has no numpy
        warnings.simplefilter("ignore")  # torch warns once that numpy is missing
        import torch, tensorsnap
        try:
            torch.ones(1).numpy()
            raise SystemExit("numpy is still reachable")
        except RuntimeError:
            pass
        root = {str(tmp_path)!r}
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        x = torch.randn(2, 4)
        with tensorsnap.capture(model, max_memory=0) as snap:
            model(x)
        snap.save(os.path.join(root, "a"))
        snap.save(os.path.join(root, "b"))
        a = tensorsnap.load(os.path.join(root, "a"))
        assert torch.equal(a["0"], model[0](x).detach())
        result = tensorsnap.diff(os.path.join(root, "a"), os.path.join(root, "b"))
        assert result.first_diverging is None and len(result.keys) == 3, result
        acts = tensorsnap.extract(model, [x, x], out=os.path.join(root, "e"), progress=False)
        assert acts["0"].shape == (4, 3)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# -- 15: what the warning for plain objects says ----------------------------------------------


class Plain:
    def __init__(self) -> None:
        self.t = torch.ones(2)


def test_plain_objects_warning_says_what_happens(tmp_path: Any) -> None:
    make({"o": Plain()}).save(tmp_path / "b")
    with pytest.warns(BundleWarning) as caught:
        got = tensorsnap.load(tmp_path / "b")["o"]
    message = str(caught[0].message)
    assert "always load as dicts, whatever is imported" in message
    assert "import the class" not in message
    assert torch.equal(got["t"], torch.ones(2))
