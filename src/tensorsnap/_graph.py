"""Graph mode: the op capture taken from a dynamo graph of the model, compiled once and reused.

``capture(model, ops=True, graph=True)`` has dynamo trace the model's whole call into one FX
graph, with a backend of ours that runs the graph as eager Python (no inductor: the same
kernels, in the same order, as a plain run) and hands the captured values to the session when
the graph returns (:mod:`._graphplan` names them and decides their copies; :mod:`._graphmarks`
marks where module calls return). For the block, the root module's ``_compiled_call_impl``
(torch's slot for ``model.compile()``) is ours, and restored exactly after.

A call dynamo cannot take whole (a graph break, an unsupported construct) raises before
anything of the model runs; :class:`GraphRunner` then runs that call through the eager capture,
so nothing is ever lost (see :meth:`GraphRunner.call`).
"""

from __future__ import annotations

import contextlib
import operator
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
import torch._dynamo
from torch import fx, nn

from . import _graphmarks
from ._errors import TensorSnapError, TensorSnapWarning
from ._graphplan import GraphSession, Plan, Unsupported, torch_dir
from ._keys import call_key

__all__ = ["CallSlot", "GraphRunner", "check_model", "is_compiled_wrapper", "warn_fallback"]

# ---- the model a block may compile ---------------------------------------------------------


def is_compiled_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule"


def check_model(
    root: nn.Module, modules: list[nn.Module], wrappers: set[int], names: dict[int, str]
) -> None:
    """Refuse, by name, models whose graph could not give the eager capture's keys."""
    if wrappers and any(not is_compiled_wrapper(m) for m in root.modules() if id(m) in wrappers):
        raise TensorSnapError(
            "graph=True cannot capture through DDP, FSDP or checkpoint wrappers (their hooks "
            "and collectives run outside the model's graph); capture with graph=False"
        )
    for module in modules:  # (the named modules: compiled wrappers are not among them)
        if module.__dict__.get("_compiled_call_impl") is not None and module is not root:
            raise TensorSnapError(
                f"graph=True cannot compile module {names.get(id(module), '?')!r}, which is "
                "torch.compile'd on its own; capture the model with graph=False"
            )
    if isinstance(root.__dict__.get("_compiled_call_impl"), _GraphCall):
        raise TensorSnapError(
            "this model is already captured in graph mode by an open block; nested graph-mode "
            "captures of one model are not supported (nest an eager capture instead)"
        )


class _GraphCall:
    """The root module's ``_compiled_call_impl`` during a graph-mode block."""

    __slots__ = ("call",)

    def __init__(self, call: Any) -> None:
        self.call = call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)


class CallSlot:
    """Sets ``module._compiled_call_impl`` for the block and restores exactly what was there."""

    def __init__(self, module: nn.Module, call: Any) -> None:
        self.module, self.call = module, _GraphCall(call)
        self.had = False
        self.old: Any = None

    def __enter__(self) -> None:
        state = self.module.__dict__
        self.had = "_compiled_call_impl" in state
        self.old = state.get("_compiled_call_impl")
        state["_compiled_call_impl"] = self.call

    def __exit__(self, *exc: Any) -> None:
        state = self.module.__dict__
        if self.had:
            state["_compiled_call_impl"] = self.old
        else:
            state.pop("_compiled_call_impl", None)


def warn_fallback(reason: str) -> None:
    warnings.warn(
        f"graph=True: the model's calls run through the eager capture instead of its graph "
        f"({reason}); keys and values are the same, only slower",
        TensorSnapWarning,
        stacklevel=5,  # the model's call: _graph_call, _GraphCall, torch's __call__, the caller
    )


# ---- compiling and running ---------------------------------------------------------------------


def _call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return model._call_impl(*args, **kwargs)


class _Active(threading.local):
    session: GraphSession | None = None
    ran = False


_active = _Active()


class _Tracing:
    """The process-wide switches of one graph-mode call.

    ``_TRACING`` has dynamo trace the marks, and :class:`._graphmarks.KeepIndexing` acts on
    this thread's traces. The fused fast paths of the encoder layer and
    MultiheadAttention are turned off, as the eager op capture's function mode turns them off
    (a function mode makes them refuse), so that the graph holds the same ops.
    """

    __slots__ = ("fastpath",)

    def __enter__(self) -> None:
        _graphmarks._TRACING = True
        self.fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        _graphmarks.KeepIndexing.local.ours = True

    def __exit__(self, *exc: Any) -> None:
        _graphmarks.KeepIndexing.local.ours = False
        _graphmarks._TRACING = False
        torch.backends.mha.set_fastpath_enabled(self.fastpath)


