"""Turning command-line text into a model and its inputs: ``MODULE:FACTORY``, ``--arg``,
``--input`` specs and ``--device``.

Everything that can be checked before the model is built is checked first (the factory path,
the keyword names against the factory's signature, the device), so that a typo costs no model
construction. Errors raised by the user's own code (a factory or a ``forward`` that raises) are
reported as theirs: the exception type and message, and the line of their code that raised.
torch is imported inside the functions, so that the command line's help stays fast.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._errors import TensorSnapError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "UsageError",
    "backward_target",
    "build",
    "check_call",
    "check_device",
    "check_kwargs",
    "default_inputs",
    "describe_inputs",
    "keyword_hint",
    "make_inputs",
    "own_error",
    "parse_kwargs",
    "resolve",
]


class UsageError(TensorSnapError):
    """A command-line argument that cannot be used as given."""


def _closest(word: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(word, choices, n=3)
    return f"; closest: {', '.join(near)}" if near else ""


# -- the factory ----------------------------------------------------------------------------


def resolve(target: str) -> Any:
    """The callable named by ``MODULE:FACTORY`` (the current directory is importable)."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise UsageError(
            f"{target!r} is not MODULE:FACTORY; expected for example mypkg.models:build or "
            "transformers:GPT2Config"
        )
    # like 'python -m', make modules in the current directory importable
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name + ".").startswith(err.name + "."):
            raise UsageError(
                f"cannot import module {module_name!r} (from {target!r}): no such module in the "
                "current directory or the installed packages"
            ) from err
        raise UsageError(f"importing {module_name!r} failed: {own_error(err)}") from err
    except Exception as err:  # the module's own code raised while it was imported
        raise UsageError(f"importing {module_name!r} failed: {own_error(err)}") from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise UsageError(
                f"{getattr(obj, '__name__', module_name)!r} has no attribute {part!r} "
                f"(from {target!r}){_closest(part, names)}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{target!r} is a {type(obj).__name__}, not a factory to call")
    return obj


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``--arg KEY=VALUE`` values: Python literals where they parse, else strings."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--arg {pair!r}: expected KEY=VALUE, for example n_layer=2")
        kwargs[key] = _literal(value)
    return kwargs


def _transformers_kind(obj: Any) -> str | None:
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(obj, type):
        return None
    if issubclass(obj, transformers.PretrainedConfig):
        return "config"
    if issubclass(obj, transformers.PreTrainedModel):
        return "model"
    return None


def check_kwargs(factory: Any, kwargs: dict[str, Any], target: str) -> None:
    """Refuse ``--arg`` names the factory does not take, before anything is built."""
    if _transformers_kind(factory) is not None or not kwargs:
        return  # configs take any keyword
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and C extensions may have none
        return
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    for key in kwargs:
        if key not in accepted:
            takes = ", ".join(accepted) if accepted else "no keyword arguments"
            raise UsageError(
                f"--arg {key}=...: {target} takes no argument {key!r}{_closest(key, accepted)} "
                f"(it takes: {takes})"
            )


