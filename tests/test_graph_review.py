"""Graph mode against the eager op capture on the cases most likely to give a wrong value
silently: module outputs written before the module returns, recursion, and the like.

Each test compares a graph-mode block that ran the graph itself (the first block of a new
graph checks its keys against an eager run) with the eager capture, bitwise.
"""

from __future__ import annotations

import collections
import warnings
from collections import OrderedDict
from typing import Any

import pytest
import torch
from conftest import assert_same
from torch import nn

import tensorsnap
from tensorsnap import TensorSnapError, TensorSnapWarning
from tensorsnap._graph import _compiled


def _run(model: nn.Module, call: Any, graph: bool, **options: Any) -> tuple[Any, Any]:
    torch.manual_seed(7)
    with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=graph, **options) as snap:
        out = call()
    return snap, out


def _fields(snap: Any) -> list[tuple[Any, ...]]:
    return [(r.key, r.module, r.call, r.op, r.kind, r.shape, r.dtype) for r in snap.records]


def _same_as_eager(model: nn.Module, call: Any, graph_runs: bool = True, **options: Any) -> Any:
    """The graph-mode capture of ``call`` equals the eager one; ``graph_runs``: from the graph
    itself (no warning, compiled once), else through the eager capture with a warning."""
    eager, out_eager = _run(model, call, graph=False, **options)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", TensorSnapWarning)
        for _ in range(3):
            graph, out_graph = _run(model, call, graph=True, **options)
    warned = [w for w in seen if issubclass(w.category, TensorSnapWarning)]
    if graph_runs:
        assert not warned, warned[0].message
        assert _compiled[model].compiles >= 1 and _compiled[model].eager is None
    else:
        assert warned and _compiled[model].eager is not None
    assert list(graph) == list(eager)
    for key in eager:
        assert_same(graph[key], eager[key], key)
    assert _fields(graph) == _fields(eager)
    assert_same(out_graph, out_eager, "output")
    return graph


# -- a module's output written before the module returns ------------------------------------


class _ReluAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h.relu_()  # h is still the linear's node in the graph: the write follows it
        return h


class _ViewWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        h[:, :2].zero_()  # written through a view
        h[0] = 1.0  # setitem
        return h


class _Parent(nn.Module):
    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sub(x)
        h.add_(1)  # and the parent writes it again after the call
        return h * 3


def test_a_module_output_written_inside_the_module_after_it_was_made_is_its_returned_value() -> (
    None
):
    x = torch.randn(3, 4)
    for sub in (_ReluAfter(), _ViewWrite()):
        model = _Parent(sub)
        graph = _same_as_eager(model, lambda: model(x))  # noqa: B023
        # an independent reference: the submodule's own output, run plainly
        with torch.no_grad():
            assert torch.equal(graph["sub"], model.sub(x))


# -- a model that calls itself -------------------------------------------------------------------


class _Recursive(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, depth: int = 2) -> torch.Tensor:
        h = self.lin(x)
        if depth > 0:
            h = self(h, depth - 1)
        return h


def test_a_model_that_calls_itself_gives_the_eager_keys_once_each() -> None:
    model = _Recursive()
    x = torch.randn(3, 4)
    graph = _same_as_eager(model, lambda: model(x), graph_runs=False)  # dynamo refuses it
    calls = ["lin/linear", "lin", "lin#1/linear", "lin#1", "lin#2/linear", "lin#2"]
    assert list(graph) == [*calls, "#2", "#1", ""]


# -- one module output whose tensors share storage --------------------------------------------


class _Shares(nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        h = x * 2
        return h, h, h[0]


class _Returns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sub = _Shares()

    def forward(self, x: torch.Tensor) -> Any:
        a, _, c = self.sub(x)
        return a, c  # the caller can reach them: copied when the graph returns


class _Writes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sub = _Shares()

    def forward(self, x: torch.Tensor) -> Any:
        a, _, c = self.sub(x)
        a.mul_(3)  # written later in the graph: copied inside it
        return c + 1


def _sharing(value: Any) -> tuple[bool, bool]:
    first, second, view = value
    ptr = first.untyped_storage().data_ptr()
    return first is second, view.untyped_storage().data_ptr() == ptr


def test_tensors_of_one_module_output_that_share_storage_share_it_as_in_the_eager_capture() -> None:
    x = torch.randn(3, 4)
    model = _Returns()
    eager, _ = _run(model, lambda: model(x), graph=False)
    graph = _same_as_eager(model, lambda: model(x))
    assert _sharing(graph["sub"]) == _sharing(eager["sub"]) == (True, True)
    # the caller's writes do not reach the snapshot
    kept = [t.clone() for t in graph["sub"]]
    with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=True) as snap:
        a, _ = model(x)
    a.zero_()
    assert all(torch.equal(t, k) for t, k in zip(snap["sub"], kept))

    model = _Writes()  # copied apart inside the graph, the sharing could not be kept
    graph = _same_as_eager(model, lambda: model(x), graph_runs=False)
    assert _sharing(graph["sub"]) == (True, True)
    assert "share storage" in str(_compiled[model].eager)


