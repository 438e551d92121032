"""Graph mode's rebuilt objects, cached records and freed sessions, against the eager capture.

A review of the module outputs graph mode rebuilds from their marked attributes (transformers'
caches, a user's classes), of the records a graph with static shapes reuses from its first
run, and of the session's lifetime. Each comparison runs the same calls under the eager
capture and in graph mode (whose first block checks the graph's keys against an eager run, so
the blocks compared ran the graph itself) and compares keys in order, records, values bitwise,
the sharing inside each value, and the model's outputs.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import logging
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_same, tiny_gpt2, tiny_llama, token_ids
from torch import nn

import tensorsnap
from tensorsnap import TensorSnapWarning
from tensorsnap._graph import _compiled
from tensorsnap._snapshot import Snapshot


def _run(model: nn.Module, call: Callable[[], Any], graph: bool, **options: Any) -> Any:
    torch.manual_seed(7)
    with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=graph, **options) as snap:
        out = call()
    return snap, out


def _fields(snap: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in snap.records]  # every field, nbytes too


def _same_as_eager(
    model: nn.Module, call: Callable[[], Any], graph_runs: bool = True, **options: Any
) -> tuple[Any, Any]:
    """The graph-mode capture of ``call`` (its third block) and the eager one, compared."""
    eager, out_eager = _run(model, call, graph=False, **options)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", TensorSnapWarning)
        for _ in range(3):
            graph, out_graph = _run(model, call, graph=True, **options)
    warned = [str(w.message) for w in seen if issubclass(w.category, TensorSnapWarning)]
    if graph_runs:
        assert not warned, warned[0]
        assert _compiled[model].compiles >= 1 and _compiled[model].eager is None
    else:
        assert warned and _compiled[model].compiles == 0
    assert list(graph) == list(eager)
    for key in eager:
        assert_same(graph[key], eager[key], key)
    assert _fields(graph) == _fields(eager)
    assert_same(out_graph, out_eager, "output")
    return graph, eager


def _sharing(value: Any) -> list[tuple[int, int]]:
    """Which places of a value hold the same tuple, list, dict or object (pairs of places)."""
    first: dict[int, int] = {}
    pairs: list[tuple[int, int]] = []
    order = [0]

    def visit(v: Any) -> None:
        if isinstance(v, (tuple, list, dict)) or (
            hasattr(v, "__dict__") and not isinstance(v, type)
        ):
            if isinstance(v, (torch.Tensor, nn.Module)):
                return
            place = order[0]
            order[0] += 1
            if id(v) in first:
                pairs.append((first[id(v)], place))
                return
            first[id(v)] = place
            items = (
                v.values()
                if isinstance(v, dict)
                else v
                if isinstance(v, (tuple, list))
                else vars(v)
            )
            for item in items.values() if isinstance(items, dict) else items:
                visit(item)

    visit(value)
    return pairs


# -- objects a module returns -------------------------------------------------------------------


class _Box:
    """A plain object, copied from its attributes."""


@dataclasses.dataclass(frozen=True)
class _Frozen:
    h: torch.Tensor
    n: int


@dataclasses.dataclass
class _Fields:
    h: torch.Tensor
    more: list[Any]


class _Shown:
    def __init__(self, h: torch.Tensor) -> None:
        self._h = h

    @property
    def h(self) -> torch.Tensor:
        return self._h * 1


class _Color(enum.Enum):
    RED = 1


def _helper() -> int:
    return 1


def _make(kind: str, h: torch.Tensor, x: torch.Tensor, lin: nn.Linear) -> Any:
    box: Any = _Box()
    box.h = h
    if kind == "itself":  # a parent pointer: the object holds itself
        box.me = box
        box.again = [box, (box,)]
    elif kind == "object-twice":
        inner: Any = _Box()
        inner.t = h * 2
        box.a, box.b = inner, inner
    elif kind == "list-twice":
        parts = [h * 2]
        box.a, box.b = parts, parts
    elif kind == "dict-twice":
        table = {"t": h * 2}
        box.a, box.b = table, {"same": table}
    elif kind == "tuple-twice":
        pair = (h * 2, 1)
        box.a, box.b = pair, [pair]
    elif kind == "tuple-itself":  # through a list it holds: a tuple cannot be made first
        inside: list[Any] = []
        holder = (inside, h * 2)
        inside.append(holder)
        box.a = holder
    elif kind == "list-itself":
        loop: list[Any] = [h * 2]
        loop.append(loop)
        box.a = loop
    elif kind == "tuple-of-one-object":
        return box, box
    elif kind == "frozen-dataclass":
        return _Frozen(h, 3)
    elif kind == "dataclass":
        return _Fields(h, [h + 1, {"a": (h * 2, None)}, [[h, 1.5]]])
    elif kind == "property":
        return _Shown(h)
    elif kind == "leaves":
        box.device, box.dtype, box.none, box.text, box.cls = h.device, h.dtype, None, "s", _Box
    elif kind == "parameter-and-input":
        box.w, box.x = lin.weight, x
    elif kind == "enum":
        box.color = _Color.RED
    elif kind == "function":
        box.f = _helper
    elif kind == "set":
        box.s = {1, 2}
    elif kind == "bytes":
        box.b = b"ab"
    return box


class _Maker(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        return _make(self.kind, self.lin(x), x, self.lin)


class _Taker(nn.Module):
    """Writes the tensor the object holds after the module returned it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.make = _Maker(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        made = self.make(x)
        if isinstance(made, tuple):
            made = made[0]
        h = made.h
        if not isinstance(made, _Shown):
            made.h.mul_(3)  # the value the snapshot holds is the one before this write
        return h + 1


_SHARED = ["itself", "object-twice", "list-twice", "dict-twice", "list-itself"]
_SHARED += ["tuple-of-one-object", "tuple-twice"]


@pytest.mark.parametrize("kind", _SHARED)
def test_a_list_dict_or_object_held_twice_is_one_copy_held_twice_as_in_the_eager_copy(
    kind: str,
) -> None:
    # before: each place got a copy of its own ("itself" raised dynamo's RecursionError out of
    # the model's call); the copy engine's copy holds one copy twice
    model = _Taker(kind)
    x = torch.randn(3, 4)
    graph, eager = _same_as_eager(model, lambda: model(x))
    assert _sharing(eager["make"]), "the eager copy shares nothing: the test is void"
    assert _sharing(graph["make"]) == _sharing(eager["make"])
    before = model.make.lin(x).detach()
    held = graph["make"][0] if kind == "tuple-of-one-object" else graph["make"]
    assert torch.equal(held.h, before)  # the value when the module returned
    if kind == "itself":
        assert held.me is held and held.again[0] is held and held.again[1][0] is held


@pytest.mark.parametrize(
    "kind", ["frozen-dataclass", "dataclass", "property", "leaves", "parameter-and-input"]
)
def test_objects_of_other_shapes_are_rebuilt_as_the_eager_copy(kind: str) -> None:
    model = _Taker(kind)
    x = torch.randn(3, 4)
    graph, _ = _same_as_eager(model, lambda: model(x))
    if kind == "parameter-and-input":  # copies, not the model's parameter or the caller's input
        made = graph["make"]
        assert type(made.w) is torch.Tensor and not made.w.requires_grad
        assert made.w.data_ptr() != model.make.lin.weight.data_ptr()
        assert made.x.data_ptr() != x.data_ptr() and torch.equal(made.x, x)


@pytest.mark.parametrize("kind", ["enum", "function", "set", "bytes", "tuple-itself"])
def test_objects_holding_what_the_graph_cannot_rebuild_run_eagerly(kind: str) -> None:
    model = _Taker(kind)
    x = torch.randn(3, 4)
    _same_as_eager(model, lambda: model(x), graph_runs=False)


class _Fills(nn.Module):
    """Sets an attribute on an object the caller passed in, and returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, state: Any) -> Any:
        if hasattr(state, "gone"):  # set again, deleted, added: kept, dropped, put last
            state.seen = state.seen + 1
            del state.gone
        state.h = self.lin(x)
        return state


class _PassesState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fill = _Fills()

    def forward(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        return self.fill(x, state).h * 2


@pytest.mark.parametrize("change", ["added", "set-deleted-added"])
def test_an_object_passed_in_and_given_attributes_keeps_their_order(change: str) -> None:
    from torch._dynamo.variables.dicts import SideEffectsProxyDict

    listing = SideEffectsProxyDict.__iter__
    model = _PassesState()
    x = torch.randn(3, 4)

    def call() -> torch.Tensor:
        state: Any = _Box()
        state.first = 1
        state.seen = torch.zeros(2)
        if change == "set-deleted-added":
            state.gone = torch.ones(1)
        state.last = "z"
        return model(x, state)

    # before: dynamo listed the attributes set during the trace first, and the rebuilt object
    # had ["h", "first", "seen", "last"]
    graph, eager = _same_as_eager(model, call)
    assert list(vars(graph["fill"])) == list(vars(eager["fill"])) == ["first", "seen", "last", "h"]
    assert SideEffectsProxyDict.__iter__ is listing  # dynamo's own again once the block ended


def test_gpt2_decoding_with_its_cache_passed_in_and_padding_matches_the_eager_capture() -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt2()
    ids = token_ids(2, 6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding

    def steps() -> Any:
        # an empty cache passed in (as generate() passes it), filled by the prompt's call, then
        # one-token steps that grow it: each call a graph of its own shapes
        cache = transformers.DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, cache=cache)
        longer = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        model(input_ids=ids[:, -1:], cache=cache, attention_mask=longer)
        longer = torch.cat([longer, torch.ones(2, 1, dtype=torch.long)], 1)
        return model(input_ids=ids[:, -2:-1], cache=cache, attention_mask=longer)

    # before: the layers of the cache passed in came back with their attributes in dynamo's
    # order (keys and values first, as the trace set them), not the layer's
    graph, _ = _same_as_eager(model, steps)
    # each call's cache as the call returned it: 6 positions, then 7, then 8
    for key, length in (("transformer", 6), ("transformer#1", 7), ("transformer#2", 8)):
        layer = graph[key].past_key_values.layers[0]
        assert layer.keys.shape[-2] == length, key
        assert list(vars(layer)) == ["keys", "values", "is_initialized", "device"]


def test_llama_steps_writing_a_static_cache_in_place_match_the_eager_capture() -> None:
    import copy

    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    ids = token_ids(2, 6)
    filled = transformers.StaticCache(config=model.config, max_cache_len=10)
    with torch.no_grad():
        model(input_ids=ids, cache=filled)  # filled outside: its first fill asks is_compiling

    def steps() -> Any:
        # the cache's tensors, inputs of the graph, are written in place by each step; the two
        # steps run one graph (the second with the records of the first numbering's run)
        cache = copy.deepcopy(filled)
        at = torch.tensor([6])
        model(input_ids=ids[:, -1:], cache=cache, cache_position=at)
        return model(input_ids=ids[:, -2:-1], cache=cache, cache_position=at + 1)

    graph, _ = _same_as_eager(model, steps)
    assert _compiled[model].compiles == 1
    keys = graph["model"].past_key_values.layers[0].keys
    later = graph["model#1"].past_key_values.layers[0].keys
    assert keys.abs().sum(-1)[..., 7].eq(0).all()  # the first step's copy: position 7 empty
    assert not later.abs().sum(-1)[..., 7].eq(0).any()  # written by the second step
    assert torch.equal(keys[..., :7, :], later[..., :7, :])


# -- the records of a graph's first run, reused ---------------------------------------------------


class _Logs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.make = _Maker("object-twice")
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        made = self.make(x)
        return self.out(made.h.relu()).log()  # NaN where the linear is negative


@pytest.mark.parametrize(
    "options",
    [{}, {"include": ["make*"]}, {"exclude": ["*log*"]}, {"dtype": torch.float64}, "spill"],
    ids=["plain", "include", "exclude", "dtype", "spill"],
)
def test_records_over_blocks_of_other_batch_sizes_are_the_eager_records(
    options: Any, tmp_path: Any
) -> None:
    # a static graph, a recompile to a dynamic one, then the static graph again (its records
    # reused), each block with two calls of the model
    if options == "spill":
        options = {"max_memory": 300, "spill_dir": str(tmp_path)}
    model = _Logs()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 4, generator=generator) for n in (2, 2, 2, 3, 5, 2, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TensorSnapWarning)
        for x in batches:
            call = lambda x=x: (model(x), model(x * 2))  # noqa: E731
            eager, out_eager = _run(model, call, graph=False, **options)
            graph, out_graph = _run(model, call, graph=True, **options)
            assert list(graph) == list(eager)
            assert _fields(graph) == _fields(eager)
            for key in eager:
                assert_same(graph[key], eager[key], key)
            assert _sharing(graph["make"]) == _sharing(eager["make"])
            assert_same(out_graph, out_eager)
    assert _compiled[model].compiles == 2  # one static graph, one dynamic


# -- the session's lifetime ----------------------------------------------------------------------


class _Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, how: str = "", rows: Any = None) -> torch.Tensor:
        h = self.lin(x).relu()
        if how == "error":
            torch.ones(2) @ torch.ones(3)  # a shape error, on fake tensors when traced too
        if how == "python":
            print(end="")  # a graph break: dynamo refuses the call, which runs eagerly
        if rows is not None:  # a row out of range: an error of the run, not of the trace
            h = h.index_select(0, rows)
        return h * 2


def _block(model: nn.Module, x: torch.Tensor, how: str, **options: Any) -> weakref.ref[Any]:
    try:
        with torch.no_grad(), tensorsnap.capture(model, **options) as snap:
            if how in ("error", "python"):
                model(x, how)
            else:  # the same graph each time: only the rows' values differ
                model(x, rows=torch.tensor([0, 9 if how == "index" else 1]))
            if how == "block":
                raise ValueError("the block's own error")
    except (RuntimeError, IndexError, ValueError):
        pass
    return weakref.ref(snap)


_OPTIONS = {"modules": {}, "ops": {"ops": True}, "graph": {"ops": True, "graph": True}}


# a graph refusing the call ("error" in graph mode) is the next test's
@pytest.mark.parametrize(
    ("options", "how"),
    [
        (o, h)
        for o in _OPTIONS
        for h in ("error", "index", "block", "")
        if (o, h) != ("graph", "error")
    ],
)
def test_a_block_that_raises_frees_its_snapshot_with_its_last_reference(
    options: str, how: str, no_cyclic_gc: None
) -> None:
    model = _Breaks()
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TensorSnapWarning)
        # graph mode: the graph checked and compiled first, so the last block runs it
        hows = ["", "", how] if options == "graph" else [how] * 3
        alive = [_block(model, x, h, **_OPTIONS[options])() is not None for h in hows]
        assert not any(alive)
        if options == "graph":
            assert _compiled[model].compiles == 1 and _compiled[model].eager is None


@pytest.mark.parametrize("how", ["error", "python"])
def test_a_call_dynamo_refuses_frees_its_snapshot_with_its_last_reference(
    how: str, no_cyclic_gc: None
) -> None:
    # before: dynamo's refusal, an error whose traceback's frames (dynamo's) hold it, in a
    # cycle with frames of the model's call that hold the session, kept the first block's
    # snapshot until the cyclic GC
    model = _Breaks()
    x = torch.randn(2, 4)
    # torch logs the fake run's error with its traceback, and pytest's log capture keeps the
    # record (and the frames it holds) for its report: no records for this test
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TensorSnapWarning)
            alive = [_block(model, x, how, ops=True, graph=True)() is not None for _ in range(3)]
    finally:
        logging.disable(logging.NOTSET)
    assert alive == [False, False, False]
    assert _compiled[model].eager is not None  # the call was refused and ran eagerly


def test_nested_blocks_and_a_block_in_a_thread_free_their_snapshots(no_cyclic_gc: None) -> None:
    outer_model, inner_model = _Breaks(), nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    refs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TensorSnapWarning)  # the eager one inside: hooks
        for inner_graph in (False, True, True, True):
            with (
                torch.no_grad(),
                tensorsnap.capture(outer_model, ops=True, graph=True) as outer,
                tensorsnap.capture(inner_model, ops=True, graph=inner_graph) as inner,
            ):
                outer_model(x)
                inner_model(x)
            assert len(outer) == 5 and len(inner) == 3
            refs += [weakref.ref(outer), weakref.ref(inner)]
            del outer, inner

    def work() -> None:
        model = _Breaks()
        for _ in range(3):
            with torch.no_grad(), tensorsnap.capture(model, ops=True, graph=True) as snap:
                model(x)
            refs.append(weakref.ref(snap))
            del snap

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert [r() is None for r in refs] == [True] * 11
    assert not [o for o in gc.get_objects() if type(o) is Snapshot]


# -- structures deeper than graph mode marks -------------------------------------------------------


class _Link:
    """A linked list's node: each one a level deeper in the module's output."""


class _Chains(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.length = length

    def forward(self, x: torch.Tensor) -> Any:
        head: Any = None
        h = self.lin(x)
        for i in range(self.length):
            link: Any = _Link()
            link.next, link.value = head, h * i
            head = link
        return head


class _ReadsChain(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.chain = _Chains(length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain(x).value + 1


@pytest.mark.parametrize("length", [16, 60])
def test_a_deep_module_output_takes_the_graph_or_runs_eagerly_by_name(length: int) -> None:
    # before: dynamo ran out of stack tracing the marks of 50 levels, and its RecursionError
    # (an InternalTorchDynamoError) came out of the model's call
    model = _ReadsChain(length)
    x = torch.randn(2, 4)
    if length < 24:
        _same_as_eager(model, lambda: model(x))
        return
    _same_as_eager(model, lambda: model(x), graph_runs=False)
    reason = _compiled[model].eager
    assert reason is not None and "'chain' returned a structure nested more than 24" in reason
