"""Tensors of ``torch.distributed``: DTensor, and the AsyncCollectiveTensor of collectives.

Tensor-parallel modules return DTensors: a rank holds one local tensor, and the placements say
how the locals of the mesh's ranks make the full tensor (``Shard(d)``: concatenated along ``d``;
``Partial``: summed; ``Replicate``: equal). Copying one must never communicate:
``detach().clone()`` of a ``Partial`` DTensor silently all-reduces it, and a collective run by
a hook on some ranks only hangs the others. So the copy of a DTensor is a DTensor over the same
mesh with the same placements and global shape whose local tensor is a copy of this rank's
local tensor. Gathering the full tensor is a collective and happens only when
``capture(gather=True)`` asks for it; every rank then gathers its values in the same order, the
order the model produced them in, which is the same on every rank of an SPMD program.

Saving keeps the local tensor and the layout (:func:`layout`); :func:`assemble` rebuilds the
full tensor from the saved locals of a mesh's ranks without a process group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._copy import Copier

__all__ = ["assemble", "copy_distributed", "is_distributed", "layout", "local"]


def is_distributed(cls: type) -> bool:
    """Whether ``cls`` is a tensor class of ``torch.distributed`` (checked without importing)."""
    return cls.__module__.startswith("torch.distributed")


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's local tensor of a DTensor; any other tensor as it is. Never communicates."""
    if is_distributed(type(t)):
        inner = getattr(t, "_local_tensor", None)  # DTensor
        if isinstance(inner, torch.Tensor):
            return inner
        inner = getattr(t, "elem", None)  # AsyncCollectiveTensor, not waited for
        if isinstance(inner, torch.Tensor):
            return inner
    return t


