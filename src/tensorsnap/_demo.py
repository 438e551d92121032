"""The built-in demo model: a tiny GPT-style network that exercises what makes copying hard.

``tensorsnap demo`` captures it end to end without downloads. The model has the traps that
naive recipes fall into: an in-place residual add after the MLP (a ``detach()`` "copy" of the
MLP output would change), a LayerNorm called twice per block (``P#1`` keys), attention built
from functional ops (``softmax``, ``matmul``), and a nested output (a dict holding a tuple).
"""

from __future__ import annotations

import os
import shutil
from os import PathLike

import torch
from torch import nn
from torch.nn import functional as F

from ._capture import capture
from ._errors import TensorSnapError
from ._manifest import DIGEST_FIELD, MANIFEST, read_manifest
from ._snapshot import Snapshot

__all__ = ["MARK", "Block", "TinyGPT", "example_input", "run"]

VOCAB = 64


class Block(nn.Module):
    """Pre-norm attention + MLP with in-place residual adds, the classic aliasing trap."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)  # reused before attention and before the MLP
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

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
    """Embedding, ``layers`` blocks and an LM head; returns ``{"logits", "hidden"}``."""

    def __init__(
        self, vocab: int = VOCAB, width: int = 32, heads: int = 4, layers: int = 2
    ) -> None:
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


def example_input(batch: int = 2, length: int = 8) -> torch.Tensor:
    """Token ids for :class:`TinyGPT`, drawn from torch's global generator."""
    return torch.randint(0, VOCAB, (batch, length))


# The file inside a bundle that marks it as the demo's own output: it holds the manifest's
# SHA-256, so a bundle saved over it (or a copied-in marker) does not pass for the demo's.
MARK = ".tensorsnap-demo"


def _digest(bundle: str) -> str:
    manifest = read_manifest(os.path.join(bundle, MANIFEST))
    return str(manifest[DIGEST_FIELD])


def _written_by_demo(bundle: str) -> bool:
    """Whether ``bundle`` is a bundle an earlier demo wrote (and nobody replaced since)."""
    mark = os.path.join(bundle, MARK)
    if os.path.islink(bundle) or not os.path.isfile(mark) or os.path.islink(mark):
        return False
    try:
        with open(mark, encoding="ascii") as f:
            saved = f.read(200).strip()
        return saved == _digest(bundle)
    except (OSError, ValueError, TensorSnapError):
        return False


def run(out_dir: str | PathLike[str], seed: int = 0) -> tuple[Snapshot, str]:
    """Capture a forward and backward pass of :class:`TinyGPT` and save it as a bundle.

    The bundle goes to ``out_dir/bundle``, marked as the demo's (a ``.tensorsnap-demo`` file
    holding its manifest's SHA-256); a bundle an earlier demo left there is replaced (only once
    the new one is complete), anything else there (a bundle of your own included) is an error.

    Args:
        out_dir: The demo's directory (created if missing).
        seed: Seed for the weights and the input, so that runs are reproducible.

    Returns:
        The snapshot and the path of the bundle.

    Raises:
        TensorSnapError: ``out_dir/bundle`` exists and is not the demo's own output.
    """
    torch.manual_seed(seed)
    model = TinyGPT()
    ids = example_input()
    with capture(model, ops=True, grads=True) as snap:
        out = model(ids)
        logits = out["logits"]
        if not isinstance(logits, torch.Tensor):  # pragma: no cover - the model returns one
            raise TensorSnapError("TinyGPT returned no logits tensor")
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        loss.backward()
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(os.fspath(out_dir), "bundle")
    if os.path.lexists(target) and not _written_by_demo(target):
        what = (
            "is a bundle the demo did not write (it has no .tensorsnap-demo file matching its "
            "manifest): it may be your own capture"
            if os.path.isfile(os.path.join(target, MANIFEST))
            else "exists and is not a tensorsnap bundle"
        )
        raise TensorSnapError(
            f"{target} {what}; the demo replaces only its own output and will not overwrite it. "
            "Pick another directory with -o, or remove it yourself"
        )
    # write the new bundle next to the old one, then swap, so a failed save keeps the old one
    fresh = os.path.join(os.fspath(out_dir), f".bundle-new-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    snap.save(fresh)
    with open(os.path.join(fresh, MARK), "w", encoding="ascii") as f:
        f.write(_digest(fresh) + "\n")
    if os.path.lexists(target):
        shutil.rmtree(target)
    os.rename(fresh, target)
    return snap, target
