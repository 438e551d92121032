"""The capture's own copy paths (plain tensors, tuples and lists of them) against ``snapshot``.

``capture`` copies the common values itself, without the general copy engine, to keep the
per-op cost low. Each case here checks such a copy against what ``tensorsnap.snapshot`` makes
of the same value at the same moment (values, strides, which parts share a storage), and that
the copy shares nothing with the model's tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import clone_value
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode

import tensorsnap


class _Run(nn.Module):
    """Runs ``fn`` on its input and returns what it returns; ``seen`` keeps a reference copy."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.fn = fn
        self.seen: Any = None

    def forward(self, x: torch.Tensor) -> Any:
        out = self.fn(x)
        with torch._C.DisableTorchFunction():  # the reference copy is no op of the model's
            self.seen = tensorsnap.snapshot(out)
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _same_copy(got: Any, want: Any, live: Any) -> None:
    """``got`` equals ``want`` (values, strides, shared storages) and shares none with ``live``."""
    got_parts = [got] if isinstance(got, torch.Tensor) else [g for g in got if g is not None]
    want_parts = [want] if isinstance(want, torch.Tensor) else [w for w in want if w is not None]
    live_parts = [live] if isinstance(live, torch.Tensor) else [v for v in live if v is not None]
    assert type(got) is type(want)
    if not isinstance(got, torch.Tensor):
        assert [g is None for g in got] == [w is None for w in want]
    assert len(got_parts) == len(want_parts)
    live_storages = {_storage(v) for v in live_parts}
    for g, w in zip(got_parts, want_parts):
        assert torch.equal(g, w)
        assert g.stride() == w.stride() and g.dtype == w.dtype
        assert not g.requires_grad and g.grad_fn is None
        assert _storage(g) not in live_storages
        # a view copies no more than the span it reaches (snapshot may align the span's start)
        assert g.untyped_storage().nbytes() <= w.untyped_storage().nbytes()
    shared = [[_storage(a) == _storage(b) for b in got_parts] for a in got_parts]
    assert shared == [[_storage(a) == _storage(b) for b in want_parts] for a in want_parts]
    same = [[a is b for b in got_parts] for a in got_parts]
    assert same == [[a is b for b in want_parts] for a in want_parts]


CASES: dict[str, Callable[[torch.Tensor], Any]] = {
    "split": lambda x: torch.split(x, 2, dim=1),
    "chunk of a transpose": lambda x: x.t().chunk(2, dim=0),
    "unbind": lambda x: x.unbind(0),
    "split of a slice": lambda x: x[1:, 1:].split(1, dim=0),
    "transpose": lambda x: x.t(),
    "slice": lambda x: x[:, 1:3],
    "expand": lambda x: x[:1].expand(1000, -1),
    "strided slice": lambda x: x[::2, ::3],
    "fresh tuple": lambda x: (x + 1, x * 2),
    "tuple with None": lambda x: (x.relu(), None),
    "list": lambda x: [x.sin(), x.cos()],
    "partly shared tuple": lambda x: (x[:2], x[2:], x.exp()),
    "chunk along dim 0": lambda x: x.chunk(2, dim=0),
    "first and last rows": lambda x: (x[0], x[-1]),
    "one tensor twice": lambda x: (lambda y: (y, y))(x.relu()),
    "empty": lambda x: x[:0],
}


