"""tensorsnap.diff against hand-built snapshots whose differences are known by construction.

Every expected error below is worked out by hand from the literals in the test, not taken from
the code under test.
"""

from __future__ import annotations

import math
import pathlib
from collections import namedtuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorsnap
from tensorsnap._snapshot import Record, Snapshot


def _snap(**values: object) -> Snapshot:
    """A Snapshot holding ``values`` in the given order (keys use '_' for '.')."""
    snap = Snapshot()
    for key, value in values.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        dtype = value.dtype if isinstance(value, torch.Tensor) else None
        nbytes = value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
        snap._add(Record(key, key, 0, None, "output", shape, dtype, nbytes), value)
    return snap


def test_equal_snapshots() -> None:
    a = _snap(fc1=torch.tensor([1.0, -2.0]), fc2=torch.tensor([[3.0]]))
    b = _snap(fc1=torch.tensor([1.0, -2.0]), fc2=torch.tensor([[3.0]]))
    result = tensorsnap.diff(a, b)
    assert result.equal
    assert result.first_diverging is None
    assert result.only_a == () and result.only_b == ()
    assert [k.key for k in result.keys] == ["fc1", "fc2"]
    assert result["fc1"].max_abs == 0 and result["fc1"].max_rel == 0
    assert str(result).startswith("equal: 2 keys")


def test_known_errors_and_first_diverging_in_order_of_a() -> None:
    # b lists the keys in another order: execution order is a's
    a = _snap(
        embed=torch.tensor([1.0, 2.0, 3.0]),
        block=torch.tensor([10.0, 20.0]),
        head=torch.tensor([4.0, 0.0]),
    )
    b = _snap(
        head=torch.tensor([2.0, 0.0]),
        block=torch.tensor([10.0, 16.0]),
        embed=torch.tensor([1.0, 2.0, 3.0]),
    )
    result = tensorsnap.diff(a, b)
    assert not result.equal
    assert result.first_diverging == "block"
    assert [k.key for k in result.keys] == ["embed", "block", "head"]
    block = result["block"]
    assert block.max_abs == pytest.approx(4.0)  # |20 - 16|
    assert block.max_rel == pytest.approx(0.25)  # 4 / 16 (b is the reference)
    assert block.mismatched == 1 and block.numel == 2
    head = result["head"]
    assert head.max_abs == pytest.approx(2.0) and head.max_rel == pytest.approx(1.0)
    assert [k.key for k in result.differing] == ["block", "head"]


def test_tolerance_boundaries() -> None:
    # |a - b| = 0.5; close iff 0.5 <= atol + rtol * |b| = atol + rtol * 4
    a, b = (
        {"x": torch.tensor([4.5], dtype=torch.float64)},
        {"x": torch.tensor([4.0], dtype=torch.float64)},
    )
    assert tensorsnap.diff(a, b, rtol=0, atol=0.5).equal
    assert not tensorsnap.diff(a, b, rtol=0, atol=0.49).equal
    assert tensorsnap.diff(a, b, rtol=0.125, atol=0).equal
    assert not tensorsnap.diff(a, b, rtol=0.12, atol=0).equal
    with pytest.raises(tensorsnap.TensorSnapError, match="rtol must be a number >= 0"):
        tensorsnap.diff(a, b, rtol=-1)


def test_nan_and_inf() -> None:
    nan, inf = math.nan, math.inf
    same = tensorsnap.diff(
        {"x": torch.tensor([nan, inf, -inf])}, {"x": torch.tensor([nan, inf, -inf])}
    )
    assert same.equal and same["x"].max_abs == 0
    one_side = tensorsnap.diff({"x": torch.tensor([nan, 1.0])}, {"x": torch.tensor([1.0, 1.0])})
    assert not one_side.equal
    assert one_side["x"].max_abs == inf and one_side["x"].mismatched == 1
    # inf vs a huge finite number is a difference even though inf <= atol + rtol * inf
    signs = tensorsnap.diff({"x": torch.tensor([inf])}, {"x": torch.tensor([1e30])})
    assert not signs.equal
    flipped = tensorsnap.diff({"x": torch.tensor([inf])}, {"x": torch.tensor([-inf])})
    assert flipped["x"].mismatched == 1


