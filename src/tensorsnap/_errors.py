"""The one exception family that tensorsnap raises."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TensorSnapError(Exception):
    """Base class of every error tensorsnap raises on purpose.

    Messages name the key or the path inside the structure, say what was expected and what
    arrived, and how to fix it.
    """


class SelectionError(TensorSnapError, KeyError):
    """An ``include`` pattern matched nothing, or a key is not in a snapshot."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NonFiniteError(TensorSnapError):
    """A captured value held a NaN or Inf while ``capture(..., nonfinite="raise")`` was on.

    Attributes:
        key: The key of the first such value.
        snapshot: Everything captured up to and including it.
    """

    def __init__(self, message: str, *, key: str, snapshot: Any) -> None:
        super().__init__(message)
        self.key = key
        self.snapshot = snapshot


class TensorSnapWarning(UserWarning):
    """Something was captured differently from what a user might assume; the message says how."""


def format_path(root: str, parts: Sequence[object]) -> str:
    """Render a path inside a structure the way Python would index it: ``out["a"][1].x``."""
    text = root
    for part in parts:
        if isinstance(part, _Attr):
            text += f".{part.name}"
        else:
            text += f"[{part!r}]"
    return text


class _Attr:
    """A path component that is an attribute, not an item."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f".{self.name}"


def attr(name: str) -> _Attr:
    return _Attr(name)


class BundleError(TensorSnapError):
    """A bundle cannot be written, or a bundle on disk is incomplete, damaged or edited.

    The message names the file and, where one is involved, the key.
    """


class BundleWarning(TensorSnapWarning):
    """A value read from a bundle came back as a documented plain fallback type.

    Raised when a saved class (dataclass, namedtuple, Mapping subclass) is not imported in
    the loading process or no longer has the saved fields; see ``docs/format.md``.
    """
