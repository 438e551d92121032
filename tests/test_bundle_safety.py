"""Bundles on disk are untrusted: crashes, damage, edits and path tricks never load as complete."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import os
import pickle
import signal
import sys
import time
from typing import Any

import pytest
import torch

import tensorsnap
from tensorsnap import _bundle, _shards
from tensorsnap._errors import BundleError, BundleWarning
from tensorsnap._snapshot import Record, Snapshot

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def make(values: dict[str, Any]) -> Snapshot:
    snap = Snapshot()
    for key, value in values.items():
        snap._add(Record(key, key, 0, None, "output", None, None, 0), value)
    return snap


VALUES = {f"k{i}": torch.arange(i * 1000, (i + 1) * 1000, dtype=torch.float32) for i in range(8)}


def check_complete_or_absent(path: Any) -> str:
    """The property a crash must keep: nothing, or a bundle equal to what was saved."""
    if not os.path.exists(path):
        return "absent"
    loaded = tensorsnap.load(path)
    assert list(loaded) == list(VALUES)
    for key, value in VALUES.items():
        assert torch.equal(loaded[key], value)
    return "complete"


def run_killed(path: Any, setup: Any) -> None:
    """Save in a forked child that ``setup`` arranges to SIGKILL itself part way."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            setup()
            make(VALUES).save(path)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0


def kill_at_call(module: Any, name: str, n: int) -> Any:
    """Replace ``module.name`` so that its n-th call (1-based) kills the process first."""
    real = getattr(module, name)
    count = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return lambda: setattr(module, name, wrapper)


def test_kill_9_at_every_step_of_a_save(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(_bundle, "_SHARD_TARGET", 8000)  # 4 shards of 2 values
    outcomes = []
    # fsync calls: 4 shards, manifest, temp dir, parent dir (after the rename)
    for n in range(1, 8):
        path = tmp_path / f"fsync{n}"
        run_killed(path, kill_at_call(os, "fsync", n))
        outcomes.append(check_complete_or_absent(path))
    for n in (1, 3, 5):  # writing the first and third shard, and the manifest
        path = tmp_path / f"write{n}"
        run_killed(path, kill_at_call(_shards, "write_all", n))
        outcomes.append(check_complete_or_absent(path))
    path = tmp_path / "rename"
    run_killed(path, kill_at_call(os, "rename", 1))
    outcomes.append(check_complete_or_absent(path))
    assert outcomes == ["absent"] * 6 + ["complete"] + ["absent"] * 4
    # what is left behind is only hidden temp directories, none of them a complete bundle
    # except where the manifest was fully written before the kill
    for name in os.listdir(tmp_path):
        if name.startswith("."):
            has_manifest = os.path.exists(tmp_path / name / "manifest.json")
            if not has_manifest:
                with pytest.raises(BundleError, match=r"has no manifest\.json"):
                    tensorsnap.load(tmp_path / name)


def test_kill_9_from_outside_at_random_moments(tmp_path: Any) -> None:
    big = {f"k{i}": torch.randn(2_000_000) for i in range(6)}  # 48 MB
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1):
        path = tmp_path / f"d{delay}"
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(write, b"go")
                make(big).save(path)
                time.sleep(10)  # wait to be killed
            finally:
                os._exit(0)
        os.read(read, 2)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        os.close(write)
        if os.path.exists(path):
            loaded = tensorsnap.load(path)
            assert all(torch.equal(loaded[k], v) for k, v in big.items())


@pytest.fixture
def bundle(tmp_path: Any) -> Any:
    path = tmp_path / "b"
    make({"a": torch.arange(100, dtype=torch.float32), "b": (torch.ones(3), 7)}).save(path)
    return path


SHARD = "shard-00000.safetensors"


def rewrite_manifest(path: Any, edit: Any) -> None:
    """Edit the manifest and give it a valid digest, as a careful forger would."""
    manifest = json.loads((path / "manifest.json").read_bytes())
    edit(manifest)
    manifest["manifest_sha256"] = "0" * 64
    text = json.dumps(manifest, indent=1).encode()
    digest = hashlib.sha256(text).hexdigest()
    (path / "manifest.json").write_bytes(text.replace(b"0" * 64, digest.encode(), 1))


def test_truncated_shard_is_refused_naming_file_and_key(bundle: Any) -> None:
    data = (bundle / SHARD).read_bytes()
    (bundle / SHARD).write_bytes(data[:-10])
    with pytest.raises(BundleError, match=rf"{SHARD} \(used by key 'a'\) has \d+ bytes.*truncated"):
        tensorsnap.load(bundle)


