"""Gradients hold exactly what flowed: views that no gradient reaches, tensors inside objects,
PackedSequence outputs, modules that return their input, one tensor at several positions.

References are independent of tensorsnap: hand-derived values, and ``conftest.GradReference``
(tensor hooks that clone, put on every tensor of every module output by plain module hooks).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from conftest import (
    GradReference,
    assert_grads_match,
    tensor_paths,
    tiny_clip,
    tiny_gpt2,
    tiny_vit,
    token_ids,
)
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils.rnn import pack_padded_sequence
from torch.overrides import TorchFunctionMode

import tensorsnap


def _grad_keys(model: nn.Module, run: Any, **options: Any) -> tuple[set[str], Any]:
    listed = tensorsnap.names(model, *run.args, grads=True, **options, **run.kwargs)
    with tensorsnap.capture(model, grads=True, **options) as snap:
        run.loss(model(*run.args, **run.kwargs)).backward()
    return set(listed), snap


class _Run:
    def __init__(self, *args: Any, loss: Any = None, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.loss = loss if loss is not None else (lambda out: out.sum())


# -- 1. a view that no gradient reaches --------------------------------------------------------


class _PairWithTranspose(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = x * 2
        return a, a.t()


def test_a_view_returned_beside_its_base_gets_no_gradient_when_none_flows() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    model = nn.Sequential(_PairWithTranspose())
    with tensorsnap.capture(model, grads=True) as snap:
        out = model(x)
        (out[0] ** 2).sum().backward()  # only `a` reaches the loss
    a = (x * 2).detach()
    grad = snap["0:grad"]
    assert type(grad) is tuple and len(grad) == 2
    assert torch.equal(grad[0], 2 * a) and grad[1] is None


def test_a_view_used_only_for_its_shape_gets_no_gradient() -> None:
    class ShapeOnly(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x * 3
            last = h[:, -1]  # needed for the shape only
            return h.sum() * last.shape[0]

    model = ShapeOnly()
    x = torch.randn(3, 4, requires_grad=True)
    listed, snap = _grad_keys(model, _Run(x, loss=lambda out: out), ops=True)
    assert "/getitem" in snap and "/getitem:grad" not in snap
    assert "/mul:grad" in snap and torch.equal(snap["/mul:grad"], torch.full((3, 4), 3.0))
    assert listed == set(snap)


def _tiny_bart() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.BartModel(config).eval()


def test_bart_shape_only_slice_gets_no_gradient_and_names_agree() -> None:
    model = _tiny_bart()
    ids = token_ids(2, 8)
    listed = tensorsnap.names(model, input_ids=ids, ops=True, grads=True)
    with GradReference(model) as reference, tensorsnap.capture(model, ops=True, grads=True) as snap:
        model(input_ids=ids).last_hidden_state.pow(2).sum().backward()
    assert "encoder/getitem" in snap and "encoder/getitem:grad" not in snap
    assert_grads_match(snap, reference)
    assert set(listed) == set(snap)


def test_clip_transposed_logits_get_no_gradient_when_the_loss_does_not_use_them() -> None:
    model = tiny_clip()
    ids = token_ids(2, 8)
    pixels = torch.randn(2, 3, 16, 16)
    with GradReference(model) as reference, tensorsnap.capture(model, grads=True) as snap:
        out = model(input_ids=ids, pixel_values=pixels)
        out.logits_per_text.pow(2).sum().backward()
    grad = snap[":grad"]
    assert grad["logits_per_image"] is None
    assert torch.equal(grad["logits_per_text"], 2 * out.logits_per_text.detach())
    assert_grads_match(snap, reference)


# -- 2. tensors held by plain objects ----------------------------------------------------------


class _Holder:
    def __init__(self, value: torch.Tensor, unused: torch.Tensor, tag: str) -> None:
        self.value, self.unused, self.tag = value, unused, tag


def test_a_tensor_inside_an_object_gets_its_gradient_in_an_object_of_that_class() -> None:
    class Inner(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[_Holder, torch.Tensor]:
            return _Holder(x * 2, x * 5, "kept"), x * 3

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            holder, other = self.inner(x)
            return (holder.value**2).sum() + other.sum()

    model = Outer()
    x = torch.randn(2, 4, requires_grad=True)
    listed, snap = _grad_keys(model, _Run(x, loss=lambda out: out))
    grad = snap["inner:grad"]
    assert type(grad) is tuple and type(grad[0]) is _Holder
    assert torch.equal(grad[0].value, 4 * x.detach()) and grad[0].unused is None
    assert grad[0].tag == "kept"  # an object's other attributes are kept as they were
    assert torch.equal(grad[1], torch.ones(2, 4))
    assert listed == set(snap)


def test_transformers_cache_gradients_equal_tensor_hooks() -> None:
    model = tiny_gpt2()
    ids = token_ids()
    with GradReference(model) as reference, tensorsnap.capture(model, grads=True) as snap:
        out = model(ids, use_cache=True)
        # a loss through the cache as well as the logits: the cache's tensors get gradients
        cache_part = sum(t.sum() for _, t in tensor_paths(out.cache))
        (out.logits.pow(2).sum() + cache_part).backward()
    cache = snap[":grad"]["cache"]
    assert type(cache) is type(out.cache)
    paths = [path for path, _ in tensor_paths(cache)]
    assert len(paths) == 4  # keys and values of both layers
    assert_grads_match(snap, reference)  # the root's cache among them


# -- 3. PackedSequence -------------------------------------------------------------------------


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_packed_sequence_outputs_get_packed_gradients(rnn: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("rnn", rnn(4, 5, batch_first=True))
    x = torch.randn(3, 6, 4, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=True)
    listed = tensorsnap.names(model.rnn, packed, grads=True)
    with GradReference(model.rnn) as reference, tensorsnap.capture(model.rnn, grads=True) as snap:
        out, _ = model.rnn(packed)
        (out.data**2).sum().backward()
    grad = snap[":grad"]
    packed_grad = grad[0]
    assert type(packed_grad) is type(out)  # a PackedSequence, built without its validation
    assert torch.equal(packed_grad.data, 2 * out.data.detach())
    assert packed_grad.batch_sizes is None  # an integer tensor: no gradient
    assert_grads_match(snap, reference)
    assert set(listed) == set(snap)


# -- 4. modules that return their input --------------------------------------------------------


@pytest.mark.parametrize(
    "block",
    [
        lambda: nn.Identity(),
        lambda: nn.Dropout(0.5).eval(),
        lambda: nn.Dropout(0.0).train(),
    ],
    ids=["identity", "eval-dropout", "dropout-p0"],
)
def test_a_module_returning_its_input_gets_grad_in_equal_to_its_grad(block: Any) -> None:
    model = nn.Sequential(nn.Linear(4, 4), block(), nn.Linear(4, 2))
    x = torch.randn(3, 4, requires_grad=True)
    listed, snap = _grad_keys(model, _Run(x))
    assert "1:grad_in" in snap
    assert torch.equal(snap["1:grad_in"][0], snap["1:grad"])
    expected = torch.ones(3, 2) @ model[2].weight.detach()
    assert torch.equal(snap["1:grad"], expected)
    assert listed == set(snap)


def test_gpt2_dropouts_in_eval_give_names_equal_to_capture() -> None:
    model = tiny_gpt2()
    ids = token_ids()
    run = _Run(ids, loss=lambda out: out.logits.pow(2).sum())
    listed, snap = _grad_keys(model, run)
    assert "transformer.drop:grad_in" in snap
    assert listed == set(snap)


# -- 5. one tensor at several positions --------------------------------------------------------


def test_the_same_tensor_at_several_positions_gets_its_gradient_at_each() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.Sequential()
    model.add_module("attn", attn)
    h = torch.randn(2, 5, 8, requires_grad=True)
    with tensorsnap.capture(attn, grads=True) as snap:
        out, _ = attn(h, h, h)
        out.pow(2).sum().backward()
    grad_in = snap[":grad_in"]
    assert len(grad_in) == 3 and all(g is not None for g in grad_in)
    assert torch.equal(grad_in[0], grad_in[1]) and torch.equal(grad_in[1], grad_in[2])
    # the reference: the gradient into h, which reaches h through this call only
    assert torch.equal(grad_in[0], h.grad)


class _TwoUses(nn.Module):
    """Reads its input in two ops: its gradient arrives in two parts, one per op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3 + x.sin()


