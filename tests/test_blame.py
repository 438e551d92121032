"""tensorsnap.blame: the module that introduces a difference, not the ones it reaches."""

from __future__ import annotations

import copy

import pytest
import torch
from ports import GPT2_MAP, GPT2Port

import tensorsnap


@pytest.fixture(scope="module")
def gpt2():
    from conftest import tiny_gpt2, token_ids

    ref = tiny_gpt2().eval()
    ref.config.use_cache = False
    return ref, token_ids()


def test_a_faithful_port_has_no_culprit_in_fp32_and_bf16(gpt2) -> None:
    ref, ids = gpt2
    port = GPT2Port(ref).eval()
    for dtype in (torch.float32, torch.bfloat16):
        result = tensorsnap.blame(ref, copy.deepcopy(port).to(dtype), ids, match="auto")
        assert result.culprits == (), str(result)
        assert len(result.modules) >= 20 and not result.not_replayed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_buggy_block_is_named_also_in_bf16(gpt2, dtype: torch.dtype) -> None:
    ref, ids = gpt2
    port = GPT2Port(ref, bug="no_residual", at=1).eval().to(dtype)
    # the map is written reference -> candidate: blame uses the direction that pairs
    result = tensorsnap.blame(ref, port, ids, match=GPT2_MAP)
    assert result.culprits == ("blocks.1",), str(result)
    # its submodules are fine on their own, and the block's children after it too
    assert result["blocks.1.ffn"].status == "ok" and result["norm_f"].status == "ok"


def test_a_bug_in_a_submodule_blames_it_not_its_parents(gpt2) -> None:
    ref, ids = gpt2
    result = tensorsnap.blame(ref, GPT2Port(ref, bug="ffn_act", at=1).eval(), ids, match=GPT2_MAP)
    assert result.culprits == ("blocks.1.ffn.act",)
    assert result["blocks.1.ffn"].status == "outside" and not result["blocks.1.ffn"].culprit
    assert result["blocks.1.ffn"].own is not None and result["blocks.1.ffn"].own.rel_l2 < 1e-6


def test_functional_code_between_submodules_is_blamed(gpt2) -> None:
    ref, ids = gpt2
    result = tensorsnap.blame(ref, GPT2Port(ref, bug="attn_scale", at=0).eval(), ids, match="auto")
    assert result.culprits == ("blocks.0.attn",)


def test_same_model_in_bf16_has_no_culprit(gpt2) -> None:
    ref, ids = gpt2
    result = tensorsnap.blame(ref, copy.deepcopy(ref).to(torch.bfloat16), ids)
    assert result.culprits == () and result.modules[0].how == "name"


def test_state_that_is_not_a_tensor_is_not_replayed() -> None:
    class Cache:
        def __init__(self) -> None:
            self.items: list[torch.Tensor] = []

    class Inner(torch.nn.Module):
        def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
            cache.items.append(x)
            return x * 2

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x, Cache()) + 1

    result = tensorsnap.blame(Outer(), Outer(), torch.ones(3))
    assert result.not_replayed == ("inner",)
    assert "is a Cache, state that is not a tensor" in result["inner"].reason
    assert result.culprits == ()


def test_nothing_paired_is_an_error() -> None:
    a = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(tensorsnap.TensorSnapError, match=r"no module call of the candidate pairs"):
        tensorsnap.blame(a, copy.deepcopy(a), torch.ones(1, 2), match=lambda key: None)
    with pytest.raises(tensorsnap.TensorSnapError, match=r"takes a torch\.nn\.Module"):
        tensorsnap.blame(a, "model", torch.ones(1, 2))  # type: ignore[arg-type]
    with pytest.raises(tensorsnap.TensorSnapError, match=r"rtol=-1"):
        tensorsnap.blame(a, a, torch.ones(1, 2), rtol=-1)


@pytest.mark.parametrize("bug_at", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resnet_blame_names_the_batch_norm_with_the_wrong_epsilon(
    bug_at: tuple[int, int], dtype: torch.dtype
) -> None:
    from ports import HandResNet, TorchvisionResNet

    torch.manual_seed(0)
    reference = TorchvisionResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    candidate = HandResNet(reference, bug_at=bug_at).eval().to(dtype)
    result = tensorsnap.blame(reference, candidate, x, match="auto")
    stage, unit = bug_at
    assert result.culprits == (f"stages.{stage}.{unit}.n2",), str(result)
    assert result[f"stages.{stage}.{unit}.n2"].reference == f"layer{stage + 1}.{unit}.bn2"
    faithful = tensorsnap.blame(reference, HandResNet(reference).eval().to(dtype), x, match="auto")
    assert faithful.culprits == ()
