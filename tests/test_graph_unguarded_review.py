"""A review of graph mode's checks of what dynamo does not guard (session 8, e5eb857..4307857).

``_Unguarded`` reads the model's modules' hooks and classes' ``forward`` at every call and drops
the graphs made with others; the block runs under the compile stance ``"force_eager"``; a
``TorchDispatchMode`` or a disabled dynamo sends a call eagerly; a graph raising inside a mode
region sets the modes back; the eager fallback orders and guards hooks as the eager capture
does. Every test compares graph mode with the eager op capture (keys in order, records, values
bitwise) and the model's outputs with a plain run's.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from _graphcheck import Context
from _graphcheck import compare as _compare
from _graphcheck import detached as _detached
from _graphcheck import graph_is_eager as _graph_is_eager
from _graphcheck import plain as _plain
from _graphcheck import run as _run
from conftest import assert_same, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import tensorsnap
from tensorsnap import TensorSnapWarning
from tensorsnap._graph import _compiled


def _quiet_run(model: nn.Module, call: Callable[[], Any], context: Context | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TensorSnapWarning)  # an eager fallback is allowed
        return _run(model, call, True, context)


def _same_as_eager(
    model: nn.Module,
    call: Callable[[], Any],
    blocks: int = 2,
    context: Context | None = None,
    plain: Callable[[], Any] | None = None,
) -> Any:
    """Graph-mode blocks (eager fallbacks allowed) each equal to the eager capture and a plain
    run (the eager capture first, so that the model's state is the same for each)."""
    eager, out_eager = _run(model, call, False, context)
    out_plain = _plain(plain or call, context)
    assert_same(_detached(out_eager), _detached(out_plain))
    for _ in range(blocks):
        graph, out_graph = _quiet_run(model, call, context)
        _compare(graph, eager)
        assert_same(_detached(out_graph), _detached(out_plain))
    return graph


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).relu())


def _two() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _Two().eval(), torch.randn(3, 4)


# -- hooks changed between blocks ------------------------------------------------------------------


