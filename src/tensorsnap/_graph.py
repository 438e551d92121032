"""Graph mode: the op capture taken from a dynamo graph of the model, compiled once and reused.

``capture(model, ops=True, graph=True)`` has dynamo trace the model's whole call into one FX
graph, with a backend of ours that runs the graph as eager Python (no inductor: the same
kernels, in the same order, as a plain run) and hands the captured values to the session when
the graph returns. The graph already holds every torch-level call with the module calls it ran
in (``nn_module_stack``); module outputs are marked by a process-wide forward hook that does
nothing outside tracing and that dynamo traces into a :func:`_mark` node where each call
returned. The marks are removed before the graph runs.

Nothing is cloned that does not need it. A value is copied inside the graph, right after it is
made, only if a later node of the same graph writes its storage (found by running the graph on
fake tensors and reading which ATen ops write which storages); after the graph, a value whose
storage the caller can reach (an input, a parameter, anything the graph returns) is copied, and
a fresh one nobody else holds is kept as it is: it is already an independent copy.

A call dynamo cannot take whole (a graph break, an unsupported construct) raises before
anything of the model runs; :class:`GraphRunner` then runs that call, and the model's later
calls, through the eager capture, so nothing is ever lost (see :meth:`GraphRunner.call`).
"""

from __future__ import annotations

import operator
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch._dynamo
from torch import fx, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from ._clones import clone, clone_items
from ._copy import Copier
from ._graphnames import operator_name
from ._ops import op_name, quiet
from ._recorder import Recorder

__all__ = ["GraphRunner", "Marks"]

# ---- marking where module calls return ---------------------------------------------------------

# our key in torch's table of process-wide forward hooks: one fixed key, so that the table looks
# the same in every block and dynamo's guards on it keep holding across blocks
_HOOK_ID = -(2**62) - 7


@torch._dynamo.allow_in_graph
def _mark(module_id: int, output: Any) -> None:
    """Stands in a graph where a module call returned ``output``; removed before it runs."""
    return None


# True while a graph-mode call runs; dynamo reads it (and guards on it) when it traces the hook
_TRACING = False


def _mark_output(module: nn.Module, args: Any, output: Any) -> None:
    if _TRACING:
        _mark(id(module), _markable(output))


# tags of what _markable makes of structures a graph node cannot hold as they are
_MAPPING = "tensorsnap:mapping"
_OPAQUE = "tensorsnap:opaque"


def _markable(value: Any) -> Any:
    """``value`` as an fx argument can hold it, traced by dynamo: Mappings (``ModelOutput``)
    become their class's module and name with their keys and values, rebuilt by the plan."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    cls = type(value)
    if cls is tuple or cls is list:
        return cls(_markable(item) for item in value)
    if isinstance(value, dict):
        return (
            _MAPPING,
            cls.__module__,
            cls.__qualname__,
            tuple(value.keys()),
            tuple(_markable(item) for item in value.values()),
        )
    return (_OPAQUE, cls.__module__, cls.__qualname__)


class Marks:
    """Keeps :func:`_mark_output` among torch's global forward hooks while graph blocks are open."""

    _lock = threading.Lock()
    _open = 0

    def __enter__(self) -> None:
        from torch.nn.modules import module as hooks

        with Marks._lock:
            if Marks._open == 0:
                hooks._global_forward_hooks[_HOOK_ID] = _mark_output
            Marks._open += 1

    def __exit__(self, *exc: Any) -> None:
        from torch.nn.modules import module as hooks

        with Marks._lock:
            Marks._open -= 1
            if Marks._open == 0:
                hooks._global_forward_hooks.pop(_HOOK_ID, None)


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

# how a captured value reaches the session
_KEEP = 0  # fresh and never written again: kept as it is (copied when it is a view)
_COPIED = 1  # copied inside the graph, before a later node wrote it
_COPY = 2  # the caller can reach its storage: copied when the graph returns

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


class _Leaf:
    """A place in a module output's structure filled from the graph's extra outputs."""

    __slots__ = ("how", "index")

    def __init__(self, index: int, how: int) -> None:
        self.index = index
        self.how = how


