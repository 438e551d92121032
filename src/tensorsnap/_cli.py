"""The ``tensorsnap`` command: demo, capture, names, ls, diff and report.

Tables and progress are drawn with rich (the ``cli`` extra), imported only when a command runs;
without it the error names the ``pip install`` line that brings it. The report needs nothing
more (its charts are drawn by the page itself). Errors that are the user's to fix (a bad
argument, factory path, input spec or pattern, an unreadable bundle, an error raised by the
model) print one line without a traceback and exit with 2; an option typo names the closest
option. torch is imported by the commands, not by this module, so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from . import _factory
from ._errors import BundleWarning, NonFiniteError, SelectionError, TensorSnapError

# torch is imported inside the commands that need it, never at module level: 'tensorsnap
# --help' and '--version' must not pay its import (seconds). A test runs them and checks that
# torch stayed unimported; a new command imports torch (and _snapshot, _bundle ...) locally.

__all__ = ["main"]

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3
_ROOT = '""'  # how the root module's key is shown

_EPILOG = """\
exit codes:
  0  success (for diff: equal within tolerance)
  1  diff found differences
  2  usage or input error: bad arguments, factory path, input spec or pattern, an unreadable
     bundle, a missing optional dependency, or an error raised by the model itself
  3  an unexpected error inside tensorsnap (a bug: the traceback is printed)

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


_UsageError = _factory.UsageError


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
    import torch

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
        out.print(f"report: {report}  (open it in a browser: hover, zoom, histograms)")
    out.print(f"next:   tensorsnap ls {bundle}")
    return EXIT_OK


def _print_summary(console: Any, snap: Any, title: str) -> None:
    from ._snapshot import human_bytes

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


# -- capture and names ----------------------------------------------------------------------


def _model_and_inputs(args: argparse.Namespace, status: Any) -> tuple[Any, list[Any], dict]:
    """Build the model and its inputs from the arguments shared by capture and names."""
    import torch

    torch.manual_seed(args.seed)
    model = _factory.build(args.factory, args.kwargs, args.auto_class, args.target)
    model.train(args.train)
    model.to(args.device)
    positional, keywords = _factory.make_inputs(
        args.input or _factory.default_inputs(model), args.device
    )
    _factory.check_call(model, positional, keywords)
    parameters = sum(p.numel() for p in model.parameters())
    status.update(f"running {type(model).__name__} ({parameters:,} parameters)...")
    return model, positional, keywords


def _check_model_args(args: argparse.Namespace) -> None:
    """Everything cheap, before a possibly large model is built."""
    args.factory = _factory.resolve(args.target)
    args.kwargs = _factory.parse_kwargs(args.arg)
    _factory.check_kwargs(args.factory, args.kwargs, args.target)
    _factory.check_device(args.device)


def _model_raised(err: Exception, what: str, model: Any, inputs: tuple[list, dict]) -> _UsageError:
    # the model's own error, where it was raised, and what it was given: a shape mismatch is
    # usually an --input spec that does not fit, any other error the model's own
    return _UsageError(
        f"the model raised during {what}: {_factory.own_error(err, model)}; its inputs were "
        f"{_factory.describe_inputs(*inputs)}{_factory.keyword_hint(model, inputs[1])} "
        "(--traceback prints the full traceback)"
    )


