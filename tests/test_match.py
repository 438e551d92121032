"""diff across names: a map of module paths, a callable and match='auto', on hand-written ports.

The ports (tests/ports.py) share no module names with transformers' GPT-2 or with a ResNet
written torchvision's way; each planted bug is at a known module, which diff must name.
"""

from __future__ import annotations

import math

import pytest
import torch
from ports import GPT2_MAP, GPT2Port, HandResNet, TorchvisionResNet

import tensorsnap


def _runs(ref: torch.nn.Module, port: torch.nn.Module, *args: object, **options: object):
    with torch.no_grad():
        with tensorsnap.capture(ref, **options) as a:  # type: ignore[arg-type]
            ref(*args)
        with tensorsnap.capture(port, **options) as b:  # type: ignore[arg-type]
            port(*args)
    return a, b


@pytest.fixture(scope="module")
def gpt2():
    from conftest import tiny_gpt2, token_ids

    return tiny_gpt2().eval(), token_ids()


@pytest.mark.parametrize(
    "bug, at, module",
    [(None, 0, None), ("ffn_act", 1, "blocks.1.ffn.act"), ("attn_scale", 0, "blocks.0.attn")],
)
def test_auto_with_ops_pairs_ops_only_where_their_values_can_be_the_same(
    gpt2, bug: str | None, at: int, module: str | None
) -> None:
    # the port's ops differ from transformers' (a fused qkv split, views in another order):
    # ops of the same name or shape with unrelated values must not pair, or a faithful port
    # diverges at its first op
    ref, ids = gpt2
    a, b = _runs(ref, GPT2Port(ref, bug=bug, at=at).eval(), ids, ops=True)
    result = tensorsnap.diff(b, a, match="auto")
    found = result.first_diverging  # an op key of the buggy module, or the module's own
    assert (found and found.partition("/")[0]) == module, result
    if bug is None:
        assert not result.differing and any("/" in k for k, _, _ in result.pairs)


def test_names_alone_do_not_pair_a_port(gpt2) -> None:
    ref, ids = gpt2
    a, b = _runs(ref, GPT2Port(ref).eval(), ids)
    result = tensorsnap.diff(b, a)
    assert result.keys[0].key == "" and len(result.keys) == 1  # only the root shares its name
    assert result.only_a and result.only_b and result.first_diverging is None


@pytest.mark.parametrize(
    "bug, module_b", [("ffn_act", "transformer.h.1.mlp.act"), ("no_residual", "transformer.h.1")]
)
def test_auto_pairs_a_gpt2_port_and_names_the_bug(gpt2, bug: str, module_b: str) -> None:
    ref, ids = gpt2
    a, b = _runs(ref, GPT2Port(ref).eval(), ids)
    faithful = tensorsnap.diff(b, a, match="auto")
    pairs = {k: kb for k, kb, _ in faithful.pairs}
    # every module of the port that has a counterpart pairs with it (pos_emb returns (S, D),
    # transformers' wpe (1, S, D): paired by dims of size 1)
    assert pairs["tok_emb"] == "transformer.wte"
    assert pairs["blocks.0.attn.qkv"] == "transformer.h.0.attn.c_attn"
    assert pairs["blocks.1.attn.proj"] == "transformer.h.1.attn.c_proj"
    assert pairs["blocks.1.attn"] == "transformer.h.1.attn"  # a tensor against a tuple
    assert pairs["blocks.1.ffn.fc_out"] == "transformer.h.1.mlp.c_proj"
    assert pairs["head"] == "lm_head" and pairs[""] == ""  # logits against a ModelOutput
    assert all(how.startswith("auto: shape") for _, _, how in faithful.pairs)
    assert faithful.first_diverging is None, faithful
    assert "transformer.h.0.mlp.dropout" in faithful.only_b  # never a divergence
    _, buggy = _runs(ref, GPT2Port(ref, bug=bug, at=1).eval(), ids)
    result = tensorsnap.diff(buggy, a, match="auto")
    assert result.first_diverging_b == module_b
    assert result.first_diverging == {"ffn_act": "blocks.1.ffn.act", "no_residual": "blocks.1"}[bug]
    # everything before it is close
    before = [k for k in result.keys[: [k.key for k in result.keys].index(result.first_diverging)]]
    assert before and all(k.close for k in before)


