"""The built-in demo as a script: the same code as ``tensorsnap demo`` (see ``tensorsnap demo -h``).

Run: ``python examples/demo.py [-o DIR]`` (no downloads). The model lives in
``tensorsnap._demo`` (a tiny GPT-style network with an in-place residual add, a reused
LayerNorm and a nested output).
"""

from __future__ import annotations

import sys

from tensorsnap._cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
