"""Manifests: what a bundle holds, as JSON.

``Encoder`` turns a captured value into a tree of JSON nodes whose leaves index a list of
tensors; ``Decoder`` rebuilds the value from such a tree without unpickling, importing or
calling anything named in the file (classes are found only among those already imported, and
assembled without running their code). ``record_entry`` and ``encode_manifest`` write one key's
entry and the whole ``manifest.json`` (with its SHA-256); ``read_manifest`` and
``decode_record`` check them on the way back. The format is described in ``docs/format.md``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import sys
import types
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ._dtensor import is_distributed, layout, local
from ._errors import BundleError, BundleWarning, attr, format_path
from ._shards import Span, dtype_from_name, dtype_name, read_small_file
from ._snapshot import KINDS, Record
from ._stats import Stats, stats_from_node, stats_node

__all__ = [
    "DIGEST_FIELD",
    "FORMAT",
    "FORMAT_VERSION",
    "JOURNAL",
    "MANIFEST",
    "Decoder",
    "Encoder",
    "decode_record",
    "encode_manifest",
    "read_manifest",
    "record_entry",
    "tensors_in",
]

FORMAT = "tensorsnap-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# What an unfinished ``extract`` keeps beside its shards instead of a manifest.
JOURNAL = "extract-journal.json"
# the most bytes read as a manifest (about two million keys)
_MAX_MANIFEST = 2**30

DIGEST_FIELD = "manifest_sha256"
_ZERO_DIGEST = "0" * 64
_DEFAULT_FACTORIES: dict[str, type] = {t.__name__: t for t in (list, dict, set, int, float, str)}
# -- structure: values to JSON nodes ---------------------------------------------------------


def _class_ref(cls: type) -> dict[str, str]:
    return {"module": cls.__module__, "qualname": cls.__qualname__}


class Encoder:
    """Turns one value into a JSON tree whose leaves index ``tensors``.

    With ``strict=False`` (spill stores) objects the format cannot describe are skipped instead
    of refused: only the tensors matter there.
    """

    def __init__(self, root: str, strict: bool = True) -> None:
        self.root = root
        self.strict = strict
        self.tensors: list[torch.Tensor] = []
        self._index: dict[int, int] = {}
        self.sources: list[torch.Tensor] = []
        self._active: set[int] = set()

    def fail(self, parts: list[object], message: str) -> BundleError:
        return BundleError(f"{format_path(self.root, parts)}: {message}")

    def node(self, x: Any, parts: list[object]) -> Any:
        cls = type(x)
        if x is None:
            return {"type": "none"}
        if cls is bool:
            return {"type": "bool", "value": x}
        if isinstance(x, torch.Tensor):
            if type(x) is not torch.Tensor and is_distributed(type(x)):
                return self.distributed(x, parts)
            if x.is_nested and type(x) is torch.Tensor:
                return self.nested(x, parts)
            return {"type": "tensor", "index": self.tensor(x, parts)}
        if isinstance(x, bool):
            return {"type": "bool", "value": bool(x)}
        if isinstance(x, int):
            return {"type": "int", "value": int(x)}
        if isinstance(x, float):
            return {"type": "float", "value": float.hex(float(x))}
        if isinstance(x, complex):
            return {"type": "complex", "real": float.hex(x.real), "imag": float.hex(x.imag)}
        if isinstance(x, str):
            return {"type": "str", "value": str(x)}
        if isinstance(x, (bytes, bytearray)):
            return {"type": "bytes", "value": bytes(x).hex()}
        if isinstance(x, torch.dtype):
            return {"type": "dtype", "value": dtype_name(x)}
        if isinstance(x, torch.device):
            return {"type": "device", "value": str(x)}
        if isinstance(x, torch.Size):
            return {"type": "size", "value": [int(s) for s in x]}
        if cls is Stats:  # a stats=True capture's record of a tensor: numbers, no bytes
            return stats_node(x)
        if id(x) in self._active:
            raise self.fail(
                parts, "the value contains a reference cycle, which bundles cannot store"
            )
        self._active.add(id(x))
        try:
            return self.container(x, cls, parts)
        finally:
            self._active.discard(id(x))

    def items(self, pairs: Any, parts: list[object]) -> list[list[Any]]:
        return [[self.node(k, [*parts, k]), self.node(v, [*parts, k])] for k, v in pairs]

    def container(self, x: Any, cls: type, parts: list[object]) -> Any:
        if cls is tuple or cls is list:
            items = [self.node(v, [*parts, i]) for i, v in enumerate(x)]
            return {"type": cls.__name__, "items": items}
        if cls is dict:
            return {"type": "dict", "items": self.items(x.items(), parts)}
        if cls is set or cls is frozenset:
            return {"type": cls.__name__, "items": [self.node(v, parts) for v in x]}
        if isinstance(x, tuple) and isinstance(getattr(cls, "_fields", None), tuple):
            return {
                "type": "namedtuple",
                "class": _class_ref(cls),
                "fields": list(cls._fields),  # type: ignore[attr-defined]
                "items": [self.node(v, [*parts, attr(str(f))]) for f, v in zip(cls._fields, x)],  # type: ignore[attr-defined]
            }
        if dataclasses.is_dataclass(x):
            node: dict[str, Any] = {
                "type": "dataclass",
                "class": _class_ref(cls),
                "fields": [
                    [f.name, self.node(getattr(x, f.name, None), [*parts, attr(f.name)])]
                    for f in dataclasses.fields(x)
                ],
            }
            if isinstance(x, Mapping):
                node["items"] = self.items(x.items(), parts)
            return node
        if isinstance(x, Mapping):
            node = {
                "type": "mapping",
                "class": _class_ref(cls),
                "items": self.items(x.items(), parts),
            }
            if isinstance(x, defaultdict):
                factory: Any = x.default_factory
                known = factory in _DEFAULT_FACTORIES.values()
                node["factory"] = factory.__name__ if known else None
            return node
        if isinstance(x, (tuple, list)):  # other sequence subclasses keep their items only
            items = [self.node(v, [*parts, i]) for i, v in enumerate(x)]
            return {"type": "tuple" if isinstance(x, tuple) else "list", "items": items}
        state = getattr(x, "__dict__", None)
        if isinstance(state, dict):
            return {
                "type": "object",
                "class": _class_ref(cls),
                "attrs": [
                    [k, self.node(v, [*parts, attr(k)])]
                    for k, v in state.items()
                    if isinstance(k, str)
                ],
            }
        if not self.strict:
            return {"type": "none"}
        raise self.fail(
            parts,
            f"cannot store a {cls.__qualname__} object in a bundle (bundles hold tensors, "
            "containers, dataclasses, namedtuples, mappings, objects with a __dict__ and "
            "scalars); exclude this key from the capture or convert the value first",
        )

    def distributed(self, t: torch.Tensor, parts: list[object]) -> Any:
        """A DTensor: this rank's local tensor, and how it fits into the full tensor."""
        try:
            spec = layout(t)
        except ValueError as err:
            raise self.fail(parts, str(err)) from err
        if spec is None:  # another torch.distributed tensor class: refused by tensor()
            return {"type": "tensor", "index": self.tensor(t, parts)}
        return {"type": "dtensor", "index": self.tensor(local(t), parts), "layout": spec}

    def nested(self, t: torch.Tensor, parts: list[object]) -> dict[str, Any]:
        """A nested tensor: its parts, each a plain tensor, and its layout."""
        if not self.strict:
            return {"type": "tensor", "index": -1}  # spill stores keep it in memory
        layout = {torch.strided: "strided", torch.jagged: "jagged"}.get(t.layout)
        if layout is None:
            raise self.fail(parts, f"cannot store a nested tensor of layout {t.layout}")
        items = [
            {"type": "tensor", "index": self.tensor(part, [*parts, i])}
            for i, part in enumerate(t.unbind())
        ]
        return {"type": "nested", "layout": layout, "items": items}

    def tensor(self, t: torch.Tensor, parts: list[object]) -> int:
        found = self._index.get(id(t))
        if found is not None:
            return found
        plain = type(t) is torch.Tensor or type(t) is torch.nn.Parameter
        dense = t.layout == torch.strided and not t.is_quantized and not t.is_nested
        if not self.strict and not (plain and dense):
            return -1
        if not plain:
            raise self.fail(
                parts, f"cannot store a {type(t).__name__}; convert it to a plain tensor"
            )
        if not dense:
            raise self.fail(
                parts,
                f"cannot store a {t.layout} {'quantized ' if t.is_quantized else ''}tensor; "
                "convert it first, for example with .to_dense() or .dequantize()",
            )
        self._index[id(t)] = len(self.tensors)
        self.sources.append(t)  # also keeps its id from being reused while we index by it
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        self.tensors.append(t)
        return len(self.tensors) - 1


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The distinct plain strided tensors inside ``value``, as they are (for spill stores).

    Objects and tensors that a bundle cannot describe are skipped, not refused.
    """
    encoder = Encoder("value", strict=False)
    try:
        encoder.node(value, [])
    except BundleError:  # a reference cycle: spill what was found before it
        pass
    return [t for t in encoder.sources if not (t.is_conj() or t.is_neg())]


def record_entry(
    record: Record,
    tree: Any,
    tensors: list[torch.Tensor],
    placements: list[tuple[int | None, int]],
    spans: list[Span],
) -> dict[str, Any]:
    """The manifest entry of one key: its record, blobs, tensor views and value tree."""
    views = []
    for t, (span, offset) in zip(tensors, placements):
        views.append(
            {
                "dtype": dtype_name(t.dtype),
                "shape": list(t.shape),
                "stride": list(t.stride()),
                "blob": span,
                "offset": offset,
                "device": str(t.device),
            }
        )
    return {
        "key": record.key,
        "module": record.module,
        "call": record.call,
        "op": record.op,
        "kind": record.kind,
        "shape": list(record.shape) if record.shape is not None else None,
        "dtype": dtype_name(record.dtype) if record.dtype is not None else None,
        "nbytes": record.nbytes,
        "blobs": [
            {
                "shard": s.shard,
                "name": s.name,
                "dtype": dtype_name(s.dtype),
                "offset": s.offset,
                "nbytes": s.nbytes,
                "crc32": s.crc32,
            }
            for s in spans
        ],
        "tensors": views,
        "value": tree,
    }


def encode_manifest(
    records: list[dict[str, Any]],
    shards: list[dict[str, Any]],
    *,
    version: str,
    rank: int | None,
    world_size: int | None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """The bytes of ``manifest.json``, its SHA-256 filled in.

    ``shards`` are ``{"file": name, "nbytes": size}``; ``extra`` fields are added after the
    standard ones (before ``shards`` and ``records``).
    """
    body: dict[str, Any] = {
        DIGEST_FIELD: _ZERO_DIGEST,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tensorsnap_version": version,
        "torch_version": torch.__version__,
        "rank": rank,
        "world_size": world_size,
        **(extra or {}),
        "shards": shards,
        "records": records,
    }
    text = json.dumps(body, indent=1, ensure_ascii=True, allow_nan=False).encode() + b"\n"
    digest = hashlib.sha256(text).hexdigest()
    return text.replace(_ZERO_DIGEST.encode(), digest.encode(), 1)


def read_manifest(path: str) -> dict[str, Any]:
    try:
        data = read_small_file(path, _MAX_MANIFEST)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise BundleError(f"{path} is a symbolic link; refusing to read it") from err
        raise BundleError(f"{path} cannot be read: {err}") from err
    damaged = f"{path} is damaged or was edited by hand"
    try:
        manifest = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise BundleError(f"{damaged}: it is not valid JSON ({err}); re-create the bundle") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a tensorsnap bundle manifest (no format {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise BundleError(
            f"{path} has format version {version!r}; this tensorsnap reads version "
            f"{FORMAT_VERSION} (upgrade tensorsnap to read newer bundles)"
        )
    digest = manifest.get(DIGEST_FIELD)
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise BundleError(f"{damaged}: its {DIGEST_FIELD} is missing; re-create the bundle")
    zeroed = data.replace(digest.encode(), _ZERO_DIGEST.encode(), 1)
    if hashlib.sha256(zeroed).hexdigest() != digest:
        raise BundleError(
            f"{damaged}: its SHA-256 does not match {DIGEST_FIELD}; re-create the bundle"
        )
    return manifest


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def decode_record(item: dict[str, Any], where: str) -> Record:
    def expect(name: str, kind: type | tuple[type, ...]) -> Any:
        value = item.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise BundleError(f"{where}: field {name!r} is {value!r}, expected {kind}")
        return value

    shape = item.get("shape")
    if shape is not None and not (
        isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)
    ):
        raise BundleError(f"{where}: field 'shape' is {shape!r}, expected a list of sizes")
    dtype = item.get("dtype")
    kind = expect("kind", str)
    if kind not in KINDS:
        raise BundleError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    return Record(
        key=expect("key", str),
        module=expect("module", str),
        call=expect("call", int),
        op=expect("op", (str, type(None))),
        kind=kind,
        shape=tuple(shape) if shape is not None else None,
        dtype=dtype_from_name(dtype, where) if dtype is not None else None,
        nbytes=_at_least_zero(expect("nbytes", int), "nbytes", where),
    )


def _at_least_zero(value: int, name: str, where: str) -> int:
    if value < 0:
        raise BundleError(f"{where}: field {name!r} is {value}, expected a count >= 0")
    return value


# -- structure: JSON nodes to values ---------------------------------------------------------


# the C-level getters of a module's and a class's own namespace and of a class's MRO: reading
# them runs no ``__getattr__``/``__getattribute__`` of a module subclass or of a metaclass
_MODULE_DICT: Any = vars(types.ModuleType)["__dict__"]
_TYPE_DICT: Any = vars(type)["__dict__"]
_TYPE_MRO: Any = vars(type)["__mro__"]
_DATACLASS_FIELD = getattr(dataclasses, "_FIELD", None)
_FACTORY_SLOT: Any = vars(defaultdict)["default_factory"]


def _find_class(ref: Any) -> type | None:
    """A class already imported in this process, by dict lookups: nothing runs or imports.

    The module must be in ``sys.modules``; each step of ``qualname`` is read from the module's
    or the class's own ``__dict__`` (never through attribute access, which could run a
    module's or a metaclass's ``__getattr__``); only classes are walked into.
    """
    if not isinstance(ref, dict):
        raise TypeError("class reference is not an object")
    module_name, qualname = ref["module"], ref["qualname"]
    if not isinstance(module_name, str) or not isinstance(qualname, str):
        raise TypeError("class reference is not two strings")
    # type(x) and issubclass on real types read C slots; isinstance could look up __class__
    module = sys.modules.get(module_name)
    if not issubclass(type(module), types.ModuleType):
        return None
    namespace: Any = _MODULE_DICT.__get__(module)
    found: Any = None
    for part in qualname.split("."):
        if type(namespace) not in (dict, types.MappingProxyType):
            return None
        found = namespace.get(part)
        if not issubclass(type(found), type):
            return None
        namespace = _TYPE_DICT.__get__(found)
    return found


def _mro(cls: type) -> tuple[type, ...]:
    mro: tuple[type, ...] = _TYPE_MRO.__get__(cls)
    return mro


def _static(cls: type, name: str) -> Any:
    """``name`` as found in the own ``__dict__`` of a class on ``cls``'s MRO (no hooks run)."""
    for base in _mro(cls):
        namespace = _TYPE_DICT.__get__(base)
        if name in namespace:
            return namespace[name]
    return None