def test_a_map_of_module_paths_names_the_bug(gpt2) -> None:
    ref, ids = gpt2
    a, b = _runs(ref, GPT2Port(ref, bug="ffn_act", at=1).eval(), ids)
    result = tensorsnap.diff(a, b, match=GPT2_MAP)
    assert result["transformer.h.1.mlp.c_fc"].key_b == "blocks.1.ffn.fc_in"
    assert (
        result["transformer.h.1.mlp.c_fc"].how
        == "map 'transformer.h.*.mlp.c_fc' -> 'blocks.*.ffn.fc_in'"
    )
    assert result.first_diverging == "transformer.h.1.mlp.act"
    assert result.first_diverging_b == "blocks.1.ffn.act"
    # a callable does the same
    inverse = {v.replace("*", "0"): k.replace("*", "0") for k, v in GPT2_MAP.items()}
    by_fn = tensorsnap.diff(b, a, match=lambda key: inverse.get(key))
    assert by_fn["blocks.0.ffn.fc_in"].key_b == "transformer.h.0.mlp.c_fc"
    assert by_fn["blocks.0.ffn.fc_in"].how == "callable"


def test_bad_match_arguments_are_named() -> None:
    a = {"x": torch.ones(1)}
    with pytest.raises(tensorsnap.TensorSnapError, match="pass 'auto', a dict"):
        tensorsnap.diff(a, a, match="fuzzy")
    with pytest.raises(tensorsnap.TensorSnapError, match="as many '\\*' as the pattern"):
        tensorsnap.diff(a, a, match={"h.*": "blocks"})
    with pytest.raises(tensorsnap.TensorSnapError, match="returned 3 for 'x'"):
        tensorsnap.diff(a, a, match=lambda k: 3)  # type: ignore[arg-type,return-value]


def test_patterns_carry_stars_and_suffixes_over() -> None:
    a = {
        "h.0.mlp": torch.ones(1),
        "h.1.mlp#1": torch.ones(1),
        "h.1.mlp/relu:grad": torch.ones(1),
        "h.0.mlp.fc": torch.ones(1),
        "emb": torch.ones(1),
    }
    b = {
        "blocks.0.ffn": torch.ones(1),
        "blocks.1.ffn#1": torch.ones(1),
        "blocks.1.ffn/relu:grad": torch.ones(1),
        "blocks.0.ffn.fc": torch.ones(1),
        "emb": torch.ones(1),
    }
    result = tensorsnap.diff(a, b, match={"h.*.mlp": "blocks.*.ffn"})
    assert {k: kb for k, kb, _ in result.pairs} == {
        "h.0.mlp": "blocks.0.ffn",
        "h.1.mlp#1": "blocks.1.ffn#1",
        "h.1.mlp/relu:grad": "blocks.1.ffn/relu:grad",
        "h.0.mlp.fc": "blocks.0.ffn.fc",  # a leading part of the path matched: the rest carries
        "emb": "emb",  # no pattern matched: by name
    }
    assert result.equal


def test_auto_pairs_a_torchvision_style_resnet_with_a_hand_written_one() -> None:
    torch.manual_seed(0)
    tv = TorchvisionResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    a, b = _runs(tv, HandResNet(tv).eval(), x)
    result = tensorsnap.diff(b, a, match="auto")
    pairs = {k: kb for k, kb, _ in result.pairs}
    assert pairs["stem.0"] == "conv1" and pairs["pool"] == "maxpool"
    assert pairs["stages.1.1.n2"] == "layer2.1.bn2"
    assert pairs["stages.1.0"] == "layer2.0" and pairs["classifier"] == "fc"
    assert result.first_diverging is None, result
    _, buggy = _runs(tv, HandResNet(tv, bug_at=(1, 0)).eval(), x)
    found = tensorsnap.diff(buggy, a, match="auto")
    # the divergence starts in the unit holding the bug (its shortcut runs in another order
    # than torchvision's, so which of its calls pair is the alignment's choice)
    assert found.first_diverging is not None and found.first_diverging.startswith("stages.1.0")
    assert found.first_diverging_b is not None and found.first_diverging_b.startswith("layer2.0")
    assert all(k.close for k in found.keys[:20])  # stem and the first stage agree


