"""Naming the nodes of a dynamo graph as the eager op capture names the calls they stand for.

A graph records ``x + y`` as ``operator.add``, ``2 - x`` as ``operator.sub(2, x)`` and
``x += y`` as ``operator.iadd``, where the eager capture's function mode sees
``Tensor.__add__``, ``Tensor.__rsub__`` and ``Tensor.add_``. Which method torch calls for each
operator is irregular (``2 * x`` is ``mul`` but ``2 - x`` is ``rsub``, ``x //= 2`` is
``floor_divide_`` but ``x &= 1`` is ``iand``) and may change between releases, so the table is
not written down: it is measured, once per process, by running each operator on real tensors
under a function mode, exactly as the eager capture would see them.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ._ops import op_name

__all__ = ["measure_operators", "operator_name"]

_BINARY = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul")
_BITWISE = ("and_", "or_", "xor", "lshift", "rshift")
_COMPARE = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}
_UNARY = ("neg", "pos", "invert", "abs")

# (operator function, first argument is a tensor) -> the name eager capture gives the call
_table: dict[tuple[Callable[..., Any], bool], str] = {}
_lock = threading.Lock()


class _Names(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        self.seen.append(op_name(func))
        return func(*args, **(kwargs or {}))


def _seen(call: Callable[[], Any]) -> str | None:
    mode = _Names()
    try:
        with mode:
            call()
    except (TypeError, RuntimeError):
        return None
    return mode.seen[-1] if mode.seen else None


def _measure() -> dict[tuple[Callable[..., Any], bool], str]:
    table: dict[tuple[Callable[..., Any], bool], str] = {}

    def put(fn: Callable[..., Any], tensor_first: bool, name: str | None) -> None:
        if name is not None:
            table[fn, tensor_first] = name

    for name in _BINARY + _BITWISE:
        fn = getattr(operator, name)
        inplace = getattr(operator, "i" + name.rstrip("_"))
        ints = name in _BITWISE
        x = torch.tensor([[3, 5], [6, 7]]) if ints else torch.tensor([[3.0, 5.0], [6.0, 7.0]])
        other: Any = x if name == "matmul" else 2
        put(fn, True, _seen(lambda: fn(x, other)))  # noqa: B023 (called at once)
        put(fn, False, _seen(lambda: fn(2, x)))  # noqa: B023
        put(inplace, True, _seen(lambda: inplace(x.clone(), other)))  # noqa: B023
    for name in _COMPARE:
        fn = getattr(operator, name)
        x = torch.tensor([1.0, 2.0])
        put(fn, True, _seen(lambda: fn(x, 1)))  # noqa: B023
        put(fn, False, _seen(lambda: fn(1, x)))  # noqa: B023
    for name in _UNARY:
        fn = getattr(operator, name)
        put(fn, True, _seen(lambda: fn(torch.tensor([1, 2]))))  # noqa: B023
    return table


def operator_name(fn: Callable[..., Any], tensor_first: bool) -> str | None:
    """The eager capture's name for a call of the ``operator`` function ``fn``, or None.

    ``tensor_first`` tells whether the first argument is a tensor (``x - 2``) or a number
    (``2 - x``, which Python hands to the tensor's reflected method). None: ``fn`` is not an
    operator a tensor answers.
    """
    return _table.get((fn, tensor_first))


def measure_operators() -> None:
    """Fill the table, once per process, before any graph is named (in plain eager code)."""
    if not _table:
        with _lock:
            if not _table:
                _table.update(_measure())