class _Entry:
    """One key's value, in the order the eager capture would record it."""

    __slots__ = ("count", "frame", "op", "value")

    def __init__(self, frame: int, op: str | None, count: int, value: Any) -> None:
        self.frame = frame  # index in Plan.frames
        self.op = op  # None: the module call's output
        self.count = count  # calls of this op before it in the same module call
        self.value = value  # a _Leaf, or a structure holding _Leafs (module outputs)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


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
        fake = fakes[0].fake_mode
        inputs = list(example_inputs)
    else:  # real inputs: fake copies, made by one converter so that aliasing is kept
        fake = FakeTensorMode()
        inputs = [fake.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in example_inputs]
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
        self._copies: dict[fx.Node, fx.Node] = {}
        counts: dict[tuple[int, str], int] = {}
        marks = []
        for node in nodes:
            if node.op == "call_module":
                raise Unsupported(f"the graph calls a module as one node ({node.target})")
            if node.op not in ("call_function", "call_method"):
                continue
            if node.target is _mark:
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
        self._values.clear()
        self._written.clear()
        self._rows: tuple[tuple[int, ...], list[tuple[Any, ...]]] | None = None

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
            name = (
                target[2:-2]
                if len(target) > 4 and target.startswith("__") and target.endswith("__")
                else target
            )
            return name
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
        only when it is the function's one op under the function's own name.
        """
        trace = node.meta.get("stack_trace") or ""
        lines = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
        if not lines:
            return
        last = lines[-1]
        torch_dir = _torch_dir()
        if torch_dir not in last or "/nn/modules/" in last:
            return
        function = last.rsplit(" in ", 1)[-1]
        if function != name:
            raise Unsupported(
                f"{name} ran inside torch's {function}(), which the eager capture sees as one op"
            )

    def _frame(self, node: fx.Node) -> int:
        """The module call ``node`` ran in directly: the innermost one of the model's modules."""
        stack = node.meta.get("nn_module_stack") or {}
        for key in reversed(list(stack)):
            module_id, call = _stack_key(key)
            if module_id in self._names and module_id != self.root_id:
                return self._frame_index(module_id, call)
        return 0

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
        if module_id == self.root_id or module_id not in self._names:
            return  # the root's output is recorded from the call itself; others are not keys
        call = 0
        for key in reversed(list(node.meta.get("nn_module_stack") or {})):
            found, n = _stack_key(key)
            if found == module_id:
                call = n
                break
        frame = self._frame_index(module_id, call)
        value = _structure(
            _unwrap(fx.node.map_arg(node.args[1], self._leaf)), self._names[module_id]
        )
        self.entries.append(_Entry(frame, None, 0, value))

    # -- copies ----------------------------------------------------------------------------------

    def _leaf(self, node: fx.Node) -> Any:
        """A :class:`_Leaf` for ``node``'s value, with a copy node after it if a write follows."""
        value = self._values.get(node)
        storages = _storages(value)
        if not _tensors(value):
            raise Unsupported(f"a module returned {type(value).__name__} from node {node.name}")
        index = self._index[node]
        written = any(i > index for s in storages for i in self._written.get(s, ()))
        if written or len(storages) < len(_tensors(value)):
            copy = self._copies.get(node)
            if copy is None:
                with self.gm.graph.inserting_after(node):
                    copy = self._copies[node] = self.gm.graph.call_function(_copy_now, (node,))
            self._extras.append(copy)
            return _Leaf(len(self._extras) - 1, _COPIED)
        self._extras.append(node)
        how = _COPY if storages & self._reachable else _KEEP
        return _Leaf(len(self._extras) - 1, how)

    # -- running ---------------------------------------------------------------------------------

    def hand_over(self, session: GraphSession, extras: Any) -> None:
        """Give the session each captured value, under the key the eager capture would use."""
        calls = session.calls
        base = tuple(calls.get(module_id, 0) for module_id, _, _ in self.frames)
        rows = self._rows_for(base)
        recorder = session.recorder
        plain = session.plain
        store = recorder.adopt if plain else recorder.record
        selected = None if session.everything else session.selected
        for key, name, call, op, kind, value in rows:
            if selected is not None and not selected(key):
                continue
            if type(value) is _Leaf:
                value = _take(extras, value, plain, recorder, key)
            else:
                value = _fill(value, extras, plain, recorder, key)
            store(key, name, call, op, kind, value)
        for module_id, n in self.calls.items():
            calls[module_id] = calls.get(module_id, 0) + n

    def _rows_for(self, base: tuple[int, ...]) -> list[tuple[Any, ...]]:
        """Each entry's key and record fields, for module calls numbered from ``base``."""
        cached = self._rows
        if cached is not None and cached[0] == base:
            return cached[1]
        rows = []
        for entry in self.entries:
            _, name, call = self.frames[entry.frame]
            call += base[entry.frame]
            key = name if call == 0 else f"{name}#{call}"
            if entry.op is not None:
                key = f"{key}/{entry.op}" if entry.count == 0 else f"{key}/{entry.op}#{entry.count}"
            kind = "op" if entry.op is not None else "output"
            rows.append((key, name, call, entry.op, kind, entry.value))
        self._rows = (base, rows)
        return rows


