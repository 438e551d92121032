"""tensorsnap: true, independent copies of the tensors a PyTorch model creates implicitly."""

from ._copy import snapshot
from ._errors import TensorSnapError

__version__ = "0.1.0.dev0"

__all__ = ["TensorSnapError", "__version__", "snapshot"]
