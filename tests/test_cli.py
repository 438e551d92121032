"""The ``tensorsnap`` command line: every command in-process through ``main``, and once each as a
real ``python -m tensorsnap`` subprocess.

Captured values are checked against independent references (plain forward hooks that clone, or
values computed by hand), not against the code's own output.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tensorsnap
from tensorsnap._cli import main
from tensorsnap._demo import TinyGPT, example_input
from tensorsnap._snapshot import Record, Snapshot

_FACTORY = """
import torch
from torch import nn


def build(width=4):
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(inplace=True), nn.Linear(width, 2))


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, a, b):
        return {"sum": self.fc(a) + b}


class Boom(nn.Module):
    def forward(self, x):
        raise ValueError("boom inside forward")


def failing(width=4):
    raise RuntimeError(f"no model of width {width}")


def log_of(x=None):
    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x) * 2

    return nn.Sequential(nn.Identity(), Log(), nn.Identity())


NOT_A_MODEL = 3


def not_a_model():
    return 3
"""


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module with model factories in the working directory; returns its (unique) name."""
    name = f"tsmodels_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _bundle(path: Path, **values: torch.Tensor) -> str:
    snap = Snapshot()
    for key, value in values.items():
        record = Record(key, key, 0, None, "output", tuple(value.shape), value.dtype, value.nbytes)
        snap._add(record, value)
    snap.save(path)
    return str(path)


# -- help -----------------------------------------------------------------------------------


def test_help_names_every_command_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("demo", "capture", "names", "ls", "diff", "report"):
        assert command in text
    assert "exit codes:" in text and "1  diff found differences" in text
    for command in ("demo", "capture", "names", "ls", "diff", "report"):
        assert main([command, "--help"]) == 0
        assert "exit codes:" in capsys.readouterr().out
    assert main(["capture", "--help"]) == 0
    assert "randint:LOW-HIGH:SHAPE" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["diff", "only-one"]) == 2
    assert main(["diff", "a", "b", "--rtol", "-1"]) == 2
    assert "must be >= 0" in capsys.readouterr().err


# -- demo -----------------------------------------------------------------------------------


