"""A review of graph mode's direct call of dynamo's guarded code (commit eb58598).

Once dynamo has compiled a graph, ``_Compiled.call`` evaluates the guards of dynamo's cache
entries itself and calls the code dynamo made for the first one that passes, skipping dynamo's
frame evaluation; none passing, dynamo decides (and recompiles). Every test here changes
something dynamo guards (or should guard) between blocks or between calls, and compares the
graph-mode capture with the eager op capture (the reference, itself tested against cloning
hooks elsewhere): keys in order, every record field, values bitwise, and the model's output
with a plain run's. Where the direct path is meant to run, a wrapper of ``compiled.fn``
(dynamo's way in) shows that no call went through dynamo.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from _graphcheck import Context
from _graphcheck import compare as _compare
from _graphcheck import detached as _detached
from _graphcheck import graph_is_eager as _graph_is_eager
from _graphcheck import plain as _plain
from _graphcheck import run as _run
from conftest import assert_same, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import tensorsnap
from tensorsnap import TensorSnapWarning
from tensorsnap._graph import _compiled


class _Dynamo:
    """Counts the calls that go through dynamo (``compiled.fn``) rather than the direct path."""

    def __init__(self, model: nn.Module) -> None:
        self.compiled = _compiled[model]
        self.calls = 0
        through = self.compiled.fn

        def counted(*args: Any) -> Any:
            self.calls += 1
            return through(*args)

        self.compiled.fn = counted


def _direct_is_eager(
    model: nn.Module, call: Callable[[], Any], context: Context | None = None
) -> None:
    """A block whose guards all pass: it runs without dynamo and still gives the eager capture."""
    dynamo = _Dynamo(model)
    compiles = dynamo.compiled.compiles
    _graph_is_eager(model, call, context, blocks=1)
    assert dynamo.calls == 0 and dynamo.compiled.compiles == compiles


# -- Python state dynamo guards, changed between blocks --------------------------------------------

_GLOBAL = 1.5


class _Reads(nn.Module):
    """A forward reading every kind of Python state dynamo guards."""

    scale = 1.0  # a class attribute

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.k = 2
        self.f = 0.5
        self.flag = True
        self.how = "relu"
        self.span = (1, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.a(x) * self.k + self.f
        h = torch.relu(h) if self.how == "relu" else torch.tanh(h)
        if self.flag:
            h = h * _GLOBAL
        h = h[:, self.span[0] : self.span[1] + 1].sum(-1, keepdim=True) + h * self.scale
        if y is not None:
            h = h + y
        return self.drop(self.b(h))


def _set_global(value: float) -> None:
    global _GLOBAL
    _GLOBAL = value


def _frozen_weight(model: nn.Module) -> None:
    model.b.weight.requires_grad_(False)


def _data_replaced(model: nn.Module) -> None:
    with torch.no_grad():
        model.b.weight.data = torch.full((4, 4), 0.25)


_CHANGES: dict[str, Callable[[Any], None]] = {
    "int": lambda m: setattr(m, "k", 3),
    "float": lambda m: setattr(m, "f", 0.25),
    "bool": lambda m: setattr(m, "flag", False),
    "str": lambda m: setattr(m, "how", "tanh"),
    "tuple": lambda m: setattr(m, "span", (0, 3)),
    "class-attribute": lambda m: setattr(type(m), "scale", 3.0),
    "global": lambda m: _set_global(-2.0),
    "train": lambda m: m.train(),
    "submodule": lambda m: setattr(m, "a", nn.Linear(4, 4)),
    "parameter": lambda m: setattr(m.b, "weight", nn.Parameter(torch.randn(4, 4))),
    "data": _data_replaced,
    "frozen": _frozen_weight,
    "instance-forward": lambda m: setattr(m.a, "forward", lambda t: t * 3),
}


@pytest.mark.parametrize("change", list(_CHANGES))
def test_python_state_changed_between_blocks_gives_the_eager_capture(change: str) -> None:
    torch.manual_seed(0)
    model = _Reads().eval()
    x = torch.randn(3, 4)
    grad = torch.enable_grad if change == "frozen" else None
    try:
        _graph_is_eager(model, lambda: model(x), grad)
        _direct_is_eager(model, lambda: model(x), grad)  # nothing changed: no dynamo
        _CHANGES[change](model)
        _graph_is_eager(model, lambda: model(x), grad)
        _direct_is_eager(model, lambda: model(x), grad)
    finally:
        _Reads.scale = 1.0
        _set_global(1.5)


def test_inputs_of_other_kinds_and_kwargs_come_and_go_between_calls_of_one_block() -> None:
    torch.manual_seed(0)
    model = _Reads().eval()
    x = torch.randn(3, 4)
    y = torch.ones(3, 4)
    inputs = [
        lambda: model(x),
        lambda: model(x, y=y),  # a keyword argument added
        lambda: model(x, y=None),
        lambda: model(torch.randn(4, 3).t()),  # not contiguous
        lambda: model(torch.randn(3, 8)[:, ::2]),  # strided
        lambda: model(x, y),
        lambda: model(x),  # back to the first graph
    ]

    def calls() -> list[Any]:
        return [call() for call in inputs]

    _graph_is_eager(model, calls)
    _direct_is_eager(model, calls)  # every call's graph exists: none goes through dynamo


class _Sums(nn.Module):
    def forward(self, x: torch.Tensor, y: Any = None, z: Any = None) -> torch.Tensor:
        h = (x * 2 + 1).sum(-1)
        if y is not None:
            h = h + y
        if z is not None:
            h = h * z
        return h


def test_inputs_of_other_dtypes_devices_and_keyword_orders_in_one_block() -> None:
    model = _Sums()
    x = torch.randn(3, 4)
    xs = [x, x.double(), x.half(), torch.arange(12).view(3, 4), x.bfloat16(), x]
    ones, twos = torch.ones(3), torch.full((3,), 2.0)

    def calls() -> list[Any]:
        outs = [model(t) for t in xs]
        outs.append(model(x, y=ones, z=twos))
        outs.append(model(x, z=twos, y=ones))  # the same keywords in another order
        return outs

    _graph_is_eager(model, calls)
    _direct_is_eager(model, calls)
    meta = torch.empty(3, 4, device="meta")  # no values: keys and records only
    eager, _ = _run(model, lambda: model(meta), False)
    for _ in range(3):
        graph, _ = _run(model, lambda: model(meta), True)
    assert list(graph) == list(eager) == ["/mul", "/add", "/sum", ""]
    assert [tuple(r) for r in graph.records] == [tuple(r) for r in eager.records]
    assert all(graph[key].device.type == "meta" for key in graph)


def test_an_input_that_requires_grad_then_not_in_grad_mode() -> None:
    torch.manual_seed(0)
    model = _Reads().eval()
    x = torch.randn(3, 4)
    leaf = torch.randn(3, 4, requires_grad=True)

    def calls() -> list[Any]:
        return [model(x), model(leaf), model(x)]

    _graph_is_eager(model, calls, torch.enable_grad)
    _direct_is_eager(model, calls, torch.enable_grad)


class _Tensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("b", torch.arange(4.0))
        self.w = nn.Parameter(torch.ones(4))
        self.plain = torch.ones(4)  # a tensor attribute, neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.b.shape[0]  # a graph of static shapes holds n as a constant
        return x[:, :n] * self.b + self.w.sum() + self.plain.sum()


_IN_PLACE: dict[str, Callable[[Any], Any]] = {
    "buffer-data-shape": lambda m: setattr(m.b, "data", torch.arange(6.0)),
    "parameter-data-shape": lambda m: setattr(m.w, "data", torch.ones(6)),
    "buffer-resize": lambda m: m.b.resize_(6).copy_(torch.arange(6.0)),
    "attribute-data-shape": lambda m: setattr(m.plain, "data", torch.ones(6)),
    "parameter-data-dtype": lambda m: setattr(m.w, "data", torch.ones(4, dtype=torch.float64)),
    "model-double": lambda m: m.double(),
    "requires-grad": lambda m: m.b.requires_grad_(True),
}


@pytest.mark.parametrize("change", list(_IN_PLACE))
def test_a_tensor_of_the_model_changed_in_place_between_blocks(change: str) -> None:
    # the same tensor objects in the same module dicts (dynamo may skip guards on tensors of
    # an unchanged dict): their new shapes, dtypes and flags must still send calls to dynamo
    model = _Tensors()
    x = torch.randn(3, 8)
    _graph_is_eager(model, lambda: model(x))
    with torch.no_grad():
        _IN_PLACE[change](model)
    graph = _graph_is_eager(model, lambda: model(x))
    _direct_is_eager(model, lambda: model(x))
    assert graph.records[0].shape == (3, 6 if change.startswith("buffer-") else 4)  # x[:, :n]


class _Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # a graph break: graph mode runs the call through the eager capture
            h = h * 2
        return h


class _Embeds(nn.Module):
    def __init__(self, region: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.region = region

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.region == "no_grad":
            with torch.no_grad():
                h = self.emb(ids) * 2
        elif self.region == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.lin(self.emb(ids)).float()
        else:
            h = self.emb(ids) * 2
        return self.lin(h)


def test_the_models_error_in_the_direct_path_is_raised_as_eager_raises_it() -> None:
    torch.manual_seed(0)
    model = _Embeds("none")
    good, bad = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 12, 3]])
    _graph_is_eager(model, lambda: model(good))
    dynamo = _Dynamo(model)
    for graph in (False, True, True):
        with (
            pytest.raises(IndexError, match="index out of range"),
            torch.no_grad(),
            tensorsnap.capture(model, ops=True, graph=graph),
        ):
            model(bad)
    assert dynamo.calls == 0  # the graph ran (directly) and raised the model's error
    _direct_is_eager(model, lambda: model(good))


class _Aliases(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = y[0] * 1
        u = y[1:]  # a view of an input, written below when x is y
        x.add_(1)
        return v + u.sum() + x.sum()


def test_inputs_that_alias_each_other_in_some_calls_and_not_in_others() -> None:
    model = _Aliases()
    a, b = torch.zeros(3, 3), torch.zeros(3, 3)

    def calls() -> list[Any]:
        outs = []
        for x, y in [(a, b), (a, a), (a[0], a), (a, b)]:
            a.zero_()
            b.zero_()
            outs.append(model(x, y))
        return outs

    _graph_is_eager(model, calls)
    _direct_is_eager(model, calls)


# -- global state dynamo guards: modes, grad, autocast ---------------------------------------------


class _Softmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) + torch.ones(4)  # a factory op without a dtype: the default dtype's
        return self.drop(h.softmax(-1)) + torch.zeros(())


class _SoftmaxOverRows(TorchFunctionMode):
    """A user's function mode that changes an op's argument (same ops, other values)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.softmax, torch.softmax):
            args, kwargs["dim"] = args[:1], 0
        return func(*args, **kwargs)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.use_deterministic_algorithms(False)


