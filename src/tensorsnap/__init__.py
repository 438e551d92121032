"""tensorsnap: true, independent copies of the tensors a PyTorch model creates implicitly."""

# The public names load on first use (PEP 562), so that the command line answers --help and
# --version without importing torch. Add a public name to _LAZY and to the TYPE_CHECKING block,
# never as a plain import here: tests/test_imports.py fails if `import tensorsnap` imports torch.
from importlib import import_module as _import_module
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

__version__ = "0.1.0.dev0"

_LAZY = {
    "BundleError": "._errors",
    "BundleWarning": "._errors",
    "DiffResult": "._diff",
    "KeyDiff": "._diff",
    "NonFiniteError": "._errors",
    "Record": "._snapshot",
    "Snapshot": "._snapshot",
    "Stats": "._stats",
    "TensorSnapError": "._errors",
    "TensorSnapWarning": "._errors",
    "blame": "._blame",
    "capture": "._capture",
    "diff": "._diff",
    "extract": "._extract",
    "load": "._bundle",
    "names": "._capture",
    "snapshot": "._copy",
}

if _TYPE_CHECKING:
    from ._blame import blame
    from ._bundle import load
    from ._capture import capture, names
    from ._copy import snapshot
    from ._diff import DiffResult, KeyDiff, diff
    from ._errors import (
        BundleError,
        BundleWarning,
        NonFiniteError,
        TensorSnapError,
        TensorSnapWarning,
    )
    from ._extract import extract
    from ._snapshot import Record, Snapshot
    from ._stats import Stats

__all__ = [
    "BundleError",
    "BundleWarning",
    "DiffResult",
    "KeyDiff",
    "NonFiniteError",
    "Record",
    "Snapshot",
    "Stats",
    "TensorSnapError",
    "TensorSnapWarning",
    "__version__",
    "blame",
    "capture",
    "diff",
    "extract",
    "load",
    "names",
    "snapshot",
]


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tensorsnap' has no attribute {name!r}")
    value = getattr(_import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
