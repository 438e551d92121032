"""capture(ops=True): keys, names and values of functional ops, against hand-computed values.

Every expected key list below is written by hand from the model's source, and every expected
value is computed again outside the capture from the same inputs and weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tensorsnap


def _ops_of(snap: tensorsnap.Snapshot) -> list[str]:
    return [r.key for r in snap.records if r.kind == "op"]


class _Names(nn.Module):
    """One op per spelling, each named in the comment as the contract names it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = torch.relu(x)  # relu
        b = F.relu(y)  # relu#1
        c = (x - y).relu()  # sub, relu#2
        d = a + b  # add
        d += c  # add_
        d.add_(y)  # add_#1
        F.relu(d, inplace=True)  # relu#3
        e = F.linear(d, self.proj.weight, self.proj.bias)  # linear
        f = F.layer_norm(e, (4,))  # layer_norm, nothing of its internals
        scores = f @ f.transpose(-1, -2)  # transpose, matmul
        return scores


def test_op_names_keys_and_order() -> None:
    model = _Names()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with tensorsnap.capture(model, ops=True) as snap:
        model(x, y)
    assert list(snap) == [
        "/relu",
        "/relu#1",
        "/sub",
        "/relu#2",
        "/add",
        "/add_",
        "/add_#1",
        "/relu#3",
        "/linear",
        "/layer_norm",
        "/transpose",
        "/matmul",
        "",
    ]
    ops = {r.key: r for r in snap.records}
    assert ops["/relu#2"].op == "relu" and ops["/relu#2"].kind == "op"
    assert ops["/relu#2"].module == "" and ops["/relu#2"].call == 0
    assert ops["/add_#1"].op == "add_"


