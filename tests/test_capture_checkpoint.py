"""Activation checkpointing re-runs forwards during backward: those re-runs are not new calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import tensorsnap


class Net(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.checkpointed = checkpointed
        self.block = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.block, x, use_reentrant=False) if self.checkpointed else self.block(x)
        return self.head(torch.relu(h))


@pytest.mark.parametrize("ops", [False, True])
def test_checkpointed_model_gives_the_keys_and_values_of_the_plain_one(ops: bool) -> None:
    x = torch.randn(3, 4, requires_grad=True)
    snaps = []
    for checkpointed in (False, True):
        model = Net(checkpointed)
        with tensorsnap.capture(model, ops=ops, grads=True, inputs=True) as snap:
            model(x).sum().backward()
        snaps.append(snap)
    plain, checkpointed_snap = snaps
    assert not any("#" in key for key in checkpointed_snap)  # no re-run counted as a call
    forward = [r.key for r in plain.records if "grad" not in r.kind]
    assert [r.key for r in checkpointed_snap.records if "grad" not in r.kind] == forward
    for key in plain:
        a, b = plain[key], checkpointed_snap[key]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