@contextlib.contextmanager
def _float64() -> Iterator[None]:
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_default_dtype(torch.float32)


@contextlib.contextmanager
def _with(*contexts: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


_CONTEXTS: dict[str, Context] = {
    "enable_grad": torch.enable_grad,
    "inference_mode": torch.inference_mode,
    "autocast": lambda: _with(torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16)),
    "deterministic": _deterministic,
    "default-dtype": _float64,
    "function-mode": lambda: _with(torch.no_grad(), _SoftmaxOverRows()),
    "force_eager-stance": lambda: _with(torch.no_grad(), torch.compiler.set_stance("force_eager")),
}


@pytest.mark.parametrize("name", list(_CONTEXTS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_block_under_other_global_state_and_back_gives_the_eager_capture(
    name: str, train: bool
) -> None:
    torch.manual_seed(0)
    model = _Softmax().train(train)
    x = torch.randn(3, 4)
    call = lambda: model(x)  # noqa: E731
    _graph_is_eager(model, call)
    _graph_is_eager(model, call, _CONTEXTS[name])
    _direct_is_eager(model, call, _CONTEXTS[name])
    _direct_is_eager(model, call)  # the first graph again, without dynamo


def test_grad_mode_toggled_between_calls_of_one_block() -> None:
    torch.manual_seed(0)
    model = _Softmax()
    x = torch.randn(3, 4)

    def calls() -> list[Any]:
        with torch.no_grad():
            first = model(x)
        with torch.enable_grad():
            second = model(x)
        with torch.inference_mode():
            third = model(x)
        return [first, second.detach(), third.clone(), model(x)]

    _graph_is_eager(model, calls, contextlib.nullcontext)
    _direct_is_eager(model, calls, contextlib.nullcontext)


# -- a float attribute dynamo makes a graph input --------------------------------------------------


class _Float(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.f = 2.0
        self.how = how

    def forward(self, x: torch.Tensor) -> Any:
        h = self.lin(x)
        if self.how == "mul":
            return h * self.f
        if self.how == "branch":  # a guard on the float's value
            return h * 2 if self.f > 2.6 else h - 1
        if self.how == "full":
            return h + torch.full((4,), self.f), self.f
        if self.how == "hardtanh":
            return F.hardtanh(h, -self.f, self.f)
        if self.how == "layer_norm-eps":
            return F.layer_norm(h, (4,), eps=self.f)
        if self.how == "sdpa-scale":
            return F.scaled_dot_product_attention(h[None], h[None], h[None], scale=self.f)
        if self.how == "interpolate":
            return F.interpolate(h[None], scale_factor=self.f)
        return F.dropout(h, p=self.f / 10, training=True)


_VALUES = [2.0, 3.0, 2.5, 4.0, 1.0, 3.0, 1.5, 2.75, 3.25, 3.75, 1.25, 2.0, 1.75]


@pytest.mark.parametrize("how", ["mul", "branch", "full"])
def test_a_float_attribute_changed_thirteen_times_takes_the_graph_every_block(how: str) -> None:
    torch.manual_seed(0)
    model = _Float(how)
    x = torch.randn(3, 4)
    for value in _VALUES:
        model.f = value
        graph = _graph_is_eager(model, lambda: model(x))
        if how == "mul":
            assert torch.equal(graph[""], model.lin(x).detach() * value)
    # the float is a graph input: a few graphs serve all the values, far below the limit
    assert _compiled[model].compiles <= 3


@pytest.mark.parametrize(
    "how", ["dropout", "hardtanh", "layer_norm-eps", "sdpa-scale", "interpolate"]
)
def test_a_float_attribute_an_op_checks_gives_the_eager_values(how: str) -> None:
    # the graph with the float as an input cannot be planned (the op guards on its value,
    # which the fake replay does not know): that call and the model's later ones run
    # eagerly, with the same values
    torch.manual_seed(0)
    model = _Float(how)
    x = torch.randn(3, 4)
    for value in [2.0, 3.0, 2.5, 2.0]:
        model.f = value
        eager, out_eager = _run(model, lambda: model(x), False)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", TensorSnapWarning)
            for _ in range(3):
                graph, out_graph = _run(model, lambda: model(x), True)
        assert all("could not plan the model's graph" in str(w.message) for w in seen)
        _compare(graph, eager)
        assert_same(out_graph, out_eager)


# -- dynamo's caches dropped, limits reached -------------------------------------------------------


def test_dynamo_reset_between_and_inside_blocks() -> None:
    torch.manual_seed(0)
    model = _Reads().eval()
    x = torch.randn(3, 4)
    _graph_is_eager(model, lambda: model(x))
    torch._dynamo.reset()  # every cache entry gone: dynamo again, which compiles anew
    dynamo = _Dynamo(model)

    def calls() -> list[Any]:
        first = model(x)
        torch._dynamo.reset()
        return [first, model(x), model(x * 2)]

    _graph_is_eager(model, calls)
    assert dynamo.calls >= 2


def test_graphs_made_before_the_recompile_limit_still_run_directly_after_it() -> None:
    torch.manual_seed(0)
    model = _Reads().eval()
    x = torch.randn(3, 4)
    with torch._dynamo.config.patch(recompile_limit=3):
        for k in range(1, 4):
            model.k = k
            _graph_is_eager(model, lambda: model(x))
        for k in range(4, 7):  # no graph for these: the calls run eagerly, said once
            model.k = k
            eager, _ = _run(model, lambda: model(x), False)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always", TensorSnapWarning)
                graph, _ = _run(model, lambda: model(x), True)
            assert [str(w.message) for w in seen if "recompile limit" in str(w.message)] == (
                [str(seen[0].message)] if k == 4 else []
            )
            _compare(graph, eager)
        for k in (1, 3, 2):  # the graphs made still serve their values, without dynamo
            model.k = k
            _direct_is_eager(model, lambda: model(x))


# -- state the model's forward changes -------------------------------------------------------------

_LOG: list[torch.Tensor] = []


class _Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.kept: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.lin(x))  # train mode: running statistics written in place
        self.kept["h"] = h
        _LOG.append(h.sum())
        return h.relu()


def test_a_forward_writing_buffers_a_dict_and_a_global_list_leaves_the_plain_runs_state() -> None:
    torch.manual_seed(0)
    model = _Stateful().train()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4)
    for _ in range(4):
        _LOG.clear()
        eager, out_eager = _run(reference, lambda: reference(x), False)
        logged = list(_LOG)
        _LOG.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", TensorSnapWarning)
            graph, out_graph = _run(model, lambda: model(x), True)
        _compare(graph, eager)
        assert_same(out_graph, out_eager)
        assert_same(list(_LOG), logged)
        assert_same(model.kept["h"], reference.kept["h"])
        assert_same(dict(model.state_dict()), dict(reference.state_dict()))
    assert _compiled[model].compiles >= 1


# -- real models -----------------------------------------------------------------------------------


def test_gpt2_decoding_with_its_cache_block_after_block_runs_directly() -> None:
    model = tiny_gpt2(n_layer=1)
    ids = token_ids(2, 5)

    def decode() -> list[Any]:
        out = model(input_ids=ids)
        logits = [out.logits]
        for _ in range(1):
            out = model(
                input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values
            )
            logits.append(out.logits)
        return logits

    _graph_is_eager(model, decode)
    _direct_is_eager(model, decode)


def test_bert_with_token_types_added_and_removed_between_calls() -> None:
    model = tiny_bert(num_hidden_layers=1)
    ids = token_ids(2, 8)
    types = torch.zeros(2, 8, dtype=torch.long)
    types[:, 4:] = 1

    def calls() -> list[Any]:
        return [
            model(input_ids=ids).last_hidden_state,
            model(input_ids=ids, token_type_ids=types).last_hidden_state,
            model(input_ids=ids).pooler_output,
        ]

    _graph_is_eager(model, calls)
    _direct_is_eager(model, calls)


def test_llama_with_its_cache_in_grad_mode_and_in_no_grad() -> None:
    model = tiny_llama(num_hidden_layers=1)
    ids = token_ids(2, 6)
    call = lambda: model(input_ids=ids).logits  # noqa: E731
    _graph_is_eager(model, call)
    _graph_is_eager(model, call, torch.enable_grad)
    _direct_is_eager(model, call)
    _direct_is_eager(model, call, torch.enable_grad)


# -- threads, a user's compiled model --------------------------------------------------------------


def test_blocks_in_two_threads_at_once_give_the_eager_values() -> None:
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)) for _ in range(2)]
    xs = [torch.randn(4, 8), torch.randn(4, 8)]
    expected = []
    for model, x in zip(models, xs):
        eager, _ = _run(model, lambda: model(x), False)  # noqa: B023
        expected.append(eager)
        _graph_is_eager(model, lambda: model(x))  # noqa: B023
    failures: list[str] = []

    def work(i: int) -> None:
        try:
            for _ in range(40):
                graph, _ = _run(models[i], lambda: models[i](xs[i]), True)
                _compare(graph, expected[i])
        except Exception as error:  # reported by the main thread
            failures.append(repr(error))

    with warnings.catch_warnings():
        # two blocks open at once see each other's module hooks: such calls run eagerly
        warnings.simplefilter("ignore", TensorSnapWarning)
        workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert failures == []


