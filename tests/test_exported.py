"""The public surface is exactly ``__all__``: every name in it exists, nothing else is public."""

from __future__ import annotations

import tensorsnap

EXPECTED = {
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
}


def test_all_is_the_public_surface() -> None:
    assert set(tensorsnap.__all__) == EXPECTED
    assert len(tensorsnap.__all__) == len(EXPECTED)  # no duplicates
    public = {name for name in dir(tensorsnap) if not name.startswith("_")}
    assert public == EXPECTED - {"__version__"}


def test_every_error_is_a_tensorsnap_error() -> None:
    for name in ("BundleError", "NonFiniteError"):
        assert issubclass(getattr(tensorsnap, name), tensorsnap.TensorSnapError)
    assert issubclass(tensorsnap.BundleWarning, tensorsnap.TensorSnapWarning)
