"""The worker of ``test_fuzz_bundles``: seeded mutations of real bundles, one outcome per case.

Run as a script, ``python _fuzz_worker.py WORK FIRST COUNT``: it saves the bundles below into
``WORK/base`` (the classes they hold live in this module, ``__main__`` here, so that the loader
finds them imported), then for each case ``FIRST .. FIRST + COUNT - 1`` copies one bundle, damages
or edits it (seeded by the case number), loads it, reads every key and compares with the saved
values. It prints ``start N`` before and ``done N OUTCOME DETAIL`` after each case, flushed, so
that the parent can tell a crash (no ``done``) or a hang (``hang``) from an outcome.

Outcomes:
    equal            every key came back equal to what was saved
    error            a TensorSnapError (BundleError included) was raised
    warning          a BundleWarning was raised (a class fallback; warnings are errors here)
    edited           a value differs after an edit the format cannot detect (a field with a
                     valid digest that describes a value, listed in ``_UNDETECTABLE``)
    differs          a value differs where the edit must be detected: a failure
    foreign          another exception escaped: a failure
    hang             the case took longer than ``_CASE_SECONDS``: a failure
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

import tensorsnap
from tensorsnap import BundleWarning, TensorSnapError
from tensorsnap._snapshot import Record, Snapshot

_CASE_SECONDS = 20


class Pair(NamedTuple):
    low: torch.Tensor
    high: torch.Tensor


@dataclasses.dataclass
class Block:
    hidden: torch.Tensor
    attn: tuple[torch.Tensor, ...]
    layer: int
    name: str


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.act(self.fc1(x))
        y = self.fc2(h)
        return {"y": y, "pair": Pair(y.min(dim=1).values, y.max(dim=1).values), "n": 3}


# -- the bundles ------------------------------------------------------------------------------


def _build(base: str) -> None:
    from tensorsnap import _bundle, _demo, _ranks

    torch.manual_seed(0)
    # 1. the demo model's forward and backward: ops, grads, a dict holding a tuple
    model = _demo.TinyGPT(width=16, heads=2, layers=1)
    ids = _demo.example_input(1, 4)
    with tensorsnap.capture(model, ops=True, grads=True) as snap:
        out = model(ids)
        out["logits"].sum().backward()  # type: ignore[union-attr]
    snap.save(os.path.join(base, "demo"))
    # 2. classes, views, dtypes, zero-size and meta tensors, scalars
    base_t = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    values: dict[str, Any] = {
        "views": (base_t, base_t[1:3], base_t.t(), base_t[:, ::2]),
        "block": Block(torch.randn(2, 3), (torch.ones(2), torch.zeros(1)), 7, "h.0"),
        "pair": Pair(torch.tensor([1, 2], dtype=torch.int64), torch.tensor([True, False])),
        "dd": collections.defaultdict(list, {"a": torch.full((3,), 0.5, dtype=torch.float16)}),
        "od": collections.OrderedDict(b=torch.tensor(2.5, dtype=torch.bfloat16), c=1.5),
        "empty": (torch.ones(0, 4), torch.ones(3, device="meta")),
        "scalars": [None, True, -3, 2.5, 1j, "s", b"\x00\xff", torch.float16, torch.Size([2])],
        "bytes": torch.arange(256, dtype=torch.uint8),
    }
    snap2 = Snapshot()
    for key, value in values.items():
        snap2._add(Record(key, key, 0, None, "output", None, None, 0), value)
    snap2.save(os.path.join(base, "classes"))
    # 3. an extract: one shard per leaf, header space, nested per-batch values
    torch.manual_seed(1)
    batches = [torch.randn(3 + i, 6) for i in range(3)]
    tensorsnap.extract(Model(), batches, out=os.path.join(base, "extract"), progress=False)
    # 4. a data-parallel bundle of two ranks, concatenated on load
    for rank in range(2):
        part = Snapshot()
        t = torch.arange(6.0).reshape(3, 2) + 10 * rank
        part._add(Record("fc", "fc", 0, None, "output", (3, 2), torch.float32, 24), t)
        part._add(Record("p", "p", 0, None, "output", None, None, 0), Pair(t, t + 1))
        root = os.path.join(base, "ranks", _ranks.part_name(rank))
        _bundle.save(part, root, rank=rank, world_size=2)
    _ranks.write_index(os.path.join(base, "ranks"), 2, concat=True)


# -- comparing --------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if (a.dtype, a.shape, a.device) != (b.dtype, b.shape, b.device):
            return False
        if a.is_meta:
            return True
        return bytes(_raw(a)) == bytes(_raw(b))
    if isinstance(a, dict):
        if list(a) != list(b):
            return False
        if isinstance(a, collections.defaultdict) and a.default_factory is not b.default_factory:
            return False
        return all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def _raw(t: torch.Tensor) -> list[int]:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).tolist()


def _read(path: str, verify: bool) -> dict[str, Any]:
    snap = tensorsnap.load(path, verify=verify)
    return {key: snap[key] for key in snap}


# -- mutations --------------------------------------------------------------------------------

_HOSTILE: list[Any] = [
    None, True, False, 0, 1, -1, 2, 7, 2**31, 2**63, 2**64 + 1, -(2**63), 1.5, -0.0, 1e308,
    "", "x", "a@0", "data", "float32", "meta", "../x", "manifest.json", "shard-00000.safetensors",
    [], {}, [0], [-1], [1, 2, 3], {"type": "none"}, {"type": "tensor", "index": 0},
    {"module": "os", "qualname": "system"}, {"module": "builtins", "qualname": "eval"},
    "x" * 5000,
]  # fmt: skip

# Fields of a record whose edit (with the digest recomputed) changes what a value is, or only
# what it is called, without any way to tell: they *are* the description of the value. The
# fields of a tensor's view are checked against the record only for values that are one tensor
# (shape and dtype); its stride, offset, blob and device describe it either way.
_DESCRIBING = ("key", "module", "call", "op", "kind", "nbytes", "value")
_VIEW = ("stride", "offset", "blob", "device")


def _paths(node: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [here] if here else []
    if isinstance(node, dict):
        for k, v in node.items():
            found += _paths(v, (*here, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _paths(v, (*here, i))
    return found


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


def _deep(depth: int) -> Any:
    node: Any = []
    for _ in range(depth):
        node = [node]
    return node


def _edit_value(rng: random.Random, old: Any) -> Any:
    roll = rng.random()
    if isinstance(old, bool) or roll < 0.45:
        return copy.deepcopy(rng.choice(_HOSTILE))
    if isinstance(old, int) and roll < 0.9:
        return old + rng.choice([-16, -8, -4, -2, -1, 1, 2, 4, 8, 16, 10**6, -old, old])
    if isinstance(old, str) and roll < 0.9:
        return old[: rng.randrange(len(old) + 1)] + rng.choice(["", "x", ".", "\u00e9", "0"])
    if isinstance(old, list) and old and roll < 0.9:
        items = list(old)
        op = rng.randrange(3)
        if op == 0:
            items.pop(rng.randrange(len(items)))
        elif op == 1:
            items.insert(rng.randrange(len(items) + 1), copy.deepcopy(rng.choice(items)))
        else:
            rng.shuffle(items)
        return items
    if roll < 0.95:
        return copy.deepcopy(rng.choice(_HOSTILE))
    return _deep(rng.choice([50, 900]))


def _write_manifest(file: str, manifest: dict[str, Any]) -> None:
    manifest["manifest_sha256"] = "0" * 64
    text = json.dumps(manifest, indent=1).encode()
    digest = hashlib.sha256(text).hexdigest()
    with open(file, "wb") as f:
        f.write(text.replace(b"0" * 64, digest.encode(), 1))


def _bytes(file: str) -> bytes:
    with open(file, "rb") as f:
        return f.read()


def _files(root: str, suffix: str) -> list[str]:
    found = []
    for directory, _, names in os.walk(root):
        found += [os.path.join(directory, n) for n in sorted(names) if n.endswith(suffix)]
    return sorted(found)


def _mutate(rng: random.Random, root: str) -> tuple[str, bool, bool]:
    """Damage or edit the bundle at ``root``; returns (what, strict, verify)."""
    kind = rng.choices(["bytes", "header", "manifest-bytes", "field"], [6, 4, 1, 10])[0]
    if kind in ("bytes", "header"):
        shards = _files(root, ".safetensors")
        file = rng.choice(shards)
        data = bytearray(_bytes(file))
        length = int.from_bytes(data[:8], "little")
        if kind == "header":  # the header length, or a byte of the header: verify or not
            if rng.random() < 0.4:
                new = max(0, length + rng.choice([-64, -16, -8, -1, 1, 8, 64, 2**40]))
                data[:8] = new.to_bytes(8, "little")
                what = f"header length {length} -> {new} in {os.path.basename(file)}"
            else:
                at = rng.randrange(8, 8 + length)
                data[at] = rng.choice([ord(" "), ord("0"), ord("9"), ord('"'), 0, data[at] ^ 1])
                what = f"header byte {at} of {os.path.basename(file)}"
            verify = rng.random() < 0.5
        else:
            op = rng.randrange(4)
            if op == 0 and len(data) > 8:
                at = rng.randrange(len(data))
                data[at] ^= 1 << rng.randrange(8)
                what = f"bit flip at {at} of {os.path.basename(file)}"
            elif op == 1:
                cut = rng.randrange(len(data))
                del data[cut:]
                what = f"truncated {os.path.basename(file)} to {cut}"
            elif op == 2:
                data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 16, 100])))
                what = f"appended to {os.path.basename(file)}"
            else:
                at = rng.randrange(len(data))
                data[at : at + 32] = bytes(len(data[at : at + 32]))
                what = f"zeroed 32 bytes at {at} of {os.path.basename(file)}"
            verify = True
        with open(file, "wb") as f:
            f.write(bytes(data))
        return what, True, verify
    manifests = _files(root, "manifest.json")
    file = rng.choice(manifests)
    if kind == "manifest-bytes":  # damage without a new digest: always detected
        data = bytearray(_bytes(file))
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        with open(file, "wb") as f:
            f.write(bytes(data))
        return f"manifest bit flip at {at}", True, True
    manifest = json.loads(_bytes(file))
    paths = [p for p in _paths(manifest) if p != ("manifest_sha256",)]
    path = rng.choice(paths)
    parent, last = _get(manifest, path[:-1]), path[-1]
    old = parent[last]
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[last]
        new: Any = "<deleted>"
    else:
        new = _edit_value(rng, old)
        parent[last] = new
    _write_manifest(file, manifest)
    strict = not _describes_value(manifest, path)
    shown = json.dumps(new)[:60] if new != "<deleted>" else new
    return (
        f"{os.path.relpath(file, root)}: {list(path)} {json.dumps(old)[:40]} -> {shown}",
        strict,
        True,
    )


def _describes_value(manifest: dict[str, Any], path: tuple[Any, ...]) -> bool:
    """Whether ``path`` is part of the description of a value (undetectable when edited)."""
    if path[0] != "records":
        return False  # format, versions, digests, shards, ranks: all checked or harmless
    if len(path) <= 2:
        return True  # the list of records, or a whole record, replaced
    if path[2] in _DESCRIBING:
        return True
    if path[2] == "tensors":
        if len(path) <= 4 or path[4] in _VIEW:
            return True
        lone = manifest["records"][path[1]].get("value", {}).get("type") == "tensor"
        return not lone
    return False  # the record's shape and dtype, and the blobs: checked


# -- the loop ---------------------------------------------------------------------------------


class _Hang(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def main() -> None:
    work, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    base = os.path.join(work, "base")
    if not os.path.isdir(base):
        os.makedirs(work, exist_ok=True)
        temp = os.path.join(work, f"base-{os.getpid()}")
        _build(temp)
        os.rename(temp, base)
    names = sorted(os.listdir(base))
    originals = {name: _read(os.path.join(base, name), True) for name in names}
    warnings.simplefilter("error", BundleWarning)
    signal.signal(signal.SIGALRM, _alarm)
    for case in range(first, first + count):
        print(f"start {case}", flush=True)
        rng = random.Random(case)
        name = rng.choice(names)
        root = os.path.join(work, f"case-{case}")
        shutil.copytree(os.path.join(base, name), root)
        what, strict, verify = _mutate(rng, root)
        signal.alarm(_CASE_SECONDS)
        try:
            got = _read(root, verify)
            if list(got) == list(originals[name]) and all(
                _same(got[k], originals[name][k]) for k in got
            ):
                outcome = "equal"
            else:
                outcome = "differs" if strict else "edited"
        except _Hang:
            outcome = "hang"
        except TensorSnapError as err:
            outcome, what = "error", f"{what} | {type(err).__name__}: {str(err)[:200]}"
        except BundleWarning as err:
            outcome, what = "warning", f"{what} | {str(err)[:120]}"
        except Exception as err:
            outcome, what = "foreign", f"{what} | {type(err).__name__}: {str(err)[:300]}"
        finally:
            signal.alarm(0)
        shutil.rmtree(root, ignore_errors=True)
        line = f"{name}: {what}".replace("\n", " ")
        print(f"done {case} {outcome} {line}", flush=True)


if __name__ == "__main__":
    main()
