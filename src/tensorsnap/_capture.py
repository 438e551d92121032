"""The capture session: attributes each tensor a model produces to a key and copies it then.

Module calls are seen through process-wide module hooks installed once per session (not one per
module; only the forward hook when nothing but outputs is captured), filtered by module identity
and thread; functional ops through a function or dispatch mode (:mod:`._ops`); gradients through
tensor and graph-node hooks, which, unlike full backward hooks, do not break when a later op
modifies an output in place. Every value it selects goes through one path,
:meth:`._recorder.Recorder.record`: copy (plain tensors and tuples of them by :mod:`._clones`,
anything else by the copy engine), record, store.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from . import _validate
from ._copy import Copier
from ._errors import TensorSnapError, TensorSnapWarning
from ._finite import FiniteCheck
from ._grads import Gradients, InputGradients, Reach
from ._keys import Selector, call_key, module_names, op_key
from ._lazy import Deferred
from ._ops import AtenMode, OpMode, aten_name, op_name, quiet
from ._recorder import Recorder, make_record
from ._snapshot import Snapshot
from ._stats import stats_session
from ._store import MemoryStore, Store, parse_size
from ._torchstate import (
    DictEntry,
    ForceEager,
    Ignored,
    compiling_possible,
    has_compiled_parts,
    unpack,
)

__all__ = ["capture", "names"]

# Our own torch calls inside hooks must not reach any mode (ours or another session's): they are
# not the model's ops, and dispatching them through Python costs ~1 us each.
_quiet = quiet

# -1 outside a backward pass; module calls inside one are activation checkpointing re-running
# a forward, which is not a new call of the model
_in_backward = torch._C._current_graph_task_id

# torch classes whose fused fast path (eval, no grad) skips their submodules' forward calls
# (not MultiheadAttention: it never calls its out_proj submodule, fast path or not)
_FASTPATH = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
# torch classes that refuse their fused kernels while any function mode is active
_FUSED = (
    nn.TransformerEncoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.MultiheadAttention,
)


class _Frame:
    """One module call in progress."""

    __slots__ = (
        "call",
        "children",
        "grad_in",
        "key",
        "module",
        "name",
        "ops",
        "quiet",
        "resumes",
        "saved",
        "wrapper",
    )

    def __init__(self, module: nn.Module, name: str, call: int) -> None:
        self.module = module
        self.name = name
        self.call = call
        self.key = call_key(name, call)
        self.ops: dict[str, int] = {}
        self.children = 0
        self.saved: list[torch.Tensor] | None = None
        self.grad_in: InputGradients | None = None
        self.quiet = False  # True while the module's own pre-hooks run: their ops are not its
        self.wrapper = False  # a DDP/FSDP/checkpoint wrapper's call: nothing in it is recorded
        self.resumes: Any = None  # our function mode, taken off the stack for this call

    def op_key(self, op: str) -> str:
        """The key of this call's next ``op``: ``C/op``, then ``C/op#1``, ``C/op#2``..."""
        count = self.ops.get(op, 0)
        self.ops[op] = count + 1
        return op_key(self.key, op, count)


