"""Planning one dynamo graph: its keys, named as the eager op capture names them, and its copies.

A :class:`Plan` is built when dynamo hands a graph to graph mode's backend. It names each node
that returns tensors (``C/op#k``, from the node's ``nn_module_stack`` and target) and each
module call's output (from the marks of :mod:`._graphmarks`), decides which values need a copy,
rewrites the graph to return them, and after each run hands them to the capture session.

Nothing is cloned that does not need it. A value is copied inside the graph, right after it is
made, only if a later node of the same graph writes its storage (found by running the graph on
fake tensors and reading which ATen ops write which storages); after the graph, a value whose
storage the caller can reach (an input, a parameter, anything the graph returns) is copied, and
a fresh one nobody else holds is kept as it is: it is already an independent copy.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import fx, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from ._clones import clone, clone_items
from ._copy import Copier, copies_as_model_output, copies_from_attributes
from ._graphfill import (
    COPIED,
    COPY,
    KEEP,
    Leaf,
    Mapping,
    Object,
    Shared,
    builder,
    value_of,
)
from ._graphmarks import CLASS, DEEP, DEEPEST, MAPPING, OBJECT, OPAQUE, SHARED, mark
from ._graphnames import operator_name
from ._keys import call_key, op_key
from ._ops import op_name, quiet
from ._recorder import Recorder
from ._tree import extent

__all__ = ["GraphSession", "Plan", "Unsupported", "torch_dir"]

# ---- what the plan needs of the session --------------------------------------------------------


class GraphSession(Protocol):
    """The parts of the capture session a graph's values are handed to."""

    recorder: Recorder

    @property
    def plain(self) -> bool:
        """No device=, dtype=, stats or rows: values it keeps need no further copy."""

    @property
    def calls(self) -> dict[int, int]:
        """Calls of each module so far in the block, by id."""

    @property
    def everything(self) -> bool:
        """No include or exclude patterns: every key is selected."""

    def selected(self, key: str) -> bool: ...


class Unsupported(Exception):
    """A graph that graph mode cannot name exactly as the eager capture would."""


# ---- planning one graph ------------------------------------------------------------------------

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift,
}  # fmt: skip
# the fast paths of nn.TransformerEncoderLayer and MultiheadAttention: an active function mode
# turns them off, so the eager op capture sees the layers' submodules instead
_FUSED_KERNELS = {
    "_transformer_encoder_layer_fwd",
    "_native_multi_head_attention",
    "_transformer_decoder_only_layer_fwd",
}


def _copy_now(value: Any) -> Any:
    """A graph node's copy of a value a later node of the same graph overwrites."""
    with quiet():
        copy: Any = None
        if type(value) is torch.Tensor:
            copy = clone(value)
        elif type(value) is tuple or type(value) is list:
            copy, _ = clone_items(value)
        if copy is None:
            copy = Copier().copy_value(value, root="a graph value")
        return copy


class _Entry:
    """One key's value, in the order the eager capture would record it."""

    __slots__ = ("build", "count", "frame", "op", "value", "whole")

    def __init__(self, frame: int, op: str | None, count: int, value: Any, whole: bool = False):
        self.frame = frame  # index in Plan.frames
        self.op = op  # None: the module call's output
        self.count = count  # calls of this op before it in the same module call
        self.value = value  # a Leaf, or a structure holding _Leafs (module outputs)
        # a structure whose tensors share storage, copied as one value when the graph returns
        # (as the eager capture copies it: one tensor twice stays one copy, views stay views)
        self.whole = whole
        self.build: Callable[[Any, Callable[[Leaf], Any]], Any] | None = None  # see builder


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _one_span(value: Any) -> bool:
    """Whether a tuple or list of tensors is views of one storage that, in order of offset,
    each overlap the ones before and together reach all of it (``split`` along a last dim).

    The eager capture copies such a value as one copy of the span they reach, viewed with
    their strides and offsets: here the span is the whole storage, so the value kept as it is
    has the same strides, offsets and bytes, with no copy.
    """
    if not isinstance(value, (tuple, list)) or not value:
        return False
    if not all(isinstance(t, torch.Tensor) for t in value):  # (fake ones, in the plan)
        return False
    first = value[0]
    if len({id(t) for t in value}) < len(value) or any(
        t.dtype != first.dtype
        or t.layout is not torch.strided
        or t.numel() == 0
        or t.is_conj()
        or t.is_neg()
        or t.untyped_storage()._cdata != first.untyped_storage()._cdata
        for t in value
    ):
        return False
    spans = sorted((int(t.storage_offset()), int(t.storage_offset()) + extent(t)) for t in value)
    start, end = spans[0]
    for low, high in spans[1:]:
        if low >= end:
            return False  # disjoint parts (chunk along dim 0): the eager capture copies each
        end = max(end, high)
    return start == 0 and end * first.element_size() == first.untyped_storage().nbytes()


