"""Shared fixtures: tiny transformers models built from configs (random weights, no downloads),
and independent references for what a capture should hold (plain hooks that clone).

The model builders are plain functions as well as fixtures, so that a test can build a variant
(``tiny_gpt2(n_layer=1)``). transformers is imported only when a builder runs.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

VOCAB = 100


# -- tiny transformers models ------------------------------------------------------------------


def gpt2_config(**overrides: Any) -> Any:
    """A 2-layer GPT-2 config with eager attention (softmax visible as an op)."""
    transformers = pytest.importorskip("transformers")
    options: dict[str, Any] = dict(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    options.update(overrides)
    return transformers.GPT2Config(**options)


def bert_config(**overrides: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    options: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    options.update(overrides)
    return transformers.BertConfig(**options)


def llama_config(**overrides: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    options: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )
    options.update(overrides)
    return transformers.LlamaConfig(**options)


def t5_config(**overrides: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    options: dict[str, Any] = dict(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation="eager",
    )
    options.update(overrides)
    return transformers.T5Config(**options)


def _build(cls_name: str, config: Any, seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model: nn.Module = getattr(transformers, cls_name)(config)
    return model.eval()


def tiny_gpt2(seed: int = 0, **overrides: Any) -> nn.Module:
    """``GPT2LMHeadModel`` from :func:`gpt2_config`, in eval mode, seeded weights."""
    return _build("GPT2LMHeadModel", gpt2_config(**overrides), seed)


def tiny_bert(seed: int = 0, **overrides: Any) -> nn.Module:
    """``BertModel`` (with pooler) from :func:`bert_config`, in eval mode."""
    return _build("BertModel", bert_config(**overrides), seed)


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """``LlamaForCausalLM`` (grouped-query attention, RoPE) from :func:`llama_config`."""
    return _build("LlamaForCausalLM", llama_config(**overrides), seed)


def tiny_t5(seed: int = 0, **overrides: Any) -> nn.Module:
    """``T5ForConditionalGeneration`` (encoder-decoder, shared embedding) from :func:`t5_config`."""
    return _build("T5ForConditionalGeneration", t5_config(**overrides), seed)


def tiny_clip(seed: int = 0) -> nn.Module:
    """``CLIPModel``: a 1-layer text tower and a 1-layer vision tower on 16x16 images."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=None,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return _build("CLIPModel", config, seed)


def tiny_vit(seed: int = 0) -> nn.Module:
    """``ViTModel``: 2 layers, d=32, 16x16 images in 8x8 patches, eager attention."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        attn_implementation="eager",
    )
    return _build("ViTModel", config, seed)


def token_ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    """Random token ids below the tiny vocabulary, avoiding the pad/eos ids 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=generator)


@pytest.fixture
def gpt2_model() -> nn.Module:
    return tiny_gpt2()


@pytest.fixture
def bert_model() -> nn.Module:
    return tiny_bert()


@pytest.fixture
def llama_model() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def t5_model() -> nn.Module:
    return tiny_t5()


@pytest.fixture
def ids() -> torch.Tensor:
    return token_ids()


