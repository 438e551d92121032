"""Seeing ops: the modes that report each call that returns tensors.

``OpMode`` (a function mode) sees torch-level calls as the user wrote them; ``AtenMode`` (a
dispatch mode) sees the ATen ops underneath, inside fused Python functions too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["AtenMode", "OpMode", "aten_name", "op_name", "quiet"]


class _Internal(threading.local):
    depth = 0  # > 0 while tensorsnap's own code runs (hooks, copies) in this thread
    aten_sessions = 0  # dispatch modes cannot be switched off as cheaply as function modes


_internal = _Internal()

# function modes below the one handling a call (it is popped while it runs)
_stack_depth = torch._C._len_torch_function_stack


def _others_listening() -> bool:
    """Whether a mode could see the torch calls that a function mode's handler makes now.

    Inside a function mode's handler that mode is off, so with no function mode below it and
    no ATen-level capture open in this thread, its own calls (the copies it takes) reach no
    mode at all and need no :func:`quiet` around them.
    """
    return bool(_stack_depth() or _internal.aten_sessions)


class _QuietAten:
    """Hides our own calls from dispatch modes (and from function modes)."""

    __slots__ = ("_off",)

    def __enter__(self) -> None:
        _internal.depth += 1
        self._off = torch._C.DisableTorchFunction()
        self._off.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._off.__exit__(*exc)
        _internal.depth -= 1


def quiet() -> Any:
    """A context in which tensorsnap's own torch calls are not reported as the model's ops.

    Function modes are switched off in C (~0.1 us); only while an ATen-level capture is open in
    this thread do we pay for the counter that dispatch modes check.
    """
    if _internal.aten_sessions:
        return _QuietAten()
    return torch._C.DisableTorchFunction()


# op_name's answers, so that naming a torch-level op is one dict lookup
_NAMES: dict[Any, str] = {}


def op_name(func: Any) -> str:
    """The torch-level name of ``func``: ``relu`` for torch.relu, F.relu and Tensor.relu.

    Dunder methods lose their underscores (``x + y`` is ``add``, ``x[i]`` is ``getitem``);
    properties are named after the attribute (``x.T`` is ``T``).
    """
    try:
        name = _NAMES.get(func)
    except TypeError:  # an unhashable callable: named below, every time
        name = None
    if name is None:
        name = getattr(func, "__name__", None) or type(func).__name__
        if name in ("__get__", "__set__"):  # a property of Tensor, e.g. x.T or x.mT
            owner = getattr(func, "__self__", None)
            name = getattr(owner, "__name__", name)
        if len(name) > 4 and name.startswith("__") and name.endswith("__"):
            name = name[2:-2]
        try:
            _NAMES[func] = name
        except TypeError:  # an unhashable callable: name it every time
            pass
    return name


def has_tensor(value: Any) -> bool:
    """Whether an op result holds tensors (a tensor, or a tuple/list with at least one)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(isinstance(item, torch.Tensor) for item in value)
    return False


class OpMode(TorchFunctionMode):
    """Calls ``on_op(func, result)`` after every torch-level call that returned tensors.

    ``before(func, args, kwargs)``, when given, runs ahead of every call (lazy copies use it to
    see writes coming).

    Active only in the thread that entered it (function modes are per thread). Calls made by
    torch functions implemented in Python (``F.layer_norm`` calling ``torch.layer_norm``) are not
    seen: a mode is switched off while it handles a call, so each op is reported once, at the
    level the user wrote it.
    """

    def __init__(
        self,
        on_op: Callable[[Any, Any], None] | None,
        before: Callable[[Any, tuple[Any, ...], dict[str, Any] | None], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_op = on_op
        self.before = before

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if self.before is not None:
            with torch._C.DisableTorchFunction():
                self.before(func, args, kwargs)
        result = func(*args, **kwargs) if kwargs else func(*args)
        self.report(func, result)
        return result

    def report(self, func: Any, result: Any) -> None:
        """Pass ``result`` to ``on_op`` if it holds tensors, hiding the copies it makes."""
        on_op = self.on_op
        if on_op is None:
            return
        if type(result) is torch.Tensor and not _others_listening():
            on_op(func, result)  # the common case: a plain tensor, nothing to hide from
        elif isinstance(result, torch.Tensor) or (
            isinstance(result, (tuple, list))
            and type(result) is not torch.Size  # x.size() and x.shape: no tensors in there
            and has_tensor(result)
        ):
            # copies made while recording are not ops, for any mode below this one
            with quiet():
                on_op(func, result)


_ATEN_NAMES: dict[Any, str] = {}


def aten_name(func: Any) -> str:
    """``aten.addmm`` for ``torch.ops.aten.addmm.default``: the namespace, a dot, the op."""
    name = _ATEN_NAMES.get(func)
    if name is None:
        schema = getattr(func, "_schema", None)
        name = schema.name.replace("::", ".") if schema is not None else str(func)
        _ATEN_NAMES[func] = name
    return name


class AtenMode(TorchDispatchMode):
    """Calls ``on_op(func, result)`` after every ATen op that returned tensors.

    ATen ops are what torch-level calls decompose into (``F.layer_norm`` is
    ``aten.native_layer_norm``, ``linear`` is ``aten.t`` + ``aten.addmm``), so this sees inside
    fused Python functions. A dispatch mode also makes ``torch.compile``'d code run eagerly.
    Results here sit below autograd, so op gradients cannot be hooked at this level.
    """

    def __init__(self, on_op: Callable[[Any, Any], None]) -> None:
        super().__init__()
        self.on_op = on_op

    def __enter__(self) -> AtenMode:
        _internal.aten_sessions += 1
        try:
            return super().__enter__()
        except BaseException:
            _internal.aten_sessions -= 1
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            _internal.aten_sessions -= 1

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if _internal.depth:
            return result
        if isinstance(result, torch.Tensor) or (
            isinstance(result, (tuple, list)) and has_tensor(result)
        ):
            with _QuietAten():
                self.on_op(func, result)
        return result