def _symbolic(value: Any) -> bool:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    if isinstance(value, (tuple, list)):
        return any(_symbolic(v) for v in value)
    return isinstance(value, torch.Tensor) and not all(type(d) is int for d in value.shape)


def _storages(value: Any) -> set[StorageWeakRef]:
    found = set()
    for t in _tensors(value):
        if t.layout is torch.strided and not t.is_nested:
            found.add(StorageWeakRef(t.untyped_storage()))
    return found


class _Writes(TorchDispatchMode):
    """Notes which storages each node of a graph writes, from the ATen ops' schemas."""

    def __init__(self) -> None:
        super().__init__()
        self.node = -1
        self.written: dict[StorageWeakRef, list[int]] = {}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        if schema is not None:
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is None or not arg.alias_info.is_write:
                    continue
                value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
                for storage in _storages(value):
                    self.written.setdefault(storage, []).append(self.node)
        return func(*args, **kwargs)


class _Replay(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, writes: _Writes) -> None:
        super().__init__(gm)
        self.writes = writes
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.writes.node += 1
        result = super().run_node(n)
        self.values[n] = result
        return result


def _replay(gm: fx.GraphModule, example_inputs: list[Any]) -> tuple[dict[fx.Node, Any], _Writes]:
    """Run ``gm`` on fake copies of its inputs: each node's fake value and the storages written."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fakes = [a for a in example_inputs if isinstance(a, FakeTensor)]
    if fakes:  # torch handed fake inputs already: their mode runs the replay
        return _replay_in(gm, fakes[0].fake_mode, list(example_inputs))
    # real inputs: fake copies, made by one converter so that aliasing is kept
    try:
        return _replay_in(gm, FakeTensorMode(), example_inputs)
    except Exception:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        # a value read from a tensor (a float attribute dynamo made an input: ``.item()``)
        # needs a shape environment; one of our own does not know the symbols of a graph
        # with dynamic shapes, which the plain mode replays, so it is the second try
        return _replay_in(
            gm, FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True), example_inputs
        )


def _replay_in(
    gm: fx.GraphModule, fake: Any, example_inputs: list[Any]
) -> tuple[dict[fx.Node, Any], _Writes]:
    from torch._subclasses.fake_tensor import FakeTensor

    inputs = [
        a if isinstance(a, FakeTensor) or not isinstance(a, torch.Tensor) else fake.from_tensor(a)
        for a in example_inputs
    ]
    writes = _Writes()
    replay = _Replay(gm, writes)
    with fake, writes:
        replay.run(*inputs)
    return replay.values, writes


class Plan:
    """What one graph captures, and how: built when dynamo hands the graph to the backend."""

    def __init__(
        self, gm: fx.GraphModule, example_inputs: list[Any], root: nn.Module, names: dict[int, str]
    ) -> None:
        self.gm = gm
        self.root_id = id(root)
        self.frames: list[tuple[int, str, int]] = [(id(root), names[id(root)], 0)]
        self.entries: list[_Entry] = []
        self.calls: dict[int, int] = {}  # module calls in the graph, by module id
        self._names = names
        self._frame_of: dict[tuple[int, int], int] = {(id(root), 0): 0}
        self._numbered: dict[tuple[str, ...], int] = {}  # a call's chain of stack keys -> call
        self._started: dict[int, int] = {}  # calls numbered so far, by module id
        values, writes = _replay(gm, example_inputs)
        nodes = list(gm.graph.nodes)
        self._index = {node: i for i, node in enumerate(nodes)}
        self._values = values
        self._written = writes.written
        self._reachable: set[StorageWeakRef] = set()  # storages the caller can reach
        for node in nodes:
            if node.op in ("placeholder", "get_attr"):
                self._reachable |= _storages(values.get(node))
            elif node.op == "output":
                for leaf in _arg_nodes(node.args):
                    self._reachable |= _storages(values.get(leaf))
        self._extras: list[fx.Node] = []
        self._slots: dict[fx.Node, int] = {}  # each node's place in _extras: one per node
        self._copies: dict[tuple[fx.Node, fx.Node], fx.Node] = {}  # (value, taken after)
        counts: dict[tuple[int, str], int] = {}
        marks = []
        self._root_mark: fx.Node | None = None  # where the model's own call returned
        for node in nodes:
            if node.op == "call_module":
                raise Unsupported(f"the graph calls a module as one node ({node.target})")
            if node.op not in ("call_function", "call_method"):
                continue
            if node.target is mark:
                marks.append(node)
                self._module_output(node)
                continue
            name = self._op_name(node)
            if name is None:
                continue
            frame = self._frame(node)
            count = counts.get((frame, name), 0)
            counts[frame, name] = count + 1
            self.entries.append(_Entry(frame, name, count, self._leaf(node)))
        # the model's own output, last, as the eager capture records it: from the graph, its
        # tensors shared with the keys that hold them; an output graph mode cannot rebuild is
        # left to the session, which copies what the call returned (calls[root] unchanged)
        self.root = self._root_output()
        for node in marks:
            gm.graph.erase_node(node)
        output = next(n for n in reversed(nodes) if n.op == "output")
        results = output.args[0]
        self.results = len(results) if isinstance(results, (tuple, list)) else -1
        if self.results < 0:
            raise Unsupported("the graph returns a single value")
        output.args = (tuple(results) + tuple(self._extras),)
        gm.graph.lint()
        gm.recompile()
        real = getattr(gm, "real_recompile", None)  # a lazy module compiles on first call,
        if real is not None:  # through Module.__call__ (and its global hooks) every time
            real()
        # symbolic shapes: values of one graph may differ in shape from run to run
        self.static = not any(_symbolic(v) for v in self._values.values())
        for entry in self.entries:  # module outputs: their structure's walk, compiled
            if type(entry.value) is not Leaf and not entry.whole:
                entry.build = builder(entry.value, self.frames[entry.frame][1])
        self._quick = _Quick(self.entries, [self._values.get(n) for n in self._extras])
        self._values.clear()
        self._written.clear()
        self._rows: tuple[tuple[int, ...], list[tuple[Any, ...]]] | None = None
        # records and keys of a run, by numbering of calls (static graphs only)
        self._records: dict[tuple[int, ...], tuple[list[Any], list[str], dict[int, int]]] = {}
        self._frame_ids = [module_id for module_id, _, _ in self.frames]
        self._zeros = [0] * len(self.frames)

    # -- naming ----------------------------------------------------------------------------------

    def _op_name(self, node: fx.Node) -> str | None:
        """The eager capture's name for ``node``, or None when eager would record nothing."""
        value = self._values.get(node)
        if not _tensors(value):
            return None  # sizes, flags, grad-mode switches: no tensor, no key
        target = node.target
        first = (
            self._values.get(node.args[0])
            if node.args and isinstance(node.args[0], fx.Node)
            else None
        )
        if node.op == "call_method":
            assert isinstance(target, str)
            dunder = len(target) > 4 and target.startswith("__") and target.endswith("__")
            return target[2:-2] if dunder else target
        if target is operator.getitem:
            # indexing a tensor is Tensor.__getitem__; taking a part of a tuple is no op at all
            return "getitem" if isinstance(first, torch.Tensor) else None
        if target is getattr:
            return str(node.args[1])  # a tensor property: x.T, x.mT
        if isinstance(target, torch._ops.HigherOrderOperator):
            raise Unsupported(f"the graph holds {target.__name__}, which runs a subgraph")
        if callable(target) and getattr(target, "__module__", None) == "_operator":
            tensor_first = isinstance(first, torch.Tensor)
            found = operator_name(target, tensor_first)
            if found is None:
                raise Unsupported(f"no eager name is known for operator.{target.__name__}")
            return found
        name = op_name(target)
        if name in _FUSED_KERNELS:
            raise Unsupported(
                f"the graph runs the fused kernel {name}, which the eager op capture turns off"
            )
        self._check_not_inlined(node, name)
        return name

    def _check_not_inlined(self, node: fx.Node, name: str) -> None:
        """Refuse ops that dynamo took from inside a torch function written in Python.

        The eager capture sees such a function as one op (``F.pad``) and none of the calls in
        it. When the innermost frame that made the node is torch's own Python code (not a
        ``torch.nn`` module's forward), the node came from inside such a function: accepted
        only under the function's own name (``F.pad`` returning what ``torch._C._nn.pad``
        made), where the eager capture's key for the call is the same.
        """
        trace = node.meta.get("stack_trace") or ""
        lines = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
        if not lines:
            return
        last = lines[-1]
        if torch_dir() not in last or "/nn/modules/" in last:
            return
        function = last.rsplit(" in ", 1)[-1]
        if function != name:
            raise Unsupported(
                f"{name} ran inside torch's {function}(), which the eager capture sees as one op"
            )

    def _frame(self, node: fx.Node) -> int:
        """The module call ``node`` ran in directly: the innermost one of the model's modules."""
        for module_id, call in reversed(self._calls_of(node)):
            if module_id in self._names and module_id != self.root_id:
                return self._frame_index(module_id, call)
        return 0

    def _calls_of(self, node: fx.Node) -> list[tuple[int, int]]:
        """The module calls ``node`` ran in, outermost first: each module's id and call.

        dynamo's ``id@n`` counts calls per path, not per module (a module shared by two parents
        is ``@0`` under both), so calls are numbered here: a call is the chain of stack keys
        down to it, and each module's calls are counted in the order the graph starts them.
        """
        stack = list(node.meta.get("nn_module_stack") or {})
        found = []
        for i, key in enumerate(stack):
            module_id = _stack_key(key)[0]
            chain = tuple(stack[: i + 1])
            call = self._numbered.get(chain)
            if call is None:
                call = self._numbered[chain] = self._started.get(module_id, 0)
                self._started[module_id] = call + 1
            found.append((module_id, call))
        return found

    def _frame_index(self, module_id: int, call: int) -> int:
        index = self._frame_of.get((module_id, call))
        if index is None:
            index = self._frame_of[module_id, call] = len(self.frames)
            self.frames.append((module_id, self._names[module_id], call))
            self.calls[module_id] = max(self.calls.get(module_id, 0), call + 1)
        return index

    def _module_output(self, node: fx.Node) -> None:
        module_id = node.args[0]
        assert isinstance(module_id, int)
        if module_id == self.root_id:
            self._root_mark = node  # the last one is the model's own call (see _root_output)
            return
        if module_id not in self._names:
            return  # not one of the model's modules: not a key
        call = 0
        for found, n in reversed(self._calls_of(node)):
            if found == module_id:
                call = n
                break
        frame = self._frame_index(module_id, call)
        value, whole = self._output(node, self._names[module_id])
        self.entries.append(_Entry(frame, None, 0, value, whole))

    def _output(self, node: fx.Node, name: str) -> tuple[Any, bool]:
        """The structure of the output a mark holds, and whether it needs one copy whole.

        The output as it is when the call returns: the module may have written it after the
        node that made it (``h = lin(x); h.relu_(); return h`` returns the linear node).
        """
        leaves: list[tuple[fx.Node, Leaf]] = []

        def leaf(n: fx.Node) -> Any:
            leaves.append((n, self._leaf(n, node)))
            return leaves[-1][1]

        value = _structure(_unwrap(fx.node.map_arg(node.args[1], leaf)), name, [])
        return value, self._whole(leaves, name)

    def _root_output(self) -> bool:
        """Add the entry of the model's own output; False where it is left to the session.

        A model that calls itself has a mark for each of its calls: the last is the outer one,
        and the inner ones have no entry (the check of keys against an eager run refuses
        such a graph).
        """
        if self._root_mark is None:
            return False
        try:
            value, whole = self._output(self._root_mark, self._names[self.root_id])
        except Unsupported:
            return False
        self.entries.append(_Entry(0, None, 0, value, whole))
        self.calls[self.root_id] = 1
        return True

    def _whole(self, leaves: list[tuple[fx.Node, Leaf]], name: str) -> bool:
        """Whether a module output's tensors share storage and need one copy of them all:
        views of each other that the caller can reach, which copies made apart would part."""
        nodes = {n: how.how for n, how in leaves}
        seen: set[StorageWeakRef] = set()
        overlap = False
        for n in nodes:
            storages = _storages(self._values.get(n))
            overlap = overlap or bool(storages & seen)
            seen |= storages
        if overlap and COPIED in nodes.values():
            # each node's value was copied apart inside the graph: their sharing is lost
            raise Unsupported(
                f"module {name!r} returns tensors that share storage and that a later node of "
                "the graph writes"
            )
        # (a tensor held twice is one value twice without this: each slot is copied once)
        return overlap and COPY in nodes.values()

    # -- copies ----------------------------------------------------------------------------------

    def _leaf(self, node: fx.Node, at: fx.Node | None = None) -> Any:
        """A :class:`Leaf` for ``node``'s value as it is right after node ``at`` (``node``
        itself unless given), with a copy node there if a later node writes it."""
        at = node if at is None else at
        value = self._values.get(node)
        storages = _storages(value)
        if not _tensors(value):
            raise Unsupported(f"a module returned {type(value).__name__} from node {node.name}")
        made, index = self._index[node], self._index[at]
        writes = [i for s in storages for i in self._written.get(s, ()) if i > made]
        if not any(i <= index for i in writes):
            at, index = node, made  # unchanged since it was made: one copy serves both keys
        written = any(i > index for i in writes)
        shared = len(storages) < len(_tensors(value))  # parts of one value share storage
        if written or (shared and not _one_span(value)):
            copy = self._copies.get((node, at))
            if copy is None:
                with self.gm.graph.inserting_after(at):
                    copy = self.gm.graph.call_function(_copy_now, (node,))
                    self._copies[node, at] = copy
            return Leaf(self._slot(copy), COPIED)
        how = COPY if storages & self._reachable else KEEP
        return Leaf(self._slot(node), how)

    def _slot(self, node: fx.Node) -> int:
        """``node``'s place among the graph's extra outputs (a value shared by two keys, such
        as a module's output and its last op's, is returned once)."""
        slot = self._slots.get(node)
        if slot is None:
            slot = self._slots[node] = len(self._extras)
            self._extras.append(node)
        return slot

    # -- running ---------------------------------------------------------------------------------

    def hand_over(self, session: GraphSession, extras: Any) -> None:
        """Give the session each captured value, under the key the eager capture would use.

        A graph without symbolic shapes makes values of the same shapes, dtypes and strides
        on every run, so the records of its first run for a numbering of module calls (keys,
        shapes, bytes) serve its later runs: only the values are handed over then.
        """
        calls = session.calls
        base = self.base(calls)
        recorder = session.recorder
        plain = session.plain
        every = session.everything
        known = self._records.get(base) if plain and every else None
        if known is not None and self._hand_known(known, extras, recorder):
            calls.update(known[2])
            return
        store = recorder.adopt if plain else recorder.record
        selected = None if every else session.selected
        start = len(recorder.snapshot)
        clones: dict[int, Any] = {}
        for (key, name, call, op, kind, value, whole), entry in zip(
            self._rows_for(base), self.entries, strict=True
        ):
            if selected is not None and not selected(key):
                continue
            value = value_of(value, whole, extras, plain, recorder, key, clones, entry.build)
            store(key, name, call, op, kind, value)
        counted = {module_id: calls.get(module_id, 0) + n for module_id, n in self.calls.items()}
        if self.static and plain and every and len(self._records) < 16:
            records = recorder.records_from(start)
            self._records[base] = (records, [r.key for r in records], counted)
        calls.update(counted)

    def base(self, calls: dict[int, int]) -> tuple[int, ...]:
        """The numbering of this graph's module calls: each frame's module's calls so far."""
        return tuple(map(calls.get, self._frame_ids, self._zeros))

    def _hand_known(
        self, known: tuple[list[Any], list[str], dict[int, int]], extras: Any, recorder: Recorder
    ) -> bool:
        """Hand over the values of a run whose records are known, in a few calls; False
        (nothing handed over) when a kept value is not a plain tensor free of autograd."""
        quick = self._quick
        if quick.grad:
            return False
        kept = quick.kept(extras)
        if kept and (
            set(map(type, kept)) != _TENSOR
            or (torch.is_grad_enabled() and any(map(_requires_grad, kept)))
        ):
            return False  # (in grad mode, a parameter may have changed its requires_grad)
        records, keys, _ = known
        values = list(quick.placed(extras))
        clones: dict[int, Any] = {}
        for position, value, whole, build in quick.special:
            key = keys[position]
            values[position] = value_of(value, whole, extras, True, recorder, key, clones, build)
        recorder.adopt_all(records, keys, values)
        return True

    def _rows_for(self, base: tuple[int, ...]) -> list[tuple[Any, ...]]:
        """Each entry's key and record fields, for module calls numbered from ``base``."""
        cached = self._rows
        if cached is not None and cached[0] == base:
            return cached[1]
        rows = []
        for entry in self.entries:
            _, name, call = self.frames[entry.frame]
            call += base[entry.frame]
            key = call_key(name, call)
            if entry.op is not None:
                key = op_key(key, entry.op, entry.count)
            kind = "op" if entry.op is not None else "output"
            rows.append((key, name, call, entry.op, kind, entry.value, entry.whole))
        self._rows = (base, rows)
        return rows