def copy_distributed(c: Copier, t: torch.Tensor) -> torch.Tensor:
    """Copy a ``torch.distributed`` tensor for the copy engine, without any collective.

    A DTensor becomes a DTensor with the same mesh, placements and global shape around a copy of
    its local tensor (or, when the copier gathers, a plain copy of ``full_tensor()``, a
    collective); an AsyncCollectiveTensor is waited for, then copied as a plain tensor.
    """
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(t, dtensor):
        if c.gather:
            full = t.full_tensor()  # type: ignore[attr-defined]  # a collective, on every rank
            return c.copy(_plain(full))
        inner = t._local_tensor  # type: ignore[attr-defined]
        copy = c.copy(inner)
        spec = t._spec  # type: ignore[attr-defined]
        if copy.dtype != inner.dtype and spec.tensor_meta is not None:
            spec = dataclasses.replace(
                spec, tensor_meta=spec.tensor_meta._replace(dtype=copy.dtype)
            )
        return dtensor(copy, spec, requires_grad=False)
    wait = getattr(t, "trigger_wait", None)
    if callable(wait):  # AsyncCollectiveTensor: the collective may still be running
        return c.copy(_plain(wait()))
    return c._copy_opaque(t)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A waited-for result as a plain tensor (functional collectives may still wrap it)."""
    while type(t) is not torch.Tensor and is_distributed(type(t)):
        wait = getattr(t, "trigger_wait", None)
        if not callable(wait):
            break
        t = wait()
    return t


def layout(t: torch.Tensor) -> dict[str, Any] | None:
    """How a DTensor's local tensor fits into the full tensor, as JSON-ready data; else None.

    ``placements``: one per mesh dimension, ``"S(d)"`` (sharded on tensor dim ``d``),
    ``"P(sum)"`` (partial, reduced with that op), ``"R"`` (replicated); ``mesh``: the global
    ranks of the mesh as a nested list of ``mesh_shape``; ``coordinate``: this rank's place in
    it; ``shape``/``stride``: the full tensor's.
    """
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(t, dtensor):
        return None
    mesh = t.device_mesh  # type: ignore[attr-defined]
    return {
        "placements": [_placement_name(p) for p in t.placements],  # type: ignore[attr-defined]
        "mesh": mesh.mesh.tolist(),
        "mesh_dim_names": list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
        "coordinate": mesh.get_coordinate(),
        "shape": list(t.shape),
        "stride": list(t.stride()),
    }


def _placement_name(p: Any) -> str:
    if p.is_shard():
        if type(p).__name__ != "Shard":
            # _StridedShard and friends interleave the chunks; plain concatenation would be wrong
            raise ValueError(f"placement {p!r} is not supported; only Shard, Partial, Replicate")
        return f"S({p.dim})"
    if p.is_partial():
        return f"P({p.reduce_op})"
    if p.is_replicate():
        return "R"
    raise ValueError(f"unknown placement {p!r}")


_REDUCE: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] = {
    "sum": lambda ts: _sum(ts),
    "avg": lambda ts: _sum(ts) / len(ts),
    "max": lambda ts: torch.stack(ts).amax(0),
    "min": lambda ts: torch.stack(ts).amin(0),
}


def _sum(ts: list[torch.Tensor]) -> torch.Tensor:
    total = ts[0].clone()
    for t in ts[1:]:
        total += t
    return total


def assemble(
    locals_by_rank: Mapping[int, torch.Tensor], layout: Mapping[str, Any], where: str = "value"
) -> torch.Tensor:
    """The full tensor of a DTensor, from the saved local tensors of its mesh's ranks.

    Mesh dimensions are undone from the innermost out, as DTensor applies them from the outermost
    in: ``S(d)`` concatenates along ``d`` in mesh order, ``P(op)`` reduces with ``op``, ``R``
    takes the first. Sums of a ``Partial`` run in rank order, which may differ from the order
    of the collective in the last bits.

    Args:
        locals_by_rank: Global rank -> that rank's local tensor.
        layout: What :func:`layout` recorded (any rank's: they agree but for ``coordinate``).
        where: Names the value in error messages.

    Raises:
        ValueError: A rank of the mesh is missing, or the layout is malformed.
    """
    placements: Sequence[str] = layout["placements"]
    mesh = torch.tensor(layout["mesh"], dtype=torch.long)
    if mesh.dim() != len(placements):
        raise ValueError(f"{where}: mesh of {mesh.dim()} dims, but {len(placements)} placements")
    missing = [r for r in mesh.flatten().tolist() if r not in locals_by_rank]
    if missing:
        raise ValueError(f"{where}: the parts of ranks {missing} of its mesh are missing")
    # an object array over the mesh, collapsed one dim at a time from the last
    grid: Any = _nested(mesh.tolist(), locals_by_rank)
    for dim in range(len(placements) - 1, -1, -1):
        grid = _collapse(grid, dim, placements[dim], where)
    result: torch.Tensor = grid
    shape = list(layout["shape"])
    if list(result.shape) != shape:
        raise ValueError(
            f"{where}: the ranks' parts make a tensor of shape {list(result.shape)}, expected "
            f"{shape}"
        )
    return result


def _nested(ranks: Any, locals_by_rank: Mapping[int, torch.Tensor]) -> Any:
    if isinstance(ranks, list):
        return [_nested(r, locals_by_rank) for r in ranks]
    return locals_by_rank[ranks]


def _collapse(grid: Any, dim: int, placement: str, where: str) -> Any:
    if dim > 0:
        return [_collapse(g, dim - 1, placement, where) for g in grid]
    parts: list[torch.Tensor] = list(grid)
    if placement == "R":
        return parts[0]
    if placement.startswith("S(") and placement.endswith(")"):
        return torch.cat(parts, dim=int(placement[2:-1]))
    if placement.startswith("P(") and placement.endswith(")"):
        reduce = _REDUCE.get(placement[2:-1])
        if reduce is not None:
            return reduce(parts)
    raise ValueError(f"{where}: unknown placement {placement!r}")