def test_a_users_compiled_model_before_inside_and_after_the_blocks() -> None:
    torch.manual_seed(0)
    model = _Softmax().eval()
    wrapped = torch.compile(model, backend="eager")
    x = torch.randn(3, 4)
    with torch.no_grad():
        before = wrapped(x)
    eager, _ = _run(model, lambda: model(x), False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TensorSnapWarning)
        for target in (wrapped, model, wrapped):
            for _ in range(3):
                graph, out = _run(target, lambda: target(x), True)  # noqa: B023
            _compare(graph, eager)
            assert_same(out, before)
    assert _compiled[model].compiles == 1
    with torch.no_grad():
        assert_same(wrapped(x), before)


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).relu())


@pytest.mark.parametrize("direction", ["untie", "tie"])
def test_a_weight_tied_or_untied_between_blocks(direction: str) -> None:
    # a graph traced with two modules holding one parameter takes it as one input
    torch.manual_seed(0)
    model = _Two().eval()
    x = torch.randn(3, 4)
    if direction == "untie":
        model.b.weight = model.a.weight
    _graph_is_eager(model, lambda: model(x))
    if direction == "untie":
        model.b.weight = nn.Parameter(torch.randn(4, 4))
    else:
        model.b.weight = model.a.weight
    _graph_is_eager(model, lambda: model(x))
    _direct_is_eager(model, lambda: model(x))