def test_a_tuple_pairs_with_a_tensor_by_leaves() -> None:
    out = torch.randn(2, 3, 4)
    weights = torch.rand(2, 2, 3, 3)
    result = tensorsnap.diff({"attn": out.clone()}, {"attn": (out, weights)})
    k = result["attn"]
    assert k.close and k.numel == out.numel() and k.problems == ()
    assert "b[1] (2, 2, 3, 3) is not paired" in k.notes
    shifted = tensorsnap.diff({"attn": out + 1.0}, {"attn": (out, weights)})["attn"]
    assert not shifted.close and shifted.max_abs == pytest.approx(1.0)
    # no leaf of the same shape at all: a difference, not a note
    none = tensorsnap.diff({"attn": torch.ones(5)}, {"attn": (out, weights)})["attn"]
    assert not none.close and none.problems == ("no tensor leaves of the same shape on both sides",)


def test_a_model_output_pairs_with_its_logits(gpt2) -> None:
    ref, ids = gpt2
    with torch.no_grad():
        out = ref(ids)
    k = tensorsnap.diff({"": out.logits.clone()}, {"": out})[""]
    assert k.close and k.numel == out.logits.numel() and k.max_abs == 0
    assert any("is not paired" in n for n in k.notes)


def test_max_rel_where_the_reference_is_zero_is_inf_and_rel_l2_is_meaningful() -> None:
    result = tensorsnap.diff({"x": torch.tensor([1.0, 1e-3])}, {"x": torch.tensor([1.0, 0.0])})
    k = result["x"]
    assert k.max_rel == math.inf
    assert k.rel_l2 == pytest.approx(1e-3 / 1.0)  # ||a - b|| / ||b|| = 1e-3 / 1
    assert k.sqnr == pytest.approx(60.0)
    assert "inf" in str(result) and "1.8e+308" not in str(result)


def test_unrelated_runs_say_so() -> None:
    torch.manual_seed(0)
    a = {f"l{i}": torch.randn(16) for i in range(4)}
    b = {f"l{i}": torch.randn(16) for i in range(4)}
    result = tensorsnap.diff(a, b)
    assert result.unrelated and "look unrelated" in result.summary()
    nothing = tensorsnap.diff({"x": torch.ones(1)}, {"y": torch.ones(1)})
    assert nothing.unrelated and "no key pairs" in nothing.summary()
    related = tensorsnap.diff(a, {k: v + 1e-3 for k, v in a.items()})
    assert not related.unrelated


def test_bf16_against_fp32_does_not_diverge_at_the_first_key(gpt2) -> None:
    import copy

    ref, ids = gpt2
    a, b = _runs(ref, copy.deepcopy(ref).to(torch.bfloat16), ids)
    result = tensorsnap.diff(b, a)
    assert result.first_diverging != result.keys[0].key
    assert result["transformer.wte"].close  # rounding to bf16 is within bf16's tolerance
    assert result["transformer.wte"].rtol == pytest.approx(1.6e-2)
    # the scale-free error stays at bf16's level through the model
    assert all(k.rel_l2 is not None and k.rel_l2 < 5e-2 for k in result.keys)


def test_to_records_is_plain_data(gpt2) -> None:
    import json

    result = tensorsnap.diff({"x": torch.tensor([1.0, 0.5])}, {"x": torch.tensor([1.0, 0.0])})
    records = result.to_records()
    assert records[0]["key"] == "x" and records[0]["key_b"] == "x" and records[0]["how"] == "name"
    assert records[0]["max_abs"] == 0.5 and records[0]["max_rel"] == math.inf
    data = result.to_dict()
    assert data["first_diverging"] == "x" and data["keys"] == records
    json.dumps(data)  # plain types only (inf is allowed by Python's json)
