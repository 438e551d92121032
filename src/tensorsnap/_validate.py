"""Argument checks shared by the entry points (capture, names, snapshot, extract, load, save).

Each helper raises :class:`TensorSnapError` naming the parameter, what it expected, what
arrived and the fix, before anything is created or written. Flags are taken only as real
``bool`` values: a string such as ``"no"`` or the number ``1`` would otherwise count by its
truthiness and do the opposite of what was meant.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from ._errors import TensorSnapError

__all__ = ["capture_options", "choice", "device", "flag", "path", "patterns", "spill_dir"]


def flag(value: object, name: str) -> bool:
    """``value`` if it is a bool; else an error naming ``name``."""
    if value is True or value is False:
        return value
    raise TensorSnapError(
        f"{name}={value!r}: expected True or False, got {type(value).__name__}; pass a bool "
        f"(flags are not read by truthiness, so {name}='no' or {name}=1 is refused)"
    )


def choice(value: object, name: str, allowed: tuple[object, ...], hint: str) -> Any:
    """``value`` if it is one of ``allowed`` *with the same type* (so ``1`` is not ``True``)."""
    for option in allowed:
        if type(value) is type(option) and value == option:
            return value
    raise TensorSnapError(f"{name}={value!r}: {hint}")


def patterns(value: object, name: str) -> list[str]:
    """Glob patterns: None, one str, or an iterable of str (never bytes, never a number)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise TensorSnapError(
            f"{name}={value!r}: expected a glob pattern (str) or a list of them, got "
            f"{type(value).__name__}; for example {name}='transformer.h.*.mlp' or "
            f"{name}=['*.attn', '*.mlp']"
        )
    found = list(value)
    for pattern in found:
        if not isinstance(pattern, str):
            raise TensorSnapError(
                f"{name}= takes glob patterns (str or a list of str), got {pattern!r} "
                f"({type(pattern).__name__}) in it"
            )
    return found


def path(value: object, name: str) -> str:
    """A file system path as ``str`` (a str or an ``os.PathLike`` giving one)."""
    text = os.fspath(value) if isinstance(value, (str, bytes, os.PathLike)) else None
    if isinstance(text, bytes) or isinstance(value, bytearray):
        raise TensorSnapError(
            f"{name}={value!r}: expected a str path, got bytes; decode it first "
            f"({name}=path.decode()) or pass a pathlib.Path"
        )
    if text is None:
        raise TensorSnapError(
            f"{name}={value!r}: expected a path (a str or a pathlib.Path), got "
            f"{type(value).__name__}"
        )
    if not text or "\0" in text:
        raise TensorSnapError(f"{name}={value!r}: expected a non-empty path without NUL bytes")
    return text


def spill_dir(value: object) -> str | None:
    """``spill_dir=``: None or a path."""
    return None if value is None else path(value, "spill_dir")


def device(value: object, name: str = "device", *, meta: bool = False) -> torch.device | None:
    """A device copies can be made on: None, or a torch device; ``meta`` only if ``meta``.

    ``snapshot`` allows meta (a copy of structure and layout without data, asked for
    explicitly); a capture or an extract exists to keep values, and on meta it would keep none.
    """
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise TensorSnapError(
            f"{name}={value!r}: expected a torch device such as 'cpu', 'cuda' or 'cuda:1' (a str "
            f"or a torch.device), got {type(value).__name__}"
        )
    try:
        found = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise TensorSnapError(
            f"{name}={value!r} is not a torch device; pass 'cpu', 'cuda', 'cuda:1' or a "
            "torch.device"
        ) from err
    if found.type == "meta" and not meta:
        raise TensorSnapError(
            f"{name}={value!r}: meta tensors hold no data, so a capture there would keep no "
            "values (and save none); pass 'cpu' (or an accelerator), or None to copy where each "
            "value was produced (tensorsnap.snapshot(obj, device='meta') copies layouts only)"
        )
    return found


def capture_options(
    *,
    ops: object,
    nonfinite: object,
    spill: object,
    where: object = None,
    **flags: object,
) -> None:
    """The options of ``capture`` and ``names`` that are not patterns or sizes.

    ``where`` is the ``device=`` option (meta is refused: a capture there keeps nothing).
    """
    device(where)
    choice(
        ops,
        "ops",
        (True, False, "aten"),
        "pass True to capture torch-level ops (relu, add, linear), 'aten' for the ATen ops "
        "beneath them, or False",
    )
    choice(
        nonfinite,
        "nonfinite",
        (None, "raise"),
        "pass 'raise' to stop at the first NaN or Inf, or None",
    )
    for name, value in flags.items():
        flag(value, name)
    spill_dir(spill)


def graph_options(**options: Any) -> None:
    """Name the options graph mode cannot serve, before the block starts."""
    if options["ops"] is not True:
        raise TensorSnapError(
            f"graph=True captures torch-level ops from a compiled graph and needs ops=True, got "
            f"ops={options['ops']!r}; ATen-level capture (ops='aten') runs eagerly only"
        )
    for name, why in (
        ("grads", "gradients are taken by hooks on the eager autograd graph"),
        ("saved", "saved tensors are packed by autograd hooks the graph does not run"),
        ("inputs", "module inputs are recorded by eager pre-hooks"),
        ("lazy", "lazy copies watch writes through an eager function mode"),
    ):
        if options[name]:
            raise TensorSnapError(
                f"graph=True cannot be used with {name}=True ({why}); capture with graph=False"
            )