def test_backward_after_direct_blocks_gives_a_plain_runs_gradients() -> None:
    torch.manual_seed(0)
    model = _Two()
    x = torch.randn(3, 4)

    def step() -> list[torch.Tensor]:
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    expected = _plain(step, torch.enable_grad)
    for _ in range(2):
        _run(model, step, True, torch.enable_grad)
    dynamo = _Dynamo(model)
    graph, grads = _run(model, step, True, torch.enable_grad)
    assert dynamo.calls == 0 and len(grads) == 4
    assert_same(grads, expected)
    eager, _ = _run(model, step, False, torch.enable_grad)
    assert list(graph) == list(eager)


@pytest.mark.parametrize("register", ["register_forward_hook", "register_forward_pre_hook"])
def test_a_hook_registered_between_blocks_gives_the_eager_capture(register: str) -> None:
    # the graph was made without the hook (dynamo does not guard hooks): it must not run
    torch.manual_seed(0)
    model = _Two().eval()
    x = torch.randn(3, 4)
    _graph_is_eager(model, lambda: model(x))
    hook = (lambda m, i, o: o * 10) if "pre" not in register else (lambda m, i: (i[0] * 10,))
    handle = getattr(model.b, register)(hook)
    try:
        eager, out_eager = _run(model, lambda: model(x), False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TensorSnapWarning)  # a hook running ops: eagerly
            for _ in range(3):
                graph, out_graph = _run(model, lambda: model(x), True)
                _compare(graph, eager)
                assert_same(out_graph, out_eager)
        assert_same(out_graph, _plain(lambda: model(x)))
    finally:
        handle.remove()


