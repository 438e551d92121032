"""Graph mode (``capture(ops=True, graph=True)``) against the eager op capture, bitwise.

Every test runs the same model twice, once per mode, and compares keys (in order), records and
values, and the model's own outputs; the eager capture is itself tested against cloning hooks
elsewhere in the suite.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_same,
    tiny_bert,
    tiny_clip,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    tiny_vit,
    token_ids,
)
from torch import nn
from transformers.utils import ModelOutput

import tensorsnap
from tensorsnap import TensorSnapError, TensorSnapWarning
from tensorsnap._graph import _compiled


def _run(model: nn.Module, call: Any, graph: bool, grad: bool = False) -> tuple[Any, Any]:
    torch.manual_seed(7)  # train-mode dropout draws the same masks in both runs
    context = torch.enable_grad() if grad else torch.no_grad()
    with context, tensorsnap.capture(model, ops=True, graph=graph) as snap:
        out = call()
    return snap, out


def _assert_same_capture(model: nn.Module, call: Any, grad: bool = False) -> Any:
    """The graph's capture equals the eager one (a first graph-mode call checks the graph's
    keys against an eager run; the one compared here runs the graph)."""
    eager, out_eager = _run(model, call, graph=False, grad=grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TensorSnapWarning)  # no call may have run eagerly
        _run(model, call, graph=True, grad=grad)  # checks the graph's keys, runs eagerly
        _run(model, call, graph=True, grad=grad)  # compiles and runs the graph
        compiles = _compiled[model].compiles
        graph, out_graph = _run(model, call, graph=True, grad=grad)
    assert _compiled[model].compiles >= 1 and _compiled[model].eager is None
    assert _compiled[model].compiles == compiles  # compiled once, reused
    assert list(graph) == list(eager)
    for key in eager:
        assert_same(graph[key], eager[key], key)
    assert graph.records == eager.records  # keys, modules, calls, ops, shapes, dtypes, bytes
    if grad:
        out_graph, out_eager = out_graph.detach(), out_eager.detach()
    assert_same(out_graph, out_eager)
    return graph


# -- real models ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["bert", "bert-train", "vit", "clip", "encoder-train", "gpt2", "llama", "t5"]
)
def test_real_models_give_the_eager_keys_records_and_values(name: str) -> None:
    ids = token_ids(2, 8)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    if name in ("gpt2", "llama"):
        # with their caches: a DynamicCache in module outputs, rebuilt from the graph
        model = tiny_gpt2() if name == "gpt2" else tiny_llama()
        call = lambda: model(input_ids=ids)  # noqa: E731
    elif name == "t5":  # an EncoderDecoderCache (two DynamicCaches and a dict of flags)
        model = tiny_t5()
        call = lambda: model(input_ids=ids, decoder_input_ids=ids)  # noqa: E731
    elif name.startswith("bert"):
        model = tiny_bert()
        if name == "bert-train":
            model.train()  # dropout masks: the same draws in both modes
        call = lambda: model(input_ids=ids)  # noqa: E731
    elif name == "vit":
        model = tiny_vit()
        call = lambda: model(pixel_values=pixels)  # noqa: E731
    elif name == "clip":
        model = tiny_clip()
        call = lambda: model(input_ids=ids, pixel_values=pixels)  # noqa: E731
    else:  # torch's own encoder, train mode (no fused kernel)
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()
        src = torch.randn(2, 5, 16)
        call = lambda: model(src)  # noqa: E731
    _assert_same_capture(model, call)


def test_the_graph_is_compiled_once_and_reused_across_blocks_and_calls() -> None:
    model = tiny_bert()
    ids = token_ids(2, 8)

    def twice() -> Any:
        model(input_ids=ids)
        return model(input_ids=ids)

    graph = _assert_same_capture(model, twice)
    assert "encoder.layer.0#1" in graph and "encoder.layer.0.output#1/add" in graph
    for _ in range(2):
        _assert_same_capture(model, twice)
    assert _compiled[model].compiles == 1


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = 2.0  # a Python number dynamo reads while tracing: a guard on its value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) * self.scale


def test_a_graph_runs_without_dynamo_while_its_guards_pass_and_recompiles_when_they_fail() -> None:
    model = _Scaled()

    def call(rows: int = 3) -> Any:
        return model(torch.ones(rows, 4))

    _assert_same_capture(model, call)
    compiled = _compiled[model]
    dynamo_calls = []
    through_dynamo = compiled.fn
    compiled.fn = lambda *a: dynamo_calls.append(1) or through_dynamo(*a)
    _assert_same_capture(model, call)  # the graph's guards pass: no call goes through dynamo
    assert dynamo_calls == []
    # a changed Python value, new shapes, then the first graph again
    for scale, rows in [(3.0, 3), (3.0, 5), (2.0, 3)]:
        model.scale = scale
        eager, _ = _run(model, lambda: call(rows), graph=False)  # noqa: B023
        for _ in range(3):  # (a new graph: its keys checked, then compiled, then run)
            graph, _ = _run(model, lambda: call(rows), graph=True)  # noqa: B023
        expected = torch.relu(model.linear(torch.ones(rows, 4))) * scale
        assert torch.equal(graph[""], expected.detach())
        assert list(graph) == list(eager)
        for key in eager:
            assert_same(graph[key], eager[key], key)
    assert len(dynamo_calls) > 0  # the failed guards sent calls to dynamo, which recompiled
    torch._dynamo.reset()  # dynamo drops its graphs: the next calls go through dynamo again
    dynamo_calls.clear()
    _assert_same_capture(model, call)
    assert dynamo_calls != []


def test_gpt2_without_its_cache_runs_eagerly_with_a_warning_naming_why() -> None:
    # without a cache, transformers looks for packed sequences in the position ids: eagerly it
    # reads their values and builds no mask for one sequence, compiled it always builds one
    model = tiny_gpt2()
    ids = token_ids(2, 8)
    call = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
    eager, out = _run(model, call, graph=False)
    why = r"find_packed_sequence_indices\(\) .* asks whether it is being compiled"
    with pytest.warns(TensorSnapWarning, match=why):
        graph, out_graph = _run(model, call, graph=True)
    for _ in range(2):  # later blocks: eager too, without another warning
        with warnings.catch_warnings():
            warnings.simplefilter("error", TensorSnapWarning)
            graph, out_graph = _run(model, call, graph=True)
        assert list(graph) == list(eager)
        for key in eager:
            assert_same(graph[key], eager[key], key)
        assert torch.equal(out_graph.logits, out.logits)
    assert _compiled[model].compiles == 0


# -- module outputs that are objects ------------------------------------------------------------


class _State:
    """A plain object a module returns (as transformers' caches are returned)."""

    def __init__(self, h: torch.Tensor, scale: float, kind: type) -> None:
        self.h, self.parts, self.scale, self.kind = h, [h * 2], scale, kind
        self.flags = {0: True}


class _Slotted:
    __slots__ = ("h",)

    def __init__(self, h: torch.Tensor) -> None:
        self.h = h


class _Reduced(_State):
    def __reduce__(self) -> Any:
        return (_State, (self.h, self.scale, self.kind))


class _MakesState(nn.Module):
    def __init__(self, cls: type) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cls = cls

    def forward(self, x: torch.Tensor) -> Any:
        h = self.lin(x)
        return _Slotted(h) if self.cls is _Slotted else self.cls(h, 0.5, nn.Linear)


class _UsesState(nn.Module):
    """Writes the object's tensors and attributes after the submodule returned it."""

    def __init__(self, cls: type) -> None:
        super().__init__()
        self.make = _MakesState(cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.make(x)
        if isinstance(state, _Slotted):
            return state.h.relu_()
        state.h.relu_()  # the tensor the object held when it was returned, written
        state.parts.append(state.h * 3)  # its list grown, an attribute replaced
        state.scale = 2.0
        return state.h + state.parts[-1] * state.scale


def test_an_object_a_module_returns_is_rebuilt_as_it_was_when_the_module_returned() -> None:
    model = _UsesState(_State)
    x = torch.randn(3, 4)
    graph = _assert_same_capture(model, lambda: model(x))
    state = graph["make"]
    assert type(state) is _State and state.kind is nn.Linear and state.scale == 0.5
    assert len(state.parts) == 1 and state.flags == {0: True}
    h = model.make.lin(x).detach()
    assert torch.equal(state.h, h) and torch.equal(state.parts[0], h * 2)  # before the relu_


@pytest.mark.parametrize("cls", [_Slotted, _Reduced], ids=["slots", "reduce"])
def test_objects_copied_through_their_own_methods_run_eagerly(cls: type) -> None:
    model = _UsesState(cls)
    x = torch.randn(3, 4)
    eager, out = _run(model, lambda: model(x), graph=False)
    with pytest.warns(TensorSnapWarning, match=f"module 'make' returned a .*{cls.__name__}"):
        graph, out_graph = _run(model, lambda: model(x), graph=True)
    assert list(graph) == list(eager) and _compiled[model].compiles == 0
    for key in eager:
        assert_same(graph[key], eager[key], key)
    assert type(graph["make"]) is type(eager["make"])
    assert_same(out_graph, out)


class _IndexesUnused(nn.Module):
    """Indexing whose result nothing reads (transformers' mask expansion does this)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[:, None]  # unused: dynamo drops such nodes from its graph
        cols = x[None, :]
        del rows
        return cols * 2


def test_indexing_whose_result_is_unused_is_still_captured() -> None:
    model = _IndexesUnused()
    x = torch.randn(3, 4)
    graph = _assert_same_capture(model, lambda: model(x))
    assert list(graph) == ["/getitem", "/getitem#1", "/mul", ""]
    assert torch.equal(graph["/getitem"], x[:, None])


# -- in-place writes, views, escapes ----------------------------------------------------------


class _Writes(nn.Module):
    """Values that later ops of the same graph overwrite, directly and through views."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("seen", torch.zeros(6))

    def forward(self, x: torch.Tensor) -> Any:
        h = self.lin(x)  # rewritten in place by the ReLU module below
        part = h[:, :3]  # a view, written through its base
        self.act(h)
        h += x  # x += on the module output
        h[:, 0] = 5.0  # setitem
        part.mul_(2)  # a write through the view rewrites h
        y = torch.sigmoid(h)
        torch.mul(y, 3, out=y)  # out=
        F.relu(y, inplace=True)
        self.seen.add_(y.sum(0))  # a buffer written in place: escapes
        t = y.t()  # a view kept as a view
        return t, h, y * 1


def test_values_written_later_in_the_graph_keep_the_value_they_had() -> None:
    model = _Writes()
    x = torch.randn(4, 6)

    def call() -> Any:
        model.seen.zero_()  # the same buffer state in every run
        return model(x.clone())

    graph = _assert_same_capture(model, call)
    # independent references for two of them: the Linear's output before the ReLU rewrote it
    # and the view before the mul_ rewrote it
    with torch.no_grad():
        h = model.lin(x)
    assert torch.equal(graph["lin"], h)
    assert torch.equal(graph["/getitem"], h[:, :3])


def test_values_the_caller_can_reach_are_copies() -> None:
    model = _Writes()
    x = torch.randn(4, 6)
    for _ in range(2):  # the first call checks the graph's keys; the second runs the graph
        with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=True) as snap:
            t, h, out = model(x)
    assert _compiled[model].compiles == 1
    kept = {key: tensorsnap.snapshot(snap[key]) for key in snap}
    t.zero_()  # the caller writes what the model returned, and its inputs and parameters
    h.zero_()
    out.zero_()
    x.zero_()
    with torch.no_grad():
        model.lin.weight.zero_()
        model.seen.zero_()
    for key in snap:
        assert_same(snap[key], kept[key], key)


def test_keys_holding_one_value_of_the_graph_hold_one_tensor() -> None:
    model = tiny_gpt2()
    ids = token_ids(2, 8)
    graph = _assert_same_capture(model, lambda: model(input_ids=ids))
    # the model's own output is rebuilt from the graph: its logits are lm_head's output, and
    # the cache in it holds the tensors of the attention's cat ops, one copy for every key
    assert graph[""].logits is graph["lm_head"] is graph["lm_head/linear"]
    layer = graph[""].past_key_values.layers[0]
    assert layer.keys is graph["transformer.h.0.attn/cat"]
    assert layer.keys is graph["transformer"].past_key_values.layers[0].keys
    # containers are per key, as the eager capture's copies are
    assert graph[""].past_key_values is not graph["transformer"].past_key_values


@dataclasses.dataclass
class _Derived(ModelOutput):  # type: ignore[misc]
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.doubled = self.a * 2  # an attribute __init__ makes from the values, in the graph


class _ReturnsDerived(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.lin(x)
        return _Derived(a=h.relu(), b=h if x.shape[0] > 2 else None)


@pytest.mark.parametrize("rows", [2, 3])
def test_model_outputs_keep_the_attributes_their_init_made(rows: int) -> None:
    model = _ReturnsDerived()
    inputs = [torch.randn(rows, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    _assert_same_capture(model, lambda: model(inputs[0]))
    for x in inputs[1:]:  # new values through the same graph: nothing kept from an earlier run
        eager, _ = _run(model, lambda: model(x), graph=False)  # noqa: B023
        graph, _ = _run(model, lambda: model(x), graph=True)  # noqa: B023
        assert list(graph) == list(eager)
        for key in eager:
            assert_same(graph[key], eager[key], key)
        assert torch.equal(graph[""].doubled, eager[""].doubled)
        assert list(graph[""].keys()) == (["a", "b"] if rows > 2 else ["a"])


class _Splits(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(6, 12)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.lin(x)
        if self.how == "split":  # views that together reach all of h: kept as they are
            parts = h.split(4, dim=-1)
        elif self.how == "part":  # views of part of h: copied apart from it
            parts = h[:, :8].split(4, dim=-1)
        elif self.how == "chunk":  # disjoint rows: the eager capture copies each on its own
            parts = h.chunk(2, dim=0)
        else:  # split, then one part written in place by a later node
            parts = h.split(4, dim=-1)
            parts[1].mul_(2)
        return [p.sum() for p in parts]


@pytest.mark.parametrize("how", ["split", "part", "chunk", "written"])
def test_a_split_value_has_the_eager_layout_bytes_and_values(how: str) -> None:
    model = _Splits(how)
    x = torch.randn(4, 6)
    graph = _assert_same_capture(model, lambda: model(x))
    eager, _ = _run(model, lambda: model(x), graph=False)
    key = "/chunk" if how == "chunk" else "/split"
    for got, want in zip(graph[key], eager[key], strict=True):
        assert (got.stride(), got.storage_offset()) == (want.stride(), want.storage_offset())
    storages = {t.untyped_storage().data_ptr() for t in graph[key]}
    assert len(storages) == len({t.untyped_storage().data_ptr() for t in eager[key]})


def test_grad_mode_forward_and_backward_match_a_plain_run() -> None:
    model = tiny_bert()
    model.train()
    ids = token_ids(2, 8)

    def loss() -> torch.Tensor:
        return model(input_ids=ids).last_hidden_state.pow(2).sum()

    _assert_same_capture(model, loss, grad=True)
    torch.manual_seed(7)
    model.zero_grad()
    loss().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.manual_seed(7)
    model.zero_grad()
    with tensorsnap.capture(model, ops=True, graph=True) as snap:
        loss().backward()
    assert all(not v.requires_grad for v in snap.values() if isinstance(v, torch.Tensor))
    for n, p in model.named_parameters():
        if n in plain:
            assert torch.equal(p.grad, plain[n]), n


# -- graph breaks ------------------------------------------------------------------------------


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if h.sum() > 0:  # data-dependent: dynamo breaks the graph here  # noqa: SIM108
            h = self.b(h) * 2
        else:
            h = torch.relu(h) - 1
        return h + 1


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["taken", "not-taken"])
def test_a_data_dependent_branch_gives_the_eager_keys_in_both_branches(sign: float) -> None:
    model = _Branchy()
    with torch.no_grad():
        model.a.weight.copy_(torch.eye(4))
        model.a.bias.fill_(0.0)
    x = torch.full((2, 4), sign)
    eager, out = _run(model, lambda: model(x), graph=False)
    with pytest.warns(TensorSnapWarning, match="eager capture instead of its graph"):
        graph, out_graph = _run(model, lambda: model(x), graph=True)
        graph, out_graph = _run(model, lambda: model(x), graph=True)
    assert list(graph) == list(eager)
    assert ("b" in graph) == (sign > 0)
    for key in eager:
        assert_same(graph[key], eager[key], key)
    assert torch.equal(out_graph, out)


# -- the model stays as it was -----------------------------------------------------------------


class _Tuples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.linear(x)
        pair = (h, x)
        return h, (h * 2, h + 1), pair, [pair], (h, x)  # pair held twice; (h, x) built again


def test_outputs_holding_several_tuples_take_the_graph() -> None:
    model = _Tuples()
    graph = _assert_same_capture(model, lambda: model(torch.ones(2, 4)))
    out = graph[""]
    assert out[2] is out[3][0]  # one tuple held twice is one tuple, as the eager copy has it
    # a tuple built twice from the same objects is rebuilt once (dynamo cannot tell tuples
    # apart but by their items; the eager copy has two): equal items, one object
    assert out[4] is out[2]


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_real_models_with_return_dict_false_take_the_graph(name: str) -> None:
    model = tiny_gpt2() if name == "gpt2" else tiny_bert()
    ids = token_ids(2, 8)
    graph = _assert_same_capture(model, lambda: model(input_ids=ids, return_dict=False))
    assert type(graph[""]) is tuple


def test_a_compiled_wrapper_inside_the_model_is_traced_into_its_graph() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[1] = torch.compile(model[1], backend="eager")  # an OptimizedModule as a child
    x = torch.randn(3, 4)
    graph = _assert_same_capture(model, lambda: model(x))
    assert list(graph) == ["0/linear", "0", "1/relu", "1", "2/linear", "2", ""]


def test_what_graph_mode_patches_in_dynamo_is_as_it_was_after_each_block() -> None:
    from torch._dynamo.output_graph import OutputGraph

    model = nn.Linear(2, 2)
    before = OutputGraph.remove_node
    for _ in range(2):  # (the patches are made in the first block, reused in the second)
        with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=True):
            assert OutputGraph.remove_node is not before
            model(torch.ones(1, 2))
        assert OutputGraph.remove_node is before

    def theirs(*args: Any, **kwargs: Any) -> Any:  # another library's patch, made since
        return before(*args, **kwargs)

    OutputGraph.remove_node = theirs  # type: ignore[method-assign]
    try:
        with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=True):
            ours = OutputGraph.remove_node
            model(torch.ones(1, 2))
        assert OutputGraph.remove_node is theirs
        # ours wrapped what the attribute held when the block began, not what it held before
        wrapped = [cell.cell_contents for cell in ours.__closure__ or ()]
        assert ours is not theirs and theirs in wrapped and before not in wrapped
    finally:
        OutputGraph.remove_node = before  # type: ignore[method-assign]


def test_the_model_and_a_users_compiled_model_are_left_as_they_were() -> None:
    from torch.nn.modules import module as hooks

    model = tiny_bert()
    ids = token_ids(2, 8)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        before = compiled(input_ids=ids).last_hidden_state
    state = dict(model.__dict__)
    global_hooks = dict(hooks._global_forward_hooks)
    with torch.no_grad(), tensorsnap.capture(compiled, ops=True, graph=True) as snap:
        inside = compiled(input_ids=ids).last_hidden_state
    assert "encoder.layer.0.output/add" in snap and torch.equal(inside, before)
    assert dict(model.__dict__) == state and "_compiled_call_impl" not in model.__dict__
    assert dict(hooks._global_forward_hooks) == global_hooks
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).last_hidden_state, before)

    model.compile(backend="eager")  # the user's own compiled call is put back exactly
    own = model._compiled_call_impl
    with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=True):
        model(input_ids=ids)
    assert model._compiled_call_impl is own