class _Stance:
    """The "default" compile stance for dynamo's way into our compiled call, if another was set.

    A graph-mode block runs with the stance "force_eager", so that the user's compiled code
    (a wrapper of the model, a function calling it) calls the model's own ``__call__``, which
    is ours for the block; an eager capture open in another thread sets it too. Our graph must
    still be made. (The direct call of a graph whose guards pass needs no stance.)
    """

    __slots__ = ("inner",)

    def __enter__(self) -> None:
        stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", None)
        # None: a torch without stances (< 2.6), where nothing can have set one
        self.inner = None if stance in (None, "default") else torch.compiler.set_stance("default")
        if self.inner is not None:
            self.inner.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.inner is not None:
            self.inner.__exit__(*exc)


def _hook_guards() -> Any:
    """dynamo's guards on modules' hooks, which it skips by default, for the graphs it makes.

    A graph holds the hooks of the modules it calls; guarded, a hook registered, removed or
    replaced on any of them (a module the model holds in a plain list too) makes dynamo make
    another graph. :class:`_Unguarded` also reads the model's own modules' hooks, and what
    dynamo does not guard even so, their classes' ``forward``.
    """
    if not hasattr(torch._dynamo.config, "skip_nnmodule_hook_guards"):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)


class _Skipped(Exception):
    """dynamo would run the call as plain Python, uncaptured: the eager capture must."""