_TENSOR = {torch.Tensor}
_requires_grad = torch.Tensor.requires_grad.__get__  # type: ignore[attr-defined]


def _items(indices: list[int]) -> Callable[[Any], tuple[Any, ...]]:
    """A function taking ``indices`` of a sequence, as a tuple, in one C call."""
    if len(indices) == 1:
        index = indices[0]
        return lambda sequence: (sequence[index],)
    return operator.itemgetter(*indices) if indices else lambda sequence: ()


class _Quick:
    """Where each entry's value lies among a graph's extra outputs, for :meth:`Plan._hand_known`.

    An entry whose value is one kept tensor (fresh, written by nothing later) is that output
    as it is; the others (copies to make, structures to rebuild) are ``special``. ``grad``:
    a kept tensor requires grad (dynamo's guards on grad mode and on the inputs'
    ``requires_grad`` keep that as it was traced), so each needs a detached view.
    """

    __slots__ = ("grad", "kept", "placed", "special")

    def __init__(self, entries: list[_Entry], fakes: list[Any]) -> None:
        kept = [
            i
            for i, e in enumerate(entries)
            if type(e.value) is Leaf
            and e.value.how == KEEP
            and isinstance(fakes[e.value.index], torch.Tensor)
        ]
        places = [0] * len(entries)
        for i in kept:
            places[i] = entries[i].value.index
        self.grad = any(fakes[places[i]].requires_grad for i in kept)
        self.kept = _items([places[i] for i in kept])
        # (the specials' places are overwritten; without a kept value there may be no outputs)
        self.placed = _items(places) if kept else (lambda sequence: (None,) * len(places))
        wanted = set(kept)
        self.special = [
            (i, e.value, e.whole, e.build) for i, e in enumerate(entries) if i not in wanted
        ]