def test_a_hook_removed_between_blocks_is_not_run_by_the_graph_made_with_it() -> None:
    torch.manual_seed(0)
    model = _Two().eval()
    x = torch.randn(3, 4)
    handle = model.b.register_forward_hook(lambda m, i, o: o + 1)  # no op of its own keyed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TensorSnapWarning)
            for _ in range(3):
                _run(model, lambda: model(x), True)
    finally:
        handle.remove()
    _graph_is_eager(model, lambda: model(x))  # the output without the hook's + 1


def test_a_hook_removed_inside_the_block_leaves_the_eager_fallback_capturing() -> None:
    # the block opened with the hook: the calls after its removal (a new graph to check,
    # run eagerly) must capture the module's ops as if it never had one
    torch.manual_seed(0)
    model = _Two().eval()
    x, y = torch.randn(3, 4), torch.randn(5, 4)

    def calls() -> Any:
        first = model(x)
        handle.remove()
        return first, model(y), model(x)

    handle = model.a.register_forward_pre_hook(lambda m, i: None)
    eager, out_eager = _run(model, calls, False)
    for _ in range(2):
        handle = model.a.register_forward_pre_hook(lambda m, i: None)
        graph, out_graph = _run(model, calls, True)
        _compare(graph, eager)
        assert_same(out_graph, out_eager)