def build(factory: Any, kwargs: dict[str, Any], auto_class: str, target: str) -> nn.Module:
    """Call the factory (or build a transformers model from a config class) and check it."""
    from torch import nn

    kind = _transformers_kind(factory)
    if kind == "config":
        import transformers

        auto: Any = getattr(transformers, auto_class, None)
        if auto is None or not hasattr(auto, "from_config"):
            raise UsageError(
                f"--auto-class {auto_class!r} is not a transformers auto class; use for "
                "example AutoModel or AutoModelForCausalLM"
            )
    try:
        if kind == "config":
            model = auto.from_config(factory(**kwargs))
        elif kind == "model":
            model = factory(factory.config_class(**kwargs))
        else:
            model = factory(**kwargs)
    except TensorSnapError:
        raise
    except Exception as err:
        raise UsageError(
            f"{target} raised while building the model (check the --arg values): {own_error(err)}"
        ) from err
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"{target!r} returned a {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def check_device(text: str) -> str:
    """``text`` as a device this torch build can use, or a clear error."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        known = ["cpu", "cuda", "mps", "xpu", "meta"]
        raise UsageError(
            f"--device {text!r} is not a device{_closest(text.split(':')[0], known)} "
            f"(torch says: {err})"
        ) from None
    if device.type == "cpu":
        return text
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is not None and not available():
        build = "a CPU-only build" if torch.version.cuda is None else "this build"
        raise UsageError(
            f"--device {text!r}: torch {torch.__version__} ({build}) has no usable "
            f"{device.type} device here; use --device cpu, or install a torch build for it"
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise UsageError(
            f"--device {text!r}: only {count()} {device.type} device(s) visible "
            f"(indices 0 to {count() - 1})"
        )
    return text


# -- inputs ---------------------------------------------------------------------------------


def _shape(text: str, spec: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 0 for d in dims):
        raise UsageError(
            f"input spec {spec!r}: shape {text!r} is not dims joined by x, e.g. 1x3x224x224"
        )
    return dims


def _dtype(text: str | None, default: torch.dtype, spec: str) -> torch.dtype:
    import torch

    if text is None:
        return default
    dtypes = {
        name: value
        for name, value in vars(torch).items()
        if isinstance(value, torch.dtype) and not name.startswith("_")
    }
    if text not in dtypes:
        raise UsageError(
            f"input spec {spec!r}: {text!r} is not a torch dtype{_closest(text, list(dtypes))}"
        )
    return dtypes[text]


def _make_input(spec: str, device: str) -> list[tuple[str | None, torch.Tensor]]:
    """Tensors for one ``--input`` spec, each with its keyword name (None: positional)."""
    import torch

    name: str | None = None
    body = spec
    head, sep, rest = spec.partition("=")
    if sep and head.isidentifier():
        name, body = head, rest
    kind, _, params = body.partition(":")
    fields = params.split(":") if params else []
    if body.endswith(".safetensors") or ".safetensors:" in body:
        return _file_input(name, body, spec, device)
    if kind in ("randn", "rand", "zeros", "ones"):
        if len(fields) not in (1, 2):
            raise UsageError(f"input spec {spec!r}: expected {kind}:SHAPE[:DTYPE]")
        shape = _shape(fields[0], spec)
        dtype = _dtype(fields[1] if len(fields) == 2 else None, torch.float32, spec)
        if not (dtype.is_floating_point or dtype.is_complex) and kind in ("randn", "rand"):
            raise UsageError(f"input spec {spec!r}: {kind} needs a floating-point dtype")
        make: Callable[..., torch.Tensor] = getattr(torch, kind)
        return [(name, make(shape, dtype=dtype, device=device))]
    if kind == "randint":
        if len(fields) not in (2, 3):
            raise UsageError(f"input spec {spec!r}: expected randint:LOW-HIGH:SHAPE[:DTYPE]")
        low_text, dash, high_text = fields[0].partition("-")
        try:
            low, high = int(low_text), int(high_text)
        except ValueError:
            dash = ""
        if not dash or low >= high:
            raise UsageError(
                f"input spec {spec!r}: range {fields[0]!r} is not LOW-HIGH with LOW < HIGH, "
                "e.g. randint:0-1000:1x32 (HIGH excluded)"
            )
        shape = _shape(fields[1], spec)
        dtype = _dtype(fields[2] if len(fields) == 3 else None, torch.int64, spec)
        return [(name, torch.randint(low, high, shape, dtype=dtype, device=device))]
    raise UsageError(
        f"input spec {spec!r} is not understood; use randn:SHAPE, rand:SHAPE, zeros:SHAPE, "
        "ones:SHAPE, randint:LOW-HIGH:SHAPE (each with an optional :DTYPE) or "
        "FILE.safetensors[:TENSOR], optionally as NAME=SPEC (see tensorsnap capture --help)"
    )


def _file_input(
    name: str | None, body: str, spec: str, device: str
) -> list[tuple[str | None, torch.Tensor]]:
    path, _, tensor_name = body.partition(".safetensors")
    path += ".safetensors"
    tensor_name = tensor_name.removeprefix(":")
    if not os.path.isfile(path):
        raise UsageError(f"input spec {spec!r}: no such file {os.path.abspath(path)}")
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise UsageError(
            "reading .safetensors inputs needs safetensors: pip install 'tensorsnap[cli]'"
        ) from err
    try:
        with safe_open(path, framework="pt", device=device) as f:
            names = list(f.keys())
            if tensor_name:
                if tensor_name not in names:
                    raise UsageError(
                        f"input spec {spec!r}: {path} has no tensor {tensor_name!r}"
                        f"{_closest(tensor_name, names)}"
                    )
                return [(name, f.get_tensor(tensor_name))]
            if len(names) == 1:
                return [(name, f.get_tensor(names[0]))]
            if name is not None or not names:
                raise UsageError(
                    f"input spec {spec!r}: {path} holds {len(names)} tensors "
                    f"({', '.join(names[:5])}); pick one with {path}:TENSOR"
                )
            return [(n, f.get_tensor(n)) for n in names]
    except UsageError:
        raise
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise UsageError(f"input spec {spec!r}: cannot read {path}: {err}") from err


def default_inputs(model: nn.Module) -> list[str]:
    """Token ids for a model with ``config.vocab_size``; otherwise an error asking for inputs."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return [f"input_ids=randint:0-{vocab}:1x16"]
    raise UsageError(
        "no --input given and the model has no config.vocab_size to draw token ids from; "
        "pass inputs, e.g. --input randn:1x3x224x224 (see tensorsnap capture --help)"
    )


