"""Seeing torch-level ops: the function mode that reports each call that returns tensors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["OpMode", "internal", "op_name"]

_NAMES: dict[Any, str] = {}


class _Internal(threading.local):
    """Per thread: how deep we are inside tensorsnap's own code (hooks, copies)."""

    depth = 0


internal = _Internal()


def op_name(func: Any) -> str:
    """The torch-level name of ``func``: ``relu`` for torch.relu, F.relu and Tensor.relu.

    Dunder methods lose their underscores (``x + y`` is ``add``, ``x[i]`` is ``getitem``);
    properties are named after the attribute (``x.T`` is ``T``).
    """
    name = _NAMES.get(func)
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

    Active only in the thread that entered it (function modes are per thread). Calls made by
    torch functions implemented in Python (``F.layer_norm`` calling ``torch.layer_norm``) are not
    seen: a mode is switched off while it handles a call, so each op is reported once, at the
    level the user wrote it.
    """

    def __init__(
        self,
        on_op: Callable[[Any, Any], None],
        on_start: Callable[[Any], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_op = on_op
        self.on_start = on_start

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if internal.depth:  # a copy or hook of ours, maybe another session's: not the model's
            return func(*args, **(kwargs or {}))
        if self.on_start is not None:
            self.on_start(func)
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) or (
            isinstance(result, (tuple, list)) and has_tensor(result)
        ):
            internal.depth += 1
            try:
                self.on_op(func, result)
            finally:
                internal.depth -= 1
        return result
