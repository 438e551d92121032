"""The process-wide state of torch that a capture block changes, each change undone exactly.

torch.compile's stance, one warnings filter, entries of torch's hook tables, and the version
check autograd skips when saved-tensor hooks are set.
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any

import torch
from torch import nn

__all__ = [
    "DictEntry",
    "ForceEager",
    "Ignored",
    "compiling_possible",
    "has_compiled_parts",
    "unpack",
]


class ForceEager:
    """``torch.compiler.set_stance("force_eager")`` shared by every open capture block.

    The stance is process-wide, and each ``set_stance`` restores what it found: two blocks
    overlapping in two threads (A enters, B enters, A exits, B exits) would leave it at
    "force_eager" for good. The first block in sets it, the last one out restores it.
    """

    _lock = threading.Lock()
    _open = 0
    _stance: Any = None

    def __enter__(self) -> None:
        with ForceEager._lock:
            if ForceEager._open == 0:
                ForceEager._stance = torch.compiler.set_stance("force_eager")
            ForceEager._open += 1

    def __exit__(self, *exc: Any) -> None:
        with ForceEager._lock:
            ForceEager._open -= 1
            if ForceEager._open == 0:
                stance, ForceEager._stance = ForceEager._stance, None
                stance.__exit__(None, None, None)


class Ignored:
    """One warnings filter, added for the block and removed exactly (other filters untouched)."""

    def __init__(self, category: type[Warning], message: str) -> None:
        self.category, self.message = category, message
        self.entry: Any = None

    def __enter__(self) -> None:
        warnings.filterwarnings("ignore", message=self.message, category=self.category)
        self.entry = warnings.filters[0]

    def __exit__(self, *exc: Any) -> None:
        filters: list[Any] = warnings.filters  # type: ignore[assignment]
        if self.entry in filters:
            filters.remove(self.entry)
            warnings._filters_mutated()  # type: ignore[attr-defined]


class DictEntry:
    """A removable handle for one entry of a module-level dict of torch's, if it exists."""

    def __init__(self, owner: Any, name: str, key: Any) -> None:
        self.owner, self.name, self.key = owner, name, key

    def remove(self) -> None:
        table = getattr(self.owner, self.name, None)
        if table is not None:
            table.pop(self.key, None)


def unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    t, version = packed
    if t._version != version:
        # the error autograd raises without hooks: capturing must not hide an in-place bug
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
            f"expected version {version} instead (tensorsnap.capture(saved=True) checked it)"
        )
    return t


def has_compiled_parts(model: nn.Module) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) for m in model.modules())


def compiling_possible() -> bool:
    # torch.compile imports dynamo; when nothing has, nothing is compiled, and importing it
    # here would cost a second on the first capture
    return "torch._dynamo" in sys.modules