def test_integers_are_compared_exactly() -> None:
    a = {"ids": torch.tensor([5, 7, 9])}
    b = {"ids": torch.tensor([5, 8, 9])}
    result = tensorsnap.diff(a, b, rtol=1.0, atol=10.0)  # tolerances do not apply to integers
    assert not result.equal
    assert result["ids"].max_abs == 1 and result["ids"].mismatched == 1
    assert (
        tensorsnap.diff({"m": torch.tensor([True])}, {"m": torch.tensor([False])})["m"].mismatched
        == 1
    )


def test_shape_dtype_and_one_sided_keys() -> None:
    a = _snap(x=torch.zeros(2, 3), y=torch.ones(2), only_here=torch.ones(1))
    b = _snap(x=torch.zeros(3, 2), y=torch.ones(2, dtype=torch.float16), only_there=torch.ones(1))
    result = tensorsnap.diff(a, b)
    assert not result.equal
    assert result.only_a == ("only_here",) and result.only_b == ("only_there",)
    assert result.first_diverging == "x"
    assert result["x"].problems == ("shape (2, 3) vs (3, 2)",)
    assert result["x"].max_abs is None
    # same values in another dtype: close (not diverging), but reported and not equal
    assert result["y"].close and result["y"].dtype_mismatch
    assert result["y"].problems == ("dtype float32 vs float16",)
    text = str(result)
    assert "only in a: 'only_here'" in text and "only in b: 'only_there'" in text
    assert "first diverging key: 'x'" in repr(result)
    with pytest.raises(tensorsnap.TensorSnapError, match="'only_here' was not compared"):
        result["only_here"]


def test_nested_values_leaf_by_leaf() -> None:
    Pair = namedtuple("Pair", "first second")
    a = {"out": {"logits": torch.tensor([1.0, 2.0]), "hidden": Pair(torch.tensor([0.0]), 3)}}
    b = {"out": {"logits": torch.tensor([1.0, 2.0]), "hidden": Pair(torch.tensor([0.25]), 4)}}
    result = tensorsnap.diff(a, b)
    out = result["out"]
    assert not out.close
    assert out.max_abs == pytest.approx(0.25)
    assert out.worst == "['hidden'][0]"
    assert out.numel == 3  # two logits + one hidden element
    assert "3 vs 4 at ['hidden'][1]" in out.problems
    # container types are not compared: a list with the same leaves matches a tuple
    assert tensorsnap.diff({"k": (torch.ones(1), 2)}, {"k": [torch.ones(1), 2]}).equal
    # a leaf one side lacks is a note, not a difference (SPEC §4: values pair by leaves)
    missing = tensorsnap.diff({"k": (torch.ones(1), torch.ones(2))}, {"k": (torch.ones(1),)})
    assert missing["k"].close and missing["k"].problems == ()
    assert missing["k"].notes[-1] == "a[1] (2,) has no leaf of that shape in b"


def test_complex_errors() -> None:
    a = {"z": torch.tensor([1 + 1j])}
    b = {"z": torch.tensor([1 + 0j])}
    assert tensorsnap.diff(a, b)["z"].max_abs == pytest.approx(1.0)  # |1j|


def test_bundle_paths(tmp_path) -> None:
    a = _snap(fc=torch.tensor([1.0, 2.0]))
    b = _snap(fc=torch.tensor([1.0, 2.0 + 1e-3]))
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    result = tensorsnap.diff(str(tmp_path / "a"), tmp_path / "b")
    assert result["fc"].max_abs == pytest.approx(1e-3, rel=1e-3)
    assert tensorsnap.diff(tmp_path / "a", tmp_path / "b", atol=2e-3).equal
    with pytest.raises(tensorsnap.TensorSnapError, match="takes a Snapshot"):
        tensorsnap.diff(42, a)  # type: ignore[arg-type]


