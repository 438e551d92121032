"""Capture keeps the kernels a plain run uses, copes with nested tensors, and keeps threads
apart: fused fast paths under inputs=True and lazy=True, the nested-tensor encoder, two threads
capturing one model, overlapping blocks and torch.compile's stance.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import nn

import tensorsnap

pytestmark = pytest.mark.filterwarnings(
    "ignore:The PyTorch API of nested tensors:UserWarning",
    "ignore:enable_nested_tensor is True:UserWarning",
)


def _encoder(nested: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    src = torch.randn(3, 7, 16)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:] = mask[2, 3:] = True  # padding at the end of two rows
    return src, mask


def _fused_layer_calls(model: nn.Module, *args: Any, **options: Any) -> tuple[int, Any, Any]:
    """How often the fused encoder-layer kernel ran, the output, and the snapshot."""
    from torch.overrides import TorchFunctionMode

    calls = 0
    fused = torch._transformer_encoder_layer_fwd

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return func(*args, **(kwargs or {}))

    def counting(*a: Any, **k: Any) -> Any:
        nonlocal calls
        calls += 1
        return fused(*a, **k)

    torch._transformer_encoder_layer_fwd = counting  # type: ignore[assignment]
    try:
        with torch.no_grad():
            if options:
                with tensorsnap.capture(model, **options) as snap:
                    out = model(*args)
            else:
                snap, out = None, model(*args)
    finally:
        torch._transformer_encoder_layer_fwd = fused  # type: ignore[assignment]
    return calls, out, snap


@pytest.mark.parametrize(
    "options",
    [{"inputs": True}, {"lazy": True}, {"inputs": True, "lazy": True}, {"saved": True}],
    ids=["inputs", "lazy", "inputs-lazy", "saved"],
)
def test_options_without_ops_keep_the_fused_encoder_kernels(options: dict[str, Any]) -> None:
    model = _encoder()
    src, mask = _batch()
    plain_calls, plain, _ = _fused_layer_calls(model, src, None, mask)
    assert plain_calls == 2  # the reference: a plain run takes the fused path in both layers
    with pytest.warns(tensorsnap.TensorSnapWarning, match="fused fast path"):
        calls, out, snap = _fused_layer_calls(model, src, None, mask, **options)
    assert calls == plain_calls
    assert torch.equal(out, plain)
    assert torch.equal(snap[""], plain)
    if options.get("inputs"):
        assert torch.equal(snap["layers.0:in"][0], src)
        # the encoder hands its layers the mask as a float mask: -inf where it was True
        layer_mask = snap["layers.0:kwargs"]["src_key_padding_mask"]
        assert torch.equal(layer_mask.isneginf(), mask) and not layer_mask.isposinf().any()


@pytest.mark.parametrize("options", [{}, {"inputs": True}, {"lazy": True}], ids=["", "in", "lazy"])
def test_the_nested_tensor_fast_path_is_captured_and_saved(
    options: dict[str, Any], tmp_path: Any
) -> None:
    model = _encoder(nested=True)
    src, mask = _batch()
    with torch.no_grad():
        plain = model(src, src_key_padding_mask=mask)
    warns = pytest.warns(tensorsnap.TensorSnapWarning)
    with warns, torch.no_grad(), tensorsnap.capture(model, **options) as snap:
        out = model(src, src_key_padding_mask=mask)
    assert torch.equal(out, plain)
    layer = snap["layers.0"]
    assert layer.is_nested
    rows = layer.unbind()
    assert [tuple(r.shape) for r in rows] == [(5, 16), (7, 16), (3, 16)]
    record = next(r for r in snap.records if r.key == "layers.0")
    assert record.shape is None and record.dtype == torch.float32
    # the last layer's output is what the encoder pads back: compare the rows with it
    last = snap["layers.1"].unbind()
    for row, length in zip(range(3), (5, 7, 3)):
        assert torch.equal(last[row], plain[row, :length])
    snap.save(tmp_path / "b")
    loaded = tensorsnap.load(tmp_path / "b")
    back = loaded["layers.1"]
    assert back.is_nested
    for got, want in zip(back.unbind(), last):
        assert torch.equal(got, want)


def test_names_lists_nested_outputs() -> None:
    model = _encoder(nested=True)
    src, mask = _batch()
    with pytest.warns(tensorsnap.TensorSnapWarning):
        listed = tensorsnap.names(model, src, src_key_padding_mask=mask)
    assert listed == ["layers.0", "layers.1", ""]


# -- threads ------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) * scale


def test_inputs_in_two_threads_stay_apart() -> None:
    model = _Net()
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(seed: int) -> None:
        try:
            x = torch.full((2, 4), float(seed))
            barrier.wait()
            for _ in range(30):
                with torch.no_grad(), tensorsnap.capture(model, inputs=True) as snap:
                    model(x, scale=float(seed))
                assert list(snap) == [":in", ":kwargs", "a:in", "a", "b:in", "b", ""]
                assert torch.equal(snap[":in"][0], x) and torch.equal(snap["a:in"][0], x)
                assert snap[":kwargs"] == {"scale": float(seed)}
                assert len(snap.records) == 7
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_inputs_of_a_module_with_its_own_pre_hook_are_what_forward_receives() -> None:
    model = _Net()
    handle = model.a.register_forward_pre_hook(lambda m, args: (args[0] * 10,))
    try:
        x = torch.ones(2, 4)
        with torch.no_grad(), tensorsnap.capture(model, inputs=True) as snap:
            model(x)
    finally:
        handle.remove()
    assert torch.equal(snap["a:in"][0], x * 10)
    assert torch.equal(snap[":in"][0], x)


def _stance() -> Any:
    from torch._dynamo import eval_frame

    return eval_frame._stance.stance


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="needs torch >= 2.6")
def test_overlapping_blocks_in_two_threads_restore_the_compile_stance() -> None:
    import torch._dynamo  # a capture sets the stance only once dynamo is loaded

    model = _Net()
    before = _stance()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    stances: dict[str, Any] = {}

    def a() -> None:
        with torch.no_grad(), tensorsnap.capture(model):
            a_in.set()
            b_in.wait()
        a_out.set()

    def b() -> None:
        a_in.wait()
        with torch.no_grad(), tensorsnap.capture(model):
            b_in.set()
            a_out.wait()
            stances["b, after a left"] = _stance()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stances["b, after a left"] == "force_eager"
    assert _stance() == before == "default"


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="needs torch >= 2.6")
def test_a_users_stance_is_restored_exactly() -> None:
    import torch._dynamo

    model = _Net()
    with torch.compiler.set_stance("eager_on_recompile"):
        with tensorsnap.capture(model), tensorsnap.capture(model):
            assert _stance() == "force_eager"
        assert _stance() == "eager_on_recompile"
    assert _stance() == "default"
