"""Check tensorsnap's CUDA promises on this machine in one command, and print one table.

Run: ``python benchmarks/gpu_check.py`` (``--quick`` for small models only, ``--repeats N`` for
the overhead rounds). Without a CUDA device it says so and exits 0; ``--device cpu`` runs the
device-independent checks on the CPU instead (the test suite does, to keep this script honest).

What it checks, each against an independent reference taken in the same run (plain hooks that
clone, a plain function mode that clones, plain tensor hooks, plain saved-tensor hooks), values
compared bitwise on the CPU (NaN payloads and -0.0 included):

* ``snapshot`` with ``device=None`` (under ``torch.cuda.set_sync_debug_mode("error")``: no host
  sync), ``device="cpu"``, ``pin_memory=True``, the staged path for tensors over 32 MiB, a cast,
  and on a side stream; aliasing and strides kept;
* ``capture`` of module outputs, ops, gradients, saved tensors, ``nonfinite="raise"`` and
  ``stats=True`` with copies kept on the device, all with no sync inside the forward and
  backward (``nonfinite`` reads its checks once per model call, which is allowed); the first
  non-finite key named as the CPU names it; ``device="cpu"`` offload; ``max_memory`` spilling;
  capture on a non-default stream and under ``torch.autocast("cuda")``; capture leaves the
  model's output bitwise as a plain run makes it;
* ``extract`` (whole values and ``per_token=True``) and bundles (``save``/``load``) of values
  made on the GPU;
* the overhead of capture on a mid-size model (a 12-layer GPT-2 at batch 8 x 512) against a
  plain forward: outputs, ops, offload to the CPU, ``nonfinite``.

Exit status: 0 when every check passed or there is no CUDA device, 1 when any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# deterministic cuBLAS, so that a captured run and a plain run compute the same bits
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

try:
    import tensorsnap
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import tensorsnap

_MiB = 2**20


class Skip(Exception):
    """The check does not apply here; the message says why."""


@dataclass
class Context:
    device: torch.device
    quick: bool
    repeats: int
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    failed: int = 0
    selfsync: dict[str, str] = field(default_factory=dict)  # models that sync by themselves
    only: list[str] = field(default_factory=list)  # run the checks whose names hold one of these

    def wanted(self, name: str) -> bool:
        return not self.only or any(part in name for part in self.only)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# -- comparing ------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> tuple[Any, ...]:
    """Shape, dtype and a digest of the bytes of ``t``'s elements in row-major order."""
    c = t.detach().to("cpu").contiguous()
    data = ctypes.string_at(c.data_ptr(), c.nbytes) if c.nbytes else b""
    return tuple(c.shape), c.dtype, hashlib.sha256(data).hexdigest()


