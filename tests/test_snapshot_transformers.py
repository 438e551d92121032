"""``tensorsnap.snapshot`` on real model outputs: transformers models from tiny configs.

Random weights, no downloads. The reference is ``copy.deepcopy`` of the same output made under
``no_grad`` (where it works), and the model itself: a cache copied by ``snapshot`` must keep
working as a cache.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2

import tensorsnap

transformers = pytest.importorskip("transformers")


def gpt2() -> Any:
    return tiny_gpt2(vocab_size=64, n_positions=32, n_embd=16, n_head=2)


def bert() -> Any:
    return tiny_bert(
        vocab_size=64,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        bos_token_id=None,
        eos_token_id=None,
    )


def assert_same_tree(got: Any, ref: Any, path: str = "out") -> int:
    """Same types everywhere, bitwise-equal tensors that own their storage; counts tensors."""
    assert type(got) is type(ref), path
    if isinstance(ref, torch.Tensor):
        assert got is not ref, path
        assert (got.shape, got.dtype, got.stride()) == (ref.shape, ref.dtype, ref.stride()), path
        assert not got.requires_grad and got.grad_fn is None, path
        assert torch.equal(got, ref), path
        return 1
    if isinstance(ref, dict):
        assert list(got.keys()) == list(ref.keys()), path
        return sum(assert_same_tree(got[k], ref[k], f"{path}[{k!r}]") for k in ref)
    if isinstance(ref, (list, tuple)):
        assert len(got) == len(ref), path
        return sum(assert_same_tree(g, r, f"{path}[{i}]") for i, (g, r) in enumerate(zip(got, ref)))
    if hasattr(ref, "__dict__") and not isinstance(ref, type):
        assert vars(got).keys() == vars(ref).keys(), path
        return sum(
            assert_same_tree(getattr(got, k), v, f"{path}.{k}") for k, v in vars(ref).items()
        )
    assert got == ref, path
    return 0


def all_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in all_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in all_tensors(v)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return [t for v in vars(obj).values() for t in all_tensors(v)]
    return []


def test_gpt2_output_with_cache_matches_deepcopy_made_under_no_grad() -> None:
    model = gpt2()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, use_cache=True, output_hidden_states=True, output_attentions=True)
    reference = copy.deepcopy(out)
    result = tensorsnap.snapshot(out)
    assert type(result) is type(out)
    assert type(result["cache"]) is transformers.DynamicCache
    assert result.logits is result["logits"]
    count = assert_same_tree(result, reference)
    assert count >= 1 + 2 * 2 + 3 + 2  # logits, keys and values, hidden states, attentions
    sources = {t.untyped_storage().data_ptr() for t in all_tensors(out)}
    assert not sources & {t.untyped_storage().data_ptr() for t in all_tensors(result)}


def test_gpt2_snapshot_under_grad_is_detached_and_independent_of_cache_writes() -> None:
    model = gpt2()
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    out = model(ids, use_cache=True)  # grad mode: logits and the cache are non-leaf
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(out)
    expected = [
        (layer.keys.detach().clone(), layer.values.detach().clone()) for layer in out.cache.layers
    ]
    expected_logits = out.logits.detach().clone()
    result = tensorsnap.snapshot(out)
    assert not result.logits.requires_grad and result.logits.grad_fn is None
    with torch.no_grad():
        for layer in out.cache.layers:  # later in-place writes to the live cache
            layer.keys.mul_(-1)
            layer.values.zero_()
        out.logits.add_(1)
    assert torch.equal(result.logits, expected_logits)
    for layer, (keys, values) in zip(result.cache.layers, expected):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert not layer.keys.requires_grad


def test_gpt2_snapshot_of_cache_still_works_as_a_cache() -> None:
    model = gpt2()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = model(ids[:, :5], use_cache=True)
        saved = tensorsnap.snapshot(first.cache)
        reference = model(ids[:, 5:], past_key_values=first.cache, use_cache=True)
        # the live cache has grown by one step; the snapshot has not
        assert first.cache.get_seq_length() == 6 and saved.get_seq_length() == 5
        again = model(ids[:, 5:], past_key_values=saved, use_cache=True)
    assert torch.equal(again.logits, reference.logits)


def test_bert_output_with_hidden_states_tuple() -> None:
    model = bert()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True, output_attentions=True)
    reference = copy.deepcopy(plain)
    result = tensorsnap.snapshot(plain)
    assert type(result) is type(plain)
    assert type(result.hidden_states) is tuple and len(result.hidden_states) == 3
    assert_same_tree(result, reference)

    out = model(ids, output_hidden_states=True)  # grad mode: deepcopy would raise
    expected = [h.detach().clone() for h in out.hidden_states]
    result = tensorsnap.snapshot(out)
    # identity mirrored: the last hidden state is the same tensor in both, or in neither
    same = out.last_hidden_state is out.hidden_states[-1]
    assert (result.last_hidden_state is result.hidden_states[-1]) == same
    assert torch.equal(result.last_hidden_state, out.last_hidden_state)
    with torch.no_grad():
        for hidden in out.hidden_states:
            hidden.add_(3)
    for got, want in zip(result.hidden_states, expected):
        assert torch.equal(got, want) and not got.requires_grad


def test_gpt2_model_copy_keeps_tied_weights_and_computes_the_same() -> None:
    model = gpt2()
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(5))
    reference = copy.deepcopy(model)  # works: the model holds no non-leaf tensors
    result = tensorsnap.snapshot(model)
    assert type(result) is type(model)
    # lm_head.weight is wte.weight in GPT-2: one Parameter, in the copy as in deepcopy's
    assert reference.lm_head.weight is reference.transformer.wte.weight
    assert result.lm_head.weight is result.transformer.wte.weight
    assert result.lm_head.weight is not model.lm_head.weight
    ref_params = dict(reference.named_parameters())
    for name, param in result.named_parameters():
        assert type(param) is torch.nn.Parameter and param.requires_grad, name
        assert torch.equal(param, ref_params[name]), name
    with torch.no_grad():
        assert torch.equal(result(ids).logits, model(ids).logits)