def _dynamo_skips() -> str | None:
    """Why dynamo would not trace a call now, where it would run the frame as it is."""
    if torch._C._len_torch_dispatch_stack():
        return "a TorchDispatchMode is active, and dynamo does not trace under one"
    if torch._dynamo.config.disable:
        return "dynamo is disabled (torch._dynamo.config.disable)"
    return None


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
        self._code = code
        self._direct: dict[types.CodeType, Callable[..., Any]] = {}  # dynamo's code -> function
        self.unguarded: tuple[Any, ...] = ()  # what the graphs hold that dynamo does not guard

    def drop_graphs(self, unguarded: tuple[Any, ...]) -> None:
        """Have dynamo make new graphs, for modules whose hooks or forward changed.

        dynamo never guards a module class's ``forward``, and guards hooks only where
        :func:`_hook_guards` has it do so: a graph made before would still run. Dropping the
        graphs also lets a model sent eagerly by a hook's ops (``eager``) take the graph again
        once the hook is gone, which dynamo's guards alone would not.
        """
        self.unguarded = unguarded
        self._direct.clear()
        self.eager = None  # (the reason may have been the hooks' ops: the new graph is checked)
        reset = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
        reset = getattr(reset, "reset_code", None)
        if reset is None:  # a torch without it: the graphs cannot be dropped
            self.eager = "the hooks or forward of a module changed after its graph was made"
        else:
            reset(self._code)

    def call(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the model's call through the first of its graphs whose guards pass, or dynamo.

        dynamo's own way in (its frame evaluation, stance and context wrappers) costs as much
        as 0.2 ms a call on a small model; a graph whose guards pass is run here by calling
        the code dynamo made for it, as dynamo does once its guards passed. No graph passing
        (new shapes, a changed module), or a torch without these internals: dynamo decides,
        compiling a new graph if need be.
        """
        if _cache_entries is not None:
            frame = {"model": model, "args": args, "kwargs": kwargs}
            for entry in _cache_entries(self._code):
                code = getattr(entry, "code", None)
                guards = getattr(entry, "guard_manager", None)
                function = self._direct.get(code) or self._function(code)  # type: ignore[arg-type]
                if function is None or guards is None:
                    break
                if _passes(guards, frame):
                    return function(model, args, kwargs)
        skipped = _dynamo_skips()
        if skipped is not None:
            raise _Skipped(skipped)
        with _Stance(), _hook_guards():
            return self.fn(model, args, kwargs)

    def _function(self, code: types.CodeType | None) -> Callable[..., Any] | None:
        """A function running ``code`` (dynamo's code for one graph), or None if it cannot be
        called as a plain function of the call's three arguments."""
        if (
            not isinstance(code, types.CodeType)
            or code.co_argcount != 3
            or code.co_freevars
            or code.co_cellvars
        ):
            return None
        if len(self._direct) >= 64:  # graphs dynamo dropped (torch._dynamo.reset())
            self._direct.clear()
        function = self._direct[code] = types.FunctionType(code, _call.__globals__)
        return function

    def _backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        model = self._model()
        if model is None:
            raise Unsupported("the model is gone")
        code = gm.code
        checked = self.checked.get(code, "")
        if checked:  # a reason: keys differ
            raise Unsupported(checked)
        asking = _asks_if_compiled()
        if asking is not None:
            raise Unsupported(
                f"{asking} asks whether it is being compiled, and a graph holds the compiled "
                "branch, which may compute other values than an eager run"
            )
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


# dynamo's cache entries for a code object, most recently used first (torch >= 2.1)
_cache_entries = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", None)


def _passes(guards: Any, frame: dict[str, Any]) -> bool:
    try:
        return bool(guards.check(frame))
    except Exception:  # a guard that cannot be read here: dynamo evaluates it instead
        return False


# the names by which code asks whether it runs compiled (torch's, and transformers' helpers)
_ASKING = frozenset(
    {
        "is_compiling",
        "is_dynamo_compiling",
        "is_exporting",
        "is_torchdynamo_compiling",
        "is_torchdynamo_exporting",
        "is_tracing",
    }
)
# functions of transformers (5.x) that ask, read to see that their compiled branch either runs
# the same ops with the same values (argument renames, pytree registration, a ContextVar, the
# helpers that ask) or other ops, which the check of the graph's keys against an eager run finds
# (mask skipping, grouped-query packing for one-token decoding, the padding warning's check)
_READ = frozenset(
    {
        ("transformers/integrations/sdpa_attention.py", "sdpa_attention_forward"),
        ("transformers/masking_utils.py", "_ignore_bidirectional_mask_sdpa"),
        ("transformers/masking_utils.py", "_ignore_causal_mask_sdpa"),
        ("transformers/modeling_utils.py", "warn_if_padding_and_no_attention_mask"),
        ("transformers/utils/deprecation.py", "wrapped_func"),
        ("transformers/utils/generic.py", "_register_model_output_pytree_node"),
        ("transformers/utils/generic.py", "_rename_kwargs_for_bc"),
        ("transformers/utils/generic.py", "_replace_old_cache_name"),
        ("transformers/utils/import_utils.py", "is_torchdynamo_compiling"),
        ("transformers/utils/import_utils.py", "is_torchdynamo_exporting"),
        ("transformers/utils/import_utils.py", "is_tracing"),
        ("transformers/utils/output_capturing.py", "set"),
    }
)


def _asks_if_compiled() -> str | None:
    """A function dynamo traced for this graph that asks whether it runs compiled, or None.

    dynamo traces ``torch.compiler.is_compiling()`` as True, so a graph holds the compiled
    branch: where both branches run ops of the same names (``2.0 if is_compiling() else
    3.0``), the check of the graph's keys cannot tell, and the values would be the compiled
    branch's. Such code runs eagerly instead. torch's own code and ours ask to decide how to
    trace, not what to compute; the transformers functions in ``_READ`` were read.
    """
    from torch._guards import TracingContext

    torch_path = torch_dir()
    own = __file__.rsplit("/", 1)[0] + "/"
    for code in TracingContext.get_traced_code() or ():
        if not _ASKING.intersection(code.co_names):
            continue
        path = code.co_filename
        if path.startswith((torch_path, own)):
            continue
        if any(path.endswith(f) and code.co_name == name for f, name in _READ):
            continue
        return f"{code.co_name}() ({path}:{code.co_firstlineno})"
    return None


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
        names: dict[int, str],
        modules: list[nn.Module],
        wrappers: list[nn.Module],
    ) -> None:
        self.model = model
        self.session = session
        self._eager = eager  # runs one call through the eager capture
        self._produced = produced  # the keys the snapshot got after its first n
        with _compiled_lock:
            compiled = _compiled.get(model)
            if compiled is None:
                compiled = _compiled[model] = _Compiled(model)
        self.compiled = compiled
        self.fallbacks: list[str] = []  # why calls ran eagerly, once per reason
        self.ran = False  # whether the last call ran through the graph
        self._depth = 0  # calls of the model in progress (a model may call itself)
        self._thread = threading.get_ident()
        self._modules = names  # the model's modules' names, by id (the session's)
        self._unguarded = _Unguarded(modules)
        self._wrappers = [m.__dict__ for m in wrappers]  # torch.compile wrappers in the model

    def __enter__(self) -> None:
        _graphmarks.watchers.append(self.watch)

    def __exit__(self, *exc: Any) -> None:
        _graphmarks.watchers.remove(self.watch)

    def watch(self, module: nn.Module) -> None:
        """Refuse a call of one of the model's modules made outside a call of the model.

        The eager capture's process-wide hooks would capture it (``model.encoder(x)`` in the
        block); graph mode sees only the calls of the model itself, and would lose the call's
        values and misnumber the keys of the module's later calls.
        """
        if self._depth or module is self.model or id(module) not in self._modules:
            return
        if threading.get_ident() != self._thread or torch._C._current_graph_task_id() != -1:
            return  # not captured by the eager capture either
        if is_compiled_wrapper(module):
            return
        raise TensorSnapError(
            f"graph=True captures the calls of the model itself, and its module "
            f"{self._modules[id(module)]!r} was called on its own in the block; capture with "
            "graph=False to capture such calls"
        )

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One call of the model in the block, captured from its graph if dynamo takes it whole.

        Dynamo compiles before it runs anything of the model, so a call it refuses (a graph
        break, an op graph mode cannot name, a graph whose keys are still to be checked) has
        not started when the refusal arrives, and runs through the eager capture instead, with
        nothing lost or counted twice.
        """
        if _graphmarks.tracing():
            # a user's torch.compile'd function calls the model: its trace stops here (a graph
            # break), and the call runs as in eager code, compiled by us or captured eagerly
            return _untraced(self, args, kwargs)
        return self._counted(args, kwargs)

    def _counted(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._depth:
            # the model calls itself: the call in progress runs eagerly (dynamo refuses the
            # recursion), and its hooks and mode capture this one as part of it
            return self.model._call_impl(*args, **kwargs)
        self._depth += 1
        try:
            return self._call(args, kwargs)
        finally:
            self._depth -= 1

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        compiled = self.compiled
        self.ran = False
        if _others_hooked():
            # another capture (or the user) has process-wide module hooks: dynamo would trace
            # them into the graph; this call runs eagerly, later ones may use the graph again
            self._note("process-wide module hooks other than graph mode's are registered")
            return self._eager(args, kwargs)
        if self._wrappers and any(chain.from_iterable(map(_HOOK_TABLES, self._wrappers))):
            # dynamo traces through a torch.compile wrapper into the module it wraps, without
            # the wrapper's own hooks: this call runs eagerly, later ones may use the graph
            self._note("a torch.compile wrapper in the model has hooks of its own")
            return self._eager(args, kwargs)
        unguarded = self._unguarded.now()
        if unguarded != compiled.unguarded:
            compiled.drop_graphs(unguarded)
        if compiled.eager is None:
            previous, _active.session, _active.ran = _active.session, self.session, False
            modes = _Modes()
            compiled.pending = None
            try:
                with _Tracing():
                    output = compiled.call(self.model, args, kwargs)
            except _Skipped as skipped:
                _active.session = previous
                self._note(str(skipped))  # later calls may take the graph again
                return self._eager(args, kwargs)
            except Exception as error:
                if _active.ran or not _is_refusal(error):
                    modes.restore()  # a graph raising sets no mode back, as a `with` would
                    raise
                _forget(error)
                pending, compiled.pending = compiled.pending, None
                if pending is not None and _is_verify(error):
                    _active.session = previous
                    return self._check(pending, args, kwargs)
                if type(error).__name__ in _LIMIT_HIT:
                    # no new graph for this call's guards; the graphs already made still run
                    _active.session = previous
                    self._note(
                        "dynamo's recompile limit (torch._dynamo.config.recompile_limit) was "
                        "reached for the model's inputs of this call"
                    )
                    return self._eager(args, kwargs)
                compiled.eager = _reason(error)
            else:
                if not _active.ran:
                    raise TensorSnapError(
                        "graph mode: torch ran the model without its compiled graph (dynamo's "
                        "recompile limit, torch._dynamo.config.recompile_limit, may have been "
                        "reached), so this call's values were not captured; capture with "
                        "graph=False, or give the model inputs of fewer distinct shapes"
                    )
                self.ran = True
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
        base = plan.base(calls)
        root = call_key(self._modules[id(self.model)], calls.get(id(self.model), 0))
        start = len(self._produced(0))
        output = self._eager(args, kwargs)
        got = self._produced(start)
        expected = [row[0] for row in plan._rows_for(base)] + ([] if plan.root else [root])
        expected = [key for key in expected if session.selected(key)]
        reason = None
        if got != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                min(len(got), len(expected)),
            )
            eager_key = got[at] if at < len(got) else "(none)"
            graph_key = expected[at] if at < len(expected) else "(none)"
            hooked = sorted(_own_hooks(self._modules, self.model).values())
            module = graph_key.split("/")[0].split("#")[0]
            if module in hooked:  # its hooks' ops: the module's forward's, in a graph
                why = (
                    f"module {module!r} has forward hooks of its own that run ops, which a "
                    "graph holds as part of its forward"
                )
            else:
                why = "e.g. library code that runs other ops when compiled" + (
                    f", or forward hooks of modules {', '.join(map(repr, hooked[:3]))} that run ops"
                    if hooked
                    else ""
                )
            reason = (
                f"its graph would give key {graph_key!r} where the eager capture gives "
                f"{eager_key!r}: {why}"
            )
            self.compiled.eager = reason
            self._note(reason)
        self.compiled.checked[code] = reason
        return output


_untraced = torch._dynamo.disable(GraphRunner._counted)


class _Unguarded:
    """What of the model's modules a graph holds and dynamo does not guard: hooks and forwards.

    Read at each call (a hook may be registered inside the block, or a module's hook dict
    replaced to clear it): the modules' ``__dict__`` and classes are gathered once per block.
    Hooks are told by their handles' ids, which torch never gives twice (holding the hooks
    themselves would keep what they refer to, the model maybe, as long as its compiled call).
    Forward hooks and pre-hooks are traced into the graph, and the backward ones set up in it
    (a module call with backward hooks wraps its inputs and outputs).
    """

    __slots__ = ("classes", "dicts")

    def __init__(self, modules: list[nn.Module]) -> None:
        self.classes: list[type[nn.Module]] = list(dict.fromkeys(map(type, modules)))
        self.dicts = [m.__dict__ for m in modules]

    def now(self) -> tuple[Any, ...]:
        forwards = tuple([cls.forward for cls in self.classes])
        tables = list(map(_HOOK_TABLES, self.dicts))
        if not any(chain.from_iterable(tables)):
            return forwards, ()
        hooked = [(i, *map(tuple, t)) for i, t in enumerate(tables) if any(t)]
        return forwards, tuple(hooked)


_HOOK_TABLES = operator.itemgetter(
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"
)


class _Modes:
    """Grad mode and autocast as a call found them, set back where a graph raised.

    A graph enters the forward's ``no_grad()`` or ``autocast()`` regions by setting the mode
    and leaves them by setting it back, with no ``finally``: a graph that raises inside one
    would leave it on.
    """

    __slots__ = ("autocast", "grad")

    def __init__(self) -> None:
        self.grad = torch.is_grad_enabled()
        self.autocast = [
            (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            for device in _AUTOCAST
        ]

    def restore(self) -> None:
        torch.set_grad_enabled(self.grad)
        for device, enabled, dtype in self.autocast:
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)


_AUTOCAST = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def _own_hooks(modules: dict[int, str], model: nn.Module) -> dict[int, str]:
    """The names of the model's modules that have forward hooks of their own, by id."""
    return {
        id(m): modules[id(m)]
        for m in model.modules()
        if (m._forward_hooks or m._forward_pre_hooks) and id(m) in modules
    }