def test_a_hook_registered_on_gpt2_between_blocks_gives_the_eager_capture() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2(n_layer=2)
    ids = token_ids(2, 6)
    call = lambda: model(input_ids=ids).logits  # noqa: E731
    _graph_is_eager(model, call)
    handle = model.transformer.ln_f.register_forward_hook(lambda m, i, o: o * 2)
    try:
        eager, out_eager = _run(model, call, False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TensorSnapWarning)  # its op: eagerly, by name
            for _ in range(3):
                graph, out_graph = _run(model, call, True)
        _compare(graph, eager)
        assert_same(out_graph, out_eager)
        assert_same(out_graph, _plain(call))
    finally:
        handle.remove()
    _graph_is_eager(model, call)


def test_functional_call_with_other_parameters_takes_the_graph_with_them() -> None:
    torch.manual_seed(0)
    model = _Two().eval()
    x = torch.randn(3, 4)
    _graph_is_eager(model, lambda: model(x))
    for seed in (1, 2):
        torch.manual_seed(seed)
        params = {k: torch.randn_like(v) for k, v in model.named_parameters()}
        call = lambda: torch.func.functional_call(model, params, (x,))  # noqa: B023, E731
        graph = _graph_is_eager(model, call)
        _direct_is_eager(model, call)
        expected = F.linear(
            F.linear(x, params["a.weight"], params["a.bias"]).relu(),
            params["b.weight"],
            params["b.bias"],
        )
        assert torch.equal(graph[""], expected)


