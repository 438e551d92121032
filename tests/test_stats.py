"""capture(stats=True): Stats records instead of copies, checked against a plain cloning hook."""

from __future__ import annotations

import math

import pytest
import torch

import tensorsnap


def _reference(t: torch.Tensor) -> dict[str, float]:
    x = t.detach().reshape(-1).to(torch.float64)
    finite = x[torch.isfinite(x)]
    return {
        "min": float(finite.min()),
        "max": float(finite.max()),
        "mean": float(finite.mean()),
        "std": float(finite.std(correction=0)),
        "absmax": float(finite.abs().max()),
        "norm": float(finite.norm()),
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
    }


def test_stats_match_a_cloning_hook_and_keep_no_tensor() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(inplace=True), torch.nn.Linear(16, 4)
    )
    x = torch.randn(5, 8)
    clones: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, a, out, n=n: clones.__setitem__(n, out.detach().clone())
        )
        for n, m in model.named_modules()
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad(), tensorsnap.capture(model, stats=True) as snap:
        model(x)
    assert list(snap) == ["0", "1", "2", ""]
    for key, value in clones.items():
        s = snap[key]
        assert isinstance(s, tensorsnap.Stats)
        assert s.shape == tuple(value.shape) and s.dtype == value.dtype
        for name, expected in _reference(value).items():
            assert getattr(s, name) == pytest.approx(expected, rel=1e-9, abs=1e-12), (key, name)
    # "0" is the Linear output before ReLU(inplace) rewrote it: its minimum is negative
    assert snap["0"].min < 0 and snap["1"].min == 0
    assert snap.records[0].shape == (5, 16) and snap.nbytes == 0
    assert not any(isinstance(v, torch.Tensor) for v in snap.values())


def test_digest_is_exact_over_bytes_not_strides() -> None:
    from tensorsnap._stats import stats_of

    t = torch.randn(4, 6)
    assert stats_of(t.t()).digest == stats_of(t.t().contiguous()).digest
    bumped = t.clone()
    bumped[2, 3] = torch.nextafter(bumped[2, 3], torch.tensor(math.inf))
    assert stats_of(bumped).digest != stats_of(t).digest
    assert stats_of(torch.tensor([0.0])).digest != stats_of(torch.tensor([-0.0])).digest
    nan = stats_of(torch.tensor([1.0, math.nan, math.inf, -math.inf, 3.0]))
    assert (nan.nan, nan.inf, nan.min, nan.max, nan.mean) == (1, 2, 1.0, 3.0, 2.0)


def test_stats_bundles_round_trip_and_diff(tmp_path) -> None:
    from conftest import tiny_gpt2, token_ids

    model = tiny_gpt2().eval()
    ids = token_ids()
    with torch.no_grad(), tensorsnap.capture(model, stats=True, ops=True) as snap:
        model(ids)
    snap.save(tmp_path / "s")
    loaded = tensorsnap.load(tmp_path / "s")
    assert list(loaded) == list(snap)
    key = "transformer.h.0.mlp"
    assert loaded[key] == snap[key] and loaded[key].digest == snap[key].digest
    assert tensorsnap.diff(loaded, snap).equal
    # a copying capture of the same run compares equal through the digests
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as copies:
        model(ids)
    same = tensorsnap.diff(snap, copies)
    assert same.first_diverging is None and same[key].max_abs == 0
    # a change in one weight: the statistics prove the divergence
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
        with tensorsnap.capture(model, stats=True) as changed:
            model(ids)
    result = tensorsnap.diff(changed, loaded)
    assert result.first_diverging == "transformer.h.1.mlp.c_fc"
    assert (
        result["transformer.h.1.mlp.c_fc"].bound and result["transformer.h.1.mlp.c_fc"].max_abs > 0
    )


def test_stats_refuses_options_about_copies() -> None:
    model = torch.nn.Linear(2, 2)
    for option in (
        {"lazy": True},
        {"max_memory": "1GB"},
        {"dtype": torch.float16},
        {"nonfinite": "raise"},
    ):
        with pytest.raises(tensorsnap.TensorSnapError, match=r"stats=True.* does not apply"):
            tensorsnap.capture(model, stats=True, **option)  # type: ignore[arg-type]
    with pytest.raises(tensorsnap.TensorSnapError, match=r"stats=1: expected True or False"):
        tensorsnap.capture(model, stats=1)  # type: ignore[arg-type]


def test_diff_of_integer_stats_uses_the_digest() -> None:
    """Integer statistics equal, bytes not: a permutation of token ids is a difference."""
    from tensorsnap._stats import stats_of

    ids = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([True, False])
    for a, b in ((ids, ids.flip(1)), (mask, mask.flip(0))):
        found = tensorsnap.diff({"ids": stats_of(a)}, {"ids": stats_of(b)})["ids"]
        assert not found.close and found.mismatched == 1 and found.max_abs == 1.0
    same = tensorsnap.diff({"ids": stats_of(ids)}, {"ids": stats_of(ids.clone())})["ids"]
    assert same.close and same.max_abs == 0.0


def test_diff_of_stats_with_nans_in_other_places_is_not_close() -> None:
    """Equal NaN counts cannot show where the NaNs stand; the digests say the bytes differ."""
    from tensorsnap._stats import stats_of

    nan = math.nan
    a = torch.tensor([1.0, nan, 3.0, 3.0])
    b = torch.tensor([1.0, 3.0, nan, 3.0])
    assert tensorsnap.diff({"x": a}, {"x": b})["x"].close is False  # the tensors themselves
    found = tensorsnap.diff({"x": stats_of(a)}, {"x": stats_of(b)})["x"]
    assert not found.close and found.mismatched == 1
    same = tensorsnap.diff({"x": stats_of(a)}, {"x": stats_of(a.clone())})["x"]
    assert same.close