def _take(extras: Any, leaf: _Leaf, plain: bool, recorder: Recorder, key: str) -> Any:
    value = extras[leaf.index]
    if not plain or leaf.how == _COPIED:
        return value  # the session's copier copies it, or it is a copy already
    if leaf.how == _KEEP:
        # fresh storage that nothing writes again and only the snapshot will hold: views of
        # it stay views (of one storage with the other keys that view it), as lazy=True keeps
        if type(value) is torch.Tensor:
            return value.detach() if value.requires_grad else value
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in value):
            return value
    return recorder.copy_value(value, key)


def _fill(structure: Any, extras: Any, plain: bool, recorder: Recorder, key: str) -> Any:
    if isinstance(structure, _Leaf):
        return _take(extras, structure, plain, recorder, key)
    if isinstance(structure, (tuple, list)):
        items = [_fill(item, extras, plain, recorder, key) for item in structure]
        return tuple(items) if isinstance(structure, tuple) else items
    if isinstance(structure, dict):
        return {k: _fill(v, extras, plain, recorder, key) for k, v in structure.items()}
    if isinstance(structure, _Mapping):
        values = [_fill(v, extras, plain, recorder, key) for v in structure.values]
        if _is_model_output(structure.cls):
            return structure.cls(**dict(zip(structure.keys, values, strict=True)))
        return structure.cls(zip(structure.keys, values, strict=True))
    return structure


def _is_model_output(cls: type) -> bool:
    return any(base.__name__ == "ModelOutput" for base in cls.__mro__)


class _Mapping:
    """A Mapping subclass in a module output (``ModelOutput``): rebuilt from its parts."""

    __slots__ = ("cls", "keys", "values")

    def __init__(self, cls: type, keys: tuple[Any, ...], values: tuple[Any, ...]) -> None:
        self.cls, self.keys, self.values = cls, keys, values


def _structure(value: Any, name: str) -> Any:
    """A module output's structure with its Mappings resolved to the live classes."""
    if isinstance(value, tuple) and value and value[0] == _OPAQUE:
        raise Unsupported(
            f"module {name!r} returned a {value[1]}.{value[2]}; graph mode rebuilds module "
            "outputs made of tensors, tuples, lists, dicts and ModelOutputs"
        )
    if isinstance(value, tuple) and len(value) == 5 and value[0] == _MAPPING:
        cls = _live_class(value[1], value[2])
        if cls is None:
            raise Unsupported(f"module {name!r} returned a {value[1]}.{value[2]}")
        return _Mapping(cls, value[3], tuple(_structure(v, name) for v in value[4]))
    if type(value) in (tuple, list):
        return type(value)(_structure(v, name) for v in value)
    if type(value) is dict:
        return {k: _structure(v, name) for k, v in value.items()}
    return value


def _live_class(module: str, qualname: str) -> type | None:
    import sys

    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def _unwrap(value: Any) -> Any:
    """fx's immutable containers back to plain tuples, lists and dicts."""
    if isinstance(value, _Leaf):
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


def _torch_dir() -> str:
    if not _TORCH_DIR:
        import os

        _TORCH_DIR.append(os.path.dirname(torch.__file__) + os.sep)
    return _TORCH_DIR[0]


# ---- compiling and running ---------------------------------------------------------------------