def make_inputs(
    specs: list[str], device: str
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The positional and keyword inputs of the ``--input`` specs, in order."""
    positional: list[torch.Tensor] = []
    keywords: dict[str, torch.Tensor] = {}
    for spec in specs:
        for name, tensor in _make_input(spec, device):
            if name is None:
                if keywords:
                    raise UsageError(
                        f"input spec {spec!r}: positional inputs must come before keyword "
                        "inputs (NAME=SPEC)"
                    )
                positional.append(tensor)
            else:
                if name in keywords:
                    raise UsageError(f"input spec {spec!r}: keyword {name!r} given twice")
                keywords[name] = tensor
    return positional, keywords


def check_call(model: nn.Module, positional: list[Any], keywords: Mapping[str, Any]) -> None:
    """Refuse inputs that do not fit ``model.forward``'s signature, before it runs."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*positional, **keywords)
    except TypeError as err:
        given = [f"{len(positional)} positional"] + [f"{k}=" for k in keywords]
        raise UsageError(
            f"the --input specs do not fit {type(model).__name__}.forward{signature}: {err} "
            f"(given: {', '.join(given)})"
        ) from None


def keyword_hint(model: nn.Module, keywords: Mapping[str, Any]) -> str:
    """``; input 'input_idz' is not a named parameter of forward (closest: input_ids)``, or "".

    For a forward that takes ``**kwargs`` (transformers models do), a misspelt keyword input is
    accepted and only fails deep inside the model; said beside that failure, it is found.
    """
    try:
        named = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        return ""
    for key in keywords:
        if key not in named:
            return f"; input {key!r} is not a named parameter of forward{_closest(key, named)}"
    return ""


# -- running --------------------------------------------------------------------------------


def own_error(err: BaseException, model: nn.Module | None = None) -> str:
    """``Type: message`` of an exception raised by user code, with where it was raised.

    Where is the innermost module of ``model`` whose call was running (named as in its keys),
    and the innermost frame outside torch and tensorsnap: the user's model or factory code,
    which is where a fix starts.
    """
    text = f"{type(err).__name__}: {err}".strip().rstrip(":")
    lines = text.splitlines()
    first = (lines[0] + (" ..." if len(lines) > 1 else "")) if lines else type(err).__name__
    where = []
    if model is not None:
        names = {id(m): n for n, m in model.named_modules()}
        inner = None
        for frame, _ in traceback.walk_tb(err.__traceback__):
            owner = frame.f_locals.get("self")
            if id(owner) in names:
                inner = owner
        if inner is not None:
            where.append(f"in module {names[id(inner)]!r} ({type(inner).__name__})")
    skip = (os.path.dirname(__file__), _package_dir("torch"))
    for summary in reversed(traceback.extract_tb(err.__traceback__)):
        if not any(s and summary.filename.startswith(s) for s in skip):
            where.append(f"at {_short(summary.filename)}:{summary.lineno}, in {summary.name}")
            break
    return f"{first} ({'; '.join(where)})" if where else first


def describe_inputs(positional: list[Any], keywords: Mapping[str, Any]) -> str:
    """``2x3 float32, mask=2x3 bool``: the inputs' shapes and dtypes, for error messages."""

    def one(t: Any) -> str:
        shape = "x".join(map(str, getattr(t, "shape", ()))) or "scalar"
        return f"{shape} {str(getattr(t, 'dtype', type(t).__name__)).removeprefix('torch.')}"

    parts = [one(t) for t in positional] + [f"{k}={one(t)}" for k, t in keywords.items()]
    return ", ".join(parts) or "none"


def _package_dir(name: str) -> str:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return os.path.dirname(path) if path else ""


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return rel if not rel.startswith("..") else path


def backward_target(output: Any) -> torch.Tensor:
    """The scalar to run backward from: the output's ``loss``, else the sum of its floats."""
    import torch

    from ._diff import leaves

    loss = None
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        loss = output["loss"]
    elif isinstance(getattr(output, "loss", None), torch.Tensor):
        loss = output.loss
    if loss is not None and loss.requires_grad:
        return loss.sum()
    parts = [
        leaf.float().sum()
        for _, leaf in leaves(output)
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.requires_grad
    ]
    if not parts:
        raise UsageError(
            "--grads: the model's output holds no floating-point tensor that requires grad, so "
            "there is nothing to run backward from (drop --grads, or use --train)"
        )
    return torch.stack(parts).sum()