def test_op_values_are_taken_when_produced() -> None:
    torch.manual_seed(0)
    model = _Names()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with tensorsnap.capture(model, ops=True) as snap:
        out = model(x, y)
    # by hand, on fresh tensors
    a, b, c = x.clamp(min=0), y.clamp(min=0), (x - y).clamp(min=0)
    d0 = a + b
    d1 = d0 + c
    d2 = d1 + y
    d3 = d2.clamp(min=0)
    w, bias = model.proj.weight.detach(), model.proj.bias.detach()
    e = d3 @ w.t() + bias
    mean = e.mean(-1, keepdim=True)
    var = e.var(-1, unbiased=False, keepdim=True)
    f = (e - mean) / torch.sqrt(var + 1e-5)
    expected = {
        "/relu": a,
        "/relu#1": b,
        "/sub": x - y,
        "/relu#2": c,
        "/add": d0,  # later changed in place three times: the copy is not
        "/add_": d1,
        "/add_#1": d2,
        "/relu#3": d3,
        "/transpose": f.t(),
        "": f @ f.t(),
    }
    for key, value in expected.items():
        torch.testing.assert_close(snap[key], value, rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(snap["/linear"], e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(snap["/layer_norm"], f, rtol=1e-4, atol=1e-5)
    assert torch.equal(snap["/matmul"], out)
    # exactly what ran: relu of x, bitwise
    assert torch.equal(snap["/relu"], torch.relu(x))
    # the in-place chain really did change the live tensor after the copies were taken
    assert not torch.equal(snap["/add"], snap["/relu#3"])
    assert snap["/transpose"].shape == (4, 3)


def test_inplace_ops_on_views_and_later_changes_of_the_base() -> None:
    class Views(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            base = x * 1  # mul
            view = base[:, 1:]  # getitem
            view.mul_(10)  # mul_ (a view of base)
            row = base.select(0, 0)  # select
            row.zero_()  # zero_ changes base and view, not the copies
            return base.t()  # t

    model = Views()
    x = torch.arange(12.0).reshape(3, 4)
    with tensorsnap.capture(model, ops=True) as snap:
        out = model(x)
    assert _ops_of(snap) == ["/mul", "/getitem", "/mul_", "/select", "/zero_", "/t"]
    assert torch.equal(snap["/mul"], x)
    assert torch.equal(snap["/getitem"], x[:, 1:])
    assert torch.equal(snap["/mul_"], x[:, 1:] * 10)
    assert torch.equal(snap["/select"], x[0].where(torch.arange(4) == 0, x[0] * 10))
    assert torch.equal(snap["/zero_"], torch.zeros(4))
    expected = x.clone()
    expected[:, 1:] *= 10
    expected[0] = 0
    assert torch.equal(snap["/t"], expected.t()) and torch.equal(out, expected.t())
    # copies do not share memory with the live tensors or with each other
    assert snap["/getitem"].untyped_storage().data_ptr() != out.untyped_storage().data_ptr()
    out.fill_(-1)
    assert torch.equal(snap["/mul"], x)


def test_tuple_returning_ops_keep_their_structure() -> None:
    class Tuples(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            values, indices = torch.max(x, dim=1)  # max -> torch.return_types.max
            parts = torch.split(x, 2, dim=1)  # split -> tuple of views
            return values + parts[1].sum(1) + indices

    model = Tuples()
    x = torch.randn(3, 5)
    with tensorsnap.capture(model, ops=True) as snap:
        model(x)
    # parts[1] indexes a Python tuple: not a torch op
    assert _ops_of(snap) == ["/max", "/split", "/sum", "/add", "/add#1"]
    got = snap["/max"]
    assert type(got) is type(torch.max(x, dim=1))
    assert torch.equal(got.values, x.max(1).values)
    assert torch.equal(got.indices, x.argmax(1))
    parts = snap["/split"]
    assert type(parts) is tuple and len(parts) == 3
    for got_part, want in zip(parts, (x[:, :2], x[:, 2:4], x[:, 4:])):
        assert torch.equal(got_part, want)
    assert snap.records[0].shape is None and snap.records[0].op == "max"


def test_ops_returning_no_tensor_are_not_captured() -> None:
    class Shapes(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, d = x.shape
            size = x.size()
            dims = x.dim()
            count = x.numel()
            first = x[0, 0].item()
            listed = x.tolist()
            assert isinstance(first, float) and len(listed) == n
            return x.reshape(size[0] * d // dims, count // (size[0] * d // dims))

    model = Shapes()
    x = torch.randn(2, 3)
    with tensorsnap.capture(model, ops=True) as snap:
        model(x)
    # x[0, 0] returns a tensor (getitem); nothing else but the reshape does
    assert _ops_of(snap) == ["/getitem", "/reshape"]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)) * 2 + x  # mul, add


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.sigmoid()
        for _ in range(3):
            h = self.block(h)  # the same block three times: block, block#1, block#2
            h = h.neg()  # neg, neg#1, neg#2
        return h


def test_ops_belong_to_the_innermost_module_call_and_count_per_call() -> None:
    torch.manual_seed(3)
    model = _Outer()
    x = torch.randn(2, 4)
    with tensorsnap.capture(model, ops=True) as snap:
        out = model(x)
        loss = out.sum() * 3  # code around the model: not captured
        loss.item()
    expected = ["/sigmoid"]
    for n in range(3):
        call = "block" if n == 0 else f"block#{n}"
        fc = "block.fc" if n == 0 else f"block.fc#{n}"
        act = "block.act" if n == 0 else f"block.act#{n}"
        expected += [f"{fc}/linear", fc, f"{act}/tanh", act, f"{call}/mul", f"{call}/add", call]
        expected.append("/neg" if n == 0 else f"/neg#{n}")
    expected.append("")
    assert list(snap) == expected
    records = {r.key: r for r in snap.records}
    assert records["block#2/add"].module == "block" and records["block#2/add"].call == 2
    assert records["block.act#1/tanh"].module == "block.act"

    # values, by hand
    h = x.sigmoid()
    w, b = model.block.fc.weight.detach(), model.block.fc.bias.detach()
    for n in range(3):
        suffix = "" if n == 0 else f"#{n}"
        lin = h @ w.t() + b
        torch.testing.assert_close(snap[f"block.fc{suffix}/linear"], lin)
        t = torch.tanh(lin)
        torch.testing.assert_close(snap[f"block.act{suffix}/tanh"], t)
        torch.testing.assert_close(snap[f"block{suffix}/mul"], t * 2)
        h = -(t * 2 + h)
        torch.testing.assert_close(snap[f"/neg{suffix}"], h)
    assert torch.equal(snap[""], out)


def test_op_gradients_equal_retain_grad() -> None:
    torch.manual_seed(4)
    model = _Outer()
    x = torch.randn(2, 4)

    # reference: the same computation written out, each op output retained
    leaf = x.clone().requires_grad_()
    retained: dict[str, torch.Tensor] = {}

    def keep(key: str, t: torch.Tensor) -> torch.Tensor:
        t.retain_grad()
        retained[key] = t
        return t

    w, b = model.block.fc.weight, model.block.fc.bias
    h = keep("/sigmoid", leaf.sigmoid())
    for n in range(3):
        s = "" if n == 0 else f"#{n}"
        lin = keep(f"block.fc{s}/linear", F.linear(h, w, b))
        t = keep(f"block.act{s}/tanh", torch.tanh(lin))
        m = keep(f"block{s}/mul", t * 2)
        a = keep(f"block{s}/add", m + h)
        h = keep(f"/neg{s}", a.neg())
    (h.square().sum()).backward()
    reference = {k: t.grad for k, t in retained.items()}
    reference_x = leaf.grad
    model.zero_grad(set_to_none=True)

    leaf = x.clone().requires_grad_()
    with tensorsnap.capture(model, ops=True, grads=True) as snap:
        model(leaf).square().sum().backward()
    grads = [r.key for r in snap.records if r.kind == "op_grad"]
    assert sorted(grads) == sorted(f"{k}:grad" for k in reference)
    for key, want in reference.items():
        assert want is not None
        torch.testing.assert_close(snap[f"{key}:grad"], want, rtol=1e-6, atol=1e-7, msg=key)
    assert leaf.grad is not None and reference_x is not None
    torch.testing.assert_close(leaf.grad, reference_x, rtol=1e-6, atol=1e-7)
    # gradients arrive in backward order: the last op first
    assert grads[0] == "/neg#2:grad" and grads[-1] == "/sigmoid:grad"


def test_inplace_op_gradient_is_for_the_value_it_produced() -> None:
    class InPlace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 3  # mul
            y += 1  # add_
            return y.square()  # square

    x = torch.randn(5)
    leaf = x.clone().requires_grad_()
    with tensorsnap.capture(InPlace(), ops=True, grads=True) as snap:
        InPlace()(leaf).sum().backward()  # a fresh, unwatched instance: nothing captured
    assert list(snap) == []

    model = InPlace()
    with tensorsnap.capture(model, ops=True, grads=True) as snap:
        model(leaf).sum().backward()
    # d/dy of sum((y + 1)^2) is 2 (y + 1) for both the value before and after the add
    want = 2 * (x * 3 + 1)
    torch.testing.assert_close(snap["/add_:grad"], want)
    torch.testing.assert_close(snap["/mul:grad"], want)
    torch.testing.assert_close(snap["/square:grad"], torch.ones(5))
    torch.testing.assert_close(snap["/add_"], x * 3 + 1)
    torch.testing.assert_close(snap["/mul"], x * 3)


def test_names_lists_the_op_keys_of_a_real_capture() -> None:
    torch.manual_seed(5)
    model = _Outer()
    x = torch.randn(2, 4)
    listed = tensorsnap.names(model, x, ops=True)
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as snap:
        model(x)
    assert listed == list(snap)
    with tensorsnap.capture(model, ops=True) as snap:
        model(x)
    assert listed == list(snap)
    assert "block#2/add" in listed and "/neg#2" in listed
    assert tensorsnap.names(model, x, ops=True, include="*/neg*") == ["/neg", "/neg#1", "/neg#2"]


def test_ops_false_captures_no_op() -> None:
    model = _Outer()
    with tensorsnap.capture(model) as snap:
        model(torch.randn(2, 4))
    assert all(r.kind == "output" for r in snap.records)
    assert not any("/" in k for k in snap)


def test_op_outside_any_module_call_but_inside_the_block_is_not_captured() -> None:
    model = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with tensorsnap.capture(model, ops=True) as snap:
        z = torch.relu(x) + 1  # before the model runs
        model(z).sum()
        other = nn.Linear(3, 3)
        other(x)  # a module that is not part of the model
    assert list(snap) == ["/linear", ""]


def test_ops_run_by_user_module_hooks_are_not_the_modules_ops() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    norms: list[float] = []
    model[0].register_forward_pre_hook(lambda m, args: norms.append(float(args[0].abs().sum())))
    model[0].register_forward_hook(lambda m, args, out: norms.append(float(out.exp().sum())))
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as snap:
        model(torch.randn(1, 2))
    assert len(norms) == 2
    assert list(snap) == ["0/linear", "0", "1/relu", "1", ""]
