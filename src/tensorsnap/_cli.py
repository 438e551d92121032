"""The ``tensorsnap`` command: demo, capture, ls, diff and report.

Tables and progress are drawn with rich (the ``cli`` extra); the report's plots need matplotlib
(the ``report`` extra). Both are imported only when a command runs, and a missing one is named
with the ``pip install`` line that brings it. Errors that are the user's to fix (a bad factory
path, input spec or pattern, an unreadable bundle) print one message without a traceback and
exit with 2.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import importlib
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._errors import BundleWarning, TensorSnapError
from ._snapshot import human_bytes

__all__ = ["main"]

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
exit codes:
  0  success (for diff: equal within tolerance)
  1  diff found differences
  2  usage or input error: bad arguments, factory path, input spec or pattern, an unreadable
     bundle, or a missing optional dependency

Run 'tensorsnap COMMAND --help' for a command's options."""

_CAPTURE_HELP = """\
TARGET is MODULE:FACTORY. The module is imported (the current directory is searched first) and
FACTORY (a dotted attribute path) is resolved in it:
  - a function or nn.Module class is called with the --arg values as keyword arguments;
  - a transformers config class (transformers:GPT2Config) is built from the --arg values and
    turned into a model with AutoModel.from_config (another auto class with --auto-class);
  - a transformers model class (transformers:GPT2LMHeadModel) is built from its own config
    class, made from the --arg values.
--arg KEY=VALUE values are Python literals (2, 0.1, True, None, 'text', [1, 2]); anything
else is a string (attn_implementation=eager).

Input specs (--input, repeatable; NAME=SPEC passes a keyword argument, SPEC a positional one):
  randn:SHAPE[:DTYPE]          normal samples, e.g. randn:1x3x224x224
  rand:SHAPE[:DTYPE]           uniform samples in [0, 1)
  zeros:SHAPE[:DTYPE], ones:SHAPE[:DTYPE]
  randint:LOW-HIGH:SHAPE[:DTYPE]   integers in [LOW, HIGH), e.g. input_ids=randint:0-1000:1x32
  FILE.safetensors[:TENSOR]    tensors from a file: one named tensor, or the file's only
                               tensor; a file of several tensors without :TENSOR and without
                               NAME= passes each as a keyword argument named after it
SHAPE is dims joined by x (2x8); DTYPE a torch dtype name (float16, bfloat16, int32).
Without --input, a model whose config has vocab_size gets input_ids=randint:0-VOCAB:1x16.

Weights and inputs are drawn after torch.manual_seed(--seed), so two runs of the same command
capture the same values. The model runs in eval mode (--train keeps train mode). With --grads,
backward runs from the output's 'loss' when it has one, else from the sum of all floating
output tensors."""

_DTYPES = {
    name: value
    for name, value in vars(torch).items()
    if isinstance(value, torch.dtype) and not name.startswith("_")
}


class _UsageError(TensorSnapError):
    """A command-line argument that cannot be used as given."""


# -- optional dependencies ------------------------------------------------------------------


def _rich() -> Any:
    try:
        import rich.console
        import rich.table
    except ImportError as err:
        raise _UsageError(
            "the tensorsnap command line needs rich, which is not installed: "
            "pip install 'tensorsnap[cli]'"
        ) from err
    return rich


def _console(stderr: bool = False) -> Any:
    _rich()
    from rich.console import Console

    # markup off: keys such as "out['hidden'][0]" contain brackets that are not markup
    console = Console(stderr=stderr, markup=False, highlight=False, emoji=False)
    if not console.is_terminal and console.width < 160:
        console.width = 160  # pipes and files get whole rows instead of wrapped cells
    return console


def _table(*columns: str, title: str | None = None, right: Sequence[str] = ()) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    for column in columns:
        if column == "key":
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right" if column in right else "left")
    return table