def _kw_hook(m: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
    return out * 3


def _kw_pre(m: nn.Module, args: Any, kwargs: Any) -> Any:
    return (args[0] * 3,), kwargs


_REGISTER: dict[str, Callable[[nn.Module], Any]] = {
    "with_kwargs": lambda m: m.register_forward_hook(_kw_hook, with_kwargs=True),
    "pre_with_kwargs": lambda m: m.register_forward_pre_hook(_kw_pre, with_kwargs=True),
    "always_call": lambda m: m.register_forward_hook(lambda m, i, o: o * 3, always_call=True),
    "prepend": lambda m: m.register_forward_hook(lambda m, i, o: o * 3, prepend=True),
    "pre_prepend": lambda m: m.register_forward_pre_hook(lambda m, i: (i[0] * 3,), prepend=True),
    "no_op_swap": lambda m: m.register_forward_hook(lambda m, i, o: i[0]),
    "no_op_pre": lambda m: m.register_forward_pre_hook(lambda m, i: None),
}


@pytest.mark.parametrize("how", list(_REGISTER))
def test_a_hook_of_each_kind_registered_and_removed_between_blocks(how: str) -> None:
    model, x = _two()
    call = lambda: model(x)  # noqa: E731
    _graph_is_eager(model, call)
    handle = _REGISTER[how](model.b)
    try:
        _same_as_eager(model, call, blocks=3)
    finally:
        handle.remove()
    _graph_is_eager(model, call)


def test_a_hook_replaced_under_the_same_handle_between_blocks() -> None:
    model, x = _two()
    call = lambda: model(x)  # noqa: E731
    handle = model.b.register_forward_hook(lambda m, i, o: None)  # no op: the graph runs
    try:
        _graph_is_eager(model, call)
        model.b._forward_hooks[handle.id] = lambda m, i, o: i[0]  # the module's output: its input
        _same_as_eager(model, call)
    finally:
        handle.remove()


def test_an_instance_forward_set_and_deleted_between_blocks() -> None:
    model, x = _two()
    call = lambda: model(x)  # noqa: E731
    _graph_is_eager(model, call)
    model.b.forward = lambda t: t * 3  # type: ignore[method-assign]
    _same_as_eager(model, call)
    del model.b.forward
    _graph_is_eager(model, call)


def test_a_submodule_swapped_inside_the_block_for_one_with_a_hook() -> None:
    model, x = _two()
    torch.manual_seed(3)
    other = nn.Linear(4, 4)
    other.register_forward_hook(lambda m, i, o: o * 3)
    first = model.b

    def calls() -> Any:
        model.b = first
        out = model(x)
        model.b = other
        try:
            return out, model(x)
        finally:
            model.b = first

    _graph_is_eager(model, lambda: model(x))
    _same_as_eager(model, calls)


def test_a_submodule_swapped_between_blocks_for_one_with_a_hook() -> None:
    model, x = _two()
    torch.manual_seed(3)
    other = nn.Linear(4, 4)
    other.register_forward_hook(lambda m, i, o: o * 3)
    first = model.b
    _graph_is_eager(model, lambda: model(x))
    model.b = other
    try:
        _same_as_eager(model, lambda: model(x))
    finally:
        model.b = first
    _graph_is_eager(model, lambda: model(x))


# -- hooks registered inside the block ------------------------------------------------------------


# (a hook registered in the block on a hooked module lost its ops until 9fac385)


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_a_second_hook_with_ops_registered_in_the_block_on_a_hooked_module(kind: str) -> None:
    # the block opens with a hook on b (its ops left out); a hook added in the block runs
    # after the eager capture's marks, so its ops are the caller's
    model, x = _two()
    first = model.b.register_forward_hook(lambda m, i, o: o * 2)

    def calls() -> Any:
        out = model(x)
        if kind == "forward":
            second = model.b.register_forward_hook(lambda m, i, o: o + 1)
        else:
            second = model.b.register_forward_pre_hook(lambda m, i: (i[0] + 1,))
        try:
            return out, model(x)
        finally:
            second.remove()

    try:
        _same_as_eager(model, calls)
    finally:
        first.remove()


def test_a_hook_removed_and_another_registered_in_the_block_on_the_same_module() -> None:
    model, x = _two()
    holder: dict[str, Any] = {}

    def calls() -> Any:
        out = model(x)
        holder["h"].remove()
        second = model.b.register_forward_hook(lambda m, i, o: o + 1)
        try:
            return out, model(x)
        finally:
            second.remove()

    eager_holder = model.b.register_forward_hook(lambda m, i, o: o * 2)
    holder["h"] = eager_holder
    eager, out_eager = _run(model, calls, False)
    for _ in range(2):
        holder["h"] = model.b.register_forward_hook(lambda m, i, o: o * 2)
        graph, out_graph = _quiet_run(model, calls)
        _compare(graph, eager)
        assert_same(out_graph, out_eager)


@pytest.mark.parametrize("how", ["forward", "pre"])
def test_a_process_wide_hook_registered_in_the_block_that_changes_values(how: str) -> None:
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    model, x = _two()

    def post(m: nn.Module, i: Any, o: Any) -> Any:
        return o * 10 if m is model.a else None

    def pre(m: nn.Module, i: Any) -> Any:
        return (i[0] * 10,) if m is model.b else None

    def calls() -> Any:
        out = model(x)
        handle = (
            register_module_forward_hook if how == "forward" else register_module_forward_pre_hook
        )(post if how == "forward" else pre)
        try:
            return out, model(x)
        finally:
            handle.remove()

    _graph_is_eager(model, lambda: model(x))
    _same_as_eager(model, calls)


# -- modes set back after a graph's error ----------------------------------------------------------


class _Region(nn.Module):
    def __init__(self, region: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.region = region

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.region == "inference_mode":
            with torch.inference_mode():
                h = self.emb(ids) * 2
        elif self.region == "enable_grad":
            with torch.enable_grad():
                h = self.emb(ids) * 2
        elif self.region == "set_grad_enabled":
            with torch.set_grad_enabled(False):
                h = self.emb(ids) * 2
        elif self.region == "nested":
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.lin(self.emb(ids)).float()
        else:
            raise ValueError(self.region)
        return self.lin(h.clone())


def _state() -> tuple[Any, ...]:
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cpu"),
        torch.get_autocast_dtype("cpu"),
    )


@pytest.mark.parametrize("region", ["inference_mode", "enable_grad", "set_grad_enabled", "nested"])
@pytest.mark.parametrize("grad", [True, False])
def test_an_error_inside_a_mode_region_of_the_graph_sets_the_modes_back(
    region: str, grad: bool
) -> None:
    torch.manual_seed(0)
    model = _Region(region)
    good, bad = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 12, 3]])
    context = torch.enable_grad if grad else torch.no_grad
    with context():
        with pytest.raises(IndexError, match="index out of range"):
            model(bad)
        expected = _state()
    for _ in range(3):
        _quiet_run(model, lambda: model(good), context)
    with context():
        try:
            with (
                pytest.raises(IndexError, match="index out of range"),
                tensorsnap.capture(model, ops=True, graph=True),
            ):
                model(bad)
            state = _state()
        finally:
            torch.set_autocast_enabled("cpu", False)
            torch.set_autocast_dtype("cpu", torch.bfloat16)
            torch._C._set_grad_enabled(True)
    assert state == expected


# -- the compile stance ----------------------------------------------------------------------------


def _stance() -> Any:
    return torch._dynamo.eval_frame._stance