class _Session(AbstractContextManager[Snapshot]):
    """Hooks, mode and bookkeeping of one ``capture`` block."""

    def __init__(
        self,
        model: nn.Module,
        *,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        ops: bool | str = False,
        inputs: bool = False,
        grads: bool = False,
        saved: bool = False,
        nonfinite: str | None = None,
        lazy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_memory: int | str | None = None,
        spill_dir: str | None = None,
        gather: bool = False,
        dry: bool = False,
        stats: bool = False,
        rows: Any = None,
        graph: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TensorSnapError(
                f"capture(model=...) takes a torch.nn.Module, got {type(model).__name__}; "
                "wrap a plain function in an nn.Module, or use tensorsnap.snapshot() for values"
            )
        _validate.capture_options(
            ops=ops, nonfinite=nonfinite, spill=spill_dir, inputs=inputs, grads=grads,
            saved=saved, lazy=lazy, gather=gather, stats=stats, graph=graph, where=device,
        )  # fmt: skip
        if graph:
            _validate.graph_options(ops=ops, inputs=inputs, grads=grads, saved=saved, lazy=lazy)
        if lazy and ops == "aten":
            raise TensorSnapError(
                "lazy=True sees writes coming at the torch level; use it with ops=True or "
                "ops=False, not ops='aten'"
            )
        self.model = model
        self._wrappers: set[int] = set()
        self._modules: list[nn.Module] = []
        self.names = module_names(model, self._wrappers, self._modules)
        self.select = Selector(include, exclude)
        self._all = self.select.everything  # no patterns: nothing to decide or remember
        self.ops, self.inputs, self.grads, self.saved = ops, inputs, grads, saved
        self.nonfinite = nonfinite
        self.dry = dry
        self.copier: Any = Copier(device=device, dtype=dtype, gather=gather)
        self._plain = device is None and dtype is None
        if rows is not None:  # extract(per_token=True): a _rows.RowCopier cuts token rows
            self.copier, self._plain = rows, False
        budget = parse_size(max_memory, "max_memory")
        store: Store
        if stats and not dry:  # statistics records instead of copies, made where copies are
            self.copier, store = stats_session(lazy, nonfinite, device, dtype, budget)
            self._plain = False
        elif budget is not None and not dry:
            from ._spill import SpillStore

            store = SpillStore(budget, spill_dir)
        else:
            store = MemoryStore()
        self.snapshot = Snapshot(store=store)
        self._finite = FiniteCheck(self.snapshot) if nonfinite is not None and not dry else None
        self._deferred = Deferred(self._settled) if lazy and not dry and self._plain else None
        # copy, record, store: what the hooks below hand each value to
        self.recorder = Recorder(
            self.snapshot, self.copier, self._plain, self._deferred, self._finite, dry
        )
        self.open = False
        self._used = False
        self._calls: dict[int, int] = {}
        self._stack: list[_Frame] = []
        # the frame that ops run now belong to: the innermost call, unless it is quiet or a
        # module's own hooks are running (None then, and outside the model)
        self._target: _Frame | None = None
        self._thread = 0
        self._handles: list[Any] = []
        self._contexts: list[AbstractContextManager[Any]] = []
        self._warned: set[int] = set()
        self._op_name = op_name
        self._hooked: set[int] = set()  # modules with forward hooks of their own
        # graph mode, whose eager calls install the hooks per call: the modules that had hooks
        # when the block opened (the eager capture's ops of hooks registered later are kept)
        self._hooks_at_entry: dict[int, set[int]] | None = None  # their hooks' ids, by module
        self._globals_at_entry: set[int] | None = None  # and the process-wide hooks' ids
        self._hooks_of: nn.Module | None = None  # whose forward hooks are running now
        self._reach = Reach()  # names(): which gradient keys a backward pass would produce
        self._inputs_at_pre: set[int] = set()  # modules whose inputs the pre-hook records
        self._mode: OpMode | None = None
        self._suspended = 0  # calls running without our function mode (lazy=True only)
        self.graph = graph
        self._runner: Any = None  # graph mode's GraphRunner
        self._root: nn.Module = model  # the module whose calls graph mode compiles

    # -- entering and leaving ------------------------------------------------------------------

    def __enter__(self) -> Snapshot:
        if self.open or self._used:
            raise TensorSnapError(
                "this capture() has already been entered, and a snapshot belongs to one block; "
                "call tensorsnap.capture(model, ...) again for each `with` block"
            )
        self._used = True
        self._thread = threading.get_ident()
        self.open = self.recorder.open = True
        try:
            if self.graph:
                self._enter_graph()
            else:
                self._install()
        except BaseException:
            self._close()
            raise
        return self.snapshot

    def _install(self) -> None:
        """Put the hooks and modes of the eager capture in place (removed by ``_close``)."""
        light = not (self.ops or self.inputs or self.grads or self.saved or self._deferred)
        if not light:
            pre = _module_hooks.register_module_forward_pre_hook(self._pre)
            self._handles.append(pre)
        post = _module_hooks.register_module_forward_hook(
            self._post_light if light else self._post, with_kwargs=True, always_call=True
        )
        self._handles.append(post)
        # torch's handle forgets the with_kwargs entry of a global hook (2.13): left there,
        # it would make torch.compile'd modules warn about global hooks forever after
        self._handles.append(DictEntry(_module_hooks, "_global_forward_hooks_with_kwargs", post.id))
        if self._globals_at_entry is not None:
            ours = {post.id} if light else {post.id, pre.id}
            tables = (_module_hooks._global_forward_pre_hooks, _module_hooks._global_forward_hooks)
            _before_later_hooks(tables, self._globals_at_entry, ours)
        if self.ops:
            self._guard_user_hooks()
        if self.inputs:
            self._watch_module_inputs(pre.id)
        if compiling_possible():
            # compiled code would skip our hooks silently, and a compiled wrapper around the
            # model (or a `model.compile()` call) need not be inside `model`: run all
            # compiled code eagerly while capturing
            if hasattr(torch.compiler, "set_stance"):
                self._enter(ForceEager())
            elif has_compiled_parts(self.model):  # torch < 2.6
                raise TensorSnapError(
                    f"the model holds torch.compile'd modules, and this torch "
                    f"({torch.__version__}) cannot run them eagerly while capturing "
                    "(torch.compiler.set_stance needs torch >= 2.6); capture the model "
                    "before compiling it, or upgrade torch"
                )
            # torch warns that global hooks fire once more for a compiled wrapper; ours skip
            # wrappers, so the warning would only be noise (and an error under -W error)
            self._enter(Ignored(UserWarning, r"Using `torch\.compile\(module\)` when there"))
        if self.saved:
            self._enter(torch.autograd.graph.saved_tensors_hooks(self._pack, unpack))
        if self.ops == "aten":
            self._op_name = aten_name
            self._enter(AtenMode(self._on_op))
        elif self.ops or self._deferred is not None:
            before = self._deferred.before if self._deferred is not None else None
            self._mode = OpMode(self._on_op if self.ops else None, before)
            self._enter(self._mode)

    # -- graph mode ------------------------------------------------------------------------------

    def _enter_graph(self) -> None:
        """Have the model's calls in this block run through its compiled graph (see _graph)."""
        from ._graph import CallSlot, GraphRunner, check_model, is_compiled_wrapper
        from ._graphmarks import Marks
        from ._graphnames import measure_operators

        root = self.model
        while "_orig_mod" in root._modules and is_compiled_wrapper(root):
            root = root._modules["_orig_mod"]  # type: ignore[assignment]
        check_model(root, self._modules, self._wrappers, self.names)
        self._root = root
        self._hooks_at_entry = {
            id(m): {*m._forward_pre_hooks, *m._forward_hooks}
            for m in self._modules
            if m._forward_pre_hooks or m._forward_hooks
        }
        measure_operators()
        self._enter(Marks())
        self._globals_at_entry = {
            *_module_hooks._global_forward_pre_hooks,
            *_module_hooks._global_forward_hooks,
        }
        if hasattr(torch.compiler, "set_stance"):
            # the user's compiled code (a wrapper of the model, a compiled function calling
            # it) runs eagerly, as in the eager capture: a graph it made of the model before
            # the block would run that graph, not ours (our own compiled call sets its stance
            # back, _graph)
            self._enter(ForceEager())
            # (torch warns that global hooks fire once more for a compiled wrapper called in
            # the block; they are ours, and skip wrappers)
            self._enter(Ignored(UserWarning, r"Using `torch\.compile\(module\)` when there"))
        self._runner = GraphRunner(
            root,
            self,
            self._eager_call,
            lambda start: [r.key for r in self.recorder.records_from(start)],
            self.names,
            self._modules,
            [m for m in root.modules() if id(m) in self._wrappers] if self._wrappers else [],
        )
        self._enter(self._runner)  # refuses calls of submodules outside the model's calls
        self._enter(CallSlot(root, self._graph_call))

    def _graph_call(self, *args: Any, **kwargs: Any) -> Any:
        """The root module's call while the block is open (its ``_compiled_call_impl``)."""
        root = self._root
        if not self.open or threading.get_ident() != self._thread or _in_backward() != -1:
            return root._call_impl(*args, **kwargs)
        for value in (*args, *kwargs.values()):
            if type(value).__name__ == "DTensor":
                raise TensorSnapError(
                    "graph=True cannot capture a model called with DTensor inputs (tensor "
                    "parallelism): capture it with graph=False"
                )
        before = len(self._runner.fallbacks)
        call = self._calls.get(id(root), 0)
        output = self._runner.call(args, kwargs)
        if len(self._runner.fallbacks) > before:
            from ._graph import warn_fallback

            warn_fallback(self._runner.fallbacks[-1])
        if self._runner.ran:
            if self._calls.get(id(root), 0) == call:  # the graph left the root's output to us
                self._calls[id(root)] = call + 1
                name = self.names[id(root)]
                key = call_key(name, call)
                if self.selected(key):
                    with _quiet():
                        self.recorder.record(key, name, call, None, "output", output)
            self._read_finite()
        return output

    def _eager_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call the graph cannot take, captured by the eager hooks and mode as without graph."""
        handles, contexts = len(self._handles), len(self._contexts)
        self._install()
        try:
            return self._root._call_impl(*args, **kwargs)
        finally:
            while len(self._contexts) > contexts:
                self._contexts.pop().__exit__(None, None, None)
            while len(self._handles) > handles:
                self._handles.pop().remove()
            self._stack.clear()
            self._hooked.clear()  # (the next call's install finds the hooks there are then)
            self._hooks_of = None
            self._target = None

    # the view of the session a graph's values are handed to (_graph.GraphSession)

    @property
    def plain(self) -> bool:
        return self._plain

    @property
    def calls(self) -> dict[int, int]:
        return self._calls

    @property
    def everything(self) -> bool:
        return self._all

    def selected(self, key: str) -> bool:
        return self._all or self.select(key)

    def _guard_user_hooks(self) -> None:
        """Keep the ops of other forward hooks on the model's modules out of the snapshot.

        Our process-wide hooks run before a module's own hooks, so its pre-hooks would look like
        part of its forward and its forward hooks like part of its caller's. Modules that have
        hooks get two more of ours, registered last, that mark where their forward starts and
        where their forward hooks end.
        """
        entry = self._hooks_at_entry
        for module in self._modules:
            if (module._forward_pre_hooks or module._forward_hooks) and (
                entry is None or id(module) in entry
            ):
                self._hooked.add(id(module))
                starts = module.register_forward_pre_hook(self._forward_starts)
                done = module.register_forward_hook(self._hooks_done, always_call=True)
                self._handles += [starts, done]
                if entry is not None:
                    tables = (module._forward_pre_hooks, module._forward_hooks)
                    _before_later_hooks(tables, entry[id(module)], {starts.id, done.id})

    def _watch_module_inputs(self, pre_hook: int) -> None:
        """Have ``P:in``/``P:kwargs`` recorded when each call of the model's modules starts.

        The process-wide pre-hook sees keyword arguments of the modules whose
        ``_forward_pre_hooks_with_kwargs`` holds its id (torch looks the id up there for global
        hooks too). Per-module hooks would do the same, but fused kernels (the encoder layer,
        MultiheadAttention) refuse to run when a module has hooks of its own, and the capture
        must keep the kernels a plain run uses. A module that does have pre-hooks gets one more
        of ours, registered last, so that its inputs are what its forward receives.
        """
        for module in self._modules:
            if module._forward_pre_hooks:
                self._handles.append(
                    module.register_forward_pre_hook(self._on_inputs, with_kwargs=True)
                )
            else:
                module._forward_pre_hooks_with_kwargs[pre_hook] = True
                self._handles.append(DictEntry(module, "_forward_pre_hooks_with_kwargs", pre_hook))
                self._inputs_at_pre.add(id(module))

    def _forward_starts(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() != self._thread:
            return
        if self._stack and self._stack[-1].module is module:
            self._stack[-1].quiet = False
            self._retarget()

    def _hooks_done(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._hooks_of is module and threading.get_ident() == self._thread:
            self._hooks_of = None
            self._retarget()

    def _retarget(self) -> None:
        top = self._stack[-1] if self._stack else None
        self._target = None if top is None or top.quiet or self._hooks_of is not None else top

    def _enter(self, context: AbstractContextManager[Any]) -> None:
        context.__enter__()
        self._contexts.append(context)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._close()
        deferred, self._deferred = self._deferred, None  # it holds a method of this session
        self.recorder.deferred = None
        spoiled = deferred.settle() if deferred is not None else []
        for key in spoiled:
            self.snapshot._drop(key)
        # checks still queued on a device: a value that failed stops the block here
        bad = self._finite.first() if self._finite is not None else None
        flush = getattr(self.snapshot._store, "flush", None)
        if flush is not None:  # a spill store: what is over the budget is on disk when we return
            try:
                flush()
            except TensorSnapError:
                if exc_type is None and bad is None:
                    raise  # else the block's own exception is the one to see
        if bad is not None and self._finite is not None:
            if exc_type is None:
                self.snapshot._drop_after(bad)
                raise self._finite.error(bad)
            if isinstance(exc, Exception) and hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"tensorsnap: {bad!r} was the first value with a NaN or Inf")
        if exc_type is None:
            if spoiled:
                raise TensorSnapError(
                    f"lazy capture: {', '.join(map(repr, spoiled))} were overwritten by writes "
                    "tensorsnap could not see (e.g. through .numpy(), DLPack or a C++ "
                    "extension), so they were dropped; capture without lazy=True to copy every "
                    "value when it is produced"
                )
            self.select.check()

    def _settled(self, key: str, copy: torch.Tensor) -> None:
        self.snapshot._store.put(key, copy, copy.nbytes)

    def _close(self) -> None:
        self.open = self.recorder.open = False
        for frame in reversed(self._stack):
            self._resume(frame)  # our mode goes back on the stack before its context exits
        while self._contexts:
            self._contexts.pop().__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        self._hooked.clear()
        self._hooks_of = None
        self._target = None
        # the mode and runner hold methods of this session: without them, the session (and
        # the snapshot it recorded into) is freed with its last reference, not by the cyclic GC
        self._mode = None
        self._runner = None

    # -- module calls ----------------------------------------------------------------------------

    def _pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> None:
        name = self.names.get(id(module))
        if name is None or threading.get_ident() != self._thread or _in_backward() != -1:
            if threading.get_ident() == self._thread and (
                id(module) in self._wrappers or (name is not None and _in_backward() != -1)
            ):
                # a wrapper's own forward (FSDP's unshard views, DDP's input moves) is not the
                # model's, and neither is a forward that activation checkpointing re-runs
                # during backward: a quiet frame keeps their ops and calls out of the snapshot
                frame = _Frame(module, "", 0)
                frame.quiet = frame.wrapper = True
                self._stack.append(frame)
                self._target = None
            return None
        calls = self._calls
        call = calls.get(id(module), 0)
        calls[id(module)] = call + 1
        frame = _Frame(module, name, call)
        stack = self._stack
        if stack:
            stack[-1].children += 1
        stack.append(frame)
        if self._hooked and id(module) in self._hooked:
            frame.quiet = True  # until its own pre-hooks are done (_forward_starts)
            self._target = None
        else:
            self._target = None if self._hooks_of is not None else frame
        if self.saved:
            frame.saved = []
        if self.grads and torch.is_grad_enabled():
            with _quiet():
                self._watch_inputs(frame, args)
        if self._inputs_at_pre and id(module) in self._inputs_at_pre:
            with _quiet():
                self._record_inputs(frame, args, kwargs)
        if self._deferred is not None and not self.ops and isinstance(module, _FUSED):
            self._suspend(frame)
        return None

    def _watch_inputs(self, frame: _Frame, args: tuple[Any, ...]) -> None:
        """Note where this call's inputs sit in the graph; their gradients are read at _post."""
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return
        key = f"{frame.key}:grad_in"
        if self.select(key):
            sink = None if self.dry else self.recorder  # names(): noted at _ended instead
            frame.grad_in = InputGradients(sink, key, frame.name, frame.call, args)

    def _on_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if threading.get_ident() != self._thread or not self._stack:
            return  # another thread's call of a model this session watches
        frame = self._stack[-1]
        if frame.module is not module or frame.wrapper:
            return  # not this call's frame, or a wrapper's or a checkpoint re-run's
        with _quiet():
            self._record_inputs(frame, args, kwargs)

    def _record_inputs(
        self, frame: _Frame, args: tuple[Any, ...], kwargs: dict[str, Any] | None
    ) -> None:
        key = f"{frame.key}:in"
        if self.select(key):
            self.recorder.record(key, frame.name, frame.call, None, "input", args)
        if kwargs:
            key = f"{frame.key}:kwargs"
            if self.select(key):
                self.recorder.record(key, frame.name, frame.call, None, "kwargs", kwargs)

    def _post(self, module: nn.Module, args: tuple[Any, ...], *rest: Any) -> None:
        # torch calls always_call hooks with (module, args, result) when forward raised, and
        # with (module, args, kwargs, result) when it returned
        stack = self._stack
        if not stack or threading.get_ident() != self._thread:
            return
        frame: _Frame | None = stack[-1]
        if stack[-1].module is module:
            stack.pop()
        else:
            frame = self._pop(module)  # an inner call raised without our hook seeing it end
        if frame is not None and frame.resumes is not None:
            self._resume(frame)
        if frame is not None and not frame.wrapper and len(rest) == 2:
            if self._hooked and id(module) in self._hooked:
                self._hooks_of = module
            self._retarget()
            with _quiet():
                self._ended(frame, module, rest[1])
        else:
            self._retarget()
        if module is self.model and len(rest) == 2:
            self._read_finite()

    def _ended(self, frame: _Frame, module: nn.Module, output: Any) -> None:
        """A module call returned ``output``: record it, and what waited for it to end."""
        if frame.saved:
            self._record_saved(f"{frame.key}:saved", frame, None)
        if self._all or self.select(frame.key):
            self.recorder.record(frame.key, frame.name, frame.call, None, "output", output)
        if self.grads and torch.is_grad_enabled():
            key = f"{frame.key}:grad"
            if self.select(key):
                self._watch_grads(key, frame, None, "grad", output)
            grad_in = frame.grad_in
            if grad_in is None:
                pass
            elif not self.dry:
                self._handles.extend(grad_in.watch(output))
            elif self._reach.inputs(grad_in.key, grad_in, output):
                record = make_record(grad_in.key, frame.name, frame.call, None, "grad_in", None)
                self.snapshot._add(record, None)
        if frame.children == 0 and module._modules and isinstance(module, _FASTPATH):
            self._warn_fastpath(module, frame.name)

    def _post_light(self, module: nn.Module, args: tuple[Any, ...], *rest: Any) -> None:
        """The only hook when nothing but module outputs is captured: no frames, no stack.

        Call numbers are then given when calls end, not when they start; they differ only for a
        module that calls itself.
        """
        name = self.names.get(id(module))
        if name is None or threading.get_ident() != self._thread or _in_backward() != -1:
            if name is None and module is self.model and len(rest) == 2:
                self._read_finite()  # a wrapper around the model returned
            return  # not ours, or re-run by activation checkpointing during backward
        call = self._calls.get(id(module), 0)
        self._calls[id(module)] = call + 1
        if len(rest) != 2:  # forward raised; the call still counts, as with frames
            return
        key = call_key(name, call)
        if self._all or self.select(key):
            if torch._C._is_torch_function_mode_enabled():
                with _quiet():
                    self.recorder.record(key, name, call, None, "output", rest[1])
            else:
                self.recorder.record(key, name, call, None, "output", rest[1])
        if module._modules and isinstance(module, _FASTPATH):
            children = module._modules.values()
            if not any(self._calls.get(id(child)) for child in children if child is not None):
                self._warn_fastpath(module, name)
        if module is self.model:
            self._read_finite()

    def _pop(self, module: nn.Module) -> _Frame | None:
        stack = self._stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].module is module:
                frame = stack[i]
                for inner in stack[i + 1 :]:
                    self._resume(inner)
                del stack[i:]
                return frame
        return None

    def _suspend(self, frame: _Frame) -> None:
        """Let a fused kernel run as in a plain run: take our function mode off for the call.

        ``lazy=True`` watches writes through a function mode, and any active mode makes the
        encoder layer and MultiheadAttention refuse their fused kernels (a different kernel,
        different last bits). When ours is the only mode, it is off until the call ends, and
        values captured meanwhile are copied at once: writes inside the call go unseen.
        """
        if self._mode is None or torch._C._len_torch_function_stack() != 1:
            return  # another mode is active: a plain run would not use the fused kernel either
        mode = torch._C._pop_torch_function_stack()
        if mode is not self._mode:
            torch._C._push_on_torch_function_stack(mode)
            return
        frame.resumes = mode
        self._suspended += 1
        self.recorder.hold = False

    def _resume(self, frame: _Frame) -> None:
        if frame.resumes is not None:
            torch._C._push_on_torch_function_stack(frame.resumes)
            frame.resumes = None
            self._suspended -= 1
            self.recorder.hold = self._suspended == 0

    def _warn_fastpath(self, module: nn.Module, name: str) -> None:
        if id(module) in self._warned:
            return
        self._warned.add(id(module))
        warnings.warn(
            f"{type(module).__name__} {name!r} ran its fused fast path, which skips "
            "its submodules, so they have no keys; capture keeps the kernels a plain run uses. "
            "To see the submodules, capture in train mode, with gradients enabled, or after "
            "torch.backends.mha.set_fastpath_enabled(False)",
            TensorSnapWarning,
            stacklevel=2,
        )

    # -- ops -------------------------------------------------------------------------------------

    def _on_op(self, func: Any, result: Any) -> None:
        frame = self._target
        if frame is None:
            return  # run by the code around the model, by hooks, or inside a quiet call
        name = self._op_name(func)  # torch-level or ATen naming, each with its own cache
        key = frame.op_key(name)
        if frame.saved:
            self._record_saved(f"{key}:saved", frame, name)
        if self._all or self.select(key):
            self.recorder.record(key, frame.name, frame.call, name, "op", result)
        if self.grads and torch.is_grad_enabled():
            grad_key = f"{key}:grad"
            if self.select(grad_key):
                self._watch_grads(grad_key, frame, name, "op_grad", result)

    # -- saved for backward ----------------------------------------------------------------------

    def _pack(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self._stack and threading.get_ident() == self._thread:
            frame = self._stack[-1]
            saved = frame.saved
            if saved is not None:
                if self.ops or self.dry or not self.select(f"{frame.key}:saved"):
                    saved.append(t)
                else:
                    # recorded only when the call ends: copy now, before later in-place ops
                    saved.append(self.recorder.copy_value(t, f"{frame.key}:saved"))
        # with pack hooks autograd no longer checks saved tensors' versions: unpack does
        return t, t._version

    def _record_saved(self, key: str, frame: _Frame, op: str | None) -> None:
        tensors, frame.saved = tuple(frame.saved or ()), []
        if not self.select(key):
            return
        if self.ops or self.dry:
            self.recorder.record(key, frame.name, frame.call, op, "saved", tensors)
            return
        # _pack already copied them
        self.snapshot._add(make_record(key, frame.name, frame.call, op, "saved", tensors), tensors)
        self.recorder.check_finite(key, tensors)

    # -- recording --------------------------------------------------------------------------------

    def _watch_grads(self, key: str, frame: _Frame, op: str | None, kind: str, value: Any) -> None:
        if self.dry:
            if self._reach.value(key, value):
                self.snapshot._add(make_record(key, frame.name, frame.call, op, kind, None), None)
            return
        gradients = Gradients(self.recorder, key, frame.name, frame.call, op, kind, value)
        self._handles.extend(gradients.handles)

    def _read_finite(self) -> None:
        # the model's call returned: read the checks queued on devices, once per call
        if self._finite is not None and threading.get_ident() == self._thread:
            self._finite.read()


def capture(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    ops: bool | str = False,
    inputs: bool = False,
    grads: bool = False,
    saved: bool = False,
    nonfinite: str | None = None,
    lazy: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_memory: int | str | None = None,
    spill_dir: str | None = None,
    gather: bool = False,
    stats: bool = False,
    graph: bool = False,
) -> AbstractContextManager[Snapshot]:
    """Copy the tensors ``model`` produces inside the block, each at the moment it is produced.

    Keys (the README's "Keys" table): ``P`` (module output), ``P:in``/``P:kwargs`` (inputs),
    ``P:grad`` and ``P:grad_in`` (gradients), ``P#n`` (later calls), ``C/op`` and ``C/op#k``
    (functional ops run by module call ``C``), ``C/op:grad``, and ``C:saved``/``C/op:saved``
    (tensors autograd saved for backward, a tuple).

    Args:
        model: The module to watch; its submodules are named as in ``model.named_modules()``.
        include: Glob pattern(s) over keys to copy (default: all). A pattern that matched no
            key raises :class:`TensorSnapError` when the block ends normally.
        exclude: Glob pattern(s) over keys not to copy.
        ops: Also capture the outputs of torch-level ops run directly by each module call
            (``True``), or of the ATen ops beneath them (``"aten"``: keys ``C/aten.addmm``;
            sees inside fused Python functions, and makes compiled code run eagerly).
        inputs: Also capture module inputs (``P:in``, ``P:kwargs``).
        grads: Also capture gradients of module outputs, inputs and (with ``ops``) op outputs,
            for backward passes run inside the block. A gradient has its value's structure
            (tuples, dicts, ``ModelOutput``, caches and other objects, ``PackedSequence``) with
            None where no gradient flowed, e.g. into a view used only for its shape; a key
            exists once some gradient arrived. ``P:grad_in`` holds, at each position, the
            gradient into that input through the call: every position holding one tensor gets
            it, and an input the call returns as it is (``Identity``, eval ``Dropout``) gets
            that tensor's gradient, i.e. ``P:grad``.
        saved: Also capture the tensors autograd saves for backward, per op or module call.
        nonfinite: ``"raise"`` stops at the first captured value holding a NaN or Inf with a
            :class:`NonFiniteError` naming its key; the snapshot so far stays readable.
        lazy: Defer copies: keep a reference to each captured tensor and copy it only right
            before a tracked in-place op would overwrite it, or at the end of the block if
            something outside the snapshot can still reach it; a tensor nobody else can reach is
            never copied. Tracked writes are torch-level in-place ops, ``out=`` arguments and
            ``inplace=True`` flags seen by the function mode; a write it cannot see (through
            ``.numpy()``, DLPack, C++ extensions) is caught by the version counter when it bumps
            it, and the value is refused, never returned wrong. Writes that bump no version
            counter (``.numpy()`` writes) cannot be detected: leave ``lazy`` off (the default)
            where such writes happen. Values that were views of each other in the model may
            share storage in the snapshot. It saves time where values are large; with many
            small values it is slower than copying them.
        device: Where copies are kept (default: where each value was produced). With
            ``"cpu"`` the copies from a GPU are queued (non-blocking, through a small pinned
            ring) and complete when the block ends, or when a key is read; they are plain CPU
            tensors.
        dtype: Cast floating-point copies to this dtype.
        max_memory: Bytes (or ``"2GB"``) of copies kept in memory, host and GPU memory counted
            together; the rest spill to disk. A spilled GPU copy reads back as a new copy on its
            GPU at each read.
        spill_dir: Where spilled copies go (default: a temporary directory).
        gather: Under tensor parallelism, store each DTensor value as its full tensor, gathered
            from the ranks when it is produced (a collective: every rank must capture with the
            same options). By default a DTensor is copied as a DTensor around a copy of this
            rank's local tensor, with no communication; ``to_local()`` and ``placements`` read
            it, and ``tensorsnap.load(path, assemble=True)`` rebuilds full tensors from a saved
            multi-rank bundle.
        stats: Keep a :class:`tensorsnap.Stats` record (shape, dtype, min, max, mean, std,
            absmax, L2 norm, NaN and Inf counts, a digest of the bytes) in place of every
            captured tensor, and no tensor: memory grows with the number of keys, not with their
            sizes. The reductions stay on the tensors' devices and are read back together at
            the end of the block. Not with ``lazy``, ``nonfinite``, ``device``, ``dtype`` or
            ``max_memory``, which are about copies.
        graph: With ``ops=True``: take the same keys and values from a dynamo graph of the
            model, compiled on its first call and reused by later calls and blocks, and run
            as eager code (the kernels of a plain run). Values are copied only where a later
            op of the graph overwrites them or the caller can reach them. A call dynamo
            cannot take whole (a graph break, a construct graph mode cannot name) runs
            through the eager capture instead, with a :class:`TensorSnapWarning` naming why.
            Not with ``grads``, ``saved``, ``inputs``, ``lazy`` or ``ops="aten"``, nor for
            models with forward hooks of their own, wrappers or DTensor inputs.

    Returns:
        A context manager whose ``__enter__`` returns the :class:`Snapshot`, filled as the
        model runs.

    Example:
        >>> import torch, tensorsnap
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(inplace=True))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.eye(2)), model[0].bias.zero_()
        >>> with tensorsnap.capture(model, ops=True) as snap:
        ...     out = model(torch.tensor([[-1.0, 2.0]]))
        >>> list(snap)
        ['0/linear', '0', '1/relu', '1', '']
        >>> snap["0"].tolist(), out.tolist()  # the Linear output, before ReLU rewrote it in place
        ([[-1.0, 2.0]], [[0.0, 2.0]])
    """
    return _Session(
        model,
        include=include,
        exclude=exclude,
        ops=ops,
        inputs=inputs,
        grads=grads,
        saved=saved,
        nonfinite=nonfinite,
        lazy=lazy,
        device=device,
        dtype=dtype,
        max_memory=max_memory,
        spill_dir=spill_dir,
        gather=gather,
        stats=stats,
        graph=graph,
    )


def names(
    model: nn.Module,
    *args: Any,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    ops: bool | str = False,
    inputs: bool = False,
    grads: bool = False,
    saved: bool = False,
    **kwargs: Any,
) -> list[str]:
    """List the keys ``capture`` would produce for ``model(*args, **kwargs)``, copying nothing.

    The model runs once (under ``no_grad`` unless ``grads`` or ``saved`` is set). Gradient keys
    are listed, in forward order, for the values that a backward pass from the model's output
    reaches (a real backward pass produces them in its own order, and only for the values its
    loss depends on).

    Example:
        >>> import torch, tensorsnap
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> tensorsnap.names(model, torch.randn(2, 4))
        ['0', '1', '']
    """
    session = _Session(
        model,
        include=include,
        exclude=exclude,
        ops=ops,
        inputs=inputs,
        grads=grads,
        saved=saved,
        dry=True,
    )
    grad_mode = nullcontext() if grads or saved else torch.no_grad()
    with grad_mode, session as snap:
        output = model(*args, **kwargs)
    unreached = session._reach.unreached(output)
    return [key for key in snap if key not in unreached]


def _before_later_hooks(
    tables: tuple[dict[int, Any], ...], entry: set[int], ours: set[int]
) -> None:
    """Move the hooks registered since a graph-mode block opened after ours, in each table.

    Graph mode installs the eager capture's hooks for each call it runs eagerly, where the
    eager capture installs them when its block opens (``entry``: the hooks there were then):
    hooks registered in the block run after the capture's, so their values and ops are those
    of the caller, not the module. A hook prepended in the block (``prepend=True``, before
    every hook of the table) stays where it is, before the capture's, as there.
    """
    for table in tables:
        keys = list(table)
        first = next((i for i, key in enumerate(keys) if key in entry), 0)
        for key in keys[first:]:
            if key not in entry and key not in ours:
                table[key] = table.pop(key)  # to the end
