"""Seeded mutations of real bundles: each loads equal or raises a named error, never worse.

``_fuzz_worker.py`` saves four real bundles (the demo model's forward and backward with ops and
gradients; dataclasses, namedtuples, defaultdicts, views, dtypes, zero-size and meta tensors; an
``extract`` output; a data-parallel two-rank bundle) and runs a few hundred cases, each seeded by
its number: bytes of a shard flipped, zeroed, cut or appended (read with ``verify=True``); the
safetensors header length or header bytes damaged (read with or without ``verify``); the manifest
damaged without a new digest; or one manifest field deleted or replaced by a hostile value (a
wrong type, a huge or negative number, a path, a class reference, a 900-deep list) with the
digest recomputed, as a careful forger would. Every key is then read and compared with what was
saved.

Allowed outcomes: equal values; a ``TensorSnapError``; a ``BundleWarning`` (a class fallback);
or, only for an edited field that is itself the description of a value (a scalar in the value
tree, a key name, a view's stride or offset, see ``_fuzz_worker._describes_value``), a different
value. Anything else fails: another exception, different values after damage that must be caught,
a hang (20 s per case) or a crash of the process (the worker runs in a subprocess and is
restarted after the case that killed it).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from typing import Any

WORKER = os.path.join(os.path.dirname(__file__), "_fuzz_worker.py")
CASES = 300
ALLOWED = {"equal", "error", "warning", "edited"}


def run_cases(work: str, first: int, count: int) -> dict[int, tuple[str, str]]:
    """Outcome and detail per case; a case whose process died is reported as ``crash``."""
    results: dict[int, tuple[str, str]] = {}
    next_case, end = first, first + count
    while next_case < end:
        done = subprocess.run(
            [sys.executable, WORKER, work, str(next_case), str(end - next_case)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        started = None
        for line in done.stdout.splitlines():
            word, _, rest = line.partition(" ")
            case_text, _, tail = rest.partition(" ")
            if word == "start":
                started = int(case_text)
            elif word == "done":
                outcome, _, detail = tail.partition(" ")
                results[int(case_text)] = (outcome, detail)
                started = None
        if done.returncode == 0 and started is None:
            break
        crashed = started if started is not None else next_case
        results[crashed] = ("crash", f"exit {done.returncode}: {done.stderr[-2000:]}")
        next_case = crashed + 1
    return results


def test_mutated_bundles_load_equal_or_raise_a_named_error(tmp_path: Any) -> None:
    results = run_cases(str(tmp_path), 0, CASES)
    assert sorted(results) == list(range(CASES))
    failures = {case: r for case, r in results.items() if r[0] not in ALLOWED}
    assert not failures, "\n".join(f"case {c}: {o} {d}" for c, (o, d) in failures.items())
    counts = collections.Counter(outcome for outcome, _ in results.values())
    # the mutations really damage: most cases are caught, some are harmless, a few are edits
    assert counts["error"] > CASES // 2 and counts["equal"] >= 10, counts
    names = {detail.split(":")[0] for _, detail in results.values()}
    assert names == {"classes", "demo", "extract", "ranks"}, names
