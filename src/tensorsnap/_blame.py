"""Which module of a candidate (a port, a bf16 or quantized copy) introduces the difference?

``blame(reference, candidate, *args)`` runs both models once with module inputs captured, pairs
their module calls (by name, a map, a callable or ``"auto"``, as ``diff``), then replays every
paired call of the candidate on the *reference's* inputs for that call (cast to the candidate's
dtype and device) and compares the result with the reference's output. That is each module's
local error, free of upstream drift. A second replay swaps the outputs of the module's paired
submodules for the reference's own, which leaves only the error made by the module's own code
(the ops between its submodules). A module whose local error and own error are both outside
tolerance, while its paired submodules' local errors are not, is a culprit: it is where the
difference is introduced, not where it merely arrives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._diff import KeyDiff, _compare_key, format_error
from ._errors import TensorSnapError, format_path
from ._match import Match, pair_keys, records_of
from ._snapshot import Record

__all__ = ["BlameResult", "ModuleBlame", "blame"]

# Default relative L2 tolerance of a module's local error, by the lower precision of the two
# runs: a module computed in that precision on inputs rounded to it errs by a few ulps.
_RTOL = {
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
    torch.float32: 1e-5,
    torch.float64: 1e-9,
}
_ATOL = 1e-6
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


@dataclasses.dataclass(frozen=True)
class ModuleBlame:
    """One paired module call of the candidate, replayed on the reference's inputs.

    Attributes:
        key: The candidate's key of the call (``blocks.1.attn``, ``blocks.0.act#1``).
        reference: The reference's key it was paired with.
        how: How the pair was found.
        status: ``"ok"`` (within tolerance), ``"outside"`` (outside tolerance), or
            ``"not replayed"`` (see ``reason``).
        local: The replayed output against the reference's output (children running live),
            or None when not replayed.
        own: The same with the outputs of the paired submodules replaced by the reference's
            (only the module's own code errs), or None for a module without paired submodules
            (then it equals ``local``) or when not replayed.
        culprit: True when both the local and the own error are outside tolerance.
        reason: Why the call was not replayed, or notes on inputs kept from the candidate.
    """

    key: str
    reference: str
    how: str
    status: str
    local: KeyDiff | None
    own: KeyDiff | None
    culprit: bool
    reason: str = ""

    @property
    def error(self) -> float | None:
        """The local error as a relative L2 norm, or None."""
        return self.local.rel_l2 if self.local is not None else None


class BlameResult:
    """The outcome of :func:`blame`.

    Attributes:
        modules: One :class:`ModuleBlame` per paired call, in the candidate's execution order
            (a module's calls complete after those of its submodules).
        culprits: The candidate keys whose local and own errors are outside tolerance, deepest
            first, in execution order; empty for a faithful candidate.
        not_replayed: Candidate keys whose calls could not be replayed, each with its reason in
            ``modules``.
        only_reference: Reference module calls that paired with nothing.
        only_candidate: Candidate module calls that paired with nothing.
        rtol: Relative L2 tolerance used (None: per dtype).
        atol: Absolute tolerance used (None: the default).
    """

    def __init__(
        self,
        modules: list[ModuleBlame],
        only_reference: list[str],
        only_candidate: list[str],
        rtol: float | None,
        atol: float | None,
    ) -> None:
        self.modules = tuple(modules)
        self.culprits = tuple(m.key for m in self.modules if m.culprit)
        self.not_replayed = tuple(m.key for m in self.modules if m.status == "not replayed")
        self.only_reference = tuple(only_reference)
        self.only_candidate = tuple(only_candidate)
        self.rtol, self.atol = rtol, atol
        self._by_key = {m.key: m for m in self.modules}

    def __getitem__(self, key: str) -> ModuleBlame:
        try:
            return self._by_key[key]
        except KeyError:
            raise TensorSnapError(
                f"{key!r} is not a paired module call of the candidate (paired: "
                f"{', '.join(repr(k) for k in list(self._by_key)[:5])}...)"
            ) from None

    def __iter__(self) -> Iterator[ModuleBlame]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def summary(self) -> str:
        """One line: how many calls were replayed and which modules are to blame."""
        replayed = len(self.modules) - len(self.not_replayed)
        line = f"{replayed} of {len(self.modules)} paired module calls replayed"
        if self.not_replayed:
            line += f" ({len(self.not_replayed)} could not be)"
        if not self.culprits:
            return line + "; no culprit: every module's own error is within tolerance"
        return line + "; culprits: " + ", ".join(repr(k) for k in self.culprits)

    def to_records(self) -> list[dict[str, Any]]:
        """One plain dict per paired call (for scripts and ``tensorsnap blame --json``)."""
        out = []
        for m in self.modules:
            out.append(
                {
                    "key": m.key,
                    "reference": m.reference,
                    "how": m.how,
                    "status": m.status,
                    "culprit": m.culprit,
                    "local_rel_l2": m.local.rel_l2 if m.local else None,
                    "local_max_abs": m.local.max_abs if m.local else None,
                    "own_rel_l2": m.own.rel_l2 if m.own else None,
                    "reason": m.reason,
                }
            )
        return out

    def __str__(self) -> str:
        lines = [self.summary()]
        table = [("candidate", "reference", "local rel l2", "own rel l2", "status")]
        for m in self.modules:
            status = "CULPRIT" if m.culprit else m.status
            if m.status == "not replayed":
                status += f": {m.reason}"
            table.append(
                (
                    m.key or '""',
                    m.reference or '""',
                    format_error(m.local.rel_l2) if m.local else "-",
                    format_error(m.own.rel_l2) if m.own else "-",
                    status[:90],
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        for row in table:
            cells = [cell.ljust(w) for cell, w in zip(row[:4], widths)]
            lines.append("  " + "  ".join([*cells, row[4]]).rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<BlameResult {self.summary()}>"


# -- values: walking, grafting and casting ----------------------------------------------------


def _walk(
    value: Any,
    fn: Callable[[torch.Tensor, tuple[object, ...]], Any],
    parts: tuple[object, ...] = (),
) -> Any:
    """``value`` rebuilt with ``fn(tensor, path)`` for every tensor in its containers.

    Tuples, lists, dicts, other mappings and dataclasses are walked; every other object is
    returned as it is.
    """
    if isinstance(value, torch.Tensor):
        return fn(value, parts)
    if isinstance(value, tuple):
        items = [_walk(v, fn, (*parts, i)) for i, v in enumerate(value)]
        if type(value) is tuple:
            return tuple(items)
        if hasattr(value, "_fields"):
            return type(value)(*items)
        return type(value)(items)
    if isinstance(value, list):
        return [_walk(v, fn, (*parts, i)) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items_m = {k: _walk(v, fn, (*parts, k)) for k, v in value.items()}
        if type(value) is dict:
            return items_m
        try:
            cls: Any = type(value)
            new = cls(**items_m) if dataclasses.is_dataclass(value) else cls(items_m)
        except Exception:  # a mapping class that cannot be rebuilt from its items: keep a dict
            return items_m
        return new
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _walk(getattr(value, f.name), fn, (*parts, f.name))
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    return value


def _tensors(value: Any) -> list[tuple[tuple[object, ...], torch.Tensor]]:
    found: list[tuple[tuple[object, ...], torch.Tensor]] = []

    def note(t: torch.Tensor, parts: tuple[object, ...]) -> torch.Tensor:
        found.append((parts, t))
        return t

    _walk(value, note)
    return found


def _objects(value: Any, parts: tuple[object, ...] = ()) -> Iterator[tuple[str, Any]]:
    """Leaves that are neither tensors nor plain scalars: state a replay cannot be trusted with."""
    if isinstance(value, (torch.Tensor, *_SCALARS)):
        return
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _objects(v, (*parts, i))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _objects(v, (*parts, k))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _objects(getattr(value, f.name), (*parts, f.name))
    else:
        yield format_path("", list(parts)), value


def _squeezed(shape: Any) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _cast(source: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``source`` as ``like`` holds it: its device, its shape, and its dtype when both are
    floating (integer ids and masks stay exact)."""
    out = source.detach().reshape(like.shape)
    same_kind = (out.is_floating_point() or out.is_complex()) == (
        like.is_floating_point() or like.is_complex()
    )
    return out.to(device=like.device, dtype=like.dtype if same_kind else out.dtype)


def _graft(own: Any, ref: Any) -> tuple[Any, list[str]]:
    """``own`` with its tensors replaced by ``ref``'s, paired in order by shape; notes on the
    ones kept."""
    theirs = _tensors(ref)
    taken: dict[tuple[object, ...], torch.Tensor] = {}
    kept: list[str] = []
    cursor = 0
    for parts, t in _tensors(own):
        found = next(
            (
                j
                for j in range(cursor, len(theirs))
                if _squeezed(theirs[j][1].shape) == _squeezed(t.shape)
            ),
            None,
        )
        if found is None:
            kept.append(format_path("", list(parts)) or "the value")
            continue
        cursor = found + 1
        taken[parts] = _cast(theirs[found][1], t)
    return _walk(own, lambda t, parts: taken.get(parts, t)), kept


# -- the runs --------------------------------------------------------------------------------


def _class_names(model: nn.Module) -> dict[str, str]:
    """Module name (as keys name it) to its class name and its own parameters' shapes."""
    from ._keys import module_names

    names = module_names(model)
    out = {}
    for m in model.modules():
        if id(m) in names:
            own = [
                "x".join(map(str, p.shape)) for p in m.parameters(recurse=False)
            ]  # its own weights' shapes tell a 3x3 conv from a 1x1 one
            out[names[id(m)]] = type(m).__name__ + (f"[{','.join(own)}]" if own else "")
    return out


def _where(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _to_candidate(value: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    def move(t: torch.Tensor, parts: tuple[object, ...]) -> torch.Tensor:
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    return _walk(value, move)


def _run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from ._capture import capture

    with torch.no_grad(), capture(model, inputs=True) as snap:
        model(*args, **kwargs)
    return snap


class _Outputs(Mapping[str, Any]):
    """The module-output keys of a snapshot, with their records (what the pairing looks at)."""

    def __init__(self, snap: Mapping[str, Any]) -> None:
        self._snap = snap
        self.records: list[Record] = [r for r in records_of(snap) if r.kind == "output"]
        self._keys = {r.key for r in self.records}

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._snap[key]

    def __iter__(self) -> Iterator[str]:
        return (r.key for r in self.records)

    def __len__(self) -> int:
        return len(self.records)


def _pairs(
    ref: _Outputs,
    cand: _Outputs,
    match: Match,
    types: tuple[Mapping[str, str], Mapping[str, str]] | None = None,
) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """Candidate -> reference pairs; a map or callable written the other way round works too."""
    pairs, only_c, only_r = pair_keys(cand, ref, match, types)
    if match is not None and not isinstance(match, str):
        flipped, only_r2, only_c2 = pair_keys(ref, cand, match)
        if len(flipped) > len(pairs):
            by_cand = {c: (r, how) for r, c, how in flipped}
            pairs = [(c, *by_cand[c]) for c in cand if c in by_cand]
            only_c, only_r = only_c2, only_r2
    return pairs, only_r, only_c


def _inside(records: list[Record], key: str) -> list[Record]:
    """The module-output records of the calls made inside call ``key`` of the candidate run."""
    index = next(i for i, r in enumerate(records) if r.key == key)
    name = records[index].module
    prefix = name + "." if name else ""
    inner = []
    j = index - 1
    while j >= 0 and records[j].module.startswith(prefix) and records[j].module != name:
        inner.append(records[j])
        j -= 1
    inner.reverse()
    return inner


def _close(d: KeyDiff, rtol: float, atol: float) -> bool:
    if d.problems and d.max_abs is None:
        return False
    if any(p.startswith(("shape", "no tensor")) for p in d.problems):
        return False
    if d.max_abs is None:
        return True
    if d.max_abs <= atol:
        return True
    return d.rel_l2 is not None and d.rel_l2 <= rtol


def _tolerance(a: Any, b: Any, rtol: float | None) -> float:
    if rtol is not None:
        return rtol
    dtypes = [t.dtype for _, t in _tensors(a)[:1] + _tensors(b)[:1] if t.is_floating_point()]
    return max((_RTOL.get(d, 1e-4) for d in dtypes), default=1e-4)


def blame(
    reference: nn.Module,
    candidate: nn.Module,
    *args: Any,
    match: Match = None,
    rtol: float | None = None,
    atol: float | None = None,
    **kwargs: Any,
) -> BlameResult:
    """Find the modules of ``candidate`` that introduce its difference from ``reference``.

    Both models run once on ``args``/``kwargs`` (the candidate's copy of the floating-point
    inputs cast to its dtype and moved to its device) under ``no_grad``, with module inputs
    captured. Each paired call of the candidate is then replayed on the reference's inputs for
    that call, its tensors put where the candidate's own call had its tensors (in order, by
    shape; cast to the candidate's dtype and device), and compared with the reference's output:
    the *local* error. A second replay also replaces the outputs of its paired submodules by the
    reference's (the *own* error, made by the module's own code). A call is within tolerance
    when ``||a - b|| <= rtol * ||b||`` or ``max |a - b| <= atol``; ``rtol`` defaults per dtype
    (the lower precision of the two outputs: float32 ``1e-5``, bfloat16 ``4e-2``, float16
    ``5e-3``, float64 ``1e-9``), ``atol`` to ``1e-6``.

    Calls whose inputs hold state that is not a tensor (a transformers cache object, an
    arbitrary object) are reported as not replayed rather than replayed on a guess; so are calls
    whose replay raises. Pass ``use_cache=False`` to a transformers model to make its attention
    and blocks replayable. Models should be in eval mode (dropout would make every replay
    differ); buffers that a replay changes (batch-norm statistics in train mode) are restored.

    Args:
        reference: The model whose outputs are right.
        candidate: The model under suspicion (a port, a lower-precision or quantized copy).
        *args: Positional inputs of both models.
        match: How module calls pair: None (same names), a dict of module-path patterns or a
            callable as in :func:`tensorsnap.diff` (written candidate -> reference or the other
            way round: the direction that pairs more calls is used), or ``"auto"``.
        rtol: Relative L2 tolerance of a call's error (default: per dtype, above).
        atol: Absolute tolerance (default: 1e-6).
        **kwargs: Keyword inputs of both models.

    Returns:
        A :class:`BlameResult`: ``result.culprits`` names the candidate modules to look at,
        ``print(result)`` shows every paired call's local and own error.

    Raises:
        TensorSnapError: A model is not an ``nn.Module``, a tolerance is negative, or no module
            call of the candidate pairs with one of the reference.

    Example:
        >>> import torch, tensorsnap
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> nn = torch.nn
        >>> ref = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> cand = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
        >>> cand.load_state_dict(ref.state_dict())
        <All keys matched successfully>
        >>> tensorsnap.blame(ref, cand, torch.randn(3, 4)).culprits
        ('1',)
    """
    for name, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, nn.Module):
            raise TensorSnapError(
                f"blame({name}=...) takes a torch.nn.Module, got {type(model).__name__}"
            )
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and (
            isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0
        ):
            raise TensorSnapError(
                f"blame({name}={tol!r}): pass a number >= 0, or None for the default"
            )
    device, dtype = _where(candidate)
    ref_snap = _run(reference, args, kwargs)
    cand_snap = _run(
        candidate, _to_candidate(args, device, dtype), _to_candidate(kwargs, device, dtype)
    )
    ref_out, cand_out = _Outputs(ref_snap), _Outputs(cand_snap)
    # module classes are known here (not in a snapshot): they help the "auto" alignment
    types = (_class_names(candidate), _class_names(reference))
    pairs, only_ref, only_cand = _pairs(ref_out, cand_out, match, types)
    if not pairs:
        raise TensorSnapError(
            "blame: no module call of the candidate pairs with one of the reference (their "
            "names differ?); pass match='auto', or a map such as {'blocks.*.ffn': 'h.*.mlp'}"
        )
    a_tol = _ATOL if atol is None else float(atol)
    to_ref = {c: r for c, r, _ in pairs}
    modules_by_name = dict(candidate.named_modules())
    records = cand_out.records
    module_of = {r.key: r for r in records}
    context = _Context(dict(reference.named_modules()), {r.key: r for r in ref_out.records})
    saved = {name: b.detach().clone() for name, b in candidate.named_buffers()}
    results: list[ModuleBlame] = []
    try:
        for ckey, rkey, how in pairs:
            results.append(
                _replay(
                    ckey, rkey, how, module_of[ckey], modules_by_name, cand_snap, ref_snap,
                    records, to_ref, rtol, a_tol, context,
                )
            )  # fmt: skip
    finally:
        with torch.no_grad():
            for name, b in candidate.named_buffers():
                if name in saved:
                    b.copy_(saved[name])
    return BlameResult(results, only_ref, only_cand, rtol, atol)


@dataclasses.dataclass
class _Context:
    ref_modules: dict[str, nn.Module]
    ref_records: dict[str, Record]
    status: dict[str, str] = dataclasses.field(default_factory=dict)


def _replay(
    ckey: str,
    rkey: str,
    how: str,
    record: Record,
    modules: dict[str, nn.Module],
    cand_snap: Mapping[str, Any],
    ref_snap: Mapping[str, Any],
    records: list[Record],
    to_ref: dict[str, str],
    rtol: float | None,
    atol: float,
    context: _Context,
) -> ModuleBlame:
    def skipped(reason: str) -> ModuleBlame:
        return ModuleBlame(ckey, rkey, how, "not replayed", None, None, False, reason)

    module = modules.get(record.module)
    if module is None:
        return skipped("the module is not reachable by its name in the candidate")
    if f"{ckey}:in" not in cand_snap or f"{rkey}:in" not in ref_snap:
        return skipped("its inputs were not recorded")
    own_args = cand_snap[f"{ckey}:in"]
    own_kwargs = cand_snap.get(f"{ckey}:kwargs", {})
    for path, obj in _objects((own_args, own_kwargs)):
        where = _args_path(path)
        return skipped(f"input {where} is a {type(obj).__name__}, state that is not a tensor")
    ref_in = ref_snap[f"{rkey}:in"]
    ref_kwargs = ref_snap.get(f"{rkey}:kwargs", {})
    (args, kwargs), kept = _graft((own_args, own_kwargs), (ref_in, ref_kwargs))
    floats_kept = [k for k in kept if _is_float_at((own_args, own_kwargs), k)]
    if floats_kept:
        # a replay on the candidate's own floating-point input would carry upstream drift
        return skipped(
            f"the reference's inputs of {rkey!r} have no tensor shaped like its input "
            f"{_args_path(floats_kept[0])} (paired with a call of another kind?)"
        )
    reason = ""
    expected = ref_snap[rkey]
    try:
        with torch.no_grad():
            live = module(*args, **kwargs)
    except Exception as err:  # a replay that raises is reported, never guessed around
        return skipped(f"replaying it raised {type(err).__name__}: {err}"[:300])
    tol = _tolerance(live, expected, rtol)
    local = _compare_key(ckey, live, expected, None, None, rkey, how)
    local_ok = _close(local, tol, atol)
    inner = [r for r in _inside(records, ckey) if r.key in to_ref]
    own: KeyDiff | str | None = None
    own_ok = local_ok
    if inner:
        own = _own(
            module, modules, inner, to_ref, context.ref_modules, context.ref_records,
            args, kwargs, ckey, rkey, how, ref_snap,
        )  # fmt: skip
        if isinstance(own, str):
            reason = (reason + "; " if reason else "") + own
            own = None
        else:
            own_ok = _close(own, tol, atol)
    status = "ok" if local_ok else "outside"
    # SPEC's rule as well: outside tolerance while its paired children are not
    names = [r.module for r in inner]
    direct = [
        r.key
        for r in inner
        if not any(n != r.module and r.module.startswith(n + ".") for n in names)
    ]
    children_ok = all(context.status.get(k) != "outside" for k in direct)
    culprit = not local_ok and not own_ok and children_ok
    context.status[ckey] = status
    own_diff = own if isinstance(own, KeyDiff) else None
    return ModuleBlame(ckey, rkey, how, status, local, own_diff, culprit, reason)


def _args_path(path: str) -> str:
    if path.startswith("[0]"):
        return "args" + path[3:]
    return "kwargs" + path[3:] if path.startswith("[1]") else path


def _is_float_at(value: Any, path: str) -> bool:
    for parts, t in _tensors(value):
        if (format_path("", list(parts)) or "the value") == path:
            return t.is_floating_point()
    return False


def _own(
    module: nn.Module,
    modules: dict[str, nn.Module],
    inner: list[Record],
    to_ref: dict[str, str],
    ref_modules: dict[str, nn.Module],
    ref_records: dict[str, Record],
    args: Any,
    kwargs: Any,
    ckey: str,
    rkey: str,
    how: str,
    ref_snap: Mapping[str, Any],
) -> KeyDiff | str:
    """The replay with every paired inner call run by the reference's own submodule instead,
    on the inputs the candidate gives it: what is left is the error of the module's own code."""
    queue: dict[str, list[str]] = {}
    for r in inner:
        queue.setdefault(r.module, []).append(r.key)
    handles = []
    failed: list[str] = []

    def substitute(name: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, inputs: Any, kw: Any, output: Any) -> Any:
            keys = queue.get(name)
            if not keys:
                return None  # a call the original run did not make: left live
            rkey = to_ref[keys.pop(0)]
            record = ref_records[rkey]
            ref_module = ref_modules.get(record.module)
            if ref_module is None or f"{rkey}:in" not in ref_snap:
                failed.append(rkey)
                return None
            their_args = ref_snap[f"{rkey}:in"]
            their_kwargs = ref_snap.get(f"{rkey}:kwargs", {})
            if next(_objects((their_args, their_kwargs)), None) is not None:
                failed.append(rkey)
                return None
            (a, k), _ = _graft((their_args, their_kwargs), (inputs, kw))
            return _graft(output, ref_module(*a, **k))[0]

        return hook

    try:
        for name in queue:
            sub = modules.get(name)
            if sub is not None:
                handles.append(sub.register_forward_hook(substitute(name), with_kwargs=True))
        with torch.no_grad():
            out = module(*args, **kwargs)
    except Exception as err:
        return f"the replay with the reference's submodules raised {type(err).__name__}: {err}"
    finally:
        for h in handles:
            h.remove()
    if failed:
        return f"the reference's {failed[0]!r} could not stand in for its pair"
    return _compare_key(ckey, out, ref_snap[rkey], None, None, rkey, how)
