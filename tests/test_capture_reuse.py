"""A capture() object serves one `with` block: reusing it would mix two runs in one snapshot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorsnap


def test_a_capture_cannot_be_entered_twice() -> None:
    model = nn.Linear(2, 2)
    session = tensorsnap.capture(model)
    with session as snap:
        model(torch.ones(1, 2))
    with pytest.raises(tensorsnap.TensorSnapError, match=r"call tensorsnap\.capture"), session:
        model(torch.ones(1, 2))
    assert list(snap) == [""]  # the first block's snapshot is untouched
