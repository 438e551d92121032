"""capture(ops=True) on model code nobody here wrote: GPT-2 (eager attention) from a tiny config,
and a ResNet basic block, checked against values the models return and plain hooks that clone.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_gpt2
from torch import nn

import tensorsnap

transformers = pytest.importorskip("transformers")


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def test_gpt2_softmax_op_is_the_returned_attention_weights_and_its_gradient() -> None:
    model = tiny_gpt2()
    ids = _ids()
    with tensorsnap.capture(model, ops=True, grads=True, include="*/softmax*") as snap:
        out = model(ids, output_attentions=True)
        for weights in out.attentions:
            weights.retain_grad()  # an independent reference for the softmax gradient
        out.logits.square().mean().backward()
    assert list(snap)[:2] == ["transformer.h.0.attn/softmax", "transformer.h.1.attn/softmax"]
    for layer, weights in enumerate(out.attentions):
        key = f"transformer.h.{layer}.attn/softmax"
        record = snap.records[list(snap).index(key)]
        assert record.module == f"transformer.h.{layer}.attn" and record.op == "softmax"
        assert torch.equal(snap[key], weights.detach())
        assert weights.grad is not None
        assert torch.equal(snap[f"{key}:grad"], weights.grad)
    # rows of a causal softmax: sum to one, zero above the diagonal
    probs = snap["transformer.h.0.attn/softmax"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 8))
    assert torch.all(probs.triu(1) == 0)


def test_gpt2_gelu_new_internals_belong_to_the_activation_module() -> None:
    model = tiny_gpt2()
    ids = _ids()
    seen: list[torch.Tensor] = []
    act = model.transformer.h[0].mlp.act
    # reference pass: a plain hook that clones (kept out of the capture: its ops would count)
    handle = act.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as snap:
        model(ids)
    prefix = "transformer.h.0.mlp.act/"
    # NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
    assert [k for k in snap if k.startswith(prefix)] == [
        prefix + op for op in ("mul", "pow", "mul#1", "add", "mul#2", "tanh", "add#1", "mul#3")
    ]
    (x,) = seen
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
    assert torch.equal(snap[prefix + "pow"], x**3)
    torch.testing.assert_close(snap[prefix + "tanh"], torch.tanh(inner))
    torch.testing.assert_close(snap["transformer.h.0.mlp.act"], 0.5 * x * (1 + torch.tanh(inner)))
    assert torch.equal(snap[prefix + "mul#3"], snap["transformer.h.0.mlp.act"])
    # the MLP's own keys hold no op of its activation
    assert not any(k.startswith("transformer.h.0.mlp/") for k in snap)


def test_gpt2_outputs_and_gradients_unchanged_by_op_capture() -> None:
    model = tiny_gpt2()
    ids = _ids()

    def run(capture: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if capture:
            with tensorsnap.capture(model, ops=True, grads=True, saved=True) as snap:
                logits = model(ids).logits
                logits.square().mean().backward()
            assert len(snap) > 300
        else:
            logits = model(ids).logits
            logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    plain_logits, plain_grads = run(False)
    logits, grads = run(True)
    assert torch.equal(plain_logits, logits)
    assert plain_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in plain_grads.items():
        assert torch.equal(grad, grads[name]), name


def test_gpt2_names_lists_the_op_keys_of_a_capture() -> None:
    model = tiny_gpt2()
    ids = _ids()
    listed = tensorsnap.names(model, ids, ops=True)
    with tensorsnap.capture(model, ops=True) as snap:
        model(ids)
    assert listed == list(snap)
    assert "transformer.h.1.attn/softmax" in listed
    assert "transformer.h.1.mlp.act/tanh" in listed


# -- a ResNet-18-style basic block, written out ------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class _ResNetStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(_BasicBlock(8), _BasicBlock(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


def _resnet() -> _ResNetStem:
    torch.manual_seed(2)
    model = _ResNetStem()
    for module in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            nn.init.normal_(module.running_mean)
            nn.init.uniform_(module.running_var, 0.5, 2.0)
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    return model.eval()


def test_resnet_block_residual_add_is_taken_before_the_inplace_relu() -> None:
    model = _resnet()
    x = torch.randn(2, 3, 6, 6)
    block = model.layer1[0]
    assert isinstance(block, _BasicBlock)
    clones: dict[str, torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(
            lambda m, args: clones.__setitem__("in", args[0].detach().clone())
        ),
        block.bn2.register_forward_hook(
            lambda m, args, out: clones.__setitem__("bn2", out.detach().clone())
        ),
    ]
    with torch.no_grad():  # reference pass, then the capture without the hooks
        model(x)
    for handle in handles:
        handle.remove()
    with torch.no_grad(), tensorsnap.capture(model, ops=True) as snap:
        model(x)
    keys = [k for k in snap if k.startswith("layer1.0")]
    assert keys == [
        "layer1.0.conv1/conv2d",
        "layer1.0.conv1",
        "layer1.0.bn1/batch_norm",
        "layer1.0.bn1",
        "layer1.0.relu/relu",
        "layer1.0.relu",
        "layer1.0.conv2/conv2d",
        "layer1.0.conv2",
        "layer1.0.bn2/batch_norm",
        "layer1.0.bn2",
        "layer1.0/add_",
        "layer1.0.relu#1/relu",
        "layer1.0.relu#1",
        "layer1.0",
    ]
    added = clones["bn2"] + clones["in"]
    assert torch.equal(snap["layer1.0/add_"], added)
    assert (added < 0).any()  # so the in-place ReLU after it really changes the live tensor
    assert torch.equal(snap["layer1.0.relu#1/relu"], added.clamp(min=0))
    assert torch.equal(snap["layer1.0"], added.clamp(min=0))
    # bn2's own output was captured before `out += identity` rewrote it
    assert torch.equal(snap["layer1.0.bn2"], clones["bn2"])
    assert torch.equal(snap["layer1.0.bn2/batch_norm"], clones["bn2"])


def test_resnet_training_step_unchanged_by_op_capture() -> None:
    x = torch.randn(4, 3, 6, 6)
    results = []
    for capture in (False, True):
        model = copy.deepcopy(_resnet()).train()
        if capture:
            with tensorsnap.capture(model, ops=True, grads=True) as snap:
                model(x).logsumexp(1).sum().backward()
            assert "layer1.1/add_:grad" in snap
        else:
            model(x).logsumexp(1).sum().backward()
        grads = [p.grad for p in model.parameters()]
        results.append((grads, [b.clone() for b in model.buffers()]))
    (plain_grads, plain_buffers), (grads, buffers) = results
    for a, b in zip(plain_grads, grads):
        assert a is not None and b is not None and torch.equal(a, b)
    for a, b in zip(plain_buffers, buffers):
        assert torch.equal(a, b)


def test_torchvision_resnet18_block_add() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    block = model.layer1[0]
    clones: dict[str, torch.Tensor] = {}
    pre = block.register_forward_pre_hook(
        lambda m, args: clones.__setitem__("in", args[0].detach().clone())
    )
    post = block.bn2.register_forward_hook(
        lambda m, args, out: clones.__setitem__("bn2", out.detach().clone())
    )
    with torch.no_grad():
        model(x)
    pre.remove()
    post.remove()
    with torch.no_grad(), tensorsnap.capture(model, ops=True, include="layer1.0*") as snap:
        model(x)
    assert torch.equal(snap["layer1.0/add_"], clones["bn2"] + clones["in"])
    assert torch.equal(snap["layer1.0"], (clones["bn2"] + clones["in"]).clamp(min=0))