def _dataclass_fields(cls: type) -> list[str] | None:
    """The field names of a dataclass, read statically; None when ``cls`` is not one.

    ``dataclasses.is_dataclass`` and ``fields`` look the fields up by attribute access, which
    runs a metaclass's ``__getattr__``; this reads the class namespaces instead.
    """
    table = _static(cls, "__dataclass_fields__")
    if type(table) is not dict:
        return None
    names = []
    for field in table.values():
        if type(field) is not dataclasses.Field:
            return None
        # not a ClassVar or InitVar pseudo-field
        if getattr(field, "_field_type", None) is _DATACLASS_FIELD:
            if type(field.name) is not str:
                return None
            names.append(field.name)
    return names


def _settable(cls: type, name: str) -> bool:
    """Whether ``object.__setattr__(obj, name, ...)`` runs no code of the class.

    A plain class attribute (a default) or a ``__slots__`` member is fine; a property or other
    data descriptor with that name would run its setter.
    """
    found = _static(cls, name)
    # type(), not isinstance: isinstance falls back to the object's own __class__, which a
    # default value's class can define (and so run code)
    if found is None or type(found) is types.MemberDescriptorType:
        return True
    kind = type(found)
    return not (_static(kind, "__set__") or _static(kind, "__delete__"))


def _warn(message: str) -> None:
    # point the warning at the first frame outside tensorsnap (the user's snap[key])
    frame, level = sys._getframe(1), 2
    package = os.path.dirname(__file__)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, BundleWarning, stacklevel=level - 1)


