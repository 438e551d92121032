"""The main job until the command line lands: capture a small GPT-style model end to end.

Run: ``python examples/demo.py`` (no arguments, no downloads).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import tensorsnap


class Block(nn.Module):
    """Pre-norm attention + MLP with in-place residual adds, the classic aliasing trap."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)  # reused before attention and before the MLP
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        weights = F.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((weights @ v).transpose(1, 2).reshape(b, t, c))
        y = self.mlp(self.norm(x))
        y += x  # in place: a detach()-"copy" of the MLP output would change here
        return y


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> dict[str, object]:
        x = self.embed(ids)
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return {"logits": self.head(x), "hidden": tuple(hidden)}


def main() -> None:
    torch.manual_seed(0)
    model = TinyGPT()
    ids = torch.randint(0, 64, (2, 8))
    with tensorsnap.capture(model, ops=True, grads=True) as snap:
        out = model(ids)
        loss = F.cross_entropy(out["logits"].flatten(0, 1), ids.flatten())  # type: ignore[union-attr]
        loss.backward()
    print(snap)
    mlp, residual = snap["blocks.0.mlp"], snap["blocks.0/add_"]
    print(f"\nblocks.0.mlp output kept its value before `y += x`: {not torch.equal(mlp, residual)}")
    print(f"blocks.0.norm ran twice: {'blocks.0.norm#1' in snap}")
    print(f"attention weights sum to one: {bool(torch.allclose(snap['blocks.0/softmax'].sum(-1), torch.tensor(1.0)))}")
    print(f"gradient keys: {sum(r.kind.endswith('grad') for r in snap.records)}")


if __name__ == "__main__":
    main()