def _cmd_capture(args: argparse.Namespace) -> int:
    from ._capture import capture
    from ._snapshot import human_bytes

    out, err = _console(), _console(stderr=True)
    _check_model_args(args)
    if os.path.lexists(args.output):
        raise _UsageError(
            f"{os.path.abspath(args.output)} already exists; bundles are never overwritten. "
            "Pass a new -o path"
        )
    started = time.perf_counter()
    with err.status(f"building {args.target}...") as status:
        model, positional, keywords = _model_and_inputs(args, status)
        session = capture(
            model,
            include=args.include or None,
            exclude=args.exclude or None,
            ops=args.ops,
            grads=args.grads,
            inputs=args.inputs,
            nonfinite=args.nonfinite,
        )
        try:
            with session as snap:
                what = "forward"
                output = model(*positional, **keywords)
                if args.grads:
                    what = "backward"
                    status.update(f"running backward ({len(snap)} keys so far)...")
                    _factory.backward_target(output).backward()
        except NonFiniteError as error:
            partial = error.snapshot
            status.update(f"saving the {len(partial)} keys captured up to {error.key!r}...")
            partial.save(args.output)
            where = os.path.abspath(args.output)
            raise _UsageError(
                f"{repr(error.key) if error.key else _ROOT} is the first captured value with "
                "a NaN or Inf; "
                f"the {len(partial)} keys captured up to and including it are saved in {where} "
                f"(look with 'tensorsnap ls {args.output}'; --inputs also keeps each module's "
                "inputs)"
            ) from error
        except SelectionError as error:
            raise _UsageError(_cli_hint(str(error), args)) from error
        except TensorSnapError:
            raise
        except Exception as error:
            raise _model_raised(error, what, model, (positional, keywords)) from error
        status.update(f"saving {len(snap)} keys ({human_bytes(snap.nbytes)})...")
        snap.save(args.output)
    _print_summary(out, snap, f"captured {args.target} in {time.perf_counter() - started:.1f} s")
    out.print(f"\nbundle: {os.path.abspath(args.output)}")
    return EXIT_OK


def _cli_hint(message: str, args: argparse.Namespace) -> str:
    """An include error's discovery hint, as the command that lists the keys."""
    from ._keys import DISCOVERY_HINT

    flags = " ".join(f"--{o}" for o in ("ops", "inputs", "grads") if getattr(args, o))
    command = f"tensorsnap names {args.target} ... {flags}".rstrip()
    return message.replace(DISCOVERY_HINT, f" (list the keys with '{command}')")


def _cmd_names(args: argparse.Namespace) -> int:
    from ._capture import names

    _check_model_args(args)
    err = _console(stderr=True)
    with err.status(f"building {args.target}...") as status:
        model, positional, keywords = _model_and_inputs(args, status)
        try:
            keys = names(
                model,
                *positional,
                include=args.include or None,
                exclude=args.exclude or None,
                ops=args.ops,
                inputs=args.inputs,
                grads=args.grads,
                **keywords,
            )
        except SelectionError as error:
            raise _UsageError(_cli_hint(str(error), args)) from error
        except TensorSnapError:
            raise
        except Exception as error:
            raise _model_raised(error, "forward", model, (positional, keywords)) from error
    # one key per line on stdout, so that it pipes into grep or wc; the root module is ""
    for key in keys:
        print(key or '""')
    print(f"{len(keys)} keys", file=sys.stderr)
    return EXIT_OK


# -- ls -----------------------------------------------------------------------------------


def _cmd_ls(args: argparse.Namespace) -> int:
    from ._bundle import load
    from ._report import first_nonfinite, rows, stored_bytes
    from ._snapshot import human_bytes

    out = _console()
    snap = load(args.bundle)
    if args.keys:
        chosen = {k for k in snap if any(fnmatch.fnmatchcase(k, p) for p in args.keys)}
        if not chosen:
            from ._snapshot import closest

            near = [k for p in args.keys for k in closest(p, list(snap))]
            hint = f"; closest: {', '.join(map(repr, dict.fromkeys(near)))}" if near else ""
            raise _UsageError(
                f"--keys {' '.join(args.keys)!r} matched none of the {len(snap)} keys in "
                f"{args.bundle}{hint} (run 'tensorsnap ls {args.bundle}' to list them)"
            )
        view: Any = _Subset(snap, chosen)
    else:
        view = snap
    columns = ["key", "kind", "shape", "dtype", "bytes"]
    if not args.no_stats:
        columns += ["min", "max", "mean", "nan", "inf"]
    table = _table(*columns, right=("bytes", "min", "max", "mean", "nan", "inf"))
    listed = rows(view, stats=not args.no_stats, hist=False)
    for row in listed:
        shape = "x".join(map(str, row.shape)) if row.shape is not None else "-"
        cells = [row.label, row.record.kind, shape, row.dtype, human_bytes(row.nbytes)]
        style = None
        if not args.no_stats:
            s = row.stats
            if s is None:
                cells += [row.text, "", "", "", ""]
            else:
                cells += [_num(s.min), _num(s.max), _num(s.mean), str(s.nans), str(s.infs)]
                style = "red" if s.nans or s.infs else None
        table.add_row(*cells, style=style)
    out.print(table)
    footer = f"{len(view)} keys, {stored_bytes(view, listed)}"
    if not args.no_stats:
        bad = first_nonfinite(listed)
        found = f"first non-finite: {bad.label} ({_nonfinite_text(bad)})" if bad else ""
        footer += "; min/max/mean over finite elements; " + (found or "no NaN or Inf")
    out.print(footer)
    return EXIT_OK