@pytest.mark.parametrize("options", [{"dtype": torch.float16}, {"stats": True}])
def test_an_input_gradient_in_parts_is_summed_before_the_copy(options: dict[str, Any]) -> None:
    # the parts must add in the gradient's own dtype and the copy be made of the sum: adding a
    # float32 part to a float16 copy gave a float32 value, and Stats could not be added at all
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _TwoUses())
    x = torch.randn(3, 4)
    seen: list[torch.Tensor] = []
    with tensorsnap.capture(model, grads=True, include="1:grad_in", **options) as snap:
        h = model[0](x)
        h.register_hook(lambda g: seen.append(g.clone()))  # the reference: h's whole gradient
        model[1](h).pow(2).sum().backward()
    (grad_in,) = snap["1:grad_in"]
    if "dtype" in options:
        assert grad_in.dtype == torch.float16
        assert torch.equal(grad_in, seen[0].half())
    else:
        identity = nn.Identity()  # the statistics of the reference, taken the same way
        with torch.no_grad(), tensorsnap.capture(identity, stats=True) as ref:
            identity(seen[0])
        assert grad_in == ref[""]


def test_distinct_tensors_keep_their_own_input_gradients() -> None:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    q, k = (torch.randn(2, 5, 8, requires_grad=True) for _ in range(2))
    with tensorsnap.capture(attn, grads=True) as snap:
        out, _ = attn(q, k, k)
        out.pow(2).sum().backward()
    grad_in = snap[":grad_in"]
    assert torch.equal(grad_in[0], q.grad)
    assert torch.equal(grad_in[1], k.grad) and torch.equal(grad_in[2], k.grad)