class _Returns(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.ones(2))
        self.same = nn.Identity()

    def forward(self, x: torch.Tensor) -> Any:
        outputs = {
            "input": lambda: x,
            "pair": lambda: (x, x),
            "dict": lambda: {"a": x},
            "parameter": lambda: self.w,
            "identity": lambda: self.same(x),
            "view": lambda: x.view(-1),
            "none": lambda: None,
            "constant": lambda: 3,
        }
        return outputs[self.how]()


def _graph_runs_of(how: str) -> None:
    model = _Returns(how)
    x = torch.randn(2, 2)
    eager, _ = _run(model, lambda: model(x), False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TensorSnapWarning)
        for _ in range(4):  # the check, the compile, then runs of a known graph, directly
            graph, out = _run(model, lambda: model(x), True)
            _compare(graph, eager)
            assert_same(_detached(out), _detached(model(x)))


@pytest.mark.parametrize("how", ["input", "pair", "dict", "parameter", "identity", "view"])
def test_a_graph_with_no_op_or_one_returns_the_eager_capture(how: str) -> None:
    _graph_runs_of(how)


# -- defects ---------------------------------------------------------------------------------------


class _Rows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.arange(x.shape[0])[:, None]


@pytest.mark.parametrize("how", ["rows", "gpt2"])
def test_a_graph_with_a_dynamic_batch_is_planned_and_run(how: str) -> None:
    model = _Rows() if how == "rows" else tiny_gpt2(n_layer=1)
    for batch in [2, 3, 5, 4, 2]:
        x = torch.randn(batch, 4) if how == "rows" else token_ids(batch, 5)
        call = (lambda x=x: model(x)) if how == "rows" else (lambda x=x: model(input_ids=x))
        _graph_is_eager(model, call, blocks=2)


def test_a_users_compiled_function_first_run_in_blocks_gives_the_eager_capture() -> None:
    torch.manual_seed(0)
    model = _Two().eval()
    x = torch.randn(3, 4)
    _graph_is_eager(model, lambda: model(x))
    step = torch.compile(lambda t: model(t) * 2, backend="eager")
    eager, out_eager = _run(model, lambda: step(x), False)  # step's first run: in a block
    with warnings.catch_warnings():
        warnings.simplefilter("error", TensorSnapWarning)
        for _ in range(4):  # (before eb58598 every block took the graph)
            graph, out_graph = _run(model, lambda: step(x), True)
            _compare(graph, eager)
            assert_same(out_graph, out_eager)
    assert_same(out_graph, _plain(lambda: model(x) * 2))


def test_an_eager_fallback_inside_a_users_compiled_function_gives_the_eager_capture() -> None:
    torch.manual_seed(0)
    model = _Breaks()
    x = torch.randn(3, 4)
    step = torch.compile(lambda t: model(t) + 1, backend="eager")
    eager, out_eager = _run(model, lambda: step(x), False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TensorSnapWarning)  # the fallback is right here
        graph, out_graph = _run(model, lambda: step(x), True)
    _compare(graph, eager)
    assert_same(out_graph, out_eager)


