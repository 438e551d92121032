"""Your own model under tensorsnap: a factory the command line can build, and the same capture
in Python.

From the repository root (the current directory is importable, like ``python -m``):

    tensorsnap names examples.my_model:build --input randn:2x3x32x32 --ops
    tensorsnap capture examples.my_model:build --arg width=16 --input randn:2x3x32x32 \
        --ops --grads -o my-run
    tensorsnap ls my-run -k 'features*'
    tensorsnap report my-run            # writes my-run.html

or ``python examples/my_model.py`` for the same in Python. For your model, copy this file next
to your code and make ``build`` return it: ``--arg KEY=VALUE`` values become its keyword
arguments, ``--input`` specs (see ``tensorsnap capture --help``) its forward's arguments.
"""

from __future__ import annotations

import torch
from torch import nn

import tensorsnap


class SmallConvNet(nn.Module):
    """A small CNN with an in-place ReLU (whose input a hook-and-detach copy would lose)."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(width: int = 8, classes: int = 10) -> nn.Module:
    """The factory ``tensorsnap capture examples.my_model:build`` calls."""
    return SmallConvNet(width, classes)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    print("keys:", tensorsnap.names(model, x, ops=True))
    with tensorsnap.capture(model, ops=True, grads=True) as snap:
        model(x).sum().backward()
    # the BatchNorm output as it was produced, before the in-place ReLU overwrote it
    print("features.1 min:", float(snap["features.1"].min()), "(negative: kept before ReLU)")
    snap.save("my-run-py")
    print("saved my-run-py; try: tensorsnap ls my-run-py")