# -- the zoo: names agree with capture, gradients with tensor hooks --------------------------------


def _zoo() -> dict[str, Any]:
    import conftest

    ids = token_ids(2, 8)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def encoder() -> nn.Module:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()

    return {
        "gpt2": (conftest.tiny_gpt2, {"input_ids": ids}),
        "bert": (conftest.tiny_bert, {"input_ids": ids}),
        "llama": (conftest.tiny_llama, {"input_ids": ids}),
        "t5": (conftest.tiny_t5, {"input_ids": ids, "decoder_input_ids": ids}),
        "bart": (_tiny_bart, {"input_ids": ids}),
        "clip": (tiny_clip, {"input_ids": ids, "pixel_values": pixels}),
        "vit": (tiny_vit, {"pixel_values": pixels}),
        "encoder": (encoder, {"src": torch.randn(2, 5, 16)}),
    }


def _whole_output_loss(output: Any) -> torch.Tensor:
    """A loss that every tensor of the output (caches included) takes part in: the output
    that names() looks at, since it cannot know which part a user's loss will read."""
    parts = [t.pow(2).sum() for _, t in tensor_paths(output) if t.requires_grad]
    return torch.stack(parts).sum()


@pytest.mark.parametrize("ops", [False, True], ids=["modules", "ops"])
@pytest.mark.parametrize("name", list(_zoo()))
def test_zoo_names_equal_capture_and_gradients_equal_tensor_hooks(name: str, ops: bool) -> None:
    build, kwargs = _zoo()[name]
    model = build()
    torch.manual_seed(5)  # dropout in train-mode models draws the same masks in both runs
    listed = tensorsnap.names(model, ops=ops, grads=True, **kwargs)
    torch.manual_seed(5)
    with GradReference(model) as reference, tensorsnap.capture(model, ops=ops, grads=True) as snap:
        _whole_output_loss(model(**kwargs)).backward()
    assert set(listed) == set(snap), (
        f"only listed: {sorted(set(listed) - set(snap))[:8]}; "
        f"only captured: {sorted(set(snap) - set(listed))[:8]}"
    )
    assert_grads_match(snap, reference)


class _HookEveryOp(TorchFunctionMode):
    """The op-level reference: a cloning tensor hook on every tensor that a torch-level call
    made inside a named module's forward returns, keyed ``module#call/op#count:grad`` by
    process-wide module hooks of its own (as ``test_capture_fastpaths._CloneEveryOp``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[tuple[str, dict[str, int]]] = []
        self.calls: dict[str, int] = {}
        self.grads: dict[str, dict[str, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        found = list(tensor_paths(result))
        if self.stack and found:
            name, counts = self.stack[-1]
            op = func.__name__
            op = op[2:-2] if op.startswith("__") and op.endswith("__") else op
            count = counts.get(op, 0)
            counts[op] = count + 1
            key = f"{name}/{op}" if count == 0 else f"{name}/{op}#{count}"
            for path, t in found:
                if t.requires_grad:
                    t.register_hook(partial(self._arrived, f"{key}:grad", path))
        return result

    def _arrived(self, key: str, path: str, grad: torch.Tensor) -> None:
        self.grads.setdefault(key, {})[path] = grad.detach().clone()

    def pre(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        if name is not None:
            call = self.calls[name] = self.calls.get(name, -1) + 1
            self.stack.append((name if call == 0 else f"{name}#{call}", {}))

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in self.names:
            self.stack.pop()


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5", "bart", "clip"])
def test_zoo_op_gradients_equal_tensor_hooks_on_every_op_result(name: str) -> None:
    build, kwargs = _zoo()[name]
    model = build()
    reference = _HookEveryOp(model)
    handles = [
        module_hooks.register_module_forward_pre_hook(reference.pre),
        module_hooks.register_module_forward_hook(reference.post),
    ]
    try:
        with reference, tensorsnap.capture(model, ops=True, grads=True) as snap:
            _whole_output_loss(model(**kwargs)).backward()
    finally:
        for handle in handles:
            handle.remove()
    assert_grads_match(snap, reference, ops=True, at_least=20)