# -- independent references ----------------------------------------------------------------------


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """Python's cyclic collector off for the test: what only a reference cycle keeps stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def clone_value(value: Any) -> Any:
    """A reference copy of a module output: every tensor ``.detach().clone()``d, containers
    rebuilt with their own types, other objects (caches) copied attribute by attribute."""
    return _clone(value, {})


def _clone(value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype)):
        return value
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, tuple):
        items = [_clone(v, memo) for v in value]
        if hasattr(value, "_fields"):
            return type(value)(*items)
        return tuple(items) if type(value) is tuple else type(value)(items)
    if isinstance(value, list):
        return [_clone(v, memo) for v in value]
    if isinstance(value, Mapping):
        # a ModelOutput also has fields that are None and so not items: copy them through
        # its attributes below when it is a dataclass
        if dataclasses.is_dataclass(value):
            kwargs = {
                f.name: _clone(getattr(value, f.name), memo) for f in dataclasses.fields(value)
            }
            return type(value)(**kwargs)
        mapping: Any = type(value)
        return mapping((k, _clone(v, memo)) for k, v in value.items())
    if isinstance(value, nn.Module):
        return value  # a module referenced from an output is compared by identity
    state = getattr(value, "__dict__", None)
    if state is None or isinstance(value, type) or callable(value):
        return value  # torch.device, enums, functions: immutable leaves
    result = object.__new__(type(value))
    memo[id(value)] = result
    result.__dict__.update({k: _clone(v, memo) for k, v in state.items()})
    return result


def assert_same(actual: Any, expected: Any, path: str = "value") -> None:
    """Structural equality: same types all the way down, tensors bitwise equal (NaN == NaN)
    with the same dtype and shape, other leaves equal. Objects without a known structure
    (caches) are compared attribute by attribute."""
    _same(actual, expected, path, set())


def _same(actual: Any, expected: Any, path: str, seen: set[int]) -> None:
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, f"{path}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: {actual.shape} != {expected.shape}"
        assert actual.device == expected.device, f"{path}: {actual.device} != {expected.device}"
        assert not actual.requires_grad, f"{path} requires grad"
        assert torch.equal(actual, expected) or bool(
            torch.isnan(actual).eq(torch.isnan(expected)).all()
            and actual.nan_to_num(0).eq(expected.nan_to_num(0)).all()
        ), f"{path}: values differ"
        return
    if expected is None or isinstance(expected, (bool, int, float, complex, str, bytes)):
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
        return
    if isinstance(expected, (nn.Module, type)):  # copies share modules; classes are atomic
        assert actual is expected, f"{path}: a different {type(expected).__name__}"
        return
    if id(expected) in seen:
        return
    seen.add(id(expected))
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            _same(a, e, f"{path}[{i}]", seen)
        return
    if isinstance(expected, Mapping):
        assert list(actual.keys()) == list(expected.keys()), f"{path}: keys differ"
        for k in expected:
            _same(actual[k], expected[k], f"{path}[{k!r}]", seen)
        return
    state = getattr(expected, "__dict__", None)
    if state is not None:
        assert list(vars(actual)) == list(state), f"{path}: attributes differ"
        for k, v in state.items():
            _same(getattr(actual, k), v, f"{path}.{k}", seen)
        return
    slots = _slot_names(type(expected))
    if slots:
        for k in slots:
            _same(getattr(actual, k), getattr(expected, k), f"{path}.{k}", seen)
        return
    assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def _slot_names(cls: type) -> list[str]:
    names: list[str] = []
    for k in cls.__mro__:
        slots = k.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return names


@contextmanager
def reference_outputs(
    model: nn.Module, clone: Callable[[Any], Any] = clone_value
) -> Iterator[dict[str, Any]]:
    """Plain ``register_forward_hook`` hooks on every module of ``model`` that clone outputs.

    Yields a dict filled in completion order with the keys SPEC §2 gives module outputs
    (``P``, then ``P#1``, ``P#2`` for later calls of the same module object).
    """
    found: dict[str, Any] = {}
    calls: dict[int, int] = {}
    handles = []

    def hook(name: str, module: nn.Module, args: Any, output: Any) -> None:
        n = calls.get(id(module), 0)
        calls[id(module)] = n + 1
        found[name if n == 0 else f"{name}#{n}"] = clone(output)

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o)))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(name="assert_same")
def _assert_same_fixture() -> Callable[..., None]:
    return assert_same


@pytest.fixture(name="reference_outputs")
def _reference_outputs_fixture() -> Callable[..., Any]:
    return reference_outputs


# -- an independent gradient reference ------------------------------------------------------------


def tensor_paths(
    value: Any, path: str = "", seen: set[int] | None = None
) -> Iterator[tuple[str, Any]]:
    """``(path, tensor)`` for every tensor in ``value``: containers, mappings, dataclasses and
    plain objects' attributes, walked in order (a path like ``[0].layers[1].keys``)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        yield path, value
        return
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, nn.Module)):
        return
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from tensor_paths(item, f"{path}[{i}]", seen)
    elif isinstance(value, Mapping):
        for k, item in value.items():
            yield from tensor_paths(item, f"{path}[{k!r}]", seen)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from tensor_paths(getattr(value, f.name), f"{path}.{f.name}", seen)
    elif not isinstance(value, type) and not callable(value):
        for k, item in getattr(value, "__dict__", {}).items():
            yield from tensor_paths(item, f"{path}.{k}", seen)


class GradReference:
    """Plain process-wide module hooks that put a cloning tensor hook on every tensor of every
    module output (``P:grad`` keys, paths inside the value as :func:`tensor_paths` names them).

    A tensor hook fires with the gradient w.r.t. that tensor, so ``grads[key][path]`` is what
    ``P:grad`` must hold at ``path``; a path with no entry got no gradient (None).
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.calls: dict[int, int] = {}
        self.grads: dict[str, dict[str, torch.Tensor]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> GradReference:
        from torch.nn.modules import module as module_hooks

        self.handles.append(module_hooks.register_module_forward_hook(self._post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        call = self.calls.get(id(module), 0)
        self.calls[id(module)] = call + 1
        key = f"{name if call == 0 else f'{name}#{call}'}:grad"
        for path, t in tensor_paths(output):
            if t.requires_grad:
                self.handles.append(t.register_hook(partial(self._arrived, key, path)))

    def _arrived(self, key: str, path: str, grad: torch.Tensor) -> None:
        self.grads.setdefault(key, {})[path] = grad.detach().clone()


def assert_grads_match(
    snap: Mapping[str, Any], reference: Any, ops: bool = False, at_least: int = 1
) -> None:
    """The ``P:grad`` keys of ``snap`` (``C/op:grad`` with ``ops``) are exactly the reference's
    (``reference.grads``: key -> path -> gradient), each holding exactly its gradients, None
    elsewhere; ``at_least`` keys are compared."""
    keys = {k for k in snap if k.endswith(":grad") and ("/" in k) == ops}
    expected_keys = set(reference.grads)
    assert keys == expected_keys, (
        f"only in capture: {sorted(keys - expected_keys)[:6]}; "
        f"only in reference: {sorted(expected_keys - keys)[:6]}"
    )
    assert len(keys) >= at_least, f"{len(keys)} gradient keys, fewer than {at_least}"
    for key, expected in reference.grads.items():
        got = dict(tensor_paths(snap[key]))
        assert set(got) == set(expected), f"{key}: {sorted(got)} != {sorted(expected)}"
        for path, grad in expected.items():
            assert torch.equal(got[path], grad), f"{key}{path}: values differ"
