"""Models the benchmarks share, built from small configs (random weights, nothing downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def gpt2_tiny() -> tuple[nn.Module, tuple[Any, ...]]:
    """GPT-2 with 2 layers, d=128, seq 32, eager attention (so softmax is an op of its own)."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=128,
        n_head=4,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config), (torch.randint(0, 1000, (1, 32)),)
