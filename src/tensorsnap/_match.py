"""Pairing the keys of two runs whose module names differ: by a map, a callable, or by structure.

``pair_keys(a, b, match)`` returns the pairs ``(key_a, key_b, how)`` in ``a``'s order and the
keys left unpaired on each side. ``match`` is None (same names), a dict of module-path
patterns (each ``*`` one dotted segment, carried over in order; suffixes ``#n``, ``/op``,
``:kind`` carry over), a callable ``key_a -> key_b | None``, or ``"auto"``.

``"auto"`` aligns the two runs' module calls as two sequences in execution order (a global
alignment, as for DNA, so that modules one side has and the other lacks, such as dropouts, are
gaps) scoring each candidate pair by output shape (required), output dtype, whether the module
is a leaf and how many calls run inside it, the values' mean and spread, the op names the call
ran, and the names' last segments. Ops are then aligned inside each pair of calls the same way,
and inputs, gradients and saved tensors follow the key they belong to.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._errors import TensorSnapError
from ._snapshot import Record

__all__ = ["Match", "pair_keys", "records_of", "split_key"]

Match = Mapping[str, str] | Callable[[str], "str | None"] | str | None

_SUFFIX = re.compile(r"[#/:]")
_KINDS = {
    "in": "input",
    "kwargs": "kwargs",
    "grad": "grad",
    "grad_in": "grad_in",
    "saved": "saved",
}
# suffixes of keys that belong to a module call or op key and follow its pairing
_FOLLOWERS = (":in", ":kwargs", ":grad", ":grad_in", ":saved")
_GAP = 1.0
# elements of each value kept for its fingerprint
_PROBES = 8
_FORBIDDEN = -1e9
# ops of one name whose fingerprints differ by this much (in units of their spread) are
# different values, not one value with an error: they are not paired
_OP_UNLIKE = 0.5


def split_key(key: str) -> tuple[str, str]:
    """``("transformer.h.0.attn", "#1/softmax:grad")``: the module path and the rest."""
    found = _SUFFIX.search(key)
    return (key, "") if found is None else (key[: found.start()], key[found.start() :])


def records_of(snap: Mapping[str, Any]) -> list[Record]:
    """The snapshot's records, or records worked out from the keys of a plain mapping."""
    records = getattr(snap, "records", None)
    if records is not None:
        return list(records)
    out = []
    for key in snap:
        module, rest = split_key(key)
        call_match = re.match(r"#(\d+)", rest)
        call = int(call_match.group(1)) if call_match else 0
        op_match = re.search(r"/([^:#]+)", rest)
        op = op_match.group(1) if op_match else None
        kind_match = re.search(r":(\w+)$", rest)
        kind = _KINDS.get(kind_match.group(1), "output") if kind_match else "output"
        if op is not None:
            kind = "op_grad" if kind == "grad" else ("saved" if kind == "saved" else "op")
        out.append(Record(key, module, call, op, kind, None, None, 0))
    return out


def pair_keys(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    match: Match,
    types: tuple[Mapping[str, str], Mapping[str, str]] | None = None,
) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """Pairs ``(key_a, key_b, how)`` in ``a``'s order, then the unpaired keys of each side."""
    keys_a, keys_b = list(a), list(b)
    if match is None:
        proposed = {k: (k, "name") for k in keys_a if k in b}
    elif isinstance(match, str):
        if match != "auto":
            raise TensorSnapError(
                f"diff(match={match!r}): pass 'auto', a dict of module-path patterns such as "
                "{'transformer.h.*.mlp': 'blocks.*.ffn'}, or a callable key_a -> key_b"
            )
        proposed = _auto(a, b, types)
    elif isinstance(match, Mapping):
        proposed = _by_patterns(keys_a, b, match)
    elif callable(match):
        proposed = _by_callable(keys_a, b, match)
    else:
        raise TensorSnapError(
            f"diff(match=...) takes None, 'auto', a dict of patterns or a callable, "
            f"got {type(match).__name__}"
        )
    pairs: list[tuple[str, str, str]] = []
    taken: set[str] = set()
    for key in keys_a:
        found = proposed.get(key)
        if found is None or found[0] in taken:
            continue
        taken.add(found[0])
        pairs.append((key, found[0], found[1]))
    paired_a = {p[0] for p in pairs}
    only_a = [k for k in keys_a if k not in paired_a]
    only_b = [k for k in keys_b if k not in taken]
    return pairs, only_a, only_b


