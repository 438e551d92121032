"""tensorsnap: true, independent copies of the tensors a PyTorch model creates implicitly."""

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

__version__ = "0.1.0.dev0"

__all__ = [
    "BundleError",
    "BundleWarning",
    "DiffResult",
    "KeyDiff",
    "NonFiniteError",
    "Record",
    "Snapshot",
    "TensorSnapError",
    "TensorSnapWarning",
    "__version__",
    "capture",
    "diff",
    "extract",
    "load",
    "names",
    "snapshot",
]