def _call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return model._call_impl(*args, **kwargs)


class _Active(threading.local):
    session: GraphSession | None = None
    ran = False


_active = _Active()


class _Tracing:
    """The process-wide switches of one graph-mode call.

    ``_TRACING`` has dynamo trace the marks. The fused fast paths of the encoder layer and
    MultiheadAttention are turned off, as the eager op capture's function mode turns them off
    (a function mode makes them refuse), so that the graph holds the same ops.
    """

    __slots__ = ("fastpath",)

    def __enter__(self) -> None:
        global _TRACING
        _TRACING = True
        self.fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc: Any) -> None:
        global _TRACING
        _TRACING = False
        torch.backends.mha.set_fastpath_enabled(self.fastpath)


class _Stance:
    """The "default" compile stance for our own compiled call, if another was set.

    A block that captures a user's compiled model runs it with the stance "force_eager" (so
    that its wrapper calls the model's own ``__call__``, which is ours for the block), and an
    eager capture open in another thread sets it too: our graph must still run.
    """

    __slots__ = ("inner",)

    def __enter__(self) -> None:
        stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", None)
        self.inner = None if stance == "default" else torch.compiler.set_stance("default")
        if self.inner is not None:
            self.inner.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.inner is not None:
            self.inner.__exit__(*exc)


class _Verify(Exception):
    """Raised by the backend for a graph seen for the first time: run the call eagerly."""


class _Compiled:
    """One model's compiled call, kept as long as the model lives, across blocks.

    A graph is trusted only after its keys were checked against the eager capture's: the
    first time the backend is handed a graph (new code, new shapes), it plans it and refuses
    to run it; the call runs through the eager capture, and the keys it produced are compared
    with the plan's. Equal: the next call compiles the same graph again and runs it. Not
    equal (library code that runs other ops when compiled, e.g. transformers' mask builders;
    a call dynamo drops as dead code), the model's calls run eagerly from then on, and the
    warning names the first key that differs.
    """

    _count = 0

    def __init__(self, model: nn.Module) -> None:
        from ._keys import module_names

        self.eager: str | None = None  # why this model's calls run through the eager capture
        self.compiles = 0  # graphs the backend was handed and ran
        self.checked: dict[str, str | None] = {}  # graph code -> None (keys equal) or why not
        self.pending: tuple[str, Plan] | None = None  # a graph whose keys are being checked
        self.warned: set[str] = set()  # reasons for running eagerly, warned about once each
        self._model = weakref.ref(model)
        self._names = module_names
        # a code object of its own: dynamo's cache (and its recompile limit) is per code object
        _Compiled._count += 1
        code = _call.__code__.replace(co_name=f"_tensorsnap_graph_{_Compiled._count}")
        fn = types.FunctionType(code, _call.__globals__, code.co_name)
        self.fn: Callable[..., Any] = torch.compile(fn, backend=self._backend, fullgraph=True)

    def _backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        model = self._model()
        if model is None:
            raise Unsupported("the model is gone")
        code = gm.code
        checked = self.checked.get(code, "")
        if checked:  # a reason: keys differ
            raise Unsupported(checked)
        plan = Plan(gm, example_inputs, model, self._names(model))
        if checked == "" and code not in self.checked:
            self.pending = (code, plan)
            raise _Verify()
        self.compiles += 1

        forward = plan.gm.forward  # not through Module.__call__: no hooks of its own to run

        def run(*args: Any) -> Any:
            session = _active.session
            _active.ran = True  # from here on an error is the model's, not a refusal
            outputs = forward(*args)
            if session is not None:
                plan.hand_over(session, outputs[plan.results :])
            return outputs[: plan.results]

        return run


_compiled: weakref.WeakKeyDictionary[nn.Module, _Compiled] = weakref.WeakKeyDictionary()
_compiled_lock = threading.Lock()