# -- refusals, by name -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ops": False}, "needs ops=True"),
        ({"ops": "aten"}, "needs ops=True"),
        ({"grads": True}, "grads=True"),
        ({"saved": True}, "saved=True"),
        ({"inputs": True}, "inputs=True"),
        ({"lazy": True}, "lazy=True"),
    ],
)
def test_options_graph_mode_cannot_serve_are_refused(options: dict[str, Any], message: str) -> None:
    options = {"ops": True, **options}
    with pytest.raises(TensorSnapError, match=message):
        tensorsnap.capture(nn.Linear(2, 2), graph=True, **options)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_transformers_hidden_states_and_attentions_hooks_take_the_graph(name: str) -> None:
    # transformers (5.x) collects hidden states and attentions with forward hooks of its own
    # on the layers, which run no ops: the graph holds them, and its keys are the eager ones
    model = tiny_gpt2() if name == "gpt2" else tiny_bert()
    ids = token_ids(2, 8)
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True, output_attentions=True)

    def call() -> Any:
        return model(input_ids=ids, output_hidden_states=True, output_attentions=True)

    graph = _assert_same_capture(model, call)
    assert any(m._forward_hooks for m in model.modules())  # the hooks are there
    assert len(graph[""].hidden_states) == len(plain.hidden_states) > 2
    for got, want in zip(graph[""].hidden_states, plain.hidden_states, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(graph[""].attentions, plain.attentions, strict=True):
        assert torch.equal(got, want)
    _assert_same_capture(model, lambda: model(input_ids=ids))  # and without them


def test_forward_hooks_that_run_no_ops_take_the_graph_and_run_each_call() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    seen: dict[str, Any] = {}
    model[1].register_forward_hook(lambda module, args, output: seen.update(relu=output))
    model[0].register_forward_pre_hook(lambda module, args: (args[0],))
    for rows in (3, 3, 4):
        x = torch.randn(rows, 2)
        _assert_same_capture(model, lambda: model(x))  # noqa: B023
        assert torch.equal(seen["relu"], torch.relu(model[0](x)).detach())  # the last call's


def test_forward_hooks_that_run_ops_run_eagerly_with_a_warning_naming_the_module() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    model[1].register_forward_hook(lambda module, args, output: output * 2)
    x = torch.randn(3, 2)
    eager, out_eager = _run(model, lambda: model(x), graph=False)
    with pytest.warns(TensorSnapWarning, match=r"module '1' has forward hooks of its own"):
        _run(model, lambda: model(x), graph=True)
    graph, out_graph = _run(model, lambda: model(x), graph=True)  # eagerly, warned once
    assert list(graph) == list(eager)
    for key in eager:
        assert_same(graph[key], eager[key], key)
    assert_same(out_graph, out_eager)


def test_graph_true_must_be_a_bool() -> None:
    with pytest.raises(TensorSnapError, match="graph="):
        tensorsnap.capture(nn.Linear(2, 2), ops=True, graph=1)  # type: ignore[arg-type]


def test_extract_with_graph_writes_the_same_bundle(tmp_path: Any) -> None:
    model = tiny_bert()
    batches = [{"input_ids": token_ids(2, 8, seed=s)} for s in range(3)]
    batches.append({"input_ids": token_ids(1, 8, seed=9)})  # a last batch of another shape
    eager = tensorsnap.extract(model, batches, out=tmp_path / "eager", ops=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TensorSnapWarning)
        graph = tensorsnap.extract(
            model, batches, out=tmp_path / "graph", ops=True, progress=False, graph=True
        )
    assert list(graph) == list(eager)
    for key in eager:
        assert_same(graph[key], eager[key], key)


# -- options that change what is kept --------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"dtype": torch.float16},
        {"stats": True},
        {"include": ["layers.1*", "*/linear"], "exclude": "*self_attn*"},
        {"max_memory": 0},
        {"device": "cpu"},  # where a GPU is, the offload path (gpu_check.py's graph row)
    ],
    ids=["dtype", "stats", "include", "spill", "device"],
)
def test_copy_options_give_what_the_eager_capture_gives(options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    src = torch.randn(2, 5, 16)

    def run(graph: bool) -> Any:
        with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=graph, **options) as s:
            model(src)
        return s

    eager = run(False)
    run(True)  # checks the graph
    with warnings.catch_warnings():
        warnings.simplefilter("error", TensorSnapWarning)
        graph = run(True)
    assert _compiled[model].compiles == 1 and _compiled[model].eager is None
    assert list(graph) == list(eager) and len(eager) > 3
    for key in eager:
        if options.get("stats"):
            assert graph[key] == eager[key], key
        else:
            assert_same(graph[key], eager[key], key)