# -- dynamo's recompile limit ----------------------------------------------------------------


class _Counts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # a side effect: the model must run exactly once per call
        return (x * 2).sum()


def test_a_call_past_dynamos_recompile_limit_runs_through_the_eager_capture() -> None:
    import torch._dynamo

    model = _Counts()
    dtypes = [torch.float32, torch.float64, torch.float16, torch.int64]  # a new graph each
    with torch._dynamo.config.patch(recompile_limit=2):
        for i, dtype in enumerate(dtypes * 2):
            x = torch.arange(3).to(dtype)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always", TensorSnapWarning)
                with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=True) as snap:
                    out = model(x)
            assert model.calls == i + 1
            assert list(snap) == ["/mul", "/sum", ""]
            assert torch.equal(snap["/mul"], x * 2) and torch.equal(snap[""], out)
            # the fourth graph would pass the limit: said once, at that call
            assert [str(w.message) for w in seen if "recompile limit" in str(w.message)] == (
                [str(seen[0].message)] if i == 3 else []
            )


# -- a submodule called outside the model's calls ----------------------------------------------


def test_a_submodule_called_on_its_own_in_the_block_is_refused_by_name() -> None:
    from torch.nn.modules import module as hooks

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(3, 4)
    eager, _ = _run(model, lambda: (model[0](x), model(x)), graph=False)
    assert list(eager) == ["0/linear", "0", "0#1/linear", "0#1", "1/relu", "1", ""]
    global_hooks = dict(hooks._global_forward_hooks)
    for _ in range(3):  # the graph's check, then the graph: neither may lose the call
        with (
            pytest.raises(TensorSnapError, match="module '0' was called on its own in the block"),
            torch.no_grad(),
            tensorsnap.capture(model, ops=True, graph=True),
        ):
            model(x)
            model[0](x)
    assert dict(hooks._global_forward_hooks) == global_hooks
    assert "_compiled_call_impl" not in model.__dict__
    graph = _same_as_eager(model, lambda: model(x))  # calls of the model itself still work
    assert list(graph) == ["0/linear", "0", "1/relu", "1", ""]


# -- module outputs of dict types ----------------------------------------------------------------


class _DictOf(nn.Module):
    def __init__(self, cls: Any) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, x: torch.Tensor) -> Any:
        out = self.cls(list) if self.cls is collections.defaultdict else self.cls()
        out["a"] = x * 2
        out["b"] = x + 1
        return out


class _ReadsA(nn.Module):
    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sub(x)["a"] * 3


@pytest.mark.parametrize(
    "cls", [dict, OrderedDict, collections.defaultdict], ids=["dict", "ordered", "default"]
)
def test_a_module_returning_a_dict_type_gives_it_back_as_the_eager_capture_does(cls: Any) -> None:
    model = _ReadsA(_DictOf(cls))
    x = torch.randn(3, 4)
    # dicts and OrderedDicts are rebuilt from the graph; a defaultdict cannot be: it runs eagerly
    graph = _same_as_eager(model, lambda: model(x), graph_runs=cls is not collections.defaultdict)
    assert type(graph["sub"]) is cls


# -- known: code that asks whether it is being compiled -----------------------------------------


class _AsksCompiling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if torch.compiler.is_compiling() else 3.0  # the same op either way
        return self.lin(x) * scale


def test_code_branching_on_is_compiling_gives_the_eager_values() -> None:
    # dynamo traces is_compiling() as True and both branches run ops of the same names, so
    # the check of the graph's keys cannot see it: code that asks runs eagerly, by name
    model = _AsksCompiling()
    x = torch.randn(3, 4)
    with pytest.warns(TensorSnapWarning, match=r"forward\(\) .* asks whether it is being compiled"):
        for _ in range(3):
            with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=True) as graph:
                got = model(x)
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as reference:
        want = model(x)
    assert list(graph) == list(reference)
    for key in reference:
        assert_same(graph[key], reference[key], key)
    assert torch.equal(got, want)


# -- a module shared by two parents ------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, act: nn.Module, lin: nn.Module) -> None:
        super().__init__()
        self.lin, self.act = lin, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


class _SharedByTwo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        act, lin = nn.GELU(), nn.Linear(4, 4)
        self.a, self.b, self.act = _Block(act, lin), _Block(act, nn.Linear(4, 4)), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x))  # a.act, then b.act: the shared GELU's calls 0 and 1
        return self.act(h + self.a(x)) + self.b.lin(h)  # a.act#2 (a#1), then act#3


def test_a_module_shared_by_two_parents_is_numbered_by_its_calls_as_in_the_eager_capture() -> None:
    model = _SharedByTwo()
    x = torch.randn(3, 4)
    graph = _same_as_eager(model, lambda: model(x))
    assert [k for k in graph if k.startswith("a.act")] == [
        f"a.act{s}{op}" for s in ("", "#1", "#2", "#3") for op in ("/gelu", "")
    ]