def test_a_users_compiled_function_run_before_the_blocks_is_captured() -> None:
    torch.manual_seed(0)
    model = _Two().eval()
    x = torch.randn(3, 4)
    step = torch.compile(lambda t: model(t) * 2, backend="eager")
    with torch.no_grad():
        step(x)
    eager, _ = _run(model, lambda: step(x), False)
    assert list(eager) == ["a/linear", "a", "/relu", "b/linear", "b", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TensorSnapWarning)  # an eager fallback is right here
        graph, _ = _run(model, lambda: step(x), True)
    _compare(graph, eager)


@pytest.mark.parametrize("where", ["a", ""])
def test_a_hook_registered_inside_the_block_gives_the_eager_capture(where: str) -> None:
    torch.manual_seed(0)
    model = _Two().eval()
    x = torch.randn(3, 4)
    _graph_is_eager(model, lambda: model(x))
    module = model.get_submodule(where)

    def calls() -> Any:
        first = model(x)
        handle = module.register_forward_hook(lambda m, i, o: o * 10)
        try:
            return first, model(x)
        finally:
            handle.remove()

    eager, out_eager = _run(model, calls, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TensorSnapWarning)  # an eager fallback is right here
        graph, out_graph = _run(model, calls, True)
    assert_same(out_graph, _plain(calls))
    assert_same(out_graph, out_eager)
    _compare(graph, eager)


_forward = _Two.forward


def test_a_module_classs_forward_replaced_between_blocks() -> None:
    torch.manual_seed(0)
    model = _Two().eval()
    x = torch.randn(3, 4)
    _graph_is_eager(model, lambda: model(x))
    try:
        _Two.forward = lambda self, x: _forward(self, x) * 2  # type: ignore[method-assign]
        _graph_is_eager(model, lambda: model(x))
    finally:
        _Two.forward = _forward  # type: ignore[method-assign]


@pytest.mark.parametrize("region", ["no_grad", "autocast"])
def test_an_error_inside_the_forwards_grad_or_autocast_region_restores_the_mode(
    region: str,
) -> None:
    torch.manual_seed(0)
    model = _Embeds(region)
    good, bad = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 12, 3]])
    _graph_is_eager(model, lambda: model(good), torch.enable_grad)
    with torch.enable_grad():
        try:
            with (
                pytest.raises(IndexError, match="index out of range"),
                tensorsnap.capture(model, ops=True, graph=True),
            ):
                model(bad)
            state = (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))
        finally:
            torch.set_autocast_enabled("cpu", False)
    assert state == (True, False)  # as after the same error in a plain or eager run


def _times_ten(module: nn.Module, args: Any, output: Any) -> Any:
    return output * 10 if isinstance(module, nn.Linear) else None


def test_a_process_wide_hook_registered_inside_the_block_gives_the_eager_capture() -> None:
    from torch.nn.modules.module import register_module_forward_hook

    torch.manual_seed(0)
    model = _Two().eval()
    x = torch.randn(3, 4)
    _graph_is_eager(model, lambda: model(x))

    def calls() -> Any:
        first = model(x)
        handle = register_module_forward_hook(_times_ten)
        try:
            return first, model(x)
        finally:
            handle.remove()

    eager, out_eager = _run(model, calls, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TensorSnapWarning)  # an eager fallback is right here
        graph, out_graph = _run(model, calls, True)
    assert_same(out_graph, out_eager)
    assert_same(out_graph, _plain(calls))
    _compare(graph, eager)


@pytest.mark.parametrize("how", ["none", "constant"])
def test_a_model_returning_no_tensor_takes_the_graph_block_after_block(how: str) -> None:
    _graph_runs_of(how)


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class _Counts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.a(x).softmax(-1)


@pytest.mark.parametrize("how", ["dispatch-mode", "dynamo-disabled"])
def test_a_block_where_dynamo_skips_frames_gives_the_eager_capture(how: str) -> None:
    torch.manual_seed(0)
    model = _Counts()
    x = torch.randn(3, 4)
    if how == "dispatch-mode":
        for _ in range(2):
            _run(model, lambda: model(x), True)
        context: Any = _PassThrough()
    else:
        context = torch._dynamo.config.patch(disable=True)
    with context:
        eager, _ = _run(model, lambda: model(x), False)
        calls = model.calls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TensorSnapWarning)  # an eager fallback is right
            graph, _ = _run(model, lambda: model(x), True)
    assert model.calls == calls + 1
    _compare(graph, eager)