def _nonfinite_text(row: Any) -> str:
    s = row.stats
    return f"{s.nans} NaN, {s.infs} Inf of {s.numel}"


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
    match = _match_option(args.match)
    result = diff(load(args.a), load(args.b), rtol=args.rtol, atol=args.atol, match=match)
    if args.json:
        print(_json_text(result.to_dict()))
        return EXIT_OK if result.equal else EXIT_DIFFERENT
    rows = result.differing
    if rows:
        limit = len(rows) if args.limit == 0 else args.limit
        table = _table(
            "key", "max abs", "max rel", "mismatched", "problems", right=("max abs", "max rel")
        )
        for k in rows[:limit]:
            mark = " <- first" if k.key == result.first_diverging else ""
            paired = f" -> {k.key_b or chr(34) * 2}" if k.key_b != k.key else ""
            table.add_row(
                (k.key or '""') + paired + mark,
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


# -- blame, and diff's --match and --json ---------------------------------------------------


def _match_option(text: str | None) -> Any:
    """``--match``: None, ``"auto"``, or a JSON map given inline or as a file."""
    import json

    if text is None or text == "auto":
        return text
    source = text
    if not text.lstrip().startswith("{"):
        try:
            with open(text, encoding="utf-8") as f:
                source = f.read()
        except OSError as err:
            raise _UsageError(
                f"--match {text!r}: not 'auto', not a JSON map and not a readable file ({err})"
            ) from err
    try:
        mapping = json.loads(source)
    except ValueError as err:
        raise _UsageError(f"--match {text!r} is not valid JSON: {err}") from err
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise _UsageError(
            f"--match {text!r}: expected a JSON object of module-path patterns to module-path "
            'patterns, such as {"transformer.h.*.mlp": "blocks.*.ffn"}'
        )
    return mapping


def _json_text(data: Any) -> str:
    """JSON for scripts: infinities and NaNs as the strings "inf", "-inf", "nan"."""
    import json
    import math

    def plain(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return json.dumps(plain(data), indent=1, allow_nan=False)


def _cmd_blame(args: argparse.Namespace) -> int:
    import copy

    import torch

    from ._blame import blame

    out, err = _console(), _console(stderr=True)
    sides = []
    for target, extra in ((args.reference, args.ref_arg), (args.candidate, args.cand_arg)):
        side = copy.copy(args)
        side.target, side.arg = target, [*args.arg, *extra]
        _check_model_args(side)
        sides.append(side)
    dtype = None
    if args.candidate_dtype is not None:
        dtype = getattr(torch, args.candidate_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise _UsageError(
                f"--candidate-dtype {args.candidate_dtype!r} is not a floating-point torch "
                "dtype (bfloat16, float16, float32, float64)"
            )
    with err.status(f"building {args.reference}...") as status:
        reference, positional, keywords = _model_and_inputs(sides[0], status)
        status.update(f"building {args.candidate}...")
        candidate, _, _ = _model_and_inputs(sides[1], status)
        if dtype is not None:
            candidate.to(dtype)
        status.update("replaying the candidate's modules on the reference's inputs...")
        try:
            result = blame(
                reference,
                candidate,
                *positional,
                match=_match_option(args.match),
                rtol=args.rtol,
                atol=args.atol,
                **keywords,
            )
        except TensorSnapError:
            raise
        except Exception as error:
            raise _model_raised(error, "blame", reference, (positional, keywords)) from error
    if args.json:
        print(_json_text({"culprits": list(result.culprits), "modules": result.to_records()}))
    else:
        out.print(str(result))
    return EXIT_DIFFERENT if result.culprits else EXIT_OK


def _add_blame_parser(sub: Any, formatter: Any) -> None:
    bla = sub.add_parser(
        "blame",
        help="which module of a candidate (port, bf16, quantized) introduces its difference",
        description="Build REF and CAND (the capture syntax: MODULE:FACTORY, --arg, --input), run "
        "both, then replay every paired module call of CAND on REF's inputs for that call and "
        "compare with REF's output: each module's local error, free of upstream drift. Culprits "
        "are modules whose own code errs beyond tolerance. Exit 1 when there are culprits.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    bla.add_argument("reference", metavar="REF", help="MODULE:FACTORY of the reference model")
    bla.add_argument("candidate", metavar="CAND", help="MODULE:FACTORY of the candidate model")
    _add_repeated(bla, "--arg", "KEY=VALUE", "keyword argument for both factories")
    _add_repeated(bla, "--ref-arg", "KEY=VALUE", "keyword argument for REF's factory only")
    _add_repeated(bla, "--cand-arg", "KEY=VALUE", "keyword argument for CAND's factory only")
    _add_repeated(bla, "--input", "[NAME=]SPEC", "a model input (as for capture)")
    bla.add_argument(
        "--candidate-dtype", metavar="DTYPE", default=None,
        help="cast the candidate to this dtype after building it (e.g. bfloat16)",
    )  # fmt: skip
    bla.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default: 0)")
    bla.add_argument("--device", default="cpu", help="where both models run (default: cpu)")
    bla.add_argument(
        "--auto-class", default="AutoModel", metavar="NAME",
        help="transformers auto class for config targets (default: AutoModel)",
    )  # fmt: skip
    bla.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_tolerances(bla)
    bla.set_defaults(func=_cmd_blame, train=False, traceback=False)


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
            match=_match_option(args.match),
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
        "--rtol", type=_tolerance, default=None,
        help="relative tolerance (default: per dtype, the lower precision of the two sides)",
    )  # fmt: skip
    parser.add_argument(
        "--atol", type=_tolerance, default=None, help="absolute tolerance (default: per dtype)"
    )
    parser.add_argument(
        "--match", metavar="auto|MAP", default=None,
        help="pair keys whose module names differ: 'auto', or a JSON map of module-path "
        "patterns ('{\"transformer.h.*.mlp\": \"blocks.*.ffn\"}') or a file holding one",
    )  # fmt: skip


def _add_repeated(parser: argparse.ArgumentParser, flag: str, metavar: str, what: str) -> None:
    """A repeatable option whose values collect into a list (``--arg a=1 --arg b=2``)."""
    parser.add_argument(
        flag, action="append", default=[], metavar=metavar, help=f"{what} (repeatable)"
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that build and run a model (capture and names)."""
    parser.add_argument("target", metavar="MODULE:FACTORY", help="e.g. mypkg.models:build")
    _add_repeated(parser, "--arg", "KEY=VALUE", "keyword argument for the factory or config")
    _add_repeated(parser, "--input", "[NAME=]SPEC", "a model input (see below)")
    _add_repeated(parser, "--include", "PATTERN", "glob over keys to capture (default: all)")
    _add_repeated(parser, "--exclude", "PATTERN", "glob over keys not to capture")
    parser.add_argument("--ops", action="store_true", help="capture functional ops (C/op keys)")
    parser.add_argument("--grads", action="store_true", help="run backward and capture gradients")
    parser.add_argument("--inputs", action="store_true", help="capture module inputs (P:in)")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default: 0)")
    parser.add_argument("--train", action="store_true", help="keep train mode (default: eval)")
    parser.add_argument(
        "--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, mps ... "
        "(default: cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--auto-class", default="AutoModel", metavar="NAME",
        help="transformers auto class for config targets (default: AutoModel)",
    )  # fmt: skip
    parser.add_argument(
        "--traceback", action="store_true",
        help="when the model or factory raises, also print its full traceback",
    )  # fmt: skip


class _ArgumentError(Exception):
    """argparse rejected the command line; ``main`` prints it as one line."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, with the closest choice for a typo."""

    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(self.prog, _suggest(self, message))


def _suggest(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's ``message``, plus the closest command for an invalid one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "invalid choice:" in message:
            word = message.split("invalid choice:", 1)[1].split("'")[1]
            near = difflib.get_close_matches(word, list(action.choices), n=1)
            commands = ", ".join(action.choices)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            return f"unknown command {word!r}{hint} (commands: {commands})"
    return f"{message} (see '{parser.prog} --help')"


def _unrecognized(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> str:
    """The message for arguments no option took, naming the closest option of the command."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        command
    ]
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    for word in extra:
        if word.startswith("-") and len(word) > 1:
            flag = word.split("=", 1)[0]
            near = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else ""
            return f"unrecognized option {flag!r}{hint} (see 'tensorsnap {command} --help')"
    return (
        f"unexpected argument(s) {' '.join(map(repr, extra))} (see 'tensorsnap {command} --help')"
    )


def _typo(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The error line for the first option no parser knows, if the command line has one."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((a for a in argv if a in sub.choices), None)
    if command is None:
        return None
    known = [o for a in sub.choices[command]._actions for o in a.option_strings]
    for word in argv[argv.index(command) + 1 :]:
        if word == "--":
            break
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and not any(o.startswith(flag) for o in known):
            return f"tensorsnap {command}: error: {_unrecognized(parser, command, [flag])}"
    return None


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
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
    cap.add_argument(
        "-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to write (new)"
    )
    _add_model_arguments(cap)
    cap.add_argument(
        "--nonfinite", choices=["raise"], default=None,
        help="stop at the first captured value holding a NaN or Inf, name its key, and save "
        "what was captured up to it",
    )  # fmt: skip
    cap.set_defaults(func=_cmd_capture)

    nam = sub.add_parser(
        "names",
        help="list the keys a capture would produce, one per line (copies nothing)",
        description="Build the model and run it once like 'tensorsnap capture' (same "
        "arguments, no -o), and print the keys the capture would produce, one per line, in "
        'execution order (the root module is ""). Gradient keys are listed in forward order.',
        epilog=_CAPTURE_HELP + "\n\n" + _EPILOG,
        formatter_class=raw,
    )
    _add_model_arguments(nam)
    nam.set_defaults(func=_cmd_names)

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
    dif.add_argument(
        "--json", action="store_true", help="print the whole result as JSON (for scripts)"
    )
    dif.set_defaults(func=_cmd_diff)
    _add_blame_parser(sub, raw)

    rep = sub.add_parser(
        "report",
        help="write a self-contained HTML report of a bundle",
        description="Write one self-contained HTML page that works offline: a sortable, "
        "filterable table of per-tensor statistics (mean, std, min/max, zeros, NaN/Inf), "
        "interactive per-layer charts (hover names the key, drag zooms, a click adds its "
        "histogram), histograms of any key, cache and state tensors kept apart from "
        "activations, the first non-finite key and, with --against, the diff against a second "
        "bundle.",
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
    """Run the ``tensorsnap`` command line; returns the exit code.

    0 success, 1 ``diff`` found differences, 2 a usage or input error (one line on stderr), 3 a
    bug in tensorsnap (with its traceback).

    Args:
        argv: The arguments without the program name (default: ``sys.argv[1:]``).
    """
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise _ArgumentError(
                f"tensorsnap {args.command}", _unrecognized(parser, args.command, extra)
            )
    except SystemExit as stop:  # --help and --version
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    except _ArgumentError as err:
        # an option typo makes argparse miss what it was meant to be: name the typo first
        typo = _typo(parser, list(sys.argv[1:] if argv is None else argv))
        print(typo or f"{err.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
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
        if getattr(args, "traceback", False) and err.__cause__ is not None:
            traceback.print_exception(err.__cause__)
        print(f"tensorsnap {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tensorsnap {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # not the user's to fix: keep the traceback for the bug report
        traceback.print_exc()
        print(
            f"tensorsnap {args.command}: internal error: {type(err).__name__}: {err} (this is "
            "a bug in tensorsnap; please report it with the traceback above)",
            file=sys.stderr,
        )
        return EXIT_BUG
