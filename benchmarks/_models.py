"""Models the benchmarks share, built from small configs (random weights, nothing downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def gpt2(**overrides: Any) -> nn.Module:
    """``GPT2LMHeadModel`` from a small config with eager attention (so softmax is an op of its
    own): 2 layers, d=128, 4 heads, vocabulary 1000, unless ``overrides`` say otherwise."""
    import transformers

    options: dict[str, Any] = dict(
        n_layer=2,
        n_embd=128,
        n_head=4,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    options.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**options))


def gpt2_tiny() -> tuple[nn.Module, tuple[Any, ...]]:
    """The issue's GPT-2 tiny: 2 layers, d=128, sequence 32."""
    return gpt2(), (torch.randint(0, 1000, (1, 32)),)
