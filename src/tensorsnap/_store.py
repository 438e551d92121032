"""Where copies are kept until they are read: memory for now, spill files beside it later."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Protocol

from ._errors import TensorSnapError

__all__ = ["MemoryStore", "Store", "parse_size"]


class Store(Protocol):
    """What a :class:`~tensorsnap.Snapshot` reads its values from.

    Stores that keep values outside memory (spill files, bundles on disk) implement the same
    three methods, so that the capture session and the snapshot never need to know which one
    they hold.
    """

    def put(self, key: str, value: Any, nbytes: int) -> None: ...

    def get(self, key: str) -> Any: ...

    def close(self) -> None: ...


class MemoryStore:
    """Keeps every value in a dict."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def put(self, key: str, value: Any, nbytes: int) -> None:
        self._values[key] = value

    def put_all(self, keys: list[str], values: list[Any]) -> None:
        self._values.update(zip(keys, values, strict=True))

    def get(self, key: str) -> Any:
        return self._values[key]

    def close(self) -> None:
        self._values.clear()


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
# sizes beyond what a signed 64-bit byte count holds are refused as typos
_MAX_SIZE = 2**63 - 1
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str | None, option: str) -> int | None:
    """Bytes from ``1000``, ``"2GB"`` (decimal, 2e9) or ``"2GiB"`` (binary, 2**31)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TensorSnapError(
            f"{option}={value!r}: expected a number of bytes or a size such as '2GB' or '512MiB'"
        )
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise TensorSnapError(
                f"{option}={value!r} is not a size; write bytes or a number with one of the "
                "units B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
            )
        # exact decimal arithmetic: float() would turn a long number into inf (OverflowError)
        size = int(Fraction(match.group(1)) * _UNITS[unit])
    if size < 0:
        raise TensorSnapError(f"{option}={value!r} is negative; pass a size of 0 or more bytes")
    if size > _MAX_SIZE:
        raise TensorSnapError(
            f"{option}={value!r} is more than 2**63 - 1 bytes (8 EiB); pass a smaller size, or "
            f"None for no limit"
        )
    return size