@pytest.mark.parametrize("ops", [False, True], ids=["outputs only", "with ops"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_captured_value_is_what_snapshot_makes_of_it(case: str, ops: bool) -> None:
    # outputs alone take the light path; with ops, module calls are frames and outputs are
    # copied like op values
    model = _Run(CASES[case])
    x = torch.randn(4, 6)
    with tensorsnap.capture(model, ops=ops) as snap:
        out = model(x)
    _same_copy(snap[""], model.seen, out)


@pytest.mark.parametrize(
    "case",
    ["split", "transpose", "slice", "expand", "list", "chunk along dim 0"],
)
def test_an_op_value_is_what_snapshot_makes_of_it(case: str) -> None:
    model = _Run(CASES[case])
    x = torch.randn(4, 6)
    with tensorsnap.capture(model, ops=True) as snap:
        out = model(x)
    op_keys = [r.key for r in snap.records if r.kind == "op"]
    assert op_keys, "the case runs at least one op"
    # the last op made the returned value (list() makes the "list" case's list in Python)
    got = snap[op_keys[-1]]
    want = model.seen if case != "list" else None
    if want is not None:
        _same_copy(got, want, out)
    else:
        assert torch.equal(got, x.cos())


def test_a_span_copy_records_the_bytes_it_holds() -> None:
    model = _Run(lambda x: x[:1].expand(1000, -1))
    with tensorsnap.capture(model, ops=True) as snap:
        model(torch.randn(4, 6))
    expanded = snap["/expand"]
    assert expanded.shape == (1000, 6) and expanded.stride() == (0, 1)
    assert snap.records[-2].key == "/expand" and snap.records[-2].nbytes == 6 * 4


def test_split_parts_share_one_copy_of_their_span_and_nothing_with_the_input() -> None:
    model = _Run(lambda x: torch.split(x, 2, dim=1))
    x = torch.randn(3, 6)
    with tensorsnap.capture(model) as snap:
        model(x)
    parts = snap[""]
    assert len({_storage(p) for p in parts}) == 1
    assert parts[0].untyped_storage().nbytes() == x.nbytes
    x.zero_()
    assert all(p.abs().sum() > 0 for p in parts)


def test_values_made_with_gradients_on_are_detached_copies() -> None:
    lin = nn.Linear(4, 4)
    model = _Run(lambda x: lin(x).t().split(2))
    x = torch.randn(3, 4, requires_grad=True)
    with tensorsnap.capture(model, ops=True) as snap:
        out = model(x)
        sum(o.sum() for o in out).backward()
    for key in snap:
        for t in [snap[key]] if isinstance(snap[key], torch.Tensor) else snap[key]:
            assert not t.requires_grad and t.grad_fn is None
    assert torch.equal(snap["/t"], (x @ lin.weight.t() + lin.bias).t().detach())
    assert x.grad is not None


class _Listener(TorchFunctionMode):
    """A user's function mode: notes every torch function that reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_users_function_mode_below_the_capture_never_sees_its_copies() -> None:
    model = _Run(lambda x: (x.relu() + 1).t().split(1))
    x = torch.randn(3, 4)
    with _Listener() as alone:
        model(x)
    with _Listener() as below, tensorsnap.capture(model, ops=True) as snap:
        model(x)
    assert "clone" not in below.names and "as_strided" not in below.names
    # the user's mode still sees each of the model's calls, once
    assert below.names == alone.names == ["relu", "add", "t", "split"]
    assert [r.op for r in snap.records if r.kind == "op"] == ["relu", "add", "t", "split"]


def test_an_aten_capture_around_an_op_capture_does_not_record_its_copies() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    with (
        tensorsnap.capture(model, ops="aten") as outer,
        tensorsnap.capture(model, ops=True) as inner,
    ):
        model(x)
    assert "0/linear" in inner and "1/relu" in inner
    aten_ops = {r.op for r in outer.records if r.kind == "op"}
    assert "aten.clone" not in aten_ops and "aten.as_strided" not in aten_ops
    assert aten_ops >= {"aten.addmm", "aten.relu"}


class _CloneEveryOp(TorchFunctionMode):
    """The reference: clones every torch-level result made inside a named module's forward.

    Keys ``module#call/op#count`` come from process-wide module hooks of its own; values from
    ``conftest.clone_value`` (detach + clone, containers rebuilt), taken when the op returns.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[tuple[str, dict[str, int]]] = []
        self.values: dict[str, Any] = {}
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        holds_tensor = isinstance(result, torch.Tensor) or (
            isinstance(result, (tuple, list))
            and any(isinstance(item, torch.Tensor) for item in result)
        )
        if self.stack and holds_tensor:
            name, counts = self.stack[-1]
            op = func.__name__
            op = op[2:-2] if op.startswith("__") and op.endswith("__") else op  # x + y is add
            count = counts.get(op, 0)
            counts[op] = count + 1
            self.values[f"{name}/{op}#{count}"] = clone_value(result)
        return result

    def pre(self, module: nn.Module, args: Any) -> None:
        name = self.names[id(module)]
        call = self.calls[name] = self.calls.get(name, -1) + 1
        self.stack.append((name if call == 0 else f"{name}#{call}", {}))

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stack.pop()


@pytest.mark.parametrize("build", ["tiny_gpt2", "tiny_bert", "tiny_llama", "tiny_t5"])
def test_every_op_value_of_a_transformers_model_equals_a_clone_taken_when_it_ran(
    build: str,
) -> None:
    import conftest

    model = getattr(conftest, build)()
    ids = conftest.token_ids()
    kwargs: dict[str, Any] = {"decoder_input_ids": ids} if build == "tiny_t5" else {}
    reference = _CloneEveryOp(model)
    handles = [
        module_hooks.register_module_forward_pre_hook(reference.pre),
        module_hooks.register_module_forward_hook(reference.post),
    ]
    try:
        with torch.no_grad(), reference:
            model(ids, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as snap:
        model(ids, **kwargs)
    ops = [r for r in snap.records if r.kind == "op"]
    assert len(ops) == len(reference.values) > 50
    for record in ops:
        key = record.key if "#" in record.key.rsplit("/", 1)[1] else f"{record.key}#0"
        conftest.assert_same(snap[record.key], reference.values[key], path=record.key)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_a_nested_tensor_twice_in_an_output_is_one_copy_twice() -> None:
    class Twice(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nested = torch.nested.nested_tensor([a, b])
            return nested, nested

    model, a, b = Twice(), torch.randn(2), torch.randn(3)
    with tensorsnap.capture(model, ops=True) as snap:
        model(a, b)
    first, second = snap[""]
    assert first is second and first.is_nested
    assert [torch.equal(p, q) for p, q in zip(first.unbind(), (a, b))] == [True, True]


def test_an_unhashable_callable_is_still_named() -> None:
    from tensorsnap._ops import op_name

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]
        __name__ = "custom_op"

    assert op_name(Unhashable()) == "custom_op"


def test_a_wrapper_subclass_output_is_captured_with_its_logical_bytes() -> None:
    two = pytest.importorskip("torch.testing._internal.two_tensor")

    class Wrap(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return two.TwoTensor(x, x * 2)

    model, x = Wrap(), torch.randn(3)
    with tensorsnap.capture(model) as snap:
        model(x)
    value = snap[""]
    assert type(value) is two.TwoTensor
    assert torch.equal(value.a, x) and torch.equal(value.b, x * 2)
    assert snap.records[0].nbytes == 3 * 4  # no storage of its own: counted by its elements