def leaves(value: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors inside a value, in order (containers, mappings, plain objects)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 8 or value is None or isinstance(value, (str, bytes, int, float, bool)):
        return []
    if isinstance(value, Mapping):
        items: Any = value.values()
    elif isinstance(value, (tuple, list)):
        items = value
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return []
    return [t for item in items for t in leaves(item, depth + 1)]


def same(a: Any, b: Any) -> bool:
    """Bitwise equal tensors in the same order, however they are nested."""
    x, y = leaves(a), leaves(b)
    return len(x) == len(y) and all(bits(p) == bits(q) for p, q in zip(x, y))


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# -- references -----------------------------------------------------------------------------------


def _clone(t: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunction():  # our own clone is no op of the model's
        return t.detach().clone()


def _clone_all(value: Any) -> list[torch.Tensor]:
    return [_clone(t) for t in leaves(value)]


@contextlib.contextmanager
def output_hooks(model: nn.Module, grads: bool = False) -> Iterator[dict[str, Any]]:
    """A plain process-wide forward hook: ``name`` / ``name#n`` -> clones of the output's leaves,
    and with ``grads`` a tensor hook per tensor output: ``name:grad`` -> clone of its gradient."""
    names = {id(m): n for n, m in model.named_modules()}
    calls: dict[int, int] = {}
    found: dict[str, Any] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        name = names.get(id(module))
        if name is None:
            return
        n = calls.get(id(module), 0)
        calls[id(module)] = n + 1
        key = name if n == 0 else f"{name}#{n}"
        found[key] = _clone_all(output)
        if grads and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda g, k=f"{key}:grad": found.__setitem__(k, [_clone(g)]))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


class OpRecorder(TorchFunctionMode):
    """A plain function mode that clones every tensor an op returns, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[torch.Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.values.append(_clone(out))
        elif isinstance(out, (tuple, list)):
            self.values.extend(_clone(t) for t in out if isinstance(t, torch.Tensor))
        return out


def ops_in_order(snap: Any, reference: list[torch.Tensor]) -> int:
    """Check that every op value of ``snap`` appears, bitwise, in ``reference`` in order."""
    ref = [bits(t) for t in reference]
    at = 0
    matched = 0
    for r in snap.records:
        if r.kind != "op":
            continue
        for t in leaves(snap[r.key]):
            want = bits(t)
            while at < len(ref) and ref[at] != want:
                at += 1
            check(at < len(ref), f"op value {r.key!r} is not a value the plain run produced")
            at += 1
            matched += 1
    return matched


def compare_outputs(snap: Any, found: dict[str, Any], kinds: tuple[str, ...] = ("output",)) -> int:
    keys = [r.key for r in snap.records if r.kind in kinds]
    check(len(keys) > 0, "nothing was captured")
    for key in keys:
        check(key in found, f"{key!r} was captured but no plain hook saw it")
        check(same(snap[key], found[key]), f"{key!r} differs from the plain hook's clone")
    return len(keys)


# -- sync detection -------------------------------------------------------------------------------


@contextlib.contextmanager
def no_sync(ctx: Context) -> Iterator[None]:
    """Raise on any host-device sync inside (CUDA only)."""
    if not ctx.cuda:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _where(err: BaseException) -> str:
    """The innermost frame of tensorsnap (else of anything) in the traceback, as file:line."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if f"{os.sep}tensorsnap{os.sep}" in f.filename]
    f = (ours or frames or [None])[-1]
    return "?" if f is None else f"{os.path.basename(f.filename)}:{f.lineno}"


# -- models ---------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        weights = torch.softmax(scores + mask, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, s, d))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.attn(self.ln1(x), mask)
        x = x + h
        y = self.act(self.fc(self.ln2(x)))  # ReLU in place: the fc output captured must not change
        return x + self.out(y), h


class Tiny(nn.Module):
    """A GPT-like model written here, free of host syncs: embedding, causal blocks with tuple
    outputs and an in-place ReLU, a head."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, vocab: int = 97) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        s = input_ids.shape[1]
        # finite, so that nonfinite="raise" has nothing to find in a healthy run
        causal = torch.full((s, s), -1e9, device=input_ids.device).triu(1)
        x = self.embed(input_ids)
        for block in self.blocks:
            x, _ = block(x, causal)
        return self.head(self.norm(x))


class _NaNAt(nn.Module):
    """Identity, except that it makes every element NaN (log of a negative number)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(-(x.abs() + 1.0))


def _gpt2(ctx: Context, big: bool) -> nn.Module:
    try:
        import transformers
    except ImportError as err:
        raise Skip("transformers is not installed (pip install transformers)") from err
    options: dict[str, Any] = dict(
        bos_token_id=None, eos_token_id=None, attn_implementation="eager", use_cache=False
    )
    if big:  # GPT-2 small: 12 layers, d=768
        options.update(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    else:
        options.update(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**options))
    return model.eval().to(ctx.device)


def _models(ctx: Context) -> dict[str, tuple[nn.Module | None, torch.Tensor, str]]:
    """name -> (model or None, input ids, why it is missing)."""
    torch.manual_seed(0)
    tiny = Tiny().eval().to(ctx.device)
    ids = torch.randint(0, 97, (2, 16), device=ctx.device)
    out: dict[str, tuple[nn.Module | None, torch.Tensor, str]] = {"tiny": (tiny, ids, "")}
    try:
        gpt2 = _gpt2(ctx, big=False)
        out["gpt2"] = (gpt2, torch.randint(0, 257, (2, 16), device=ctx.device), "")
    except Skip as why:
        out["gpt2"] = (None, ids, str(why))
    return out


def _guard(ctx: Context, name: str) -> contextlib.AbstractContextManager[None]:
    """no_sync, unless the model syncs by itself (then values are still checked)."""
    return contextlib.nullcontext() if name in ctx.selfsync else no_sync(ctx)


def _sync_note(ctx: Context, name: str) -> str:
    return f"; sync not checked: {ctx.selfsync[name]}" if name in ctx.selfsync else ""


# -- checks ---------------------------------------------------------------------------------------


def _mixed(ctx: Context) -> dict[str, Any]:
    """Tensors of every kind snapshot must copy bitwise, with views and aliasing."""
    d = ctx.device
    payload = torch.tensor([0x7FC00001, -0x80000000, 1], dtype=torch.int32).view(torch.float32)
    base = torch.randn(64, 32, device=d)
    shared = torch.randn(5, device=d)
    src: dict[str, Any] = {
        "nan_payload_and_minus_zero": payload.to(d),
        "half": torch.randn(7, 3, device=d).half(),
        "bf16": torch.randn(4, 9, device=d).bfloat16(),
        "int": torch.randint(-(2**40), 2**40, (6,), device=d),
        "bool": torch.rand(11, device=d) > 0.5,
        "complex": torch.randn(4, dtype=torch.complex64, device=d),
        "channels_last": torch.randn(2, 3, 4, 5, device=d).contiguous(
            memory_format=torch.channels_last
        ),
        "base": base,
        "transposed": base.t(),
        "rows": base[3:9],
        "expanded": torch.randn(3, 1, device=d).expand(3, 5),
        "scalar": torch.tensor(2.5, device=d),
        "empty": torch.empty(0, 4, device=d),
        "twice_a": shared,
        "twice_b": shared,
    }
    if hasattr(torch, "float8_e4m3fn"):
        src["float8"] = torch.randn(8, device=d).to(torch.float8_e4m3fn)
    return src


def check_snapshot_on_device(ctx: Context) -> str:
    src = _mixed(ctx)
    with no_sync(ctx):
        copy = tensorsnap.snapshot(src)
    for key, t in src.items():
        c = copy[key]
        check(c.device == t.device, f"{key}: on {c.device}, expected {t.device}")
        check(c.stride() == t.stride(), f"{key}: strides {c.stride()} != {t.stride()}")
        check(bits(c) == bits(t), f"{key}: values differ")
        if t.numel():
            check(c.data_ptr() != t.data_ptr(), f"{key}: shares memory with the source")
    check(copy["twice_a"] is copy["twice_b"], "the same tensor twice gave two copies")
    ptr = copy["base"].untyped_storage().data_ptr()
    for key in ("transposed", "rows"):
        check(copy[key].untyped_storage().data_ptr() == ptr, f"{key} is no view of base's copy")
    return f"{len(src)} tensors bitwise, strides and aliasing kept"


def check_snapshot_to_cpu(ctx: Context) -> str:
    src = _mixed(ctx)
    pins = [False, True] if ctx.cuda else [False]
    for pin in pins:
        copy = tensorsnap.snapshot(src, device="cpu", pin_memory=pin)
        for key, t in src.items():
            c = copy[key]
            check(c.device.type == "cpu", f"{key}: on {c.device}")
            check(bits(c) == bits(t), f"{key}: values differ (pin_memory={pin})")
            check(c.stride() == t.stride(), f"{key}: strides {c.stride()} != {t.stride()}")
            if pin and t.numel() and key != "expanded":
                check(c.is_pinned(), f"{key}: not pinned with pin_memory=True")
        check(copy["twice_a"] is copy["twice_b"], "the same tensor twice gave two copies")
        ptr = copy["base"].untyped_storage().data_ptr()
        check(copy["rows"].untyped_storage().data_ptr() == ptr, "rows is no view of base's copy")
    return "pageable" + (" and pinned" if ctx.cuda else "") + ", bitwise, aliasing kept"


def check_snapshot_staged(ctx: Context) -> str:
    # 48 MiB, dense but not contiguous: more than one 32 MiB staging chunk
    x = torch.randn(3, 4096, 1024, device=ctx.device).transpose(0, 1)
    want = bits(x)
    copy = tensorsnap.snapshot(x, device="cpu")
    check(copy.stride() == x.stride() and bits(copy) == want, "staged copy differs")
    half = tensorsnap.snapshot(x, device="cpu", dtype=torch.float16)
    check(bits(half) == bits(x.half()), "staged cast differs from x.half()")
    # the copy is taken when snapshot runs: a write queued right after must not reach it
    y = torch.randn(64 * _MiB // 4, device=ctx.device)
    before = bits(y)
    for pin in [False, True] if ctx.cuda else [False]:
        copy = tensorsnap.snapshot(y, device="cpu", pin_memory=pin)
        y.mul_(2)
        check(bits(copy) == before, f"a later in-place write reached the copy (pin={pin})")
        y.div_(2)
    return "48 MiB transposed + cast, 64 MiB then overwritten: bitwise"


def check_side_stream_snapshot(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skip("CUDA streams only")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        a = torch.randn(2048, 2048, device=ctx.device)
        x = a @ a  # long enough that a missing wait would read it unfinished
        on_device = tensorsnap.snapshot(x)
        pinned = tensorsnap.snapshot(x, device="cpu", pin_memory=True)
        x.zero_()  # queued after both copies on the same stream
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        want = bits(a @ a)
    torch.cuda.synchronize()
    check(bits(on_device) == want, "device copy on a side stream differs")
    check(bits(pinned) == want, "pinned copy on a side stream differs")
    return "copies ordered after the producer on the side stream"


def _first_sync(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> None:
    """Note whether the model's plain forward (and backward) syncs by itself."""
    if not ctx.cuda:
        return
    _logits(model(ids)).float().sum().backward()  # warm up: first calls may sync
    try:
        with no_sync(ctx):
            out = model(ids)
            _logits(out).float().sum().backward()
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        ctx.selfsync[name] = f"its plain run syncs at {_where(err)}"
    model.zero_grad(set_to_none=True)


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def check_capture_outputs(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    with torch.no_grad():
        plain = _logits(model(ids))
        with output_hooks(model) as found, tensorsnap.capture(model) as snap, _guard(ctx, name):
            out = _logits(model(ids))
    n = compare_outputs(snap, found)
    check(bits(out) == bits(plain), "capture changed the model's output")
    return f"{n} module outputs bitwise; output unchanged{_sync_note(ctx, name)}"


def _ops_against_references(
    ctx: Context, name: str, model: nn.Module, ids: torch.Tensor, what: str
) -> tuple[Any, int, int]:
    """An ops=True capture beside a plain op recorder and output hooks (inside whatever
    autocast the caller opened): the snapshot, ops in order, outputs bitwise."""
    with torch.no_grad():
        plain = _logits(model(ids))
        with output_hooks(model) as found, tensorsnap.capture(model, ops=True) as snap:
            recorder = OpRecorder()
            with _guard(ctx, name), recorder:
                out = _logits(model(ids))
    n = ops_in_order(snap, recorder.values)
    m = compare_outputs(snap, found)
    check(bits(out) == bits(plain), f"capture(ops=True) changed the model's output{what}")
    return snap, n, m


def check_capture_ops(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    _, n, m = _ops_against_references(ctx, name, model, ids, "")
    return f"{n} op values in order, {m} outputs bitwise{_sync_note(ctx, name)}"


def check_capture_grads(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    model.zero_grad(set_to_none=True)
    _logits(model(ids)).float().sum().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    with (
        output_hooks(model, grads=True) as found,
        tensorsnap.capture(model, grads=True, ops=True) as snap,
        _guard(ctx, name),
    ):
        _logits(model(ids)).float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    check(len(grads) == len(plain), "capture changed which parameters get a gradient")
    # embedding backward adds with atomics on CUDA (not deterministic): those are left out
    sparse = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in model.parameters() if p.grad is not None]
    for p, g, want in zip(params, grads, plain):
        check(id(p) in sparse or same(g, want), "capture changed p.grad")
    model.zero_grad(set_to_none=True)
    keys = [k for k in found if k.endswith(":grad")]
    check(len(keys) > 0, "the plain hooks saw no gradient")
    for key in keys:
        check(key in snap, f"{key!r} is missing from the capture")
        check(same(snap[key], found[key]), f"{key!r} differs from the tensor hook's clone")
    return f"{len(keys)} output gradients bitwise; p.grad unchanged{_sync_note(ctx, name)}"


def check_capture_saved(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(_clone(t))
        return t

    # only the innermost pair of saved-tensor hooks runs: the reference is a run of its own
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _logits(model(ids)).float().sum().backward()
    with tensorsnap.capture(model, saved=True, ops=True) as snap, _guard(ctx, name):
        loss = _logits(model(ids)).float().sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    ours: dict[Any, int] = {}
    for r in snap.records:
        if r.kind == "saved":
            for t in leaves(snap[r.key]):
                ours[bits(t)] = ours.get(bits(t), 0) + 1
    theirs: dict[Any, int] = {}
    for t in packed:
        theirs[bits(t)] = theirs.get(bits(t), 0) + 1
    check(len(packed) > 0, "autograd saved nothing")
    missing = sum(max(0, n - ours.get(k, 0)) for k, n in theirs.items())
    check(missing == 0, f"{missing} of {len(packed)} saved tensors are not in the capture")
    return f"{len(packed)} saved tensors bitwise{_sync_note(ctx, name)}"


def check_nonfinite(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    # a finite run: the same values as without the check, and no sync but one read per call
    with torch.no_grad():
        with tensorsnap.capture(model, ops=True) as plain:
            model(ids)
        with tensorsnap.capture(model, ops=True, nonfinite="raise") as checked, _guard(ctx, name):
            model(ids)
    check(list(plain) == list(checked), "nonfinite='raise' changed the keys")
    check(all(same(plain[k], checked[k]) for k in plain), "nonfinite='raise' changed values")
    # a NaN deep inside: the first key holding one in a plain capture of the same run (read on
    # the host, value by value) is the one named, and the snapshot stops there
    poisoned = _poisoned(model)
    with torch.no_grad(), tensorsnap.capture(poisoned, ops=True) as everything:
        poisoned(ids)
    keys = list(everything)
    first = next(k for k in keys if any(_nonfinite(t) for t in leaves(everything[k])))
    try:
        with (
            torch.no_grad(),
            tensorsnap.capture(poisoned, ops=True, nonfinite="raise") as snap,
            _guard(ctx, name),
        ):
            poisoned(ids)
    except tensorsnap.NonFiniteError as err:
        check(err.key == first, f"named {err.key!r}; the first value with a NaN is {first!r}")
        check(list(snap) == keys[: keys.index(first) + 1], "the snapshot goes on past it")
        check(all(same(snap[k], everything[k]) for k in snap), "values differ")
    else:
        raise AssertionError("no NonFiniteError")
    return f"finite run unchanged; NaN named {first!r}, snapshot cut there{_sync_note(ctx, name)}"


def _nonfinite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()):
        return False
    c = t.detach().cpu()
    c = c.float() if c.element_size() == 1 else c
    return not bool(torch.isfinite(torch.view_as_real(c) if c.is_complex() else c).all())


def _poisoned(model: nn.Module) -> nn.Module:
    """A copy of the model whose second block's MLP activation turns everything to NaN."""
    import copy

    poisoned = copy.deepcopy(model)
    if isinstance(poisoned, Tiny):
        poisoned.blocks[-1].act = _NaNAt()
    else:
        poisoned.transformer.h[-1].mlp.act = _NaNAt()
    return poisoned


def check_finite_kernel(ctx: Context) -> str:
    from tensorsnap import _finite

    torch.manual_seed(5)
    n = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64):
        for size in (1, 1000, 3 * _MiB + 7):
            for poison in (None, "nan", "inf", "-inf"):
                t = torch.randn(size, device=ctx.device).to(dtype)
                if poison is not None:
                    t[int(torch.randint(size, ()))] = float(poison)
                low, high = _finite._extremes(t)
                got = bool(low.isfinite() and high.isfinite())
                real = torch.view_as_real(t) if t.is_complex() else t
                check(got == bool(torch.isfinite(real).all()), f"{dtype} {size} {poison}")
                n += 1
    big = torch.full((64, 4096), 60000.0, dtype=torch.float16, device=ctx.device)
    low, high = _finite._extremes(big)
    check(bool(low.isfinite() and high.isfinite()), "a finite float16 tensor was flagged")
    return f"{n + 1} tensors: aminmax flags exactly the non-finite ones"


def check_stats(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    with (
        torch.no_grad(),
        output_hooks(model) as found,
        tensorsnap.capture(model, stats=True) as snap,
        _guard(ctx, name),
    ):
        model(ids)
    n = 0
    for r in snap.records:
        for s, t in zip(_stats_leaves(snap[r.key]), found[r.key]):
            ident = nn.Identity()
            with tensorsnap.capture(ident, stats=True) as ref:
                ident(t.cpu())
            want = ref[""]
            for attr in ("shape", "dtype", "nan", "inf", "digest", "min", "max"):
                a, b = getattr(s, attr), getattr(want, attr)
                check(a == b or (a != a and b != b), f"{r.key!r}: Stats.{attr} {a} != {b} (CPU)")
            n += 1
    check(n > 0, "no Stats records")
    return f"{n} Stats exact vs the CPU's (digest, min, max, counts){_sync_note(ctx, name)}"


def _stats_leaves(value: Any) -> list[Any]:
    if isinstance(value, tensorsnap.Stats):
        return [value]
    if isinstance(value, (tuple, list)):
        return [s for v in value for s in _stats_leaves(v)]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _stats_leaves(v)]
    return []


def check_offload(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    """device='cpu': copies queued through the pinned ring, no host sync inside the forward
    (the ring's own waits, when a region is reused, are the only ones allowed)."""
    with torch.no_grad():
        plain = _logits(model(ids))
        with (
            output_hooks(model) as found,
            tensorsnap.capture(model, ops=True, device="cpu") as snap,
        ):
            recorder = OpRecorder()
            with _guard(ctx, name), recorder:
                out = _logits(model(ids))
    devices = {t.device.type for k in snap for t in leaves(snap[k])}
    check(devices == {"cpu"}, f"offloaded copies on {devices}")
    pinned = sum(t.is_pinned() for k in snap for t in leaves(snap[k]))
    check(pinned == 0, f"{pinned} offloaded copies are pinned (they must be plain memory)")
    n = ops_in_order(snap, recorder.values)
    m = compare_outputs(snap, found)
    check(bits(out) == bits(plain), "capture(device='cpu') changed the model's output")
    return f"{n} ops + {m} outputs on the CPU, bitwise{_sync_note(ctx, name)}"


def check_graph_mode(ctx: Context) -> str:
    """capture(ops=True, graph=True) on the device: the eager op capture's keys and values
    bitwise, the graph (not a fallback) producing them, no sync inside the graph's call."""
    from tensorsnap._graph import _compiled

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval().to(ctx.device)
    src = torch.randn(4, 32, 64, device=ctx.device)
    with torch.no_grad():
        with tensorsnap.capture(model, ops=True) as eager:
            want = model(src)
        for _ in range(2):  # the first checks the graph's keys (eagerly), the second compiles
            with tensorsnap.capture(model, ops=True, graph=True):
                model(src)
        with tensorsnap.capture(model, ops=True, graph=True) as graph, _guard(ctx, "graph"):
            out = model(src)
    compiled = _compiled[model]
    check(compiled.eager is None, f"graph mode ran eagerly: {compiled.eager}")
    check(list(graph) == list(eager), "graph mode's keys differ from the eager capture's")
    bad = [k for k in eager if not same(graph[k], eager[k])]
    check(not bad, f"{len(bad)} values differ, first {bad[:1]}")
    check(bits(out) == bits(want), "graph mode changed the model's output")
    return f"{len(eager)} keys bitwise against the eager op capture{_sync_note(ctx, 'graph')}"


def check_offload_ring(ctx: Context) -> str:
    """The ring itself: 300 values through a 1 MiB ring (it wraps ~150 times), each source
    overwritten right after its copy was queued, with device work queued in between."""
    if not ctx.cuda:
        raise Skip("CUDA only (the CPU side is tests/test_offload.py)")
    from tensorsnap._offload import Offload

    torch.manual_seed(3)
    offload = Offload(clone=True, arena=_MiB, chunk=_MiB // 4)
    pairs = []
    a = torch.randn(1024, 1024, device=ctx.device)
    with no_sync(ctx):
        for i in range(300):
            src = torch.randn(1000 + 997 * i % 300_000, device=ctx.device)
            dst = torch.empty(src.numel())
            offload.copy(dst, src)
            pairs.append((dst, src.clone()))
            src.mul_(-3)  # queued after the copy on the same stream: must not reach it
            if i % 50 == 0:
                a = torch.tanh(a @ a)  # the side stream's copies wait behind this
    offload.drain()
    bad = sum(not torch.equal(dst, want.cpu()) for dst, want in pairs)
    check(bad == 0, f"{bad} of {len(pairs)} values differ after the ring wrapped")
    return f"{len(pairs)} values, {offload.issued} copies through 1 MiB: bitwise, no sync"


def check_spill(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    """max_memory keeps the budget for copies on the CPU and on the device alike; a spilled
    device copy reads back on its device, bitwise."""
    budget = 64 * 1024
    notes = []
    for where in ("cpu", None):
        with tempfile.TemporaryDirectory() as spill, torch.no_grad():
            with output_hooks(model) as found:
                options = dict(device=where, max_memory=budget, spill_dir=spill)
                with tensorsnap.capture(model, ops=True, **options) as snap:  # type: ignore[arg-type]
                    if ctx.cuda:
                        _busy(ctx)  # the model's work waits behind this: a writer that did not
                    model(ids)  # wait for each copy's event would read it unfinished
            compare_outputs(snap, found)
            check(all(same(snap[k], snap[k]) for k in snap), "a second read differs")
            held = snap._store.memory
            spilled = sum(len(files) for _, _, files in os.walk(spill))
            label = "device='cpu'" if where else f"copies on {ctx.device.type}"
            check(
                held <= budget,
                f"{label}: {held / _MiB:.1f} MiB held in memory over a {budget // 1024} KiB "
                f"budget ({spilled} spill files)",
            )
            check(spilled > 0, f"{label}: nothing was spilled")
            want = torch.device("cpu") if where else ctx.device
            devices = {t.device for k in snap for t in leaves(snap[k])}
            check(devices == {want}, f"{label}: spilled values read back on {devices}, not {want}")
            notes.append(f"{label}: {spilled} files")
            del snap
    return "bitwise after spilling, read back where captured; " + ", ".join(notes)


def check_spill_bytes(ctx: Context) -> str:
    """Device values made on a side stream behind queued work, spilled at once (budget 0): the
    bytes in the spill file and the copies read back are the values, bitwise."""
    if not ctx.cuda:
        raise Skip("CUDA only (the CPU side is tests/test_offload.py)")
    from tensorsnap._spill import SpillStore

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    kept = []
    with tempfile.TemporaryDirectory() as spill:
        store = SpillStore(max_memory=0, spill_dir=spill)
        with torch.cuda.stream(side):
            for i in range(6):
                a = torch.randn(2048, 2048, device=ctx.device)
                for _ in range(10):
                    a = torch.tanh(a @ a)  # long, so that a missing wait would read it early
                value = (a, a[::3], a.t().half())
                kept.append(value)
                store.put(f"k{i}", value, a.nbytes + value[2].nbytes)
        store.flush()
        torch.cuda.synchronize()
        check(store.memory == 0, f"{store.memory} bytes still held with a budget of 0")
        for i, value in enumerate(kept):
            got = store.get(f"k{i}")
            check(same(got, value), f"k{i}: spilled bytes differ from the device values")
            check({t.device for t in got} == {ctx.device}, f"k{i}: read back on another device")
            check(got[2].stride() == value[2].stride(), f"k{i}: strides changed")
        store.close()
    return f"{len(kept)} values from a side stream: bitwise after disk, on {ctx.device}"


def check_side_stream_capture(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    if not ctx.cuda:
        raise Skip("CUDA streams only")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        with output_hooks(model) as found, tensorsnap.capture(model, ops=True) as snap:
            recorder = OpRecorder()
            with _guard(ctx, name), recorder:
                model(ids)
        with tensorsnap.capture(model, device="cpu") as offloaded:
            model(ids)
    torch.cuda.synchronize()
    n = ops_in_order(snap, recorder.values)
    m = compare_outputs(snap, found)
    compare_outputs(offloaded, found)
    return f"{n} ops + {m} outputs bitwise, on device and offloaded{_sync_note(ctx, name)}"


def check_cross_stream_reads(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    """Blocks whose end (where Stats and nonfinite checks are read) runs on the default stream
    while the model ran on a side stream behind queued work."""
    if not ctx.cuda:
        raise Skip("CUDA streams only")
    side = torch.cuda.Stream()
    with torch.no_grad():
        with tensorsnap.capture(model, stats=True) as reference:
            model(ids)
        side.wait_stream(torch.cuda.current_stream())
        with tensorsnap.capture(model, stats=True) as stats, torch.cuda.stream(side):
            _busy(ctx)
            model(ids)
        torch.cuda.synchronize()
        for key in reference:
            a, b = _stats_leaves(reference[key]), _stats_leaves(stats[key])
            check([s.digest for s in a] == [s.digest for s in b], f"stats of {key!r} differ")
        nan = nn.Sequential(_NaNAt())
        side.wait_stream(torch.cuda.current_stream())
        try:
            with tensorsnap.capture(nan, nonfinite="raise"), torch.cuda.stream(side):
                _busy(ctx)
                nan[0](torch.ones(8, device=ctx.device))  # a submodule: read when the block ends
        except tensorsnap.NonFiniteError as err:
            check(err.key == "0", f"named {err.key!r}, expected '0'")
        else:
            raise AssertionError("a NaN made on a side stream was not found at the block's end")
    return "Stats and the nonfinite check read after the side stream's work"


def _busy(ctx: Context) -> None:
    """Queue some 0.1-0.3 s of work on the current stream (4096^3 matmuls), so that a read not
    ordered after it reads too early."""
    a = torch.randn(4096, 4096, device=ctx.device)
    for _ in range(60):
        a = torch.tanh(a @ a)


def check_autocast(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        snap, n, _ = _ops_against_references(ctx, name, model, ids, " under autocast")
    dtypes = {r.dtype for r in snap.records if r.dtype is not None}
    check(torch.bfloat16 in dtypes, f"no bfloat16 value under autocast: {dtypes}")
    return f"{n} ops bitwise, dtypes as autocast made them{_sync_note(ctx, name)}"


def check_extract(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    batches = [ids, ids.flip(0), (ids + 1) % 97]
    include = ["blocks.*.attn", "head"] if isinstance(model, Tiny) else ["transformer.h.*.mlp"]
    want: dict[str, list[torch.Tensor]] = {}
    for b in batches:  # call numbers restart with each batch, as in extract
        with torch.no_grad(), output_hooks(model) as found:
            model(b)
            for key, value in found.items():
                if any(_fnmatch(key, p) for p in include):
                    want.setdefault(key, []).append(value[0])
    with tempfile.TemporaryDirectory() as tmp:
        streams = [None, torch.cuda.Stream()] if ctx.cuda else [None]
        for k, stream in enumerate(streams):
            # on a side stream the writer thread must still read each copy after it is made
            out = os.path.join(tmp, f"bundle{k}")
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                loaded = tensorsnap.extract(
                    model, _slow(ctx, batches), out=out, include=include, progress=False
                )
            check(sorted(loaded) == sorted(want), f"keys {sorted(loaded)} != {sorted(want)}")
            for key, parts in want.items():
                value = leaves(loaded[key])[0]
                where = " (side stream)" if stream is not None else ""
                check(bits(value) == bits(torch.cat(parts)), f"{key!r} differs{where}")
        # per token: the rows where the mask is 1
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        rows_out = os.path.join(tmp, "rows")
        token_batches = [{"input_ids": ids, "attention_mask": mask}]
        key = include[0].replace("*", "0")
        rows = tensorsnap.extract(
            model, token_batches, out=rows_out, include=key, per_token=True, progress=False
        )
        with torch.no_grad(), output_hooks(model) as found:
            model(input_ids=ids, attention_mask=mask)
        full = found[key][0]
        kept = full.flatten(0, 1)[mask.flatten().bool()]
        check(bits(leaves(rows[key])[0]) == bits(kept), f"per-token rows of {key!r} differ")
        check(bits(rows["input_ids"]) == bits(ids.flatten()[mask.flatten().bool()]), "token ids")
    return f"{len(want)} keys x {len(batches)} batches bitwise; per-token rows bitwise"


def check_extract_token_copies(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    """per_token extract with rows copied on a side stream into pinned staging (issue 14,
    tensorsnap._transfer): bitwise against hook-and-mask rows, with device work queued before
    each batch (a writer that read a copy before its fence would read it unfinished), with the
    writer thread on and off, fp32 and bf16."""
    if not ctx.cuda:
        raise Skip("CUDA only")
    from tensorsnap import _stream, _transfer

    pattern = "blocks.*.attn" if isinstance(model, Tiny) else "transformer.h.*.mlp"
    batches = []
    for i, b in enumerate([ids, ids.flip(0), (ids + 1) % 97, ids]):
        mask = torch.ones_like(b)
        mask[i % b.shape[0], b.shape[1] - 1 - i :] = 0
        batches.append({"input_ids": b, "attention_mask": mask})
    want: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        with torch.no_grad(), output_hooks(model) as found:
            model(**batch)
        keep = batch["attention_mask"].flatten().bool()
        for key, value in found.items():
            if _fnmatch(key, pattern):
                want.setdefault(key, []).append(value[0].flatten(0, 1)[keep].cpu())

    def slow() -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches:
            _busy(ctx)
            yield batch

    copies = [0]
    real = _transfer.CudaTransfers.copy

    def counted(self: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        check(dst.is_pinned(), "a host staging buffer is not pinned")
        copies[0] += 1
        real(self, dst, src)

    _transfer.CudaTransfers.copy = counted  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for background in (False, True):
                for dtype in (None, torch.bfloat16):
                    _stream.BACKGROUND = background
                    got = tensorsnap.extract(
                        model,
                        slow(),
                        out=os.path.join(tmp, f"rows-{background}-{dtype}"),
                        include=pattern,
                        per_token=True,
                        dtype=dtype,
                        progress=False,
                    )
                    for key, parts in want.items():
                        expect = torch.cat(parts)
                        expect = expect.to(dtype) if dtype is not None else expect
                        where = f"(writer thread {background}, {dtype})"
                        check(bits(leaves(got[key])[0]) == bits(expect), f"{key!r} differs {where}")
    finally:
        _transfer.CudaTransfers.copy = real  # type: ignore[method-assign]
        _stream.BACKGROUND = None
    # at least the ids and one leaf per key, per batch and setting
    check(copies[0] >= 4 * 4 * (len(want) + 1), f"only {copies[0]} side-stream copies")
    return f"{len(want)} keys x {len(batches)} batches x 4 settings bitwise, {copies[0]} copies"


def _slow(ctx: Context, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The batches, with device work queued before each (CUDA only)."""
    for b in batches:
        if ctx.cuda:
            _busy(ctx)
        yield b


def _fnmatch(key: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(key, pattern)


def check_bundle(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as snap:
        model(ids)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "b")
        snap.save(path)
        loaded = tensorsnap.load(path)
        check(list(loaded) == list(snap), "keys differ after save/load")
        for key in snap:
            check(same(loaded[key], snap[key]), f"{key!r} differs after save/load")
        n = len(loaded)
        del loaded
    return f"{n} keys saved from {ctx.device.type} and loaded bitwise"


def check_detector(ctx: Context) -> str:
    if not ctx.cuda:
        raise Skip("CUDA only")
    x = torch.ones(3, device=ctx.device)
    try:
        with no_sync(ctx):
            x.sum().item()
    except RuntimeError as err:
        check("synchroniz" in str(err), f"unexpected error: {err}")
        return "a .item() inside the guard raises: the no-sync checks can fail"
    raise AssertionError("set_sync_debug_mode('error') did not catch .item()")


# -- overhead -------------------------------------------------------------------------------------


def overhead(ctx: Context) -> None:
    big = not ctx.quick
    try:
        model = _gpt2(ctx, big=big)
        label = "GPT-2 12x768" if big else "GPT-2 2x64"
        vocab = 50257 if big else 257
    except Skip:
        torch.manual_seed(0)
        model = Tiny(768, 12, 12, 50257) if big else Tiny()
        model = model.eval().to(ctx.device)
        label, vocab = (
            ("Tiny 12x768 (no transformers)" if big else "Tiny 2x64"),
            50257 if big else 97,
        )
    shape = (8, 512) if big and ctx.cuda else (2, 32)
    ids = torch.randint(0, vocab, shape, device=ctx.device)
    variants: dict[str, Callable[[], Any]] = {
        "plain forward": lambda: model(ids),
        "capture outputs": lambda: _run(model, ids),
        "capture outputs, nonfinite": lambda: _run(model, ids, nonfinite="raise"),
        "capture ops": lambda: _run(model, ids, ops=True),
        "capture ops, nonfinite": lambda: _run(model, ids, ops=True, nonfinite="raise"),
        "capture outputs, device=cpu": lambda: _run(model, ids, device="cpu"),
        "capture ops, device=cpu": lambda: _run(model, ids, ops=True, device="cpu"),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    sizes: dict[str, int] = {}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm up
        for _ in range(ctx.repeats):
            for key, fn in variants.items():
                _sync(ctx)
                start = time.perf_counter()
                result = fn()
                _sync(ctx)
                times[key].append(time.perf_counter() - start)
                if isinstance(result, int):
                    sizes[key] = result
                del result
    base = statistics.median(times["plain forward"])
    where = f"{label}, batch {shape[0]} x {shape[1]}, {ctx.device.type}"
    for key, values in times.items():
        ms = statistics.median(values) * 1000
        ratio = statistics.median(values) / base
        stored = f", {sizes[key] / 1e6:.1f} MB copied" if key in sizes else ""
        _row(ctx, "overhead", key, f"{ratio:.2f}x", f"{ms:.1f} ms, {where}{stored}")


def _run(model: nn.Module, ids: torch.Tensor, **options: Any) -> int:
    with tensorsnap.capture(model, **options) as snap:
        model(ids)
    return sum(r.nbytes for r in snap.records)


def _sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


# -- running --------------------------------------------------------------------------------------


def _row(ctx: Context, section: str, name: str, result: str, detail: str) -> None:
    ctx.rows.append((section, name, result, detail))
    if result == "FAIL":
        ctx.failed += 1


def _attempt(ctx: Context, section: str, name: str, fn: Callable[..., str], *args: Any) -> None:
    if not ctx.wanted(f"{section} {name}"):
        return
    try:
        detail = fn(*args)
    except Skip as why:
        _row(ctx, section, name, "skip", str(why))
    except Exception as err:  # every failure is a row; the table is the report
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "synchroniz" in str(err):
            text = f"host sync at {_where(err)}: {text}"
        elif not isinstance(err, AssertionError):
            text = f"{type(err).__name__} at {_where(err)}: {text}"
        _row(ctx, section, name, "FAIL", text[:300])
    else:
        _row(ctx, section, name, "ok", detail)


def run(ctx: Context) -> None:
    if ctx.cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    _attempt(ctx, "sync", "sync detector self-test", check_detector, ctx)
    _attempt(ctx, "snapshot", "device=None, no sync", check_snapshot_on_device, ctx)
    _attempt(ctx, "snapshot", "device='cpu', pin_memory", check_snapshot_to_cpu, ctx)
    _attempt(ctx, "snapshot", "staged > 32 MiB, cast, race", check_snapshot_staged, ctx)
    _attempt(ctx, "snapshot", "side stream", check_side_stream_snapshot, ctx)
    _attempt(ctx, "capture", "nonfinite device check", check_finite_kernel, ctx)
    _attempt(ctx, "capture", "offload ring reuse", check_offload_ring, ctx)
    _attempt(ctx, "capture", "spill of device values", check_spill_bytes, ctx)
    _attempt(ctx, "capture", "graph mode", check_graph_mode, ctx)
    checks: list[tuple[str, Callable[..., str]]] = [
        ("outputs, no sync", check_capture_outputs),
        ("ops, no sync", check_capture_ops),
        ("grads (+ops), no sync", check_capture_grads),
        ("saved, no sync", check_capture_saved),
        ("nonfinite='raise'", check_nonfinite),
        ("stats=True, no sync", check_stats),
        ("device='cpu' offload, no sync", check_offload),
        ("max_memory spill", check_spill),
        ("non-default stream", check_side_stream_capture),
        ("reads across streams", check_cross_stream_reads),
        ("autocast bfloat16", check_autocast),
        ("extract (+per_token)", check_extract),
        ("per_token side-stream copies", check_extract_token_copies),
        ("bundle save/load", check_bundle),
    ]
    for name, (model, ids, why) in _models(ctx).items():
        if model is None:
            _row(ctx, f"capture {name}", "all", "skip", why)
            continue
        _attempt(ctx, f"capture {name}", "plain run syncs?", _probe, ctx, name, model, ids)
        for label, fn in checks:
            _attempt(ctx, f"capture {name}", label, fn, ctx, name, model, ids)
    if not ctx.wanted("overhead"):
        return
    try:
        overhead(ctx)
    except Exception as err:
        _row(ctx, "overhead", "mid-size model", "FAIL", f"{type(err).__name__}: {err}"[:300])


def _probe(ctx: Context, name: str, model: nn.Module, ids: torch.Tensor) -> str:
    if not ctx.cuda:
        raise Skip("CUDA only")
    _first_sync(ctx, name, model, ids)
    return ctx.selfsync.get(name, "no: its forward and backward run without a host sync")


def table(ctx: Context) -> str:
    head = ("section", "check", "result", "detail")
    rows = [head, *ctx.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) for j in range(3)) + "  " + r[3])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models only")
    parser.add_argument("--repeats", type=int, default=5, help="overhead rounds (median)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts of check names to run (e.g. 'capture gpt2,overhead')",
    )
    parser.add_argument(
        "--device", default=None, help="cuda (default when available), or cpu to test this script"
    )
    args = parser.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            print(
                f"gpu_check: no CUDA device here (torch {torch.__version__}, {build}); "
                "nothing to check"
            )
            return 0
        args.device = "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    only = [part.strip() for part in args.only.split(",") if part.strip()]
    ctx = Context(device=device, quick=args.quick, repeats=args.repeats, only=only)
    where = torch.cuda.get_device_name(device) if ctx.cuda else "CPU"
    print(f"gpu_check: tensorsnap {tensorsnap.__version__}, torch {torch.__version__}, {where}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deterministic-algorithm notes, fast-path notes
        run(ctx)
    print(table(ctx))
    total = sum(r[2] in ("ok", "FAIL") for r in ctx.rows)
    print(
        f"gpu_check: {ctx.failed} of {total} checks failed"
        if ctx.failed
        else "gpu_check: all passed"
    )
    return 1 if ctx.failed else 0


if __name__ == "__main__":
    sys.exit(main())
