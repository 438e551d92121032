"""capture() on real model code nobody here wrote: tiny transformers models from configs.

Every module output is checked against plain forward hooks that clone (conftest), gradients
against ``retain_grad()`` in a separate, identical run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from conftest import (
    assert_same,
    reference_outputs,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    token_ids,
)
from torch import nn

import tensorsnap

pytest.importorskip("transformers")


def _t5_kwargs() -> dict[str, Any]:
    return {"decoder_input_ids": token_ids(2, 5, seed=3)}


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict[str, Any]]]] = {
    "gpt2": (tiny_gpt2, dict),
    "bert": (tiny_bert, dict),
    "llama": (tiny_llama, dict),
    "t5": (tiny_t5, _t5_kwargs),
}

# modules whose output gradient is checked, per model; tuple outputs included on purpose
GRAD_MODULES = {
    "gpt2": ["transformer.wte", "transformer.h.0.mlp", "transformer.h.1.attn", "lm_head"],
    "bert": ["embeddings", "encoder.layer.0.attention.self", "encoder.layer.1.output", "pooler"],
    "llama": ["model.embed_tokens", "model.layers.0.self_attn", "model.layers.1.mlp", "lm_head"],
    "t5": ["encoder.block.0.layer.0", "decoder.block.1.layer.1", "decoder.final_layer_norm"],
}


def _loss(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits.pow(2).mean()
    return output.last_hidden_state.pow(2).mean() + output.pooler_output.sum()


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_module_output_matches_clone_hooks(name: str, grad: bool) -> None:
    build, extra = MODELS[name]
    model = build()
    ids = token_ids()
    with torch.set_grad_enabled(grad):
        plain = model(ids, **extra())
        with reference_outputs(model) as ref, tensorsnap.capture(model) as snap:
            out = model(ids, **extra())
    # one key per module call, named and ordered like the plain hooks fired
    assert list(snap) == list(ref)
    assert len(ref) >= 30  # every layer's submodules, not a handful
    for key in ref:
        assert_same(snap[key], ref[key], f"snap[{key!r}]")
    # and the run itself is untouched
    assert torch.equal(
        out.logits if hasattr(out, "logits") else out.last_hidden_state,
        plain.logits if hasattr(plain, "logits") else plain.last_hidden_state,
    )


def _grad_references(model: nn.Module, names: list[str], run: Callable[[], Any]) -> dict[str, Any]:
    """Gradients w.r.t. the chosen modules' outputs, from retain_grad() in a plain run."""
    kept: dict[str, Any] = {}
    handles = []
    modules = dict(model.named_modules())

    def hook(key: str, module: nn.Module, args: Any, output: Any) -> None:
        for t in output if isinstance(output, tuple) else (output,):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.retain_grad()
        kept[key] = output

    for key in names:
        handles.append(
            modules[key].register_forward_hook(lambda m, a, o, key=key: hook(key, m, a, o))
        )
    try:
        _loss(run()).backward()
    finally:
        for handle in handles:
            handle.remove()

    def grads(output: Any) -> Any:
        if isinstance(output, tuple):
            return tuple(grads(t) for t in output)
        if isinstance(output, torch.Tensor) and output.grad is not None:
            return output.grad.clone()
        return None  # not a tensor, or no gradient reached it

    return {key: grads(output) for key, output in kept.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_output_gradients_match_retain_grad(name: str) -> None:
    build, extra = MODELS[name]
    ids = token_ids()
    reference_model = build()
    expected = _grad_references(
        reference_model, GRAD_MODULES[name], lambda: reference_model(ids, **extra())
    )
    expected_params = {
        n: p.grad.clone() for n, p in reference_model.named_parameters() if p.grad is not None
    }

    model = build()
    include = [f"{m}:grad" for m in GRAD_MODULES[name]]
    with tensorsnap.capture(model, grads=True, include=include) as snap:
        _loss(model(ids, **extra())).backward()
    assert sorted(snap) == sorted(include)
    for module in GRAD_MODULES[name]:
        assert_same(snap[f"{module}:grad"], expected[module], f"snap['{module}:grad']")
    # capturing gradients did not change the parameters' gradients, bit for bit
    got_params = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert list(got_params) == list(expected_params)
    for n, g in expected_params.items():
        assert torch.equal(got_params[n], g), n


def test_generate_keeps_every_step_of_lm_head() -> None:
    model: Any = tiny_gpt2()
    ids = token_ids(2, 5)
    steps = 4
    kwargs = dict(
        max_new_tokens=steps,
        do_sample=False,
        use_cache=True,
        attention_mask=torch.ones_like(ids),
        pad_token_id=0,
    )
    plain = model.generate(ids, **kwargs)
    with reference_outputs(model) as ref, tensorsnap.capture(model, include="lm_head*") as snap:
        tokens = model.generate(ids, **kwargs)
    assert torch.equal(tokens, plain)
    expected = [k for k in ref if k == "lm_head" or k.startswith("lm_head#")]
    assert expected == ["lm_head"] + [f"lm_head#{k}" for k in range(1, steps)]
    assert list(snap) == expected
    for key in expected:
        assert_same(snap[key], ref[key], key)
    # the prompt step sees the whole prompt (or only its last position), later steps one token
    assert snap["lm_head"].shape[0] == 2
    assert all(snap[f"lm_head#{k}"].shape == (2, 1, 100) for k in range(1, steps))
    # each step's logits pick the token generate() appended
    for k, key in enumerate(expected):
        assert torch.equal(snap[key][:, -1].argmax(-1), tokens[:, 5 + k])


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_names_lists_the_keys_of_a_real_capture(name: str) -> None:
    build, extra = MODELS[name]
    model = build()
    ids = token_ids()
    listed = tensorsnap.names(model, ids, inputs=True, **extra())
    with torch.no_grad(), tensorsnap.capture(model, inputs=True) as snap:
        model(ids, **extra())
    assert listed == list(snap)
    assert any(k.endswith(":kwargs") for k in listed)


def _llama_parameter_grads(**options: Any) -> tuple[torch.Tensor, dict[str, Any], Any]:
    model = tiny_llama()
    ids = token_ids()
    with tensorsnap.capture(model, **options) if options else nullcontext() as snap:
        loss = _loss(model(ids))
        loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}, snap


def _assert_same_grads(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert list(got) == list(expected)
    for n, g in expected.items():
        assert (got[n] is None) == (g is None), n
        if g is not None:
            assert torch.equal(got[n], g), n


def test_llama_grads_and_inputs_keep_the_computation() -> None:
    plain_loss, plain_grads, _ = _llama_parameter_grads()
    loss, grads, snap = _llama_parameter_grads(grads=True, inputs=True)
    assert torch.equal(loss, plain_loss)
    _assert_same_grads(grads, plain_grads)
    assert "model.layers.0.self_attn:kwargs" in snap
    assert "model.layers.0.input_layernorm:grad" in snap
    # backward reaches the last module first
    grads_order = [r.key for r in snap.records if r.kind == "grad"]
    assert grads_order.index("lm_head:grad") < grads_order.index("model.norm:grad")


def test_llama_grad_in_keeps_parameter_gradients_bitwise() -> None:
    _, plain_grads, _ = _llama_parameter_grads()
    _, grads, snap = _llama_parameter_grads(grads=True, include="*input_layernorm:grad_in")
    assert "model.layers.0.input_layernorm:grad_in" in snap
    _assert_same_grads(grads, plain_grads)
