"""capture() without ops: module outputs, inputs, gradients, keys and selection (SPEC §2).

References are independent of the library: plain forward hooks that clone (conftest), values
computed by hand with torch.nn.functional, and ``retain_grad()`` in a separate identical run.
"""

from __future__ import annotations

import copy
import fnmatch
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same, reference_outputs
from torch import nn
from torch.nn.modules import module as module_globals
from torch.utils._python_dispatch import TorchDispatchMode

import tensorsnap
from tensorsnap import TensorSnapError, TensorSnapWarning


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.lin(x) * scale


class Net(nn.Module):
    """A module called three times, registered under two names, and a call with kwargs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.shared = nn.Linear(8, 8)
        self.alias = self.shared  # the same module under a second name
        self.act = nn.Tanh()
        self.head = Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.act(self.shared(h))
        h = self.act(self.alias(h))
        h = self.shared(h)
        return self.head(h, scale=2.0)


FORWARD_KEYS = [
    ":in",
    "embed:in",
    "embed",
    "shared:in",
    "shared",
    "act:in",
    "act",
    "shared#1:in",
    "shared#1",
    "act#1:in",
    "act#1",
    "shared#2:in",
    "shared#2",
    "head:in",
    "head:kwargs",
    "head.lin:in",
    "head.lin",
    "head",
    "",
]


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _x(*shape: int, seed: int = 1, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


# -- keys and their order ---------------------------------------------------------------------


def test_keys_follow_the_spec_in_execution_order() -> None:
    model = _net()
    with torch.no_grad(), tensorsnap.capture(model, inputs=True) as snap:
        model(_x(2, 4))
    assert list(snap) == FORWARD_KEYS  # no ":kwargs" for the root, no "alias" key


def test_inputs_and_kwargs_values() -> None:
    model = _net()
    x = _x(2, 4)
    with torch.no_grad(), tensorsnap.capture(model, inputs=True) as snap:
        model(x)
    assert_same(snap[":in"], (x,))
    assert_same(snap["head:kwargs"], {"scale": 2.0})
    with torch.no_grad():
        h = torch.tanh(snap["shared#1"])
        expected_lin = F.linear(h, model.shared.weight, model.shared.bias)
        expected_out = 2.0 * F.linear(expected_lin, model.head.lin.weight, model.head.lin.bias)
    assert torch.equal(snap["act#1"], h)
    assert torch.equal(snap["shared#2:in"][0], h)
    assert torch.equal(snap["head.lin:in"][0], expected_lin)
    assert torch.equal(snap[""], expected_out)


def test_module_outputs_match_clone_hooks_with_call_counters() -> None:
    model = _net()
    with torch.no_grad(), reference_outputs(model) as ref, tensorsnap.capture(model) as snap:
        model(_x(2, 4))
        model(_x(3, 4, seed=2))  # a second run keeps counting calls
    assert list(snap) == list(ref)
    assert "shared#5" in snap and "#1" in snap and "head.lin#1" in snap
    for key in ref:
        assert_same(snap[key], ref[key], key)
    records = {r.key: r for r in snap.records}
    assert (records["shared#5"].module, records["shared#5"].call) == ("shared", 5)
    assert (records["#1"].module, records["#1"].call, records["#1"].kind) == ("", 1, "output")


def _retain_grad_references(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    kept: dict[str, torch.Tensor] = {}
    calls: dict[int, int] = {}

    def hook(name: str, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        n = calls.get(id(module), 0)
        calls[id(module)] = n + 1
        out.retain_grad()
        kept[f"{name}#{n}:grad" if n else f"{name}:grad"] = out

    handles = [
        m.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o))
        for name, m in model.named_modules()
    ]
    model(x).pow(2).sum().backward()
    for handle in handles:
        handle.remove()
    return {k: t.grad for k, t in kept.items() if t.grad is not None}


def test_gradient_keys_values_and_order() -> None:
    model = _net()
    reference = _retain_grad_references(copy.deepcopy(model), _x(2, 4, requires_grad=True))
    x = _x(2, 4, requires_grad=True)
    with tensorsnap.capture(model, grads=True) as snap:
        model(x).pow(2).sum().backward()
    keys = list(snap)
    forward = [k for k in FORWARD_KEYS if ":" not in k]
    assert keys[: len(forward)] == forward
    grads = keys[len(forward) :]
    calls = [k for k in forward]
    assert sorted(grads) == sorted([f"{k}:grad" for k in calls] + [f"{k}:grad_in" for k in calls])
    # backward runs the calls in reverse: a later call's gradients come first
    order = [k for k in grads if k.startswith("shared") and k.endswith(":grad")]
    assert order == ["shared#2:grad", "shared#1:grad", "shared:grad"]
    for k in calls:
        assert grads.index(f"{k}:grad") < grads.index(f"{k}:grad_in"), k
    # values: retain_grad() in a plain run of an identical model
    assert set(reference) == {f"{k}:grad" for k in calls}
    for key, expected in reference.items():
        assert_same(snap[key], expected, key)
    # grad_in of a Linear call is grad_out @ W, computed here by hand
    for k in ("shared", "shared#1", "shared#2"):
        assert_same(snap[f"{k}:grad_in"], (snap[f"{k}:grad"] @ model.shared.weight,), k)
    assert_same(snap[":grad_in"], (x.grad,))
    kinds = {r.key: r.kind for r in snap.records}
    assert kinds["shared#2:grad"] == "grad" and kinds["shared#2:grad_in"] == "grad_in"


def test_grad_of_a_tuple_output_has_none_where_no_gradient_flowed() -> None:
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
            a = self.lin(x)
            return a, a * 2, 7, x.detach()

    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.split = Split()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, _, _, _ = self.split(x)
            return (a * 3).sum()

    model = Top()
    with tensorsnap.capture(model, grads=True, include="split*") as snap:
        model(_x(2, 4, requires_grad=True)).backward()
    grad = snap["split:grad"]
    assert type(grad) is tuple and len(grad) == 4
    assert torch.equal(grad[0], torch.full((2, 4), 3.0))
    assert grad[1:] == (None, None, None)
    assert type(snap["split"]) is tuple and snap["split"][2] == 7


def test_second_call_gradient_key() -> None:
    model = _net()
    with tensorsnap.capture(model, grads=True, include="shared#2:grad") as snap:
        out = model(_x(2, 4))
        out.sum().backward()
    assert list(snap) == ["shared#2:grad"]
    # d(sum(2 * lin(h)))/dh = 2 * 1 @ W for head.lin, by hand
    expected = (2.0 * torch.ones(2, 3)) @ model.head.lin.weight
    assert torch.allclose(snap["shared#2:grad"], expected, rtol=0, atol=1e-6)


# -- values are taken when produced ----------------------------------------------------------


def test_values_survive_inplace_relu_and_add() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.relu = nn.ReLU(inplace=True)
            self.other = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            h = self.relu(h)  # rewrites lin's output
            y = self.other(x)
            y += h  # rewrites other's output
            return y

    torch.manual_seed(0)
    model = M()
    x = _x(8, 4)
    with torch.no_grad(), tensorsnap.capture(model) as snap:
        out = model(x)
    lin = F.linear(x, model.lin.weight, model.lin.bias)
    other = F.linear(x, model.other.weight, model.other.bias)
    assert (lin < 0).any()
    assert torch.equal(snap["lin"], lin)
    assert torch.equal(snap["relu"], lin.clamp(min=0))
    assert torch.equal(snap["other"], other)
    assert torch.equal(snap[""], out)
    assert not torch.equal(snap["other"], out)


def test_value_survives_index_copy_into_a_cache_buffer() -> None:
    class Cache(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("kv", torch.zeros(2, 4, 3))

        kv: torch.Tensor

        def forward(self, k: torch.Tensor, pos: int) -> torch.Tensor:
            self.kv.index_copy_(1, torch.tensor([pos]), k)
            return self.kv[:, : pos + 1]  # a view of the live buffer

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 3)
            self.cache = Cache()

        def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
            return self.cache(self.proj(x), pos).sum(1)

    torch.manual_seed(0)
    model: Any = Decoder()
    steps = [_x(2, 1, 3, seed=s) for s in range(4)]
    with torch.no_grad(), reference_outputs(model) as ref, tensorsnap.capture(model) as snap:
        for pos, x in enumerate(steps):
            model(x, pos)
    expected = torch.zeros(2, 4, 3)
    for pos, x in enumerate(steps):
        key = "cache" if pos == 0 else f"cache#{pos}"
        expected[:, pos] = F.linear(x[:, 0], model.proj.weight, model.proj.bias)
        assert torch.equal(snap[key], expected[:, : pos + 1]), key
        assert_same(snap[key], ref[key])
    assert not torch.equal(model.cache.kv[:, :1], torch.zeros(2, 1, 3))


def test_values_survive_an_optimizer_step_and_grad_accumulation() -> None:
    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 2))

        def forward(self) -> torch.Tensor:
            return self.weight  # the live parameter itself

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = Table()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.table() * x).sum()

    torch.manual_seed(0)
    model: Any = M()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.table.weight.detach().clone()
    x1, x2 = _x(3, 2, seed=1), _x(3, 2, seed=2)
    with tensorsnap.capture(model, grads=True, include="table*") as snap:
        model(x1).backward()
        opt.step()
        model(x2).backward()  # accumulates into the same .grad tensor
    assert torch.equal(snap["table"], before)
    assert not torch.equal(model.table.weight, before)
    assert torch.equal(snap["table#1"], before - 0.5 * x1)
    assert torch.equal(snap["table:grad"], x1)
    assert torch.equal(snap["table#1:grad"], x2)
    assert torch.equal(model.table.weight.grad, x1 + x2)


def test_values_survive_writes_through_numpy() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())
    with torch.no_grad(), tensorsnap.capture(model) as snap:
        out = model(_x(2, 4))
    expected = out.clone()
    out.numpy()[:] = -1.0  # bypasses torch's version counter
    assert torch.equal(snap["1"], expected)
    assert torch.equal(snap[""], expected)
    snap[""].numpy()[:] = 5.0  # a write to the copy does not reach the copy of another key
    assert torch.equal(snap["1"], expected)


# -- capturing changes nothing ----------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.norm = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.drop(self.norm(self.lin(x))))
        return self.out(h) + x


def _hook_state(model: nn.Module) -> list[Any]:
    state: list[Any] = [
        dict(module_globals._global_forward_hooks),
        dict(module_globals._global_forward_pre_hooks),
        dict(module_globals._global_forward_hooks_always_called),
        dict(module_globals._global_forward_hooks_with_kwargs),
        dict(module_globals._global_backward_hooks),
    ]
    for m in model.modules():
        state += [
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            dict(m._forward_hooks_with_kwargs),
            dict(m._forward_pre_hooks_with_kwargs),
            dict(m._backward_hooks),
        ]
    return state


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


MODES = {
    "train-grad": (True, "grad"),
    "train-nograd": (True, "no_grad"),
    "eval-grad": (False, "grad"),
    "eval-nograd": (False, "no_grad"),
    "eval-inference": (False, "inference"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_capture_never_changes_the_computation(mode: str) -> None:
    train, grad_mode = MODES[mode]

    def run(capturing: bool) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any], Any]:
        torch.manual_seed(0)
        model = Block().train(train)
        x = _x(5, 6, requires_grad=grad_mode == "grad")
        context: Any = {
            "grad": torch.enable_grad(),
            "no_grad": torch.no_grad(),
            "inference": torch.inference_mode(),
        }[grad_mode]
        hooks = _hook_state(model)
        torch.manual_seed(1)  # dropout draws the same mask in both runs
        with context:
            if capturing:
                with tensorsnap.capture(model, grads=True, inputs=True) as snap:
                    out = model(x)
                    if grad_mode == "grad":
                        out.pow(2).sum().backward()
            else:
                snap = None
                out = model(x)
                if grad_mode == "grad":
                    out.pow(2).sum().backward()
        assert _hook_state(model) == hooks
        grads = {n: p.grad for n, p in model.named_parameters()}
        grads["x"] = x.grad
        return out.detach().clone(), _state(model), grads, snap

    plain_out, plain_state, plain_grads, _ = run(False)
    out, state, grads, snap = run(True)
    assert torch.equal(out, plain_out)
    assert state.keys() == plain_state.keys()
    for k in state:  # running statistics of BatchNorm included
        assert torch.equal(state[k], plain_state[k]), k
    for k, g in plain_grads.items():
        assert (grads[k] is None) == (g is None), k
        if g is not None:
            assert torch.equal(grads[k], g), k
    assert "lin" in snap and "act:in" in snap
    assert ("lin:grad" in snap) == (grad_mode == "grad")
    assert torch.equal(snap[""], plain_out)


def test_hooks_and_parameters_unchanged_when_the_block_raises() -> None:
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.after = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            if h.shape[0] == 3:
                raise ValueError("odd batch")
            return self.after(h)

    model = Fails()
    hooks = _hook_state(model)
    state = _state(model)
    with pytest.raises(ValueError, match="odd batch"):  # noqa: SIM117
        with tensorsnap.capture(model, grads=True, inputs=True, include="nothing*") as snap:
            model(_x(3, 4, requires_grad=True))
    assert _hook_state(model) == hooks
    assert all(torch.equal(v, state[k]) for k, v in _state(model).items())
    assert list(snap) == [":in", "lin:in", "lin"] or list(snap) == []  # nothing* selects none
    # the module stack recovered: a failed call inside a block does not shift later keys
    with tensorsnap.capture(model) as snap:
        with pytest.raises(ValueError):
            model(_x(3, 4))
        model(_x(2, 4))
    assert list(snap) == ["lin", "lin#1", "after", "#1"]
    # gradients after the block are not recorded and hooks on tensors are gone
    with tensorsnap.capture(model, grads=True) as snap:
        out = model(_x(2, 4, requires_grad=True))
    n = len(snap)
    out.sum().backward()
    assert len(snap) == n


# -- gradients through tensor hooks ------------------------------------------------------------


def test_gradients_with_an_inplace_op_after_the_module() -> None:
    torch.manual_seed(0)
    model: Any = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    x = _x(6, 4, requires_grad=True)
    # the documented torch alternative breaks here: the reason capture uses tensor hooks
    probe = copy.deepcopy(model)
    handle = probe[0].register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(RuntimeError, match=r"inplace|in-place"):
        probe(x).sum().backward()
    handle.remove()

    with tensorsnap.capture(model, grads=True) as snap:
        model(x).sum().backward()
    lin0 = F.linear(x, model[0].weight, model[0].bias).detach()
    upstream = torch.ones(6, 2) @ model[2].weight  # d sum / d relu output
    assert torch.equal(snap["2:grad"], torch.ones(6, 2))
    assert torch.allclose(snap["1:grad"], upstream, rtol=0, atol=1e-6)
    # gradient w.r.t. the Linear's output as it was produced, before ReLU rewrote it
    assert torch.allclose(snap["0:grad"], upstream * (lin0 > 0), rtol=0, atol=1e-6)
    assert torch.equal(snap["0"], lin0)
    plain = copy.deepcopy(model)
    plain.zero_grad()
    x2 = x.detach().requires_grad_()
    plain(x2).sum().backward()
    assert x2.grad is not None and x.grad is not None
    assert torch.equal(x2.grad, x.grad)


# -- selection ---------------------------------------------------------------------------------


def test_include_exclude_globs_match_across_separators() -> None:
    model = _net()
    every = tensorsnap.names(model, _x(2, 4, requires_grad=True), inputs=True, grads=True)
    cases = [
        (["shared*"], None),  # "#" and ":" inside the star
        (["*#2*"], None),
        (["head*"], ["*:in"]),  # "." and ":" inside the star
        (["*:grad"], ["*#*"]),
        (None, ["*in", "*kwargs", "*grad*"]),
        (["*"], ["*"]),
    ]
    for include, exclude in cases:
        with tensorsnap.capture(
            model, inputs=True, grads=True, include=include, exclude=exclude
        ) as snap:
            model(_x(2, 4, requires_grad=True)).sum().backward()
        expected = {
            k
            for k in every
            if (include is None or any(fnmatch.fnmatchcase(k, p) for p in include))
            and not any(fnmatch.fnmatchcase(k, p) for p in exclude or ())
        }
        assert set(snap) == expected, (include, exclude)
    assert set(every) >= {"shared#2:grad", "head.lin:in", ":grad_in", "head:kwargs"}


class _CopySpy(TorchDispatchMode):
    """Records the storages that any aten copy reads from."""

    COPIES = {"clone", "copy_", "_to_copy", "copy", "_copy_from"}

    def __init__(self) -> None:
        super().__init__()
        self.sources: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in self.COPIES:
            source = args[1] if name in ("copy_", "_copy_from") else args[0]
            if isinstance(source, torch.Tensor):
                self.sources.add(source.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def test_unselected_values_are_never_copied() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid())
    # hold every output, so that no storage is freed and reused by a later one
    outputs: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        m.register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o))
    spy = _CopySpy()
    with torch.no_grad(), spy, tensorsnap.capture(model, include="2") as snap:
        model(_x(4, 16))
    assert list(snap) == ["2"]
    assert [r.key for r in snap.records] == ["2"]
    ptr = {k: t.untyped_storage().data_ptr() for k, t in outputs.items()}
    assert len(set(ptr.values())) == 4  # "3" and "" are one tensor
    assert ptr["2"] in spy.sources
    unselected = {ptr[k] for k in ("0", "1", "3", "")}
    assert not unselected & spy.sources


def test_include_matching_nothing_names_the_closest_keys() -> None:
    model = _net()
    with (
        pytest.raises(TensorSnapError, match=r"'sharde'.*closest.*'shared'"),
        tensorsnap.capture(model, include=["embed", "sharde"]) as snap,
    ):
        model(_x(2, 4))
    assert list(snap) == ["embed"]  # what matched was captured before the error
    with pytest.raises(TensorSnapError, match="grad"), tensorsnap.capture(model, include="*:grad"):
        model(_x(2, 4))  # grads= is off, so there is no gradient key


def test_include_error_never_masks_an_exception_from_the_block() -> None:
    model = _net()
    with pytest.raises(ZeroDivisionError), tensorsnap.capture(model, include="nope"):
        model(_x(2, 4))
        _ = 1 / 0


# -- device and dtype ----------------------------------------------------------------------------


def test_dtype_casts_floating_copies_only() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.lin(x)
            return y, y.argmax(-1)

    model = M()
    x = _x(3, 4)
    with torch.no_grad(), tensorsnap.capture(model, dtype=torch.float16, inputs=True) as snap:
        y, idx = model(x)
    assert snap["lin"].dtype == torch.float16
    assert torch.equal(snap["lin"], y.to(torch.float16))
    assert snap[""][1].dtype == torch.int64 and torch.equal(snap[""][1], idx)
    assert torch.equal(snap["lin:in"][0], x.half())
    record = next(r for r in snap.records if r.key == "lin")
    assert record.dtype == torch.float16 and record.nbytes == 3 * 4 * 2


def test_device_option_keeps_independent_copies() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad(), tensorsnap.capture(model, device="cpu") as snap:
        out = model(_x(2, 4))
    expected = out.clone()
    out.mul_(0)
    assert snap["0"].device == torch.device("cpu")
    assert torch.equal(snap["0"], expected)
    with pytest.raises(TensorSnapError):  # noqa: SIM117
        with tensorsnap.capture(model, device="no-such-device"):
            pass


# -- isolation -----------------------------------------------------------------------------------


def test_other_threads_are_not_recorded() -> None:
    model = _net()
    other = _net()
    inside = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            inside.wait(10)
            with torch.no_grad():
                for _ in range(5):
                    model(_x(7, 4))  # the captured model itself, from another thread
                    other(_x(7, 4))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    x = _x(2, 4)
    with torch.no_grad(), tensorsnap.capture(model) as snap:
        inside.set()
        assert done.wait(30)
        with reference_outputs(model) as ref:
            model(x)
    thread.join()
    assert not errors
    assert list(snap) == list(ref)
    for key in ref:
        assert_same(snap[key], ref[key], key)


def test_nested_captures_and_two_models() -> None:
    model, second = _net(), nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = _x(2, 4)
    with (
        torch.no_grad(),
        reference_outputs(model) as ref,
        reference_outputs(second) as ref2,
        tensorsnap.capture(model) as outer,
        tensorsnap.capture(model, include="shared*") as inner,
        tensorsnap.capture(model.head) as head,
        tensorsnap.capture(second) as other,
    ):
        model(x)
        second(x)
    assert list(outer) == list(ref)
    assert list(inner) == [k for k in ref if k.startswith("shared")]
    assert list(head) == ["lin", ""]  # names relative to the captured root
    assert list(other) == list(ref2)
    for key in ref:
        assert_same(outer[key], ref[key], key)
    for key in inner:
        assert_same(inner[key], ref[key], key)
    assert_same(head[""], ref["head"])
    assert_same(head["lin"], ref["head.lin"])
    for key in ref2:
        assert_same(other[key], ref2[key], key)


# -- torch.compile and fused fast paths ---------------------------------------------------------


def _compile_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))


def test_compiled_model_is_captured_not_silently_empty() -> None:
    model = _compile_model()
    compiled: Any = torch.compile(model, backend="eager")
    x = _x(3, 4)
    with torch.no_grad():
        plain = compiled(x)  # compiled before the block
        with reference_outputs(model) as ref, tensorsnap.capture(compiled) as snap:
            out = compiled(x)
        assert torch.equal(out, plain)
        assert list(snap) == list(ref)
        for key in ref:
            assert_same(snap[key], ref[key], key)
        assert torch.equal(compiled(x), plain)  # and it still runs after the block


def test_capturing_the_module_inside_a_compiled_wrapper() -> None:
    # the wrapper was compiled before the block and is not inside the captured module
    model = _compile_model()
    compiled: Any = torch.compile(model, backend="eager")
    x = _x(3, 4)
    with torch.no_grad():
        compiled(x)
        with reference_outputs(model) as ref, tensorsnap.capture(model) as snap:
            compiled(x)
    assert list(ref) == ["0", "1", "2", ""]
    assert list(snap) == list(ref)
    for key in ref:
        assert_same(snap[key], ref[key], key)


def test_module_compiled_in_place() -> None:
    model = _compile_model()
    model.compile(backend="eager")
    x = _x(3, 4)
    with torch.no_grad():
        model(x)
        with reference_outputs(model) as ref, tensorsnap.capture(model) as snap:
            model(x)
    assert list(snap) == list(ref) == ["0", "1", "2", ""]
    for key in ref:
        assert_same(snap[key], ref[key], key)


def _encoder_layer() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
    return layer.eval()


def test_encoder_layer_fast_path_warns_and_keeps_its_output() -> None:
    layer = _encoder_layer()
    x = _x(2, 5, 16)
    with torch.no_grad():
        plain = layer(x)
        with (
            pytest.warns(TensorSnapWarning, match="fast path"),
            tensorsnap.capture(layer) as snap,
        ):
            out = layer(x)
    assert torch.equal(out, plain)
    assert list(snap) == [""]  # the fused kernel skipped the submodules
    assert torch.equal(snap[""], plain)


def test_encoder_layer_with_grad_sees_submodules() -> None:
    layer = _encoder_layer()
    x = _x(2, 5, 16)
    with reference_outputs(layer) as ref, tensorsnap.capture(layer) as snap:
        layer(x)
    assert "self_attn" in snap and "linear2" in snap
    assert list(snap) == list(ref)
    for key in ref:
        assert_same(snap[key], ref[key], key)


# -- names() and the Snapshot API ----------------------------------------------------------------


def test_names_matches_a_real_capture() -> None:
    model = _net()
    assert tensorsnap.names(model, _x(2, 4), inputs=True) == FORWARD_KEYS
    assert tensorsnap.names(model, _x(2, 4)) == [k for k in FORWARD_KEYS if ":" not in k]
    assert tensorsnap.names(model, _x(2, 4), include="shared*") == [
        "shared",
        "shared#1",
        "shared#2",
    ]
    listed = tensorsnap.names(model.head, _x(2, 8), scale=3.0, inputs=True)
    with torch.no_grad(), tensorsnap.capture(model.head, inputs=True) as snap:
        model.head(_x(2, 8), scale=3.0)
    assert listed == list(snap) == [":in", ":kwargs", "lin:in", "lin", ""]
    with pytest.raises(TensorSnapError, match="closest"):
        tensorsnap.names(model, _x(2, 4), include="head.lin2")


def test_names_lists_the_gradient_keys_a_backward_pass_produces() -> None:
    model = _net()
    x = _x(2, 4, requires_grad=True)
    listed = tensorsnap.names(model, x, grads=True)
    with tensorsnap.capture(model, grads=True) as snap:
        model(x).sum().backward()
    assert sorted(listed) == sorted(snap)
    assert [k for k in listed if ":" not in k] == [k for k in snap if ":" not in k]
    assert "shared#2:grad_in" in listed and ":grad_in" in listed


def test_names_lists_gradients_of_an_object_held_output_as_capture_produces_them() -> None:
    class Holder:
        def __init__(self, value: torch.Tensor) -> None:
            self.value = value

    class Inner(nn.Module):
        def forward(self, x: torch.Tensor) -> Holder:
            return Holder(x * 2)  # a tensor inside a plain object: P:grad is a Holder too

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).value.sum()

    model = Outer()
    x = _x(2, 4, requires_grad=True)
    listed = tensorsnap.names(model, x, grads=True)
    with tensorsnap.capture(model, grads=True) as snap:
        model(x).backward()
    assert sorted(listed) == sorted(snap)
    assert "inner" in listed and "inner:grad" in listed and ":grad" in listed
    assert type(snap["inner:grad"]) is Holder
    assert torch.equal(snap["inner:grad"].value, torch.ones(2, 4))


def test_snapshot_mapping_records_and_reprs() -> None:
    model = _net()
    x = _x(2, 4)
    with torch.no_grad(), tensorsnap.capture(model, inputs=True) as snap:
        out = model(x)
    assert isinstance(snap, Mapping) and isinstance(snap, tensorsnap.Snapshot)
    assert len(snap) == len(FORWARD_KEYS) == len(snap.records)
    assert list(snap.keys()) == FORWARD_KEYS
    assert [k for k, _ in snap.items()] == FORWARD_KEYS
    assert "shared#1" in snap and "nope" not in snap and 3 not in snap
    assert snap.get("nope") is None
    assert snap.get("nope", 5) == 5
    assert torch.equal(snap[""], out)
    with pytest.raises(KeyError, match="closest: 'shared#1'"):
        snap["shared#11"]
    with pytest.raises(TypeError):
        snap["x"] = 1  # type: ignore[index]
    records = {r.key: r for r in snap.records}
    assert [r.key for r in snap.records] == FORWARD_KEYS
    assert records["head.lin"] == tensorsnap.Record(
        "head.lin", "head.lin", 0, None, "output", (2, 3), torch.float32, 2 * 3 * 4
    )
    assert records["shared#2:in"].kind == "input" and records["shared#2:in"].call == 2
    assert records["head:kwargs"].kind == "kwargs" and records["head:kwargs"].shape is None
    assert records[":in"].nbytes == x.numel() * 4
    assert snap.nbytes == sum(r.nbytes for r in snap.records)
    assert snap.nbytes == sum(_nbytes(v) for v in snap.values())
    text = repr(snap)
    assert f"{len(FORWARD_KEYS)} keys" in text and "shared#2" in text and "2x3" in text
    html = snap._repr_html_()
    assert "<table" in html and "shared#2:in" in html and "<td>head.lin</td>" in html


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def test_snapshot_repr_escapes_html() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module("<b>", nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self, "<b>")(x)

    with torch.no_grad(), tensorsnap.capture(Odd()) as snap:
        Odd()(_x(1, 2))
    assert len(snap) == 0
    model = Odd()
    with torch.no_grad(), tensorsnap.capture(model) as snap:
        model(_x(1, 2))
    assert list(snap) == ["<b>", ""]
    html = snap._repr_html_()
    assert "<td>&lt;b&gt;</td>" in html and "<td><b></td>" not in html