class GraphRunner:
    """Runs a model's calls through its compiled graph, or eagerly where the graph cannot go."""

    def __init__(
        self,
        model: nn.Module,
        session: GraphSession,
        eager: Callable[[tuple[Any, ...], dict[str, Any]], Any],
        produced: Callable[[int], list[str]],
        root_key: Callable[[int], str],
    ) -> None:
        self.model = model
        self.session = session
        self._eager = eager  # runs one call through the eager capture
        self._produced = produced  # the keys the snapshot got after its first n
        self._root_key = root_key  # the key of the root's n-th call
        with _compiled_lock:
            compiled = _compiled.get(model)
            if compiled is None:
                compiled = _compiled[model] = _Compiled(model)
        self.compiled = compiled
        self.fallbacks: list[str] = []  # why calls ran eagerly, once per reason

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One call of the model in the block, captured from its graph if dynamo takes it whole.

        Dynamo compiles before it runs anything of the model, so a call it refuses (a graph
        break, an op graph mode cannot name, a graph whose keys are still to be checked) has
        not started when the refusal arrives, and runs through the eager capture instead, with
        nothing lost or counted twice.
        """
        compiled = self.compiled
        if _others_hooked():
            # another capture (or the user) has process-wide module hooks: dynamo would trace
            # them into the graph; this call runs eagerly, later ones may use the graph again
            self._note("process-wide module hooks other than graph mode's are registered")
            return self._eager(args, kwargs)
        if compiled.eager is None:
            previous, _active.session, _active.ran = _active.session, self.session, False
            compiled.pending = None
            try:
                with _Stance(), _Tracing():
                    output = compiled.fn(self.model, args, kwargs)
            except Exception as error:
                if _active.ran or not _is_refusal(error):
                    raise
                pending, compiled.pending = compiled.pending, None
                if pending is not None and _is_verify(error):
                    _active.session = previous
                    return self._check(pending, args, kwargs)
                compiled.eager = _reason(error)
            else:
                if not _active.ran:
                    from ._errors import TensorSnapError

                    raise TensorSnapError(
                        "graph mode: torch ran the model without its compiled graph (dynamo's "
                        "recompile limit, torch._dynamo.config.recompile_limit, may have been "
                        "reached), so this call's values were not captured; capture with "
                        "graph=False, or give the model inputs of fewer distinct shapes"
                    )
                return output
            finally:
                _active.session = previous
        self._note(compiled.eager)
        return self._eager(args, kwargs)

    def _note(self, reason: str) -> None:
        """Keep a reason for the session to warn about: once per model and reason."""
        if reason not in self.compiled.warned:
            self.compiled.warned.add(reason)
            self.fallbacks.append(reason)

    def _check(self, pending: tuple[str, Plan], args: tuple[Any, ...], kwargs: Any) -> Any:
        """Run a call eagerly and compare its keys with those the new graph would give."""
        code, plan = pending
        session = self.session
        calls = session.calls
        base = tuple(calls.get(module_id, 0) for module_id, _, _ in plan.frames)
        root = self._root_key(calls.get(id(self.model), 0))
        start = len(self._produced(0))
        output = self._eager(args, kwargs)
        got = self._produced(start)
        expected = [row[0] for row in plan._rows_for(base)] + [root]
        expected = [key for key in expected if session.selected(key)]
        reason = None
        if got != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                min(len(got), len(expected)),
            )
            eager_key = got[at] if at < len(got) else "(none)"
            graph_key = expected[at] if at < len(expected) else "(none)"
            reason = (
                f"its graph would give key {graph_key!r} where the eager capture gives "
                f"{eager_key!r}, e.g. library code that runs other ops when compiled"
            )
            self.compiled.eager = reason
            self._note(reason)
        self.compiled.checked[code] = reason
        return output


def _others_hooked() -> bool:
    from torch.nn.modules import module as hooks

    return bool(
        len(hooks._global_forward_hooks) > 1
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def _is_verify(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, _Verify):
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__  # type: ignore[assignment]
    return False


def _is_refusal(error: Exception) -> bool:
    """Whether dynamo refused to compile the call (so nothing of it ran)."""
    from torch._dynamo import exc

    refusals = tuple(
        getattr(exc, name)
        for name in ("Unsupported", "BackendCompilerFailed", "UserError", "TorchRuntimeError")
        if hasattr(exc, name)
    )
    return isinstance(error, refusals)


def _reason(error: Exception) -> str:
    inner = getattr(error, "inner_exception", None)
    if isinstance(inner, Unsupported):
        return str(inner)
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