class Decoder:
    def __init__(
        self,
        key: str,
        tensors: list[torch.Tensor],
        on_dtensor: Callable[[torch.Tensor, dict[str, Any]], Any] | None = None,
    ) -> None:
        self.key = key
        self.tensors = tensors
        # a saved DTensor comes back as its local tensor, or as what this makes of it
        self.on_dtensor = on_dtensor

    def node(self, n: dict[str, Any]) -> Any:
        kind = n["type"]
        # letters only: a type such as "_eq__" must not reach self.__eq__ (or any dunder)
        known = isinstance(kind, str) and kind.isascii() and kind.isalpha()
        method = getattr(self, f"_{kind}", None) if known else None
        if method is None:
            raise ValueError(f"unknown node type {kind!r}")
        return method(n)

    def items(self, n: dict[str, Any]) -> list[tuple[Any, Any]]:
        return [(self.node(k), self.node(v)) for k, v in n["items"]]

    def fallback(self, n: dict[str, Any], why: str, plain: str) -> None:
        ref = n["class"]
        _warn(
            f"snap[{self.key!r}]: {ref['module']}.{ref['qualname']} {why}; it comes back as a "
            f"plain {plain} (import the class before reading the key to get it back)"
        )

    def _none(self, n: dict[str, Any]) -> None:
        return None

    def _bool(self, n: dict[str, Any]) -> bool:
        return _typed(n["value"], bool)

    def _int(self, n: dict[str, Any]) -> int:
        return _typed(n["value"], int)

    def _float(self, n: dict[str, Any]) -> float:
        return float.fromhex(_typed(n["value"], str))

    def _complex(self, n: dict[str, Any]) -> complex:
        return complex(float.fromhex(n["real"]), float.fromhex(n["imag"]))

    def _str(self, n: dict[str, Any]) -> str:
        return _typed(n["value"], str)

    def _bytes(self, n: dict[str, Any]) -> bytes:
        return bytes.fromhex(n["value"])

    def _dtype(self, n: dict[str, Any]) -> torch.dtype:
        return dtype_from_name(n["value"], f"snap[{self.key!r}]")

    def _device(self, n: dict[str, Any]) -> torch.device:
        return torch.device(_typed(n["value"], str))

    def _stats(self, n: dict[str, Any]) -> Stats:
        return stats_from_node(n, f"snap[{self.key!r}]")

    def _size(self, n: dict[str, Any]) -> torch.Size:
        return torch.Size([_typed(s, int) for s in n["value"]])

    def _tensor(self, n: dict[str, Any]) -> torch.Tensor:
        index = _typed(n["index"], int)
        if index < 0:
            raise IndexError(f"tensor index {index}")
        return self.tensors[index]

    def _dtensor(self, n: dict[str, Any]) -> Any:
        t = self._tensor(n)
        return self.on_dtensor(t, n["layout"]) if self.on_dtensor is not None else t

    def _nested(self, n: dict[str, Any]) -> torch.Tensor:
        layouts = {"strided": torch.strided, "jagged": torch.jagged}
        layout = layouts.get(n["layout"]) if isinstance(n["layout"], str) else None
        if layout is None:
            raise ValueError(f"unknown nested-tensor layout {n['layout']!r}")
        parts = [self.node(v) for v in n["items"]]
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            raise ValueError("a nested tensor's items must be one or more tensors")
        with warnings.catch_warnings():  # torch calls the nested-tensor API a prototype
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.nested.as_nested_tensor(parts, layout=layout)
            except RuntimeError as err:  # parts of mixed dtypes or dimensions
                raise ValueError(
                    f"the parts of a nested tensor do not fit together: {err}"
                ) from err

    def _tuple(self, n: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(self.node(v) for v in n["items"])

    def _list(self, n: dict[str, Any]) -> list[Any]:
        return [self.node(v) for v in n["items"]]

    def _dict(self, n: dict[str, Any]) -> dict[Any, Any]:
        return dict(self.items(n))

    def _set(self, n: dict[str, Any]) -> set[Any]:
        return {self.node(v) for v in n["items"]}

    def _frozenset(self, n: dict[str, Any]) -> frozenset[Any]:
        return frozenset(self.node(v) for v in n["items"])

    def _namedtuple(self, n: dict[str, Any]) -> tuple[Any, ...]:
        items = [self.node(v) for v in n["items"]]
        cls = _find_class(n["class"])
        if cls is None:
            self.fallback(n, "is not imported", "tuple")
            return tuple(items)
        fields = _static(cls, "_fields")
        if (
            not issubclass(cls, tuple)
            or type(fields) is not tuple
            or not all(type(f) is str for f in fields)
            or list(fields) != n["fields"]
        ):
            self.fallback(n, "is not a namedtuple with the saved fields", "tuple")
            return tuple(items)
        return tuple.__new__(cls, items)

    def _dataclass(self, n: dict[str, Any]) -> Any:
        fields = [(_typed(name, str), self.node(v)) for name, v in n["fields"]]
        items = self.items(n) if "items" in n else None
        cls = _find_class(n["class"])
        plain = dict(items) if items is not None else dict(fields)
        if cls is None:
            self.fallback(n, "is not imported", "dict")
            return plain
        names = _dataclass_fields(cls)
        if names != [name for name, _ in fields] or (
            items is not None and not issubclass(cls, dict)
        ):
            self.fallback(n, "is not a dataclass with the saved fields", "dict")
            return plain
        if not all(_settable(cls, name) for name in names):
            self.fallback(n, "has a property or descriptor in place of a field", "dict")
            return plain
        # no __init__, __new__, __post_init__ or __setattr__ of the class runs: the instance
        # is assembled by object's own setter, into its __dict__ or slots
        try:
            obj = _new_mapping(cls, items) if items is not None else object.__new__(cls)
            for name, value in fields:
                object.__setattr__(obj, name, value)
        except (TypeError, AttributeError):
            self.fallback(n, "cannot be assembled without running its code", "dict")
            return plain
        return obj

    def _mapping(self, n: dict[str, Any]) -> Any:
        items = self.items(n)
        cls = _find_class(n["class"])
        if cls is None:
            self.fallback(n, "is not imported", "dict")
            return dict(items)
        if not issubclass(cls, dict):
            self.fallback(n, "is not a dict subclass", "dict")
            return dict(items)
        obj = _new_mapping(cls, items)
        if issubclass(cls, defaultdict):  # set through defaultdict's slot, not cls.__setattr__
            factory = n.get("factory")
            known = _DEFAULT_FACTORIES.get(factory) if isinstance(factory, str) else None
            _FACTORY_SLOT.__set__(obj, known)
        return obj

    def _object(self, n: dict[str, Any]) -> dict[str, Any]:
        attrs = {_typed(name, str): self.node(v) for name, v in n["attrs"]}
        ref = n["class"]
        _warn(
            f"snap[{self.key!r}]: {ref['module']}.{ref['qualname']} comes back as a plain dict "
            "of its attributes: bundles rebuild only dataclasses, namedtuples and "
            "dict subclasses, so such objects always load as dicts, whatever is imported. Read "
            "the attributes from the dict, or make the class a dataclass before capturing to get "
            "instances back"
        )
        return attrs


def _new_mapping(cls: type, items: list[tuple[Any, Any]]) -> Any:
    # the nearest built-in base creates and fills the instance, never the class's own code
    # by identity: ``in`` would compare with ==, which a metaclass can define
    base = next(b for b in _mro(cls) if b is OrderedDict or b is defaultdict or b is dict)
    obj: Any = base.__new__(cls)
    for key, value in items:
        base.__setitem__(obj, key, value)
    return obj


def _typed(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value