# -- patterns and callables ------------------------------------------------------------------


def _compile(pattern: str, target: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    for name, value in (("pattern", pattern), ("target", target)):
        if not isinstance(value, str):
            raise TensorSnapError(f"diff(match={{...}}): every {name} must be a str, got {value!r}")
    if pattern.count("*") != target.count("*"):
        raise TensorSnapError(
            f"diff(match={{{pattern!r}: {target!r}}}): the target must have as many '*' as "
            f"the pattern ({pattern.count('*')}), each standing for one dotted segment"
        )
    body = "([^.]+)".join(re.escape(p) for p in pattern.split("*"))
    # the whole path, or else a prefix of whole segments whose rest carries over
    return re.compile(body + "$"), re.compile(body + r"(?=\.)")


def _by_patterns(
    keys_a: list[str], b: Mapping[str, Any], match: Mapping[str, str]
) -> dict[str, tuple[str, str]]:
    compiled = [(_compile(p, t), p, t) for p, t in match.items()]
    out: dict[str, tuple[str, str]] = {}
    for key in keys_a:
        module, rest = split_key(key)
        new = how = None
        for whole in (True, False):  # the first pattern that matches wins, whole paths first
            for (full, prefix), pattern, target in compiled:
                subject = key if _SUFFIX.search(pattern) else module
                found = (full if whole else prefix).match(subject)
                if found is None:
                    continue
                mapped = target
                for segment in found.groups():
                    mapped = mapped.replace("*", segment, 1)
                new = mapped + subject[found.end() :] + ("" if subject is key else rest)
                how = f"map {pattern!r} -> {target!r}"
                break
            if new is not None:
                break
        if new is None:
            new, how = key, "name"
        if new in b and how is not None:
            out[key] = (new, how)
    return out


def _by_callable(
    keys_a: list[str], b: Mapping[str, Any], match: Callable[[str], str | None]
) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for key in keys_a:
        new = match(key)
        if new is None:
            continue
        if not isinstance(new, str):
            raise TensorSnapError(
                f"diff(match=callable): it returned {new!r} for {key!r}; return a key of b "
                "(a str) or None to leave the key unpaired"
            )
        if new in b:
            out[key] = (new, "callable")
    return out


# -- auto --------------------------------------------------------------------------------------


class _Node:
    """One module call (or op) of one run, as the alignment sees it."""

    __slots__ = (
        "calls_inside",
        "cls",
        "dtype",
        "key",
        "leaves",
        "mean",
        "name",
        "ops",
        "passthrough",
        "probe",
        "shape",
        "std",
    )

    def __init__(self, key: str, name: str, value: Any) -> None:
        from ._diff import leaves

        self.key = key
        self.name = name
        self.calls_inside = 0
        self.cls: str | None = None  # the module's class name, where the caller knows it
        self.ops: list[str] = []
        self.passthrough = False
        tensors = [leaf for _, leaf in leaves(value) if _is_array(leaf)]
        self.leaves = len(tensors)
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self.mean = self.std = math.nan
        self.probe: tuple[float, ...] = ()
        if tensors:
            first = tensors[0]
            # dims of size 1 aside: (1, S, D) position embeddings pair with (S, D) ones
            self.shape = tuple(d for d in first.shape if d != 1)
            self.dtype = first.dtype
            self.mean, self.std, self.probe = _moments(first)


def _is_array(leaf: Any) -> bool:
    from ._stats import Stats

    return isinstance(leaf, (torch.Tensor, Stats))


def _moments(leaf: Any) -> tuple[float, float, tuple[float, ...]]:
    """Mean, spread and a few evenly spaced elements of a value (its fingerprint)."""
    from ._stats import Stats

    if isinstance(leaf, Stats):
        return leaf.mean, leaf.std, ()
    t = leaf
    if t.layout != torch.strided or t.is_quantized or t.is_meta or t.numel() == 0:
        return math.nan, math.nan, ()
    if t.is_complex():
        t = t.abs()
    x = t.detach().reshape(-1).to(torch.float64)
    index = torch.linspace(0, x.numel() - 1, min(_PROBES, x.numel())).round().long()
    probe = tuple(x[index].tolist())
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return math.nan, math.nan, ()
    return float(x.mean()), float(x.std(correction=0)), probe


def _distance(x: _Node, y: _Node) -> float:
    """How unlike two values are, relative to their spread (0: equal fingerprints)."""
    spread = max(abs(x.std), abs(y.std), 1e-30)
    if not math.isfinite(spread):
        return math.inf
    d = (abs(x.std - y.std) + abs(x.mean - y.mean)) / spread
    if x.probe and len(x.probe) == len(y.probe):
        gaps = [abs(p - q) for p, q in zip(x.probe, y.probe) if math.isfinite(p - q)]
        if gaps:
            d = max(d, max(gaps) / spread)
    return d


def _nodes(
    snap: Mapping[str, Any], records: list[Record], types: Mapping[str, str] | None = None
) -> list[_Node]:
    nodes: list[_Node] = []
    by_call: dict[tuple[str, int], _Node] = {}
    for r in records:
        if r.kind == "output":
            node = _Node(r.key, r.module, snap[r.key])
            node.cls = types.get(r.module) if types else None
            nodes.append(node)
            by_call[(r.module, r.call)] = node
    for r in records:
        if r.kind == "op" and r.op is not None:
            owner = by_call.get((r.module, r.call))
            if owner is not None:
                owner.ops.append(r.op)
    # module outputs come children first: a call's calls are the run of descendants before it
    for i, node in enumerate(nodes):
        prefix = node.name + "." if node.name else ""
        j = i - 1
        while j >= 0 and nodes[j].name.startswith(prefix) and nodes[j].name != node.name:
            j -= 1
        node.calls_inside = i - 1 - j
    # a leaf whose value equals an earlier one (dropout in eval, Identity)
    seen: set[tuple[Any, float, float]] = set()
    for node in nodes:
        fingerprint = (node.shape, node.mean, node.std)
        # only a leaf copies: a parent returning its last child's output is ordinary
        node.passthrough = (
            node.calls_inside == 0
            and node.shape is not None
            and math.isfinite(node.std)
            and fingerprint in seen
        )
        seen.add(fingerprint)
    return nodes


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _score(x: _Node, y: _Node) -> tuple[float, list[str]]:
    if x.shape != y.shape:
        return _FORBIDDEN, []
    if x.shape is None:
        return 0.0, ["no tensors"]
    score, why = 2.0, [f"shape {'x'.join(map(str, x.shape)) or '()'}"]
    if x.dtype == y.dtype:
        score += 0.25
    if x.leaves == y.leaves:
        score += 0.25
    leaf_x, leaf_y = x.calls_inside == 0, y.calls_inside == 0
    # the call tree's shape weighs more than the values: a bug makes values differ, not trees
    if leaf_x == leaf_y:
        score += 1.0
        if leaf_x:
            why.append("leaf")
        else:
            ratio = abs(math.log((x.calls_inside + 1) / (y.calls_inside + 1)))
            score += 2.0 * (1.0 - min(1.0, ratio)) - 1.0
            why.append(f"{x.calls_inside} vs {y.calls_inside} calls inside")
    else:
        score -= 3.0
    d = _distance(x, y)
    if math.isfinite(d):
        if d < 1e-3:
            score += 1.0
            why.append("values agree")
        elif d < 0.05:
            score += 0.5
            why.append("values close")
        elif d >= 0.3:  # values unlike each other: pair only where nothing better is in reach
            score -= 1.0
    if x.passthrough or y.passthrough:
        # a copy of an earlier value (Identity, eval dropout) pairs only with what it equals
        score -= 0.5 if d < 0.05 else 6.0
    if x.cls is not None and y.cls is not None:
        if x.cls == y.cls:
            score += 1.5
            why.append(f"both {x.cls}")
        else:
            score -= 0.5
    if x.name == y.name:
        score += 2.0
        why.append("same name")
    else:
        score += 0.75 * difflib.SequenceMatcher(None, _last(x.name), _last(y.name)).ratio()
    if x.ops or y.ops:
        sx, sy = set(x.ops), set(y.ops)
        jaccard = len(sx & sy) / len(sx | sy)
        score += jaccard
        if jaccard >= 0.5:
            why.append("same ops")
    return score, why


def _align(
    xs: list[_Node], ys: list[_Node], score: Callable[[_Node, _Node], tuple[float, list[str]]]
) -> list[tuple[int, int, list[str]]]:
    """A global alignment of two sequences maximising the summed scores (gaps cost _GAP)."""
    n, m = len(xs), len(ys)
    if not n or not m:
        return []
    # float64 torch, not numpy: the core of tensorsnap needs nothing but torch (issue 12)
    table = torch.full((n, m), _FORBIDDEN, dtype=torch.float64)
    reasons: dict[tuple[int, int], list[str]] = {}
    by_shape: dict[Any, list[int]] = {}
    for j, y in enumerate(ys):
        by_shape.setdefault(y.shape, []).append(j)
    for i, x in enumerate(xs):
        for j in by_shape.get(x.shape, ()):
            table[i, j], reasons[(i, j)] = score(x, ys[j])
    grid = torch.zeros((n + 1, m + 1), dtype=torch.float64)
    steps = _GAP * torch.arange(m + 1, dtype=torch.float64)
    grid[0] = -steps
    for i in range(1, n + 1):
        t = torch.empty(m + 1, dtype=torch.float64)
        t[0] = grid[i - 1, 0] - _GAP
        t[1:] = torch.maximum(grid[i - 1, :-1] + table[i - 1], grid[i - 1, 1:] - _GAP)
        grid[i] = torch.cummax(t + steps, 0).values - steps
    h = grid.tolist()  # the traceback reads single cells: Python floats are faster there
    scores = table.tolist()
    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        here = h[i][j]
        if math.isclose(here, h[i - 1][j] - _GAP, abs_tol=1e-9):
            i -= 1
        elif math.isclose(here, h[i][j - 1] - _GAP, abs_tol=1e-9):
            j -= 1
        else:
            pairs.append((i - 1, j - 1, reasons.get((i - 1, j - 1), [])))
            i, j = i - 1, j - 1
    pairs.reverse()
    return [p for p in pairs if scores[p[0]][p[1]] > _FORBIDDEN / 2]


def _agree(x: _Node, y: _Node) -> bool:
    if x.shape != y.shape or x.shape is None or (x.calls_inside == 0) != (y.calls_inside == 0):
        return False
    if x.passthrough or y.passthrough:
        return False  # a copy equals its original too: no evidence of which it is
    return _distance(x, y) < 0.05


def _same_kind(x: _Node, y: _Node) -> bool:
    return (
        x.cls == y.cls
        and x.shape == y.shape
        and x.shape is not None
        and (x.calls_inside == 0) == (y.calls_inside == 0)
        and not (x.passthrough or y.passthrough)
    )


def _out_of_order(
    xs: list[_Node], ys: list[_Node], pairs: list[tuple[int, int, list[str]]]
) -> list[tuple[int, int, list[str]]]:
    """Calls the two runs make in another order (a ResNet's shortcut before or after its main
    path): a node left unpaired, or paired with values unlike its own, takes an unpaired node
    of the other run with the same shape and equal values, nearest in execution order."""
    by_x = {i: (j, why) for i, j, why in pairs}
    owner = {j: i for i, j, _ in pairs}

    def agreed(i: int) -> bool:
        return i in by_x and any(w.startswith("values") for w in by_x[i][1])

    for i, x in enumerate(xs):
        if agreed(i):
            continue
        free = [
            j for j, y in enumerate(ys) if (j not in owner or not agreed(owner[j])) and _agree(x, y)
        ]
        evidence = "values agree"
        if not free and i not in by_x and x.cls is not None:
            # an unpaired call whose twin is unpaired too: same class, parameter shapes and
            # output shape (values may differ downstream of a bug)
            free = [j for j, y in enumerate(ys) if j not in owner and _same_kind(x, y)]
            evidence = f"both {x.cls}"
        if not free:
            continue
        j = min(free, key=lambda j: abs(j / max(len(ys), 1) - i / max(len(xs), 1)))
        if i in by_x:
            owner.pop(by_x[i][0], None)
        if j in owner:
            by_x.pop(owner[j], None)
        shape = "x".join(map(str, x.shape or ()))
        by_x[i] = (j, [f"shape {shape}", evidence, "out of order"])
        owner[j] = i
    return [(i, j, why) for i, (j, why) in sorted(by_x.items())]


def _op_nodes(snap: Mapping[str, Any], records: list[Record]) -> dict[tuple[str, int], list[_Node]]:
    ops: dict[tuple[str, int], list[_Node]] = {}
    for r in records:
        if r.kind == "op":
            node = _Node(r.key, r.op or "", snap[r.key])
            ops.setdefault((r.module, r.call), []).append(node)
    return ops


def _op_score(x: _Node, y: _Node) -> tuple[float, list[str]]:
    # ops inside paired calls pair by name *and* values: two implementations of one module
    # run different ops (a fused qkv splits where three projections do not), and pairing
    # same-named or same-shaped ops whose values are unrelated would report a divergence
    # the candidate does not have (an unpaired op is a note, never a divergence)
    if x.shape != y.shape:
        return _FORBIDDEN, []
    d = _distance(x, y)
    if x.name == y.name and d < _OP_UNLIKE:
        return (4.0 if d < 0.05 else 3.0), [f"op {x.name}"]
    if d < 1e-3:
        return 2.0, [f"op {x.name} vs {y.name}", "values agree"]
    return _FORBIDDEN, []


def _auto(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    types: tuple[Mapping[str, str], Mapping[str, str]] | None = None,
) -> dict[str, tuple[str, str]]:
    records_a, records_b = records_of(a), records_of(b)
    types_a, types_b = types if types is not None else (None, None)
    nodes_a, nodes_b = _nodes(a, records_a, types_a), _nodes(b, records_b, types_b)
    out: dict[str, tuple[str, str]] = {}
    calls: list[tuple[tuple[str, int], tuple[str, int]]] = []
    call_of_a = {r.key: (r.module, r.call) for r in records_a if r.kind == "output"}
    call_of_b = {r.key: (r.module, r.call) for r in records_b if r.kind == "output"}
    for i, j, why in _out_of_order(nodes_a, nodes_b, _align(nodes_a, nodes_b, _score)):
        ka, kb = nodes_a[i].key, nodes_b[j].key
        out[ka] = (kb, "auto: " + ", ".join(why))
        calls.append((call_of_a[ka], call_of_b[kb]))
    ops_a, ops_b = _op_nodes(a, records_a), _op_nodes(b, records_b)
    for ca, cb in calls:
        xs, ys = ops_a.get(ca, []), ops_b.get(cb, [])
        for i, j, why in _align(xs, ys, _op_score):
            out[xs[i].key] = (ys[j].key, "auto: " + ", ".join(why) + " in paired calls")
    # inputs, gradients and saved tensors follow the key they belong to
    for ka, (kb, _) in list(out.items()):
        for suffix in _FOLLOWERS:
            if ka + suffix in a and kb + suffix in b:
                out[ka + suffix] = (kb + suffix, f"auto: follows {ka or '<root>'!r}")
    return out