def _structure(value: Any, name: str, made: list[Any]) -> Any:
    """A module output's structure with its Mappings resolved to the live classes.

    ``made``: its tuples, lists, mappings and objects in the order :func:`._graphmarks._markable`
    met them (a ``SHARED`` tag names one by its place there; a tuple is made after what it
    holds, so one holding itself is refused).
    """
    if isinstance(value, tuple) and value and value[0] == OPAQUE:
        raise Unsupported(
            f"module {name!r} returned a {value[1]}.{value[2]}; graph mode rebuilds module "
            "outputs made of tensors, tuples, lists, dicts, ModelOutputs, classes and objects "
            "copied from their attributes"
        )
    if isinstance(value, tuple) and len(value) == 1 and value[0] == DEEP:
        raise Unsupported(
            f"module {name!r} returned a structure nested more than {DEEPEST} levels deep"
        )
    if isinstance(value, tuple) and len(value) == 2 and value[0] == SHARED:
        target = made[value[1]]
        if target is None:
            raise Unsupported(
                f"module {name!r} returned a tuple that holds itself (a tuple is made after "
                "what it holds)"
            )
        return Shared(target)
    if isinstance(value, tuple) and len(value) == 7 and value[0] == MAPPING:
        cls = _live_class(value[1], value[2])
        # rebuilt as cls(pairs), or a ModelOutput as the copy engine copies one: other dict
        # types (defaultdict, a subclass with an __init__ or __deepcopy__ of its own, an
        # OrderedDict given attributes) would not come back as they were
        fields = cls is not None and copies_as_model_output(cls)
        if cls is None or not ((cls in (dict, OrderedDict) and not value[5]) or fields):
            raise Unsupported(f"module {name!r} returned a {value[1]}.{value[2]}")
        mapping = Mapping(cls, value[3], fields, value[5])
        made.append(mapping)
        mapping.values = tuple(_structure(v, name, made) for v in value[4])
        mapping.state = tuple(_structure(v, name, made) for v in value[6])
        return mapping
    if isinstance(value, tuple) and len(value) == 5 and value[0] == OBJECT:
        cls = _live_class(value[1], value[2])
        if cls is None or not copies_from_attributes(cls):
            raise Unsupported(
                f"module {name!r} returned a {value[1]}.{value[2]}, which the copy engine "
                "copies through its own __deepcopy__, __reduce__ or __setstate__; graph mode "
                "rebuilds objects from their attributes only"
            )
        found = Object(cls, value[3], ())
        made.append(found)
        found.values = tuple(_structure(v, name, made) for v in value[4])
        return found
    if isinstance(value, tuple) and len(value) == 3 and value[0] == CLASS:
        live = _live_class(value[1], value[2])
        if live is None:
            raise Unsupported(f"module {name!r} returned a class not found as {value[2]}")
        return live
    if type(value) is tuple:
        at = len(made)
        made.append(None)  # until its items are resolved: a tuple is made after them
        made[at] = resolved = tuple(_structure(v, name, made) for v in value)
        return resolved
    if type(value) is list:
        items: list[Any] = []
        made.append(items)
        items.extend(_structure(v, name, made) for v in value)
        return items
    if type(value) is dict:
        return {k: _structure(v, name, made) for k, v in value.items()}
    return value


def _live_class(module: str, qualname: str) -> type | None:
    import sys

    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def _unwrap(value: Any) -> Any:
    """fx's immutable containers back to plain tuples, lists and dicts."""
    if isinstance(value, Leaf):
        return value
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _arg_nodes(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []

    def note(node: fx.Node) -> fx.Node:
        found.append(node)
        return node

    fx.node.map_arg(args, note)
    return found


def _stack_key(key: str) -> tuple[int, int]:
    """``"140..."`` or ``"140...@2"``: a module's id and its call in the graph."""
    module, _, call = str(key).partition("@")
    try:
        return int(module), int(call or 0)
    except ValueError:
        raise Unsupported(f"nn_module_stack key {key!r} is not id@call") from None


_TORCH_DIR: list[str] = []


def torch_dir() -> str:
    if not _TORCH_DIR:
        import os

        _TORCH_DIR.append(os.path.dirname(torch.__file__) + os.sep)
    return _TORCH_DIR[0]