def test_demo_captures_saves_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "demo"
    assert main(["demo", "-o", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert f"bundle: {out_dir / 'bundle'}" in text
    assert f"report: {out_dir / 'report.html'}" in text
    assert "kept its value from before the in-place 'y += x': True" in text
    assert (out_dir / "report.html").read_text().startswith("<!DOCTYPE html>")

    # reference: the same model and input, outputs cloned by a plain forward hook
    torch.manual_seed(0)
    model = TinyGPT()
    ids = example_input()
    cloned: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        cloned["mlp"] = output.detach().clone()

    handle = model.blocks[0].mlp.register_forward_hook(keep)
    out = model(ids)
    handle.remove()
    snap = tensorsnap.load(out_dir / "bundle")
    assert torch.equal(snap["blocks.0.mlp"], cloned["mlp"])
    assert torch.equal(snap[""]["logits"], out["logits"].detach())
    assert {"blocks.0.norm#1", "blocks.0/softmax", "blocks.0:grad"} <= set(snap)

    # a second demo replaces the first one's bundle
    assert main(["demo", "-o", str(out_dir), "--no-report"]) == 0
    assert "report:" not in capsys.readouterr().out
    assert len(tensorsnap.load(out_dir / "bundle")) == len(snap)


def test_demo_refuses_to_overwrite_a_foreign_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "notes.txt").write_text("mine")
    assert main(["demo", "-o", str(tmp_path)]) == 2
    assert "is not a tensorsnap bundle" in capsys.readouterr().err
    assert (tmp_path / "bundle" / "notes.txt").read_text() == "mine"


# -- capture --------------------------------------------------------------------------------


def test_capture_factory_with_args_and_generated_input(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "run"
    argv = ["capture", f"{factory}:build", "--arg", "width=5", "--input", "randn:2x3", "--ops"]
    assert main([*argv, "-o", str(target)]) == 0
    assert f"bundle: {target}" in capsys.readouterr().out
    snap = tensorsnap.load(target)
    assert list(snap) == ["0/linear", "0", "1/relu", "1", "2/linear", "2", ""]

    # reference: the documented order (seed, build, eval, draw inputs), cloned by hooks
    module = __import__(factory)
    torch.manual_seed(0)
    model = module.build(width=5).eval()
    x = torch.randn(2, 3)
    first = model[0](x).detach().clone()  # before the in-place ReLU rewrites it
    assert torch.equal(snap["0"], first)
    assert torch.equal(snap[""], model(x).detach())
    assert snap["0"].shape == (2, 5)


def test_capture_keyword_inputs_from_safetensors(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[10.0, 20.0]])
    save_file({"b": b, "a": a}, str(tmp_path / "inputs.safetensors"))
    target = tmp_path / "pair"
    assert (
        main(["capture", f"{factory}:Pair", "--input", "inputs.safetensors", "-o", str(target)])
        == 0
    )
    snap = tensorsnap.load(target)
    torch.manual_seed(0)
    model = __import__(factory).Pair()
    assert torch.equal(snap[""]["sum"], (model.fc(a) + b).detach())

    # one tensor from the file, positionally, then the other by name
    target2 = tmp_path / "pair2"
    argv = ["--input", "inputs.safetensors:a", "--input", "b=inputs.safetensors:b"]
    assert main(["capture", f"{factory}:Pair", *argv, "-o", str(target2)]) == 0
    assert torch.equal(tensorsnap.load(target2)[""]["sum"], snap[""]["sum"])


def test_capture_transformers_config_with_grads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    args = [
        "n_layer=1", "n_embd=32", "n_head=2", "vocab_size=50", "n_positions=32",
        "bos_token_id=None", "eos_token_id=None", "attn_implementation=eager",
    ]  # fmt: skip
    argv = ["capture", "transformers:GPT2Config", "--grads", "--include", "*h.0.mlp*"]
    for arg in args:
        argv += ["--arg", arg]
    assert main([*argv, "-o", str(tmp_path / "gpt2")]) == 0
    snap = tensorsnap.load(tmp_path / "gpt2")
    assert "h.0.mlp" in snap and "h.0.mlp:grad" in snap
    assert snap["h.0.mlp"].shape == (1, 16, 32)  # default input: input_ids of shape 1x16

    # a model class is built from its own config class
    assert (
        main(["capture", "transformers:GPT2LMHeadModel", *argv[2:], "-o", str(tmp_path / "lm")])
        == 0
    )
    lm = tensorsnap.load(tmp_path / "lm")
    assert "transformer.h.0.mlp" in lm and "transformer.h.0.mlp:grad" in lm


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nocolon"], "'nocolon' is not MODULE:FACTORY"),
        (["no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
        (["{m}:biuld"], "has no attribute 'biuld'.*closest: build"),
        (["{m}:NOT_A_MODEL"], "is a int, not a factory"),
        (["{m}:not_a_model"], "returned a int, expected a torch.nn.Module"),
        (["{m}:build", "--arg", "width"], "expected KEY=VALUE"),
        (["{m}:build", "--input", "randn:2y3"], "shape '2y3' is not dims joined by x"),
        (["{m}:build", "--input", "randint:5-1:2x3"], "is not LOW-HIGH with LOW < HIGH"),
        (["{m}:build", "--input", "randn:2x3:float17"], "'float17' is not a torch dtype"),
        (["{m}:build", "--input", "gauss:2x3"], "is not understood"),
        (["{m}:build", "--input", "x.safetensors"], "no such file"),
        (["{m}:build", "--input", "randn:2x3", "--include", "fc9"], "matched no key"),
        (
            ["{m}:build", "--input", "randn:2x4"],
            r"the model raised during forward: RuntimeError: mat1 and mat2 shapes cannot be "
            r"multiplied \(2x4 and 3x4\) \(in module '0' \(Linear\)\); its inputs were 2x4 "
            r"float32",
        ),
        (
            ["{m}:Boom", "--input", "randn:2x3"],
            r"the model raised during forward: ValueError: boom inside forward \(in module '' "
            r"\(Boom\); at tsmodels_\d+\.py:\d+, in forward\)",
        ),
        (
            ["{m}:failing", "--arg", "width=7"],
            r"{m}:failing raised while building the model \(check the --arg values\): "
            r"RuntimeError: no model of width 7 \(at tsmodels_\d+\.py:\d+, in failing\)",
        ),
        (
            ["{m}:build", "--arg", "widht=3"],
            r"--arg widht=\.\.\.: {m}:build takes no argument 'widht'; closest: width",
        ),
        (
            ["{m}:build", "--input", "randn:2x3", "--input", "randn:2x3"],
            r"the --input specs do not fit Sequential\.forward\(input\): too many positional",
        ),
        (["{m}:build", "--device", "cdua"], r"--device 'cdua' is not a device; closest: cuda"),
        (["{m}:build", "--device", "cuda:0x"], r"--device 'cuda:0x' is not a device"),
        (["{m}:build"], "no --input given"),
    ],
)
def test_capture_errors_exit_2_without_traceback(
    factory: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    argv = [a.replace("{m}", factory) for a in argv]
    assert main(["capture", *argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert err.startswith("tensorsnap capture: error: ")
    assert re.search(message.replace("{m}", factory), err), err
    assert not (tmp_path / "out").exists()


def test_a_misspelt_keyword_input_is_named_beside_the_models_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    args = ["n_layer=1", "n_embd=32", "n_head=4", "vocab_size=50", "bos_token_id=None"]
    argv = ["capture", "transformers:GPT2Config", "--input", "input_idz=randint:0-50:1x8"]
    for arg in [*args, "eos_token_id=None"]:
        argv += ["--arg", arg]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert (
        "the model raised during forward: ValueError: You have to specify either input_ids" in err
    )
    assert "in module '' (GPT2Model)" in err
    assert (
        "its inputs were input_idz=1x8 int64; input 'input_idz' is not a named parameter of " in err
    )
    assert "closest: input_ids" in err


def test_device_without_a_backend_is_refused_before_building(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv = ["capture", f"{factory}:build", "--device", "cuda", "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(r"--device 'cuda': torch \S+ \(.*\) has no usable cuda device here", err)


def test_traceback_flag_prints_the_models_own_traceback(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["capture", f"{factory}:Boom", "--input", "randn:2x3", "-o", str(tmp_path / "out")]
    assert main([*argv, "--traceback"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert 'raise ValueError("boom inside forward")' in err
    assert err.strip().splitlines()[-1].startswith("tensorsnap capture: error: the model raised")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["capture", "m:f", "--opps", "-o", "x"],
            "unrecognized option '--opps'; did you mean --ops?",
        ),
        (
            ["diff", "a", "b", "--rtoll", "1e-3"],
            "unrecognized option '--rtoll'; did you mean --rtol?",
        ),
        (["diff", "a", "b", "--rtoll=1e-3"], "unrecognized option '--rtoll'; did you mean --rtol?"),
        (["ls", "a", "--no-stat"], None),  # an unambiguous prefix is accepted by argparse
        (["ls", "a", "b"], "unexpected argument\\(s\\) 'b'"),
        (["dmeo"], "unknown command 'dmeo'; did you mean 'demo'\\?"),
        (["capture", "m:f"], "the following arguments are required: -o/--output"),
        (["capture", "--opps"], "unrecognized option '--opps'; did you mean --ops?"),
        (["diff", "a", "--atoll", "1"], "unrecognized option '--atoll'; did you mean --atol?"),
    ],
)
def test_argument_errors_are_one_line_with_the_closest_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str | None
) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    if message is None:  # parsed; fails later because bundle 'a' does not exist
        assert code == 2 and "unrecognized" not in err
        return
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert err.startswith(f"tensorsnap{' ' + argv[0] if argv[0] != 'dmeo' else ''}: error: ")


def test_capture_refuses_an_existing_bundle(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").mkdir()
    assert main(["capture", f"{factory}:build", "--input", "randn:1x3", "-o", "out"]) == 2
    assert "already exists" in capsys.readouterr().err


# -- ls -------------------------------------------------------------------------------------


def test_ls_lists_keys_with_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = _bundle(
        tmp_path / "b",
        fc1=torch.tensor([[-2.0, 4.0], [1.0, 3.0]]),  # min -2, max 4, mean 1.5
        ids=torch.tensor([7, 9], dtype=torch.int32),  # min 7, max 9, mean 8
    )
    assert main(["ls", bundle]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header == ["key", "kind", "shape", "dtype", "bytes", "min", "max", "mean", "nan", "inf"]
    fc1 = ["fc1", "output", "2x2", "float32", "16", "B", "-2", "4", "1.5", "0", "0"]
    assert lines[1].split() == fc1
    assert lines[2].split() == ["ids", "output", "2", "int32", "8", "B", "7", "9", "8", "0", "0"]
    assert lines[3] == "2 keys, 24 B; min/max/mean over finite elements; no NaN or Inf"

    assert main(["ls", bundle, "-k", "id*", "--no-stats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "kind", "shape", "dtype", "bytes"]
    assert [line.split()[0] for line in lines[1:-1]] == ["ids"]

    assert lines[-1] == "1 keys, 8 B"
    assert main(["ls", bundle, "-k", "nothing*"]) == 2
    err = capsys.readouterr().err
    assert "matched none of the 2 keys" in err and "closest" not in err
    assert main(["ls", bundle, "-k", "fc2"]) == 2
    assert "matched none of the 2 keys in " + bundle + "; closest: 'fc1'" in capsys.readouterr().err
    assert main(["ls", str(tmp_path / "missing")]) == 2
    assert "no bundle at" in capsys.readouterr().err


def test_ls_counts_nans_and_names_the_first_nonfinite_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1/log(x) of 64 values, 24 of them NaN (log of a negative), 2 of them Inf (log(1) = 0)
    x = torch.cat([torch.full((24,), -2.0), torch.ones(2), torch.full((38,), 4.0)])
    bundle = _bundle(
        tmp_path / "b", fine=torch.tensor([1.0, -1.0]), inv_log=1 / torch.log(x), later=1 / x
    )
    assert main(["ls", bundle]) == 0
    lines = capsys.readouterr().out.splitlines()
    inv = lines[2].split()
    assert inv[0] == "inv_log" and inv[-2:] == ["24", "2"]
    # statistics over the 38 finite values, all 1/log(4)
    assert float(inv[6]) == pytest.approx(1 / math.log(4), rel=1e-3)
    assert lines[-1].endswith("first non-finite: inv_log (24 NaN, 2 Inf of 64)")
    assert lines[3].split()[-2:] == ["0", "0"]


def test_ls_keys_keeps_every_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(input=x))  # a keyword argument: an 'fc:kwargs' key

    model = Net()
    with tensorsnap.capture(model, ops=True, inputs=True, grads=True, saved=True) as snap:
        model(torch.randn(2, 3, requires_grad=True)).sum().backward()
    kinds = {r.key: r.kind for r in snap.records}
    every = {"output", "input", "kwargs", "op", "grad", "grad_in", "op_grad", "saved"}
    assert set(kinds.values()) == every
    snap.save(tmp_path / "b")
    assert main(["ls", str(tmp_path / "b"), "-k", "fc*", "--no-stats"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:-1]
    listed: dict[str, set[str]] = {}
    for line in lines:
        tokens = line.split()
        at = 1
        while tokens[at].startswith("["):  # leaf rows of nested values: "KEY [0] KIND ..."
            at += 1
        listed.setdefault(tokens[0], set()).add(tokens[at])
    expected = {k: {v} for k, v in kinds.items() if k.startswith("fc")}
    assert listed == expected
    assert len(set.union(*expected.values())) >= 6  # not just "output"


def test_the_example_factory_runs_as_the_readme_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the README's commands run from the repository root
    monkeypatch.syspath_prepend(str(root))
    target = tmp_path / "my-run"
    argv = ["examples.my_model:build", "--arg", "width=4", "--input", "randn:2x3x8x8", "--ops"]
    try:
        assert main(["capture", *argv, "--grads", "-o", str(target)]) == 0
        example = sys.modules["examples.my_model"]
    finally:
        sys.modules.pop("examples.my_model", None)
        sys.modules.pop("examples", None)
    snap = tensorsnap.load(target)
    # reference: the BatchNorm output cloned by a plain hook, before the in-place ReLU
    torch.manual_seed(0)
    model = example.build(width=4).eval()
    x = torch.randn(2, 3, 8, 8)
    kept: list[torch.Tensor] = []
    model.features[1].register_forward_hook(lambda m, a, out: kept.append(out.detach().clone()))
    model(x)
    assert torch.equal(snap["features.1"], kept[0])
    assert float(snap["features.1"].min()) < 0  # the ReLU ran in place on it afterwards
    assert "features.1:grad" in snap and "head/linear" in snap


# -- names ----------------------------------------------------------------------------------


def test_names_lists_the_keys_a_capture_would_produce(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"{factory}:build", "--input", "randn:2x3", "--ops"]
    assert main(["names", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["0/linear", "0", "1/relu", "1", "2/linear", "2", '""']
    assert captured.err.strip().endswith("7 keys")
    assert main(["names", *argv, "--include", "*linear"]) == 0
    assert capsys.readouterr().out.split() == ["0/linear", "2/linear"]
    # the same keys as a capture's bundle
    assert main(["capture", *argv, "-o", str(tmp_path / "run")]) == 0
    assert list(tensorsnap.load(tmp_path / "run")) == [
        "0/linear",
        "0",
        "1/relu",
        "1",
        "2/linear",
        "2",
        "",
    ]


def test_include_error_suggests_near_misses_and_the_names_command(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["capture", f"{factory}:build", "--input", "randn:2x3", "--ops", "-o", "out"]
    assert main([*argv, "--include", "0.linear"]) == 2
    err = capsys.readouterr().err
    assert (
        "include pattern '0.linear' matched no key; closest: '0/linear', '2/linear' (list the "
        f"keys with 'tensorsnap names {factory}:build ... --ops')"
    ) in err
    assert "tensorsnap.names" not in err and "''" not in err  # never the root as a near miss


# -- nonfinite ------------------------------------------------------------------------------


def test_capture_nonfinite_raise_stops_and_keeps_what_came_before(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["capture", f"{factory}:log_of", "--input", "randn:8x8", "-o", str(tmp_path / "run")]
    assert main([*argv, "--nonfinite", "raise"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "'1' is the first captured value with a NaN or Inf" in err
    assert f"the 2 keys captured up to and including it are saved in {tmp_path / 'run'}" in err
    partial = tensorsnap.load(tmp_path / "run")
    torch.manual_seed(0)
    x = torch.randn(8, 8)
    assert list(partial) == ["0", "1"]
    assert torch.equal(partial["0"], x)
    assert torch.allclose(partial["1"], torch.log(x) * 2, equal_nan=True)
    # without the flag the same run completes
    assert main([*argv[:-1], str(tmp_path / "all")]) == 0
    assert len(tensorsnap.load(tmp_path / "all")) == 4


# -- diff -----------------------------------------------------------------------------------


def test_diff_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _bundle(tmp_path / "a", x=torch.tensor([1.0, 2.0]), y=torch.tensor([3.0]))
    same = _bundle(tmp_path / "same", x=torch.tensor([1.0, 2.0]), y=torch.tensor([3.0]))
    other = _bundle(tmp_path / "other", x=torch.tensor([1.0, 2.0]), y=torch.tensor([3.5]))
    assert main(["diff", a, same]) == 0
    assert capsys.readouterr().out.strip().startswith("equal: 2 keys")
    assert main(["diff", a, other]) == 1
    out = capsys.readouterr().out
    assert "y <- first" in out and "first diverging key: 'y'" in out
    assert main(["diff", a, other, "--atol", "0.5"]) == 0  # |3 - 3.5| <= 0.5
    assert main(["diff", a, str(tmp_path / "nope")]) == 2


# -- report ---------------------------------------------------------------------------------


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _bundle(tmp_path / "a", x=torch.tensor([1.0, 2.0]))
    b = _bundle(tmp_path / "b", x=torch.tensor([1.0, 2.5]))
    assert main(["report", a]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'a.html'}"
    page = tmp_path / "r.html"
    assert main(["report", a, "-o", str(page), "--against", b]) == 0
    html = page.read_text()
    assert "<h2>Diff against" in html and "first diverging key: &#x27;x&#x27;" in html


# -- missing extras -------------------------------------------------------------------------


def test_missing_rich_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle(tmp_path / "a", x=torch.ones(1))
    monkeypatch.setitem(sys.modules, "rich", None)
    assert main(["ls", bundle]) == 2
    assert "pip install 'tensorsnap[cli]'" in capsys.readouterr().err


def test_report_without_matplotlib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle(tmp_path / "a", x=torch.ones(1))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", bundle]) == 0  # the page draws its own charts
    assert (tmp_path / "a.html").read_text().startswith("<!DOCTYPE html>")


# -- real subprocesses ----------------------------------------------------------------------


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning:tensorsnap"}
    return subprocess.run(
        [sys.executable, "-m", "tensorsnap", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_subprocess_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "mods.py").write_text(textwrap.dedent(_FACTORY))
    demo = _run("demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert (tmp_path / "tensorsnap-demo" / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "tensorsnap-demo" / "report.html").is_file()

    ok = _run("capture", "mods:build", "--input", "randn:2x3", "-o", "run0", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    seed1 = _run(
        "capture", "mods:build", "--input", "randn:2x3", "--seed", "1", "-o", "run1", cwd=tmp_path
    )
    assert seed1.returncode == 0, seed1.stderr

    bad = _run("capture", "mods:build", "--input", "randn:2x3x", "-o", "bad", cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip() == (
        "tensorsnap capture: error: input spec 'randn:2x3x': shape '2x3x' is not dims joined "
        "by x, e.g. 1x3x224x224"
    )

    listing = _run("ls", "run0", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[0] for line in listing.stdout.splitlines()[1:5]] == ["0", "1", "2", '""']

    differ = _run("diff", "run0", "run1", cwd=tmp_path)
    assert differ.returncode == 1, differ.stderr
    assert "first diverging key: '0'" in differ.stdout

    report = _run("report", "run0", "--against", "run1", "-o", "page.html", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "page.html").read_text()
    assert 'data-spec="ts-layers"' in page and 'data-spec="ts-diff"' in page


def test_plain_container_fallbacks_are_summed_up_in_one_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import tiny_gpt2, token_ids

    model = tiny_gpt2()
    with tensorsnap.capture(model) as snap:
        model(token_ids())
    snap.save(tmp_path / "gpt2")
    assert main(["ls", str(tmp_path / "gpt2"), "--no-stats"]) == 0
    err = capsys.readouterr().err
    # the cache objects (not dataclasses or mappings) come back as dicts: said once, in a note
    assert err.count("note:") == 1 and "came back as plain dicts" in err
    assert "BundleWarning" not in err