def test_truncated_manifest_is_refused(bundle: Any) -> None:
    data = (bundle / "manifest.json").read_bytes()
    (bundle / "manifest.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"manifest.json is damaged .* not valid JSON"):
        tensorsnap.load(bundle)


def test_missing_manifest_is_not_a_bundle(bundle: Any) -> None:
    os.remove(bundle / "manifest.json")
    with pytest.raises(BundleError, match=r"has no manifest\.json: .*did not finish"):
        tensorsnap.load(bundle)


def test_bit_flip_in_data_is_caught_by_the_checksum(bundle: Any) -> None:
    data = bytearray((bundle / SHARD).read_bytes())
    data[-300] ^= 0x01  # inside key 'a' (400 bytes, the first blob)
    (bundle / SHARD).write_bytes(bytes(data))
    loaded = tensorsnap.load(bundle)
    assert loaded["b"][1] == 7  # the other key's bytes are intact
    with pytest.raises(BundleError, match=rf"{SHARD}: checksum mismatch in the data of key 'a'"):
        loaded["a"]


def test_verify_false_skips_only_the_checksum(bundle: Any) -> None:
    intact = tensorsnap.load(bundle)["a"].clone()
    data = bytearray((bundle / SHARD).read_bytes())
    data[-300] ^= 0x01  # inside key 'a', as above
    (bundle / SHARD).write_bytes(bytes(data))
    flipped = tensorsnap.load(bundle, verify=False)["a"]  # the caller vouched for the file
    assert not torch.equal(flipped.view(torch.uint8), intact.view(torch.uint8))
    with pytest.raises(BundleError, match="checksum mismatch"):
        tensorsnap.load(bundle)["a"]


def test_bit_flip_in_shard_header_is_caught(bundle: Any) -> None:
    data = bytearray((bundle / SHARD).read_bytes())
    at = data.index(b'"data_offsets"') + 2
    data[at] ^= 0x20  # "data_offsets" -> "Data_offsets"
    (bundle / SHARD).write_bytes(bytes(data))
    with pytest.raises(
        BundleError, match=rf"{SHARD} \(used by key 'a'\): header entry 'a@0' has malformed"
    ):
        tensorsnap.load(bundle)["a"]


@pytest.mark.parametrize("offset", [5, 100, -5])
def test_bit_flip_in_manifest_is_caught(bundle: Any, offset: int) -> None:
    data = bytearray((bundle / "manifest.json").read_bytes())
    data[offset] ^= 0x02
    (bundle / "manifest.json").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"manifest.json (is damaged|is not a tensorsnap)"):
        tensorsnap.load(bundle)


def test_hand_edited_manifest_is_caught(bundle: Any) -> None:
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"module": "a"', '"module": "A"'))
    assert (bundle / "manifest.json").read_text() != text
    with pytest.raises(BundleError, match=r"SHA-256 does not match manifest_sha256"):
        tensorsnap.load(bundle)


@pytest.mark.parametrize(
    "name",
    ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".hidden", "manifest.json"],
)
def test_shard_paths_cannot_escape_the_bundle(bundle: Any, name: str) -> None:
    (bundle.parent / "outside.safetensors").write_bytes((bundle / SHARD).read_bytes())

    def edit(m: dict[str, Any]) -> None:
        m["shards"][0]["file"] = name

    rewrite_manifest(bundle, edit)
    with pytest.raises(BundleError, match=r"not a plain file name inside the bundle.*refusing"):
        tensorsnap.load(bundle)


def test_symlinked_shard_leading_outside_is_refused(bundle: Any) -> None:
    outside = bundle.parent / "elsewhere.safetensors"
    os.replace(bundle / SHARD, outside)
    os.symlink(outside, bundle / SHARD)
    with pytest.raises(BundleError, match=r"is a link that leads outside the bundle"):
        tensorsnap.load(bundle)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["records"][0]["tensors"][0].update(offset=4000),
        lambda m: m["records"][0]["tensors"][0].update(shape=[1000]),
        lambda m: m["records"][0]["tensors"][0].update(stride=[-1]),
        lambda m: m["records"][0]["tensors"][0].update(dtype="float128"),
        lambda m: m["records"][0]["blobs"][0].update(nbytes=10**12),
        lambda m: m["records"][0]["blobs"][0].update(shard=5),
        lambda m: m["records"][0]["blobs"][0].update(name="__metadata__"),
        lambda m: m["records"][0].update(value={"type": "exec", "code": "print(1)"}),
        lambda m: m["records"][0].update(value={"type": "tensor", "index": 9}),
        lambda m: m["records"][0].update(value=[1, 2]),
    ],
)
def test_forged_entries_raise_bundle_errors_naming_the_key(bundle: Any, edit: Any) -> None:
    rewrite_manifest(bundle, edit)
    with pytest.raises(BundleError, match=r"key 'a'"):
        tensorsnap.load(bundle)["a"]


