"""What does ``import tensorsnap`` cost beyond torch's own import? Measured in fresh processes.

Run ``python benchmarks/bench_import.py`` (``--repeats N``, default 5); CI prints its table.

Cases, each a new interpreter, interleaved, medians of the repeats:

* ``import torch``: the floor every PyTorch library pays;
* ``import tensorsnap`` and then every public name (which loads the modules behind them);
* ``python -m tensorsnap --help``: must not import torch at all.

The second column is the self time ``python -X importtime`` reports for tensorsnap's own modules
(their top-level code, without torch or the standard library), which is far less noisy than
wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

_CASES = {
    "import torch": "import torch",
    "import tensorsnap + public names": (
        "import tensorsnap\nfor name in tensorsnap.__all__: getattr(tensorsnap, name)"
    ),
    "tensorsnap --help": "from tensorsnap._cli import main\nmain(['--help'])",
}


def _run(code: str) -> tuple[float, float, bool]:
    """Wall seconds, tensorsnap's own import self-seconds, and whether torch was imported."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    own, torch_seen = 0.0, False
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, _, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if not self_us.isdigit():
            continue  # the header line
        if name.split(".")[0] == "tensorsnap":
            own += int(self_us) / 1e6
        torch_seen = torch_seen or name == "torch"
    return wall, own, torch_seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, bool]]] = {name: [] for name in _CASES}
    for repeat in range(args.repeats):
        order = list(_CASES) if repeat % 2 == 0 else list(reversed(_CASES))
        for name in order:
            results[name].append(_run(_CASES[name]))
    floor = statistics.median(r[0] for r in results["import torch"])
    print(f"{'case':34} {'wall s':>7} {'vs torch':>9} {'own modules s':>14}  torch imported")
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        own = statistics.median(r[1] for r in runs)
        seen = "yes" if all(r[2] for r in runs) else ("no" if not any(r[2] for r in runs) else "?")
        print(f"{name:34} {wall:7.2f} {wall / floor:8.2f}x {own:14.3f}  {seen}")


if __name__ == "__main__":
    main()