class _Counting:
    """A dynamo backend that counts the graphs it is handed and runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("stance", ["eager_on_recompile", "fail_on_recompile", "force_backend"])
def test_a_users_stance_around_the_blocks_is_kept_and_the_graph_still_made(stance: str) -> None:
    model, x = _two()
    call = lambda: model(x)  # noqa: E731
    if stance == "force_backend":
        setting = torch.compiler.set_stance("default", force_backend="eager")
    else:
        setting = torch.compiler.set_stance(stance)
    try:
        before = _stance()
        _graph_is_eager(model, call)
        assert _stance() is before
        # and an error in the block leaves it too
        with (
            pytest.raises(RuntimeError, match="mat1 and mat2"),
            tensorsnap.capture(model, ops=True, graph=True),
        ):
            model(torch.randn(3, 5))
        assert _stance() is before
    finally:
        setting.__exit__(None, None, None)
    assert _stance().stance == "default" and _stance().backend is None


def test_a_users_compiled_function_after_the_blocks_compiles_and_runs_compiled() -> None:
    model, x = _two()
    counting = _Counting()
    step = torch.compile(lambda t: model(t) * 2, backend=counting, fullgraph=True)
    with torch.no_grad():
        expected = model(x) * 2
    _graph_is_eager(model, lambda: model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TensorSnapWarning)
        _run(model, lambda: step(x), True)
    assert counting.graphs == 0  # force_eager inside the block
    with torch.no_grad():
        assert torch.equal(step(x), expected)
    assert counting.graphs == 1  # compiled after it, as without a block
    with torch.no_grad():
        assert torch.equal(step(x), expected)
    assert counting.graphs == 1


class _WithCompiled(nn.Module):
    def __init__(self, backend: Any) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = torch.compile(nn.Linear(4, 4), backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).relu()).softmax(-1)


def test_a_compiled_submodule_before_inside_and_after_blocks() -> None:
    torch.manual_seed(0)
    counting = _Counting()
    model = _WithCompiled(counting).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        model(x)  # the submodule's own graph, made before the blocks
    graphs = counting.graphs
    _same_as_eager(model, lambda: model(x), blocks=3)
    assert counting.graphs == graphs  # the submodule's compiled code did not run in the blocks
    with torch.no_grad():
        model(x)
    assert counting.graphs == graphs  # and its graph still runs after them (no recompile)


_GLOBAL_HOOKS_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"


def test_a_users_compiled_model_wrapper_with_hooks_changed_between_blocks() -> None:
    # capture(model) while the user calls torch.compile(model): torch's warning about global
    # hooks is left aside here (see the next test)
    model, x = _two()
    wrapper = torch.compile(model, backend="eager")
    with torch.no_grad():
        wrapper(x)  # the user's graph of the model, made before any block
    call = lambda: wrapper(x)  # noqa: E731
    # (the reference is the model's own call: torch's wrapper, run outside a block, would run
    # its graph made before the hook, which dynamo does not guard)
    plain = lambda: model(x)  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _GLOBAL_HOOKS_WARNING, UserWarning)
        _same_as_eager(model, call, plain=plain)
        handle = model.a.register_forward_hook(lambda m, i, o: i[0])
        try:
            _same_as_eager(model, call, plain=plain)
        finally:
            handle.remove()
        _same_as_eager(model, call, plain=plain)


# (torch's warning came through until 9fac385)
def test_a_users_compiled_model_wrapper_called_in_a_block_of_the_model_warns_nothing() -> None:
    model, x = _two()
    wrapper = torch.compile(model, backend="eager")
    for graph in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(model, lambda: wrapper(x), graph)
        assert [str(w.message)[:60] for w in caught if w.category is UserWarning] == [], graph


def test_an_error_in_our_compile_leaves_the_blocks_stance() -> None:
    # a model whose graph fails to run after dynamo's way in (a shape error in a new graph)
    model, x = _two()
    _graph_is_eager(model, lambda: model(x))
    with tensorsnap.capture(model, ops=True, graph=True):
        with pytest.raises(RuntimeError, match="mat1 and mat2"):
            model(torch.randn(2, 5))  # new shapes: dynamo's way in, the error raised there
        assert _stance().stance == "force_eager"
        model(x)
    assert _stance().stance == "default"


# -- threads ---------------------------------------------------------------------------------------


# (this recursed until 9fac385: is_compiling() is true while any thread compiles)
def test_a_model_called_in_a_block_while_another_thread_compiles() -> None:
    # (the graph is made first: a call needing dynamo would wait for the other thread's compile)
    model, x = _two()
    call = lambda: model(x)  # noqa: E731
    _graph_is_eager(model, call)
    eager, out_eager = _run(model, call, False)
    with _SlowCompile():
        graph, out_graph = _quiet_run(model, call)
    _compare(graph, eager)
    assert_same(out_graph, out_eager)


# -- hooks and forwards changed inside the block ---------------------------------------------------


def _inside(model: nn.Module, x: torch.Tensor, change: Callable[[], Any]) -> Callable[[], Any]:
    def calls() -> Any:
        first = model(x)
        undo = change()
        try:
            return first, model(x)
        finally:
            undo()

    return calls


def _reassigned_hooks(module: nn.Module) -> Callable[[], Any]:
    from collections import OrderedDict

    original = module._forward_hooks
    module._forward_hooks = OrderedDict()
    module.register_forward_hook(lambda m, i, o: o * 3)

    def undo() -> None:
        module._forward_hooks = original

    return undo


def _instance_forward(module: nn.Module) -> Callable[[], Any]:
    module.forward = lambda t: t * 3  # type: ignore[method-assign]

    def undo() -> None:
        del module.forward

    return undo


def _replaced_hook(module: nn.Module, handle: Any) -> Callable[[], Any]:
    original = module._forward_hooks[handle.id]
    module._forward_hooks[handle.id] = lambda m, i, o: i[0]

    def undo() -> None:
        module._forward_hooks[handle.id] = original

    return undo


_REASSIGNED = pytest.mark.xfail(
    strict=True,
    reason="discrepancy (since 9fac385; contrived): a hook registered into a module's hook dict "
    "replaced inside the block: graph mode's eager fallback records the hook's op as '#1/mul', "
    "the eager capture records no op of it (its guard hooks went with the old dict; the docs say "
    "a hook registered in the block has its ops captured under the caller's key, so the eager "
    "capture may be the one at fault)",
)


@pytest.mark.parametrize(
    "how",
    [pytest.param("reassigned-hook-dict", marks=_REASSIGNED), "instance-forward", "replaced-hook"],
)
def test_a_modules_hooks_or_forward_changed_inside_the_block(how: str) -> None:
    model, x = _two()
    handle = model.b.register_forward_hook(lambda m, i, o: None)  # no op: the graph runs
    try:
        changes = {
            "reassigned-hook-dict": lambda: _reassigned_hooks(model.b),
            "instance-forward": lambda: _instance_forward(model.b),
            "replaced-hook": lambda: _replaced_hook(model.b, handle),
        }
        _graph_is_eager(model, lambda: model(x))
        _same_as_eager(model, _inside(model, x, changes[how]))
        if how == "reassigned-hook-dict":
            # (the new graph's keys differed: dynamo saw the new dict, _Unguarded the old one,
            # so nothing resets compiled.eager, and the model stays eager; values still right)
            _same_as_eager(model, lambda: model(x))
        else:
            _graph_is_eager(model, lambda: model(x))
    finally:
        handle.remove()


# -- many hook changes -----------------------------------------------------------------------------


def test_hooks_changed_more_often_than_the_recompile_limit() -> None:
    model, x = _two()
    call = lambda: model(x)  # noqa: E731
    limit = torch._dynamo.config.recompile_limit
    for k in range(limit + 3):
        handle = model.b.register_forward_hook(lambda m, i, o, k=k: None)  # a new hook each time
        try:
            graph = _graph_is_eager(model, call, blocks=2)
        finally:
            handle.remove()
    assert list(graph) == ["a/linear", "a", "/relu", "b/linear", "b", ""]
    _graph_is_eager(model, call)


def test_hooks_changed_at_every_call_of_one_block() -> None:
    model, x = _two()

    def calls() -> Any:
        outs = []
        for k in range(torch._dynamo.config.recompile_limit + 2):
            handle = model.b.register_forward_hook(lambda m, i, o, k=k: o * (k + 1))
            try:
                outs.append(model(x))
            finally:
                handle.remove()
        return outs

    _same_as_eager(model, calls, blocks=1)


# -- memory ----------------------------------------------------------------------------------------


# (every captured model stayed alive, held by _keys._walks, until b6e187a)
@pytest.mark.parametrize("graph", [False, True])
def test_a_captured_model_is_freed(graph: bool) -> None:
    def block() -> weakref.ref[nn.Module]:
        model, x = _two()
        _run(model, lambda: model(x), graph)
        return weakref.ref(model)

    gone = block()
    gc.collect()
    assert gone() is None


def test_a_model_whose_hooks_and_forward_changed_between_blocks_is_freed() -> None:
    def blocks() -> weakref.ref[nn.Module]:
        model, x = _two()
        call = lambda: model(x)  # noqa: E731
        _graph_is_eager(model, call)
        handle = model.b.register_forward_hook(lambda m, i, o: model.a.weight.sum() * 0 + o)
        _same_as_eager(model, call)
        handle.remove()
        model.b.forward = lambda t: model.a(t)  # type: ignore[method-assign]
        _same_as_eager(model, call)
        model.b.register_forward_pre_hook(lambda m, i: (model, None)[1])  # no op: the graph
        _graph_is_eager(model, call)
        return weakref.ref(model)

    gone = blocks()
    gc.collect()
    assert gone() is None


# -- transformers models ---------------------------------------------------------------------------


def _collecting(found: list[Any]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        found.append(output)  # no op (as transformers' own output collection)

    return hook


@pytest.mark.parametrize("name", ["gpt2"])  # (llama passes too, 11 s more: left out)
def test_transformers_models_with_hooks_registered_and_removed_between_blocks(name: str) -> None:
    build = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}[name]
    model = build(num_hidden_layers=1) if name != "gpt2" else build(n_layer=1)
    ids = token_ids(2, 6)

    def call() -> Any:
        out = model(input_ids=ids)
        return out.last_hidden_state if name == "bert" else out.logits

    _graph_is_eager(model, call, blocks=2)
    layers = [m for n, m in model.named_modules() if n.endswith(("mlp", "attention", "attn"))]
    norm = next(
        m
        for n, m in model.named_modules()
        if "norm" in type(m).__name__.lower() or n.endswith("ln_f")
    )
    # a value-changing hook (ops: eager fallback), then hooks with no op (the graph again)
    handle = norm.register_forward_hook(lambda m, i, o: o * 2)
    try:
        _same_as_eager(model, call, blocks=1)
    finally:
        handle.remove()
    handles = [m.register_forward_pre_hook(lambda m, i: None) for m in layers]
    try:
        _graph_is_eager(model, call, blocks=2)
    finally:
        for h in handles:
            h.remove()
    _graph_is_eager(model, call, blocks=1)


# -- dynamic shapes and float attributes -----------------------------------------------------------


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.f = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) * self.f
        return h * torch.arange(x.shape[0])[:, None] + x.shape[0]


@pytest.mark.xfail(
    strict=True,
    reason="defect: a graph with a dynamic batch and a float attribute as input (.item()) cannot "
    "be planned: 'graph mode could not plan the model's graph (AssertionError: vr must not be "
    "None for symbol s..)', and the model runs eagerly from then on; _graphplan._replay's first "
    "try (a plain FakeTensorMode) cannot .item(), its second (a ShapeEnv of its own, static "
    "shapes) does not know the graph's size symbols",
)
@pytest.mark.parametrize("order", ["float-first", "batch-first", "both"])
def test_dynamic_batches_and_a_changing_float_attribute_together(order: str) -> None:
    torch.manual_seed(0)
    model = _Scaled().eval()
    steps = {
        "float-first": [(2, 0.5), (2, 0.25), (2, 0.125), (3, 0.125), (5, 0.75), (4, 1.5)],
        "batch-first": [(2, 0.5), (3, 0.5), (5, 0.5), (4, 0.25), (2, 0.125), (5, 2.0)],
        "both": [(2, 0.5), (3, 0.25), (5, 0.125), (4, 0.75), (2, 1.5), (3, 3.0)],
    }[order]
    for batch, f in steps:
        model.f = f
        x = torch.randn(batch, 4)
        _same_as_eager(model, lambda x=x: model(x), blocks=2)
    # the graphs made by then serve both changes without an eager call
    model.f = 0.375
    _graph_is_eager(model, lambda: model(torch.randn(6, 4)), blocks=1)


def test_dynamic_batches_on_bert_with_a_hook_registered_between() -> None:
    model = tiny_bert(num_hidden_layers=1)
    calls = [(lambda b=b: model(input_ids=token_ids(b, 5)).last_hidden_state) for b in (2, 3)]
    for call in calls:
        _same_as_eager(model, call, blocks=1)
    handle = model.pooler.register_forward_pre_hook(lambda m, i: None)
    try:
        _same_as_eager(model, calls[1], blocks=1)  # the dynamic graph, made again
        _graph_is_eager(model, calls[1], blocks=1)
    finally:
        handle.remove()


# -- models returning no tensor --------------------------------------------------------------------


class _NoTensor(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.how = how
        self.seen: list[Any] = []

    def forward(self, x: torch.Tensor) -> Any:
        h = self.a(x).relu()
        self.seen.append(h)  # what the model computed goes elsewhere
        outputs = {
            "empty-tuple": lambda: (),
            "empty-dict": lambda: {},
            "nones": lambda: (None, [None], {"k": None}),
            "mixed-constants": lambda: (3, "s", 2.5, True, None),
            "shape": lambda: h.shape,
            "dtype": lambda: h.dtype,
        }
        return outputs[self.how]()


# (a torch.Size output ran eagerly until 9fac385)


@pytest.mark.parametrize(
    "how",
    [
        "empty-tuple",
        "empty-dict",
        "nones",
        "mixed-constants",
        "shape",
        "dtype",
    ],
)
def test_a_model_returning_no_tensor_after_computing_some(how: str) -> None:
    torch.manual_seed(0)
    model = _NoTensor(how)
    x = torch.randn(2, 4)
    eager, out_eager = _run(model, lambda: model(x), False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TensorSnapWarning)
        for _ in range(3):
            graph, out = _run(model, lambda: model(x), True)
            _compare(graph, eager)
            assert out == out_eager and type(out) is type(out_eager)
    assert torch.equal(model.seen[-1], model.seen[0])
    assert _compiled[model].eager is None


# -- a TorchDispatchMode or a disabled dynamo ------------------------------------------------------


class _Counter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_over_a_graph_already_made_and_one_to_make() -> None:
    model, x = _two()
    _graph_is_eager(model, lambda: model(x))
    for batch in (3, 5):  # a graph made (direct), and new shapes (dynamo's way: eagerly)
        y = torch.randn(batch, 4)
        with _Counter():
            eager, out_eager = _run(model, lambda y=y: model(y), False)
        with _Counter() as counter:
            graph, out = _quiet_run(model, lambda y=y: model(y))
        _compare(graph, eager)
        assert_same(out, out_eager)
        assert "aten.addmm.default" in counter.ops  # the user's mode saw the model's ops
    with _Counter() as plain:
        _plain(lambda: model(x))
    with _Counter() as counter:
        _graph_is_eager(model, lambda: model(x), blocks=1)
    assert [op for op in counter.ops if "addmm" in op or "relu" in op] == [
        op for op in plain.ops if "addmm" in op or "relu" in op
    ] * 3  # (the eager capture, the plain run, the graph)


def test_dynamo_disabled_between_calls_of_one_block() -> None:
    model, x = _two()
    y = torch.randn(5, 4)

    def calls() -> Any:
        first = model(x)
        with torch._dynamo.config.patch(disable=True):
            second, third = model(x), model(y)  # a graph made; new shapes: eagerly
        return first, second, third, model(y)

    _graph_is_eager(model, lambda: model(x))
    _same_as_eager(model, calls)


# -- backward hooks --------------------------------------------------------------------------------


# (torch 2.13 ran a graph made before the hook, without it, until 9fac385)
@pytest.mark.parametrize("kind", ["full", "pre"])
def test_a_backward_hook_registered_between_blocks_runs_in_the_backward(kind: str) -> None:
    model, x = _two()
    x = x.requires_grad_()

    def step() -> Any:
        out = model(x)
        out.sum().backward()
        return out

    _graph_is_eager(model, step, torch.enable_grad)
    fired: list[str] = []

    def full(m: nn.Module, grad_in: Any, grad_out: Any) -> Any:
        fired.append("full")
        return (grad_in[0] * 0.5,)

    def pre(m: nn.Module, grad_out: Any) -> Any:
        fired.append("pre")
        return (grad_out[0] * 0.5,)

    if kind == "full":
        handle = model.b.register_full_backward_hook(full)
    else:
        handle = model.b.register_full_backward_pre_hook(pre)
    try:
        grads = []
        for how in ("plain", "graph"):
            x.grad = None
            if how == "plain":
                _plain(step, torch.enable_grad)
            else:
                _quiet_run(model, step, torch.enable_grad)
            grads.append(x.grad.clone())
        assert fired == [kind, kind]
        assert torch.equal(grads[1], grads[0])
    finally:
        handle.remove()


# -- captures inside and around graph-mode blocks -------------------------------------------------


def test_an_eager_capture_of_a_submodule_inside_a_graph_block() -> None:
    model, x = _two()
    _graph_is_eager(model, lambda: model(x))
    with torch.no_grad(), tensorsnap.capture(model.b, ops=True) as inner_eager:
        eager, _ = _run(model, lambda: model(x), False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TensorSnapWarning)  # process-wide hooks: eagerly
        with torch.no_grad(), tensorsnap.capture(model.b, ops=True) as inner_graph:
            graph, _ = _run(model, lambda: model(x), True)
    _compare(graph, eager)
    _compare(inner_graph, inner_eager)


def test_two_models_sharing_a_submodule_with_a_hook_registered_between_blocks() -> None:
    torch.manual_seed(0)
    first, second = _Two().eval(), _Two().eval()
    second.b = first.b  # shared
    x = torch.randn(3, 4)
    for model in (first, second):
        _graph_is_eager(model, lambda model=model: model(x), blocks=2)
    handle = first.b.register_forward_hook(lambda m, i, o: i[0])  # no op: changes the value
    try:
        for model in (second, first):
            _same_as_eager(model, lambda model=model: model(x))
            _graph_is_eager(model, lambda model=model: model(x), blocks=1)
    finally:
        handle.remove()
    for model in (first, second):
        _graph_is_eager(model, lambda model=model: model(x), blocks=2)


# -- modules the model calls that are not its submodules ------------------------------------------


class _Helper(nn.Module):
    """Calls a module it holds in a plain list (not a submodule: no key of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.helpers = [nn.Linear(4, 4)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.helpers[0](self.a(x)).relu()


# (torch 2.13 ran a stale graph without the hook until 9fac385: a wrong value)


@pytest.mark.parametrize("change", ["hook", "class-forward"])
def test_a_hook_on_a_module_the_model_calls_but_does_not_hold_as_a_submodule(change: str) -> None:
    torch.manual_seed(0)
    model = _Helper().eval()
    x = torch.randn(3, 4)
    call = lambda: model(x)  # noqa: E731
    _graph_is_eager(model, call)
    helper = model.helpers[0]
    if change == "hook":
        handle = helper.register_forward_hook(lambda m, i, o: i[0])
        undo = handle.remove
    else:

        class _Other(nn.Linear):
            pass

        _Other.forward = lambda self, t: t * 3  # type: ignore[method-assign]
        helper.__class__ = _Other
        undo = lambda: setattr(helper, "__class__", nn.Linear)  # noqa: E731
    try:
        _same_as_eager(model, call)
    finally:
        undo()
    _same_as_eager(model, call)


def test_a_module_classs_forward_replaced_inside_the_block() -> None:
    model, x = _two()
    _graph_is_eager(model, lambda: model(x))
    forward = _Two.forward

    def change() -> Callable[[], None]:
        _Two.forward = lambda self, t: forward(self, t) * 2  # type: ignore[method-assign]
        return lambda: setattr(_Two, "forward", forward)

    try:
        _same_as_eager(model, _inside(model, x, change))
    finally:
        _Two.forward = forward  # type: ignore[method-assign]
    _graph_is_eager(model, lambda: model(x))


def test_a_users_compiled_function_traced_in_the_block_under_its_own_default_stance() -> None:
    # the user sets the stance back to "default" inside the block: its compiled function
    # traces the model's call, which graph mode's runner breaks out of
    model, x = _two()
    _graph_is_eager(model, lambda: model(x))
    counting = _Counting()
    step = torch.compile(lambda t: model(t).softmax(-1) * 2, backend=counting)

    def call() -> Any:
        with torch.compiler.set_stance("default"):
            return step(x)

    with torch.no_grad():
        expected = model(x).softmax(-1) * 2
    graph, out = _quiet_run(model, call)
    assert torch.equal(out, expected)
    eager, _ = _run(model, lambda: model(x), False)
    _compare(graph, eager)  # the model's call; the user's softmax and mul are not the model's
    assert counting.graphs >= 1  # the user's code outside the model's call was compiled


# -- more hook and forward changes ----------------------------------------------------------------


def test_a_base_classs_forward_patched_between_blocks() -> None:
    # libraries patch nn.Linear.forward process-wide: every Linear of the model changes
    model, x = _two()
    _graph_is_eager(model, lambda: model(x))
    forward = nn.Linear.forward
    nn.Linear.forward = lambda self, t: forward(self, t) * 2  # type: ignore[method-assign]
    try:
        _same_as_eager(model, lambda: model(x))
        _graph_is_eager(model, lambda: model(x), blocks=1)
    finally:
        nn.Linear.forward = forward  # type: ignore[method-assign]
    _graph_is_eager(model, lambda: model(x))


class _Kwargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.inner = _Scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.a(x), scale=2.0)


class _Scale(nn.Module):
    def forward(
        self, h: torch.Tensor, scale: float = 1.0, shift: torch.Tensor | None = None
    ) -> Any:
        h = h * scale
        return h if shift is None else h + shift


def test_a_kwargs_pre_hook_adding_a_tensor_keyword_registered_between_blocks() -> None:
    torch.manual_seed(0)
    model = _Kwargs().eval()
    x = torch.randn(3, 4)
    shift = torch.full((4,), 0.5)
    _graph_is_eager(model, lambda: model(x))

    def pre(m: nn.Module, args: Any, kwargs: Any) -> Any:
        return args, {**kwargs, "shift": shift, "scale": 3.0}

    handle = model.inner.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        _same_as_eager(model, lambda: model(x))
        _graph_is_eager(model, lambda: model(x), blocks=1)
    finally:
        handle.remove()
    _graph_is_eager(model, lambda: model(x))


def test_a_process_wide_hook_present_when_the_block_opens_and_another_added_in_it() -> None:
    from torch.nn.modules.module import register_module_forward_hook

    model, x = _two()

    def double(m: nn.Module, i: Any, o: Any) -> Any:
        return o * 2 if m is model.a else None

    def calls() -> Any:
        out = model(x)
        handle = register_module_forward_hook(lambda m, i, o: o + 1 if m is model.b else None)
        try:
            return out, model(x)
        finally:
            handle.remove()

    first = register_module_forward_hook(double)
    try:
        _same_as_eager(model, calls)
    finally:
        first.remove()
    _graph_is_eager(model, lambda: model(x))


def test_a_model_compiled_in_place_before_the_blocks_keeps_its_compiled_call() -> None:
    model, x = _two()
    counting = _Counting()
    model.compile(backend=counting)
    with torch.no_grad():
        expected = model(x)
    assert counting.graphs == 1
    slot = model._compiled_call_impl
    _same_as_eager(model, lambda: model(x))
    assert model._compiled_call_impl is slot
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert counting.graphs == 1  # its own graph runs again after the blocks


def test_refused_blocks_leave_the_stance_as_it_was() -> None:
    model, x = _two()
    with tensorsnap.capture(model, ops=True, graph=True):
        with (
            pytest.raises(tensorsnap.TensorSnapError, match="graph"),
            tensorsnap.capture(model, ops=True, graph=True),
        ):
            pass
        assert _stance().stance == "force_eager"
        with torch.no_grad():
            model(x)
    assert _stance().stance == "default"
    with (
        pytest.raises(tensorsnap.TensorSnapError, match="lazy"),
        tensorsnap.capture(model, ops=True, graph=True, lazy=True),
    ):
        pass
    assert _stance().stance == "default"
    _graph_is_eager(model, lambda: model(x))


class _SlowCompile:
    """Another thread inside a torch.compile session (its backend waits) for a ``with`` block."""

    def __enter__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

        def slow(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            self.entered.set()
            self.release.wait(60)
            return gm.forward

        other = torch.compile(lambda t: t * 2, backend=slow)
        self.thread = threading.Thread(target=other, args=(torch.ones(2),))
        self.thread.start()
        assert self.entered.wait(60)

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.thread.join()


# (not refused while another thread compiled until 24a631b)


@pytest.mark.parametrize("other_thread_compiling", [False, True])
def test_a_submodule_called_on_its_own_in_a_block_is_refused(other_thread_compiling: bool) -> None:
    model, x = _two()
    _graph_is_eager(model, lambda: model(x))
    with (
        _SlowCompile() if other_thread_compiling else contextlib.nullcontext(),
        pytest.raises(tensorsnap.TensorSnapError, match="called on its own"),
        torch.no_grad(),
        tensorsnap.capture(model, ops=True, graph=True),
    ):
        model(x)
        model.b(x)


_PREPENDED_PRE = pytest.mark.xfail(
    strict=True,
    reason="defect (forward hooks fixed in 24a631b, pre-hooks not): a pre-hook registered in the "
    "block with prepend=True on a module that had hooks when the block opened: graph mode's "
    "eager fallback records its op as 'b#1/add', the eager capture leaves it out (there it runs "
    "before the capture's _forward_starts pre-hook, registered at the block's entry)",
)


@pytest.mark.parametrize("kind", ["forward", pytest.param("pre", marks=_PREPENDED_PRE)])
def test_a_prepended_hook_with_ops_registered_in_the_block_on_a_hooked_module(kind: str) -> None:
    # prepended, it runs before the eager capture's marks: its ops are left out, as the
    # hook's there when the block opened
    model, x = _two()
    first = model.b.register_forward_hook(lambda m, i, o: o * 2)

    def calls() -> Any:
        out = model(x)
        if kind == "forward":
            second = model.b.register_forward_hook(lambda m, i, o: o + 1, prepend=True)
        else:
            second = model.b.register_forward_pre_hook(lambda m, i: (i[0] + 1,), prepend=True)
        try:
            return out, model(x)
        finally:
            second.remove()

    try:
        _same_as_eager(model, calls)
    finally:
        first.remove()


def _eagerly(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` with torch's compiled code run eagerly (a compiled submodule's own graph, made
    before a hook, would run without it: dynamo does not guard hooks)."""

    def run() -> Any:
        with torch.compiler.set_stance("force_eager"):
            return call()

    return run


# (a wrong value until 24a631b: the graph skipped the wrapper's hooks)


@pytest.mark.parametrize(
    "on",
    [
        "wrapper",
        "wrapped",
        "wrapper-from-start",
    ],
)
def test_a_hook_registered_between_blocks_on_a_compiled_submodule(on: str) -> None:
    torch.manual_seed(0)
    model = _WithCompiled("eager").eval()
    x = torch.randn(3, 4)
    call = lambda: model(x)  # noqa: E731
    target = model.b if on.startswith("wrapper") else model.b._orig_mod
    hook = lambda m, i, o: i[0]  # noqa: E731  (no op: the value changes)
    if on == "wrapper-from-start":
        target.register_forward_hook(hook)
    _same_as_eager(model, call, blocks=3, plain=_eagerly(call))
    handle = target.register_forward_hook(hook)
    try:
        _same_as_eager(model, call, blocks=3, plain=_eagerly(call))
    finally:
        handle.remove()
    _same_as_eager(model, call, plain=_eagerly(call))


def test_a_backward_hook_registered_between_calls_of_one_block() -> None:
    model, x = _two()
    x = x.requires_grad_()
    fired: list[int] = []

    def steps() -> Any:
        grads = []
        for k in range(3):
            handle = None
            if k == 1:
                handle = model.b.register_full_backward_hook(
                    lambda m, gi, go: (fired.append(1), (gi[0] * 0.5,))[1]
                )
            x.grad = None
            model(x).sum().backward()
            grads.append(x.grad.clone())
            if handle is not None:
                handle.remove()
        return grads

    _graph_is_eager(model, lambda: model(x), torch.enable_grad)
    expected = _plain(steps, torch.enable_grad)
    assert len(fired) == 1
    _, grads = _quiet_run(model, steps, torch.enable_grad)
    assert len(fired) == 2
    assert_same(grads, expected)