def test_forged_record_fields_are_refused(bundle: Any) -> None:
    rewrite_manifest(bundle, lambda m: m["records"][0].update(kind="bogus"))
    with pytest.raises(BundleError, match=r"key 'a'.*kind 'bogus'"):
        tensorsnap.load(bundle)


def test_newer_format_asks_for_an_upgrade(bundle: Any) -> None:
    rewrite_manifest(bundle, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="upgrade tensorsnap"):
        tensorsnap.load(bundle)


def test_load_never_unpickles_imports_or_executes(
    tmp_path: Any, monkeypatch: Any, bundle: Any
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"load called a forbidden function with {args!r}")

    real_import = builtins.__import__

    def no_new_imports(name: str, *args: Any, **kwargs: Any) -> Any:
        if name not in sys.modules and not name.startswith("_"):
            raise AssertionError(f"load imported {name}")
        return real_import(name, *args, **kwargs)

    # a class whose own code must never run when it is rebuilt
    @dataclasses.dataclass
    class Trap:
        x: Any

        def __post_init__(self) -> None:
            raise AssertionError("__post_init__ ran")

    trap = object.__new__(Trap)
    trap.x = torch.ones(2)
    sys.modules[__name__].Trap = Trap  # type: ignore[attr-defined]
    Trap.__qualname__ = "Trap"
    try:
        make({"t": trap}).save(tmp_path / "t")
        monkeypatch.setattr(pickle, "loads", forbidden)
        monkeypatch.setattr(pickle, "load", forbidden)
        monkeypatch.setattr(pickle, "Unpickler", forbidden)
        monkeypatch.setattr(torch, "load", forbidden)
        monkeypatch.setattr(builtins, "__import__", no_new_imports)
        monkeypatch.setattr(builtins, "eval", forbidden)
        monkeypatch.setattr(builtins, "exec", forbidden)
        loaded = tensorsnap.load(bundle)
        assert torch.equal(loaded["a"], torch.arange(100, dtype=torch.float32))
        assert loaded["b"][1] == 7
        got = tensorsnap.load(tmp_path / "t")["t"]
        assert type(got) is Trap and torch.equal(got.x, torch.ones(2))
    finally:
        del sys.modules[__name__].Trap  # type: ignore[attr-defined]


def test_classes_not_imported_are_not_imported_and_fall_back(bundle: Any) -> None:
    module = "xml.dom.minidom"  # a real module that this test process has not imported
    assert module not in sys.modules

    def edit(m: dict[str, Any]) -> None:
        value = m["records"][1]["value"]
        m["records"][1]["value"] = {
            "type": "namedtuple",
            "class": {"module": module, "qualname": "Node"},
            "fields": ["x", "n"],
            "items": value["items"],
        }

    rewrite_manifest(bundle, edit)
    with pytest.warns(
        BundleWarning, match=r"snap\['b'\]: xml.dom.minidom.Node is not imported.*tuple"
    ):
        got = tensorsnap.load(bundle)["b"]
    assert type(got) is tuple and got[1] == 7
    assert module not in sys.modules


def test_classes_that_are_not_what_the_file_says_are_never_called(bundle: Any) -> None:
    import subprocess

    def edit(m: dict[str, Any]) -> None:
        items = m["records"][1]["value"]["items"]
        m["records"][1]["value"] = {
            "type": "dataclass",
            "class": {"module": "subprocess", "qualname": "Popen"},
            "fields": [["args", items[1]]],
        }

    rewrite_manifest(bundle, edit)
    assert subprocess.Popen  # imported, a class, but not a dataclass
    with pytest.warns(BundleWarning, match=r"subprocess.Popen is not a dataclass with the saved"):
        got = tensorsnap.load(bundle)["b"]
    assert got == {"args": 7}


def test_mapping_node_pointing_at_a_function_falls_back(bundle: Any) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["records"][1]["value"] = {
            "type": "mapping",
            "class": {"module": "os", "qualname": "system"},
            "items": [[{"type": "str", "value": "echo hacked"}, {"type": "int", "value": 1}]],
        }

    rewrite_manifest(bundle, edit)
    with pytest.warns(BundleWarning, match=r"os.system is not imported"):
        got = tensorsnap.load(bundle)["b"]
    assert got == {"echo hacked": 1}
