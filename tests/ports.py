"""Hand-written ports of real models, with their own module names, for diff(match=...) and blame.

``GPT2Port`` reimplements transformers' GPT-2 (fused qkv as one ``nn.Linear``, its own names,
plain tensors where transformers returns tuples and ModelOutputs) and copies the weights of a
``GPT2LMHeadModel``; ``bug=`` plants one mistake in one block. ``TorchvisionResNet`` is written
the way torchvision writes ResNet (module names ``conv1``, ``layer1.0.bn2``, one ReLU module
called twice per block); ``HandResNet`` computes the same function with other names and
functional ReLUs and takes its weights from a ``TorchvisionResNet``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, scale_bug: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.scale_bug = scale_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        # the planted bug: divide by the head size instead of its square root
        scale = (d // self.heads) if self.scale_bug else math.sqrt(d // self.heads)
        scores = q @ k.transpose(-1, -2) / scale
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class _FeedForward(nn.Module):
    def __init__(self, d: int, act_bug: bool = False) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d, 4 * d)
        # the planted bug: exact GELU where GPT-2 uses the tanh approximation
        self.act = nn.GELU() if act_bug else nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, eps: float, bug: str | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = _Attention(d, heads, scale_bug=bug == "attn_scale")
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.ffn = _FeedForward(d, act_bug=bug == "ffn_act")
        self.no_residual = bug == "no_residual"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.ffn(self.norm2(x))
        return h if self.no_residual else x + h


class GPT2Port(nn.Module):
    """GPT-2 written by hand; ``bug`` ("ffn_act", "attn_scale", "no_residual") in block ``at``."""

    def __init__(self, reference: nn.Module, bug: str | None = None, at: int = 1) -> None:
        super().__init__()
        cfg = reference.config
        d, heads, eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_epsilon
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.n_positions, d)
        self.blocks = nn.ModuleList(
            _Block(d, heads, eps, bug if i == at else None) for i in range(cfg.n_layer)
        )
        self.norm_f = nn.LayerNorm(d, eps=eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self._load(reference)

    @torch.no_grad()
    def _load(self, ref: nn.Module) -> None:
        t = ref.transformer
        self.tok_emb.weight.copy_(t.wte.weight)
        self.pos_emb.weight.copy_(t.wpe.weight)
        for mine, theirs in zip(self.blocks, t.h):
            for a, b in ((mine.norm1, theirs.ln_1), (mine.norm2, theirs.ln_2)):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
            # transformers' Conv1D keeps weights as (in, out); nn.Linear as (out, in)
            pairs = (
                (mine.attn.qkv, theirs.attn.c_attn),
                (mine.attn.proj, theirs.attn.c_proj),
                (mine.ffn.fc_in, theirs.mlp.c_fc),
                (mine.ffn.fc_out, theirs.mlp.c_proj),
            )
            for linear, conv in pairs:
                linear.weight.copy_(conv.weight.t())
                linear.bias.copy_(conv.bias)
        self.norm_f.weight.copy_(t.ln_f.weight)
        self.norm_f.bias.copy_(t.ln_f.bias)
        self.head.weight.copy_(ref.lm_head.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x))


# -- ResNet, torchvision's way and by hand -----------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, written out (same names, one ReLU called twice)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TorchvisionResNet(nn.Module):
    """A small ResNet with torchvision's module names (two stages of two BasicBlocks)."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, width, 1))
        self.layer2 = nn.Sequential(
            BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width, 1)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)
        with torch.no_grad():  # non-trivial batch-norm statistics, so that a swap shows
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _Unit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bug: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        # the planted bug: a batch norm with another epsilon
        self.n2 = nn.BatchNorm2d(cout, eps=0.5 if bug else 1e-5)
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(self.c1(x)))
        return F.relu(self.n2(self.c2(h)) + self.skip(x))


class HandResNet(nn.Module):
    """The same network as ``TorchvisionResNet``, written with other names; weights from it."""

    def __init__(self, reference: TorchvisionResNet, bug_at: tuple[int, int] | None = None) -> None:
        super().__init__()
        width = reference.conv1.out_channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*(_Unit(width, width, 1, bug_at == (0, j)) for j in range(2))),
                nn.Sequential(
                    _Unit(width, 2 * width, 2, bug_at == (1, 0)),
                    _Unit(2 * width, 2 * width, 1, bug_at == (1, 1)),
                ),
            ]
        )
        self.classifier = nn.Linear(2 * width, reference.fc.out_features)
        self._load(reference)

    @torch.no_grad()
    def _load(self, ref: TorchvisionResNet) -> None:
        def bn(mine: nn.BatchNorm2d, theirs: nn.BatchNorm2d) -> None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(mine, name).copy_(getattr(theirs, name))

        self.stem[0].weight.copy_(ref.conv1.weight)
        bn(self.stem[1], ref.bn1)
        for stage, layer in zip(self.stages, (ref.layer1, ref.layer2)):
            for unit, block in zip(stage, layer):
                unit.c1.weight.copy_(block.conv1.weight)
                unit.c2.weight.copy_(block.conv2.weight)
                bn(unit.n1, block.bn1)
                bn(unit.n2, block.bn2)
                if block.downsample is not None:
                    unit.skip[0].weight.copy_(block.downsample[0].weight)
                    bn(unit.skip[1], block.downsample[1])
        self.classifier.weight.copy_(ref.fc.weight)
        self.classifier.bias.copy_(ref.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x.mean(dim=(2, 3)))


GPT2_MAP = {
    "transformer.wte": "tok_emb",
    "transformer.wpe": "pos_emb",
    "transformer.h.*.ln_1": "blocks.*.norm1",
    "transformer.h.*.ln_2": "blocks.*.norm2",
    "transformer.h.*.attn.c_attn": "blocks.*.attn.qkv",
    "transformer.h.*.attn.c_proj": "blocks.*.attn.proj",
    "transformer.h.*.attn": "blocks.*.attn",
    "transformer.h.*.mlp.c_fc": "blocks.*.ffn.fc_in",
    "transformer.h.*.mlp.act": "blocks.*.ffn.act",
    "transformer.h.*.mlp.c_proj": "blocks.*.ffn.fc_out",
    "transformer.h.*.mlp": "blocks.*.ffn",
    "transformer.h.*": "blocks.*",
    "transformer.ln_f": "norm_f",
    "lm_head": "head",
}