def _others_hooked() -> bool:
    from torch.nn.modules import module as hooks

    return bool(
        len(hooks._global_forward_hooks) > 1
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def _forget(error: BaseException | None) -> None:
    """Clear the frames of a refusal's tracebacks, and of the errors it was raised from.

    dynamo's frames there hold the errors they raised, and the model's call frames hold the
    capture session: uncleared, that cycle keeps the session and its snapshot until the
    cyclic GC runs. The refusal's message is all that is read of it afterwards.
    """
    import traceback

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # skips frames still running (ours)
        error = error.__cause__ or error.__context__


def _is_verify(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, _Verify):
            return True
        error = getattr(error, "inner_exception", None) or error.__cause__  # type: ignore[assignment]
    return False


# what fullgraph=True raises, before the call runs, where a new graph would pass the limit
_LIMIT_HIT = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")


def _is_refusal(error: Exception) -> bool:
    """Whether dynamo refused to compile the call (so nothing of it ran)."""
    from torch._dynamo import exc

    # InternalTorchDynamoError: dynamo's own failure while tracing (its RecursionError on a
    # deep structure, say), before anything of the call ran, as the others
    names = (
        "Unsupported",
        "BackendCompilerFailed",
        "UserError",
        "TorchRuntimeError",
        "InternalTorchDynamoError",
    )
    refusals = tuple(getattr(exc, name) for name in names + _LIMIT_HIT if hasattr(exc, name))
    return isinstance(error, refusals)


def _reason(error: Exception) -> str:
    inner = getattr(error, "inner_exception", None)
    if isinstance(inner, Unsupported):
        return str(inner)
    if inner is not None:  # the backend failed: say how, not only that dynamo's backend raised
        text = str(inner).strip().splitlines()
        detail = f"{type(inner).__name__}: {text[0]}" if text else type(inner).__name__
        return f"graph mode could not plan the model's graph ({detail})"
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