def _num(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


# -- demo ---------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo
    from ._report import write_report

    out, err = _console(), _console(stderr=True)
    with err.status("capturing TinyGPT (forward + backward)..."):
        snap, bundle = _demo.run(args.out)
    _print_summary(out, snap, "captured TinyGPT forward + backward (ops=True, grads=True)")
    inplace_ok = not torch.equal(snap["blocks.0.mlp"], snap["blocks.0/add_"])
    out.print(
        f"\nblocks.0.mlp kept its value from before the in-place 'y += x': {inplace_ok}\n"
        f"blocks.0.norm runs twice per block: keys 'blocks.0.norm' and "
        f"'blocks.0.norm#1' both exist: {'blocks.0.norm#1' in snap}"
    )
    report = ""
    if not args.no_report:
        with err.status("writing the HTML report..."):
            report = write_report(
                snap, os.path.join(args.out, "report.html"), title="tensorsnap demo", source=bundle
            )
    out.print(f"\nbundle: {os.path.abspath(bundle)}")
    if report:
        out.print(f"report: {report}")
    out.print(f"next:   tensorsnap ls {bundle}")
    return EXIT_OK


def _print_summary(console: Any, snap: Any, title: str) -> None:
    table = _table("kind", "keys", "bytes", "first keys", title=title, right=("keys", "bytes"))
    groups: dict[str, list[Any]] = {}
    for record in snap.records:
        groups.setdefault(record.kind, []).append(record)
    for kind, records in groups.items():
        first = ", ".join(r.key or '""' for r in records[:3])
        if len(records) > 3:
            first += ", ..."
        table.add_row(kind, str(len(records)), human_bytes(sum(r.nbytes for r in records)), first)
    table.add_row("total", str(len(snap)), human_bytes(snap.nbytes), "")
    console.print(table)


# -- capture ------------------------------------------------------------------------------


def _resolve(target: str) -> Any:
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise _UsageError(
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
            raise _UsageError(
                f"cannot import module {module_name!r} (from {target!r}): no such module in the "
                "current directory or the installed packages"
            ) from err
        raise _UsageError(f"importing {module_name!r} failed: {err}") from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = difflib.get_close_matches(part, names, n=3)
            hint = f"; closest: {', '.join(near)}" if near else ""
            raise _UsageError(
                f"{getattr(obj, '__name__', module_name)!r} has no attribute {part!r} "
                f"(from {target!r}){hint}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise _UsageError(f"{target!r} is a {type(obj).__name__}, not a factory to call")
    return obj


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_args_kv(pairs: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise _UsageError(f"--arg {pair!r}: expected KEY=VALUE, for example n_layer=2")
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


def _build(factory: Any, kwargs: dict[str, Any], auto_class: str, target: str) -> nn.Module:
    kind = _transformers_kind(factory)
    if kind == "config":
        import transformers

        auto = getattr(transformers, auto_class, None)
        if auto is None or not hasattr(auto, "from_config"):
            raise _UsageError(
                f"--auto-class {auto_class!r} is not a transformers auto class; use for "
                "example AutoModel or AutoModelForCausalLM"
            )
        model = auto.from_config(factory(**kwargs))
    elif kind == "model":
        model = factory(factory.config_class(**kwargs))
    else:
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise _UsageError(
            f"{target!r} returned a {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def _shape(text: str, spec: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 0 for d in dims):
        raise _UsageError(
            f"input spec {spec!r}: shape {text!r} is not dims joined by x, e.g. 1x3x224x224"
        )
    return dims


def _dtype(text: str | None, default: torch.dtype, spec: str) -> torch.dtype:
    if text is None:
        return default
    if text not in _DTYPES:
        near = difflib.get_close_matches(text, list(_DTYPES), n=3)
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise _UsageError(f"input spec {spec!r}: {text!r} is not a torch dtype{hint}")
    return _DTYPES[text]


def _make_input(spec: str, device: str) -> list[tuple[str | None, torch.Tensor]]:
    """Tensors for one ``--input`` spec, each with its keyword name (None: positional)."""
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
            raise _UsageError(f"input spec {spec!r}: expected {kind}:SHAPE[:DTYPE]")
        shape = _shape(fields[0], spec)
        dtype = _dtype(fields[1] if len(fields) == 2 else None, torch.float32, spec)
        if not (dtype.is_floating_point or dtype.is_complex) and kind in ("randn", "rand"):
            raise _UsageError(f"input spec {spec!r}: {kind} needs a floating-point dtype")
        make: Callable[..., torch.Tensor] = getattr(torch, kind)
        return [(name, make(shape, dtype=dtype, device=device))]
    if kind == "randint":
        if len(fields) not in (2, 3):
            raise _UsageError(f"input spec {spec!r}: expected randint:LOW-HIGH:SHAPE[:DTYPE]")
        low_text, dash, high_text = fields[0].partition("-")
        try:
            low, high = int(low_text), int(high_text)
        except ValueError:
            dash = ""
        if not dash or low >= high:
            raise _UsageError(
                f"input spec {spec!r}: range {fields[0]!r} is not LOW-HIGH with LOW < HIGH, "
                "e.g. randint:0-1000:1x32 (HIGH excluded)"
            )
        shape = _shape(fields[1], spec)
        dtype = _dtype(fields[2] if len(fields) == 3 else None, torch.int64, spec)
        return [(name, torch.randint(low, high, shape, dtype=dtype, device=device))]
    raise _UsageError(
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
        raise _UsageError(f"input spec {spec!r}: no such file {os.path.abspath(path)}")
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise _UsageError(
            "reading .safetensors inputs needs safetensors: pip install 'tensorsnap[cli]'"
        ) from err
    try:
        with safe_open(path, framework="pt", device=device) as f:
            names = list(f.keys())
            if tensor_name:
                if tensor_name not in names:
                    near = difflib.get_close_matches(tensor_name, names, n=3)
                    hint = f"; closest: {', '.join(near)}" if near else ""
                    raise _UsageError(
                        f"input spec {spec!r}: {path} has no tensor {tensor_name!r}{hint}"
                    )
                return [(name, f.get_tensor(tensor_name))]
            if len(names) == 1:
                return [(name, f.get_tensor(names[0]))]
            if name is not None or not names:
                raise _UsageError(
                    f"input spec {spec!r}: {path} holds {len(names)} tensors "
                    f"({', '.join(names[:5])}); pick one with {path}:TENSOR"
                )
            return [(n, f.get_tensor(n)) for n in names]
    except _UsageError:
        raise
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise _UsageError(f"input spec {spec!r}: cannot read {path}: {err}") from err


def _default_inputs(model: nn.Module) -> list[str]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return [f"input_ids=randint:0-{vocab}:1x16"]
    raise _UsageError(
        "no --input given and the model has no config.vocab_size to draw token ids from; "
        "pass inputs, e.g. --input randn:1x3x224x224 (see tensorsnap capture --help)"
    )


def _backward_target(output: Any) -> torch.Tensor:
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
        raise _UsageError(
            "--grads: the model's output holds no floating-point tensor that requires grad, so "
            "there is nothing to run backward from (drop --grads, or use --train)"
        )
    return torch.stack(parts).sum()


def _cmd_capture(args: argparse.Namespace) -> int:
    from ._capture import capture

    out, err = _console(), _console(stderr=True)
    # validate everything cheap before building a possibly large model
    factory = _resolve(args.target)
    kwargs = _parse_args_kv(args.arg)
    if os.path.lexists(args.output):
        raise _UsageError(
            f"{os.path.abspath(args.output)} already exists; bundles are never overwritten. "
            "Pass a new -o path"
        )
    started = time.perf_counter()
    with err.status(f"building {args.target}...") as status:
        torch.manual_seed(args.seed)
        try:
            model = _build(factory, kwargs, args.auto_class, args.target)
        except TensorSnapError:
            raise
        except Exception as error:
            traceback.print_exc()
            raise _UsageError(f"building the model with {args.target!r} failed: {error}") from error
        model.train(args.train)
        model.to(args.device)
        specs = args.input or _default_inputs(model)
        positional: list[torch.Tensor] = []
        keywords: dict[str, torch.Tensor] = {}
        for spec in specs:
            for name, tensor in _make_input(spec, args.device):
                if name is None:
                    if keywords:
                        raise _UsageError(
                            f"input spec {spec!r}: positional inputs must come before keyword "
                            "inputs (NAME=SPEC)"
                        )
                    positional.append(tensor)
                else:
                    if name in keywords:
                        raise _UsageError(f"input spec {spec!r}: keyword {name!r} given twice")
                    keywords[name] = tensor
        parameters = sum(p.numel() for p in model.parameters())
        status.update(f"running {type(model).__name__} ({parameters:,} parameters)...")
        with capture(
            model,
            include=args.include or None,
            exclude=args.exclude or None,
            ops=args.ops,
            grads=args.grads,
            inputs=args.inputs,
        ) as snap:
            try:
                output = model(*positional, **keywords)
                if args.grads:
                    status.update(f"running backward ({len(snap)} keys so far)...")
                    _backward_target(output).backward()
            except TensorSnapError:
                raise
            except Exception as error:
                traceback.print_exc()
                raise _UsageError(
                    f"running the model failed: {type(error).__name__}: {error} (check the "
                    "--input specs against the model's forward signature)"
                ) from error
        status.update(f"saving {len(snap)} keys ({human_bytes(snap.nbytes)})...")
        snap.save(args.output)
    _print_summary(out, snap, f"captured {args.target} in {time.perf_counter() - started:.1f} s")
    out.print(f"\nbundle: {os.path.abspath(args.output)}")
    return EXIT_OK


# -- ls -----------------------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace) -> int:
    from ._bundle import load
    from ._report import rows

    out = _console()
    snap = load(args.bundle)
    if args.keys:
        chosen = {k for k in snap if any(fnmatch.fnmatchcase(k, p) for p in args.keys)}
        if not chosen:
            raise _UsageError(
                f"--keys {' '.join(args.keys)!r} matched none of the {len(snap)} keys in "
                f"{args.bundle} (run 'tensorsnap ls {args.bundle}' to list them)"
            )
        subset = _Subset(snap, chosen)
        view: Mapping[str, Any] = subset
        records = subset.records
    else:
        view, records = snap, list(snap.records)
    columns = ["key", "kind", "shape", "dtype", "bytes"]
    if not args.no_stats:
        columns += ["min", "max", "mean"]
    table = _table(*columns, right=("bytes", "min", "max", "mean"))
    for row in rows(view, stats=not args.no_stats, hist=False):
        shape = "x".join(map(str, row.shape)) if row.shape is not None else "-"
        cells = [row.label, row.record.kind, shape, row.dtype, human_bytes(row.nbytes)]
        if not args.no_stats:
            s = row.stats
            cells += [_num(s.min), _num(s.max), _num(s.mean)] if s else [row.text, "", ""]
        table.add_row(*cells)
    out.print(table)
    out.print(f"{len(view)} keys, {human_bytes(sum(r.nbytes for r in records))}")
    return EXIT_OK


class _Subset(Mapping[str, Any]):
    """The chosen keys of a snapshot, in its order, with their records."""

    def __init__(self, snap: Any, keys: set[str]) -> None:
        self._snap = snap
        self.records = [r for r in snap.records if r.key in keys]

    def __getitem__(self, key: str) -> Any:
        return self._snap[key]

    def __iter__(self) -> Any:
        return (r.key for r in self.records)

    def __len__(self) -> int:
        return len(self.records)


# -- diff ---------------------------------------------------------------------------------


def _cmd_diff(args: argparse.Namespace) -> int:
    from ._bundle import load
    from ._diff import diff, format_error

    out = _console()
    result = diff(load(args.a), load(args.b), rtol=args.rtol, atol=args.atol)
    rows = result.differing
    if rows:
        limit = len(rows) if args.limit == 0 else args.limit
        table = _table(
            "key", "max abs", "max rel", "mismatched", "problems", right=("max abs", "max rel")
        )
        for k in rows[:limit]:
            mark = " <- first" if k.key == result.first_diverging else ""
            table.add_row(
                (k.key or '""') + mark,
                format_error(k.max_abs),
                format_error(k.max_rel),
                f"{k.mismatched}/{k.numel}",
                "; ".join(k.problems[:2]) + (" ..." if len(k.problems) > 2 else ""),
            )
        out.print(table)
        if len(rows) > limit:
            out.print(f"... and {len(rows) - limit} more differing keys (--limit 0 shows all)")
    for side, keys in (("a", result.only_a), ("b", result.only_b)):
        if keys:
            shown = ", ".join(k or '""' for k in keys[:20])
            more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
            out.print(f"only in {side}: {shown}{more}")
    out.print(result.summary())
    return EXIT_OK if result.equal else EXIT_DIFFERENT


# -- report -------------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> int:
    from ._bundle import load
    from ._report import write_report

    out, err = _console(), _console(stderr=True)
    snap = load(args.bundle)
    against = load(args.against) if args.against else None
    target = args.output or os.path.normpath(os.fspath(args.bundle)) + ".html"
    with err.status("writing the HTML report..."):
        path = write_report(
            snap,
            target,
            title=f"tensorsnap report: {os.path.basename(os.path.normpath(args.bundle))}",
            source=os.path.abspath(args.bundle),
            against=against,
            against_source=os.path.abspath(args.against) if args.against else "",
            rtol=args.rtol,
            atol=args.atol,
        )
    out.print(f"report: {path}")
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _add_tolerances(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rtol", type=_tolerance, default=1e-5, help="relative tolerance (default: 1e-5)"
    )
    parser.add_argument(
        "--atol", type=_tolerance, default=1e-8, help="absolute tolerance (default: 1e-8)"
    )


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="tensorsnap",
        description="Capture, inspect, compare and report the tensors a PyTorch model creates.",
        epilog=_EPILOG,
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"tensorsnap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="capture a built-in model end to end (no downloads)",
        description="Capture forward + backward of a built-in tiny GPT-style model with "
        "ops=True, grads=True; save the bundle to DIR/bundle and the report to "
        "DIR/report.html (an earlier demo's bundle in DIR is replaced).",
        epilog=_EPILOG,
        formatter_class=raw,
    )
    demo.add_argument(
        "-o", "--out", default="tensorsnap-demo", metavar="DIR",
        help="output directory (default: ./tensorsnap-demo)",
    )  # fmt: skip
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")
    demo.set_defaults(func=_cmd_demo)

    cap = sub.add_parser(
        "capture",
        help="build a model from MODULE:FACTORY, run it under capture, save a bundle",
        description="Build a model, run it on generated or saved inputs under "
        "tensorsnap.capture, and save the snapshot as a bundle.",
        epilog=_CAPTURE_HELP + "\n\n" + _EPILOG,
        formatter_class=raw,
    )
    cap.add_argument("target", metavar="MODULE:FACTORY", help="e.g. mypkg.models:build")
    cap.add_argument(
        "-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to write (new)"
    )
    cap.add_argument(
        "--arg", action="append", default=[], metavar="KEY=VALUE",
        help="keyword argument for the factory or config (repeatable)",
    )  # fmt: skip
    cap.add_argument(
        "--input", action="append", default=[], metavar="[NAME=]SPEC",
        help="a model input (repeatable; see below)",
    )  # fmt: skip
    cap.add_argument(
        "--include", action="append", default=[], metavar="PATTERN",
        help="glob over keys to capture (repeatable; default: all)",
    )  # fmt: skip
    cap.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="glob over keys not to capture (repeatable)",
    )  # fmt: skip
    cap.add_argument("--ops", action="store_true", help="capture functional ops (C/op keys)")
    cap.add_argument("--grads", action="store_true", help="run backward and capture gradients")
    cap.add_argument("--inputs", action="store_true", help="capture module inputs (P:in)")
    cap.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default: 0)")
    cap.add_argument("--train", action="store_true", help="keep train mode (default: eval)")
    cap.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    cap.add_argument(
        "--auto-class", default="AutoModel", metavar="NAME",
        help="transformers auto class for config targets (default: AutoModel)",
    )  # fmt: skip
    cap.set_defaults(func=_cmd_capture)

    ls = sub.add_parser(
        "ls",
        help="list a bundle's keys with shape, dtype, size and min/max/mean",
        description="List the keys of a bundle in execution order; nested values get one row "
        "per tensor, labelled with its path. Statistics are over finite elements.",
        epilog=_EPILOG,
        formatter_class=raw,
    )
    ls.add_argument("bundle", metavar="BUNDLE")
    ls.add_argument(
        "-k", "--keys", action="append", default=[], metavar="PATTERN",
        help="only keys matching this glob (repeatable)",
    )  # fmt: skip
    ls.add_argument(
        "--no-stats", action="store_true", help="skip min/max/mean (reads no tensor data)"
    )
    ls.set_defaults(func=_cmd_ls)

    dif = sub.add_parser(
        "diff",
        help="compare two bundles key by key; exit 1 when they differ",
        description="Compare bundle A with bundle B in A's execution order: per-key max "
        "abs/rel error, the first diverging key, keys on one side only, shape/dtype "
        "mismatches. An element is close when |a - b| <= atol + rtol * |b|; NaNs in the same "
        "places are equal; integer tensors must match exactly.",
        epilog=_EPILOG,
        formatter_class=raw,
    )
    dif.add_argument("a", metavar="A", help="bundle (execution order is taken from it)")
    dif.add_argument("b", metavar="B", help="reference bundle (relative errors divide by it)")
    _add_tolerances(dif)
    dif.add_argument(
        "--limit", type=int, default=30, help="differing keys to list (0: all; default: 30)"
    )
    dif.set_defaults(func=_cmd_diff)

    rep = sub.add_parser(
        "report",
        help="write a self-contained HTML report of a bundle",
        description="Write one self-contained HTML page: a sortable table of per-tensor "
        "statistics (mean, std, min/max, zeros, NaN/Inf), histograms, a per-layer statistics "
        "plot and, with --against, the diff against a second bundle. Needs matplotlib.",
        epilog=_EPILOG,
        formatter_class=raw,
    )
    rep.add_argument("bundle", metavar="BUNDLE")
    rep.add_argument(
        "-o", "--output", metavar="HTML", help="where to write (default: BUNDLE.html beside it)"
    )
    rep.add_argument("--against", metavar="OTHER_BUNDLE", help="add the diff against this bundle")
    _add_tolerances(rep)
    rep.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tensorsnap`` command line; returns the exit code (0 ok, 1 differ, 2 error).

    Args:
        argv: The arguments without the program name (default: ``sys.argv[1:]``).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and argparse's own usage errors
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    try:
        # a bundle read here brings classes back as plain containers when their modules are
        # not imported (the CLI imports none); say so once instead of once per value
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BundleWarning)
            code = args.func(args)
        for warning in caught:
            if not issubclass(warning.category, BundleWarning):
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
        plain = sum(issubclass(w.category, BundleWarning) for w in caught)
        if plain:
            print(
                f"note: {plain} nested value(s) came back as plain dicts or tuples, because "
                "their classes are not imported in this process (tensors are unaffected)",
                file=sys.stderr,
            )
        return int(code)
    except TensorSnapError as err:
        print(f"tensorsnap {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tensorsnap {args.command}: interrupted", file=sys.stderr)
        return 130