def test_nonfinite_raise_names_the_first_bad_key_as_eager_does() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.log(x)  # -inf at 0, nan below
            return torch.relu(y) + 1

    model = Bad()
    good, bad = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([1.0, 0.0, 2.0])
    for _ in range(2):  # graph mode's check of the graph, then the graph, on finite values
        with tensorsnap.capture(model, ops=True, graph=True, nonfinite="raise") as snap:
            model(good)
    assert list(snap) == ["/log", "/relu", "/add", ""]
    for graph in (False, True):
        with (
            pytest.raises(tensorsnap.NonFiniteError, match="'/log'"),
            tensorsnap.capture(model, ops=True, graph=graph, nonfinite="raise") as snap,
        ):
            model(bad)
        assert list(snap) == ["/log"]
    assert _compiled[model].compiles == 1


def test_an_eager_capture_nested_inside_sees_its_values_and_the_graph_comes_back() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    x = torch.randn(2, 3)
    with torch.no_grad():
        for _ in range(2):
            with tensorsnap.capture(model, ops=True, graph=True):
                model(x)
        with (
            pytest.warns(TensorSnapWarning, match="process-wide module hooks"),
            tensorsnap.capture(model, ops=True, graph=True) as outer,
            tensorsnap.capture(model, ops=True) as inner,
        ):
            model(x)
        assert list(outer) == list(inner) == ["0/linear", "0", "1/tanh", "1", ""]
        for key in inner:
            assert torch.equal(outer[key], inner[key])
        with warnings.catch_warnings():
            warnings.simplefilter("error", TensorSnapWarning)
            with tensorsnap.capture(model, ops=True, graph=True) as alone:
                model(x)
    assert list(alone) == list(inner) and _compiled[model].eager is None


def test_calls_from_another_thread_are_not_captured_and_run_as_plain_calls() -> None:
    import threading

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    x = torch.randn(2, 3)
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(2):
            with tensorsnap.capture(model, ops=True, graph=True) as snap:
                model(x)
                worker = threading.Thread(target=lambda: seen.append(model(x * 2)))
                worker.start()
                worker.join()
        assert list(snap) == ["0/linear", "0", "1/relu", "1", ""]
        assert torch.equal(seen[-1], model(x * 2))