def test_in_place_trap_seen_by_diff() -> None:
    # two runs of one model, the second with a perturbed MLP: divergence starts at the MLP
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True), torch.nn.Linear(4, 2)
    )
    x = torch.randn(3, 4)
    with tensorsnap.capture(model, ops=True) as before:
        model(x)
    with torch.no_grad():
        model[2].weight[0, 0] += 1.0
    with tensorsnap.capture(model, ops=True) as after:
        model(x)
    result = tensorsnap.diff(after, before)
    assert result.first_diverging == "2/linear"
    assert [k.key for k in result.differing] == ["2/linear", "2", ""]


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=20),
    deltas=st.lists(st.floats(-10, 10, width=32), min_size=20, max_size=20),
)
def test_max_errors_match_numpy(values: list[float], deltas: list[float]) -> None:
    x = np.array(values, dtype=np.float32)
    y = x + np.array(deltas[: len(values)], dtype=np.float32)
    result = tensorsnap.diff({"k": torch.from_numpy(x)}, {"k": torch.from_numpy(y)})["k"]
    err = np.abs(x.astype(np.float64) - y.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(err == 0, 0.0, err / np.abs(y.astype(np.float64)))
    assert result.max_abs == pytest.approx(err.max())
    assert result.max_rel == pytest.approx(rel.max())
    expected_bad = int((err > 1e-8 + 1e-5 * np.abs(y.astype(np.float64))).sum())
    given_tolerances = tensorsnap.diff(
        {"k": torch.from_numpy(x)}, {"k": torch.from_numpy(y)}, rtol=1e-5, atol=1e-8
    )["k"]
    assert given_tolerances.mismatched == expected_bad
    # defaults for float32: torch.testing's rtol, atol at least rtol * RMS of the reference
    ref = np.abs(y.astype(np.float64))
    atol = max(1e-5, 1.3e-6 * float(np.sqrt(np.mean(ref**2))))
    assert result.mismatched == int((err > atol + 1.3e-6 * ref).sum())
    if (ref**2).sum():
        expected_l2 = float(np.sqrt((err**2).sum() / (ref**2).sum()))
    else:
        expected_l2 = 0.0 if not err.any() else math.inf
    assert result.rel_l2 == pytest.approx(expected_l2)


@pytest.mark.filterwarnings("ignore::tensorsnap._errors.BundleWarning")  # caches load as dicts
def test_a_live_capture_equals_its_saved_bundle(tmp_path: pathlib.Path) -> None:
    from conftest import tiny_gpt2, token_ids

    model = tiny_gpt2()
    ids = token_ids()
    with tensorsnap.capture(model, grads=True) as snap:
        model(ids, labels=ids).loss.backward()
    snap.save(tmp_path / "run")
    result = tensorsnap.diff(tensorsnap.load(tmp_path / "run"), snap)
    assert result.equal, result.summary()
    assert not result.only_a and not result.only_b
    # and a real difference in one cache tensor is found, at its path
    loaded = tensorsnap.load(tmp_path / "run")
    changed = dict(loaded)
    changed[""] = tensorsnap.snapshot(snap[""])
    changed[""].past_key_values.layers[0].keys.add_(1.0)
    result = tensorsnap.diff(changed, snap)
    assert result.first_diverging == ""


def test_a_faithful_bf16_run_is_close_and_a_planted_bug_in_bf16_is_named() -> None:
    import conftest

    ids = conftest.token_ids()
    runs = {}
    for name in ("fp32", "bf16", "bug"):
        model = conftest.tiny_gpt2(n_layer=6)
        if name != "fp32":
            model = model.to(torch.bfloat16)
        if name == "bug":
            with torch.no_grad():
                model.transformer.h[3].mlp.c_fc.weight.mul_(1.05)
        with torch.no_grad(), tensorsnap.capture(model) as snap:
            model(ids)
        runs[name] = snap
    faithful = tensorsnap.diff(runs["bf16"], runs["fp32"])
    assert len(faithful.keys) == 79 and faithful.first_diverging is None
    assert all(k.rel_l2 is not None and 0 < k.rel_l2 < 1.6e-2 for k in faithful.keys[:-1])
    assert tensorsnap.diff(runs["bug"], runs["fp32"]).first_diverging == "transformer.h.3.mlp.c_fc"
