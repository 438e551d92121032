"""Gradients: of module and op outputs (tensor hooks), and of a call's inputs (graph-node hooks).

Both arrive during backward, one tensor at a time, and are handed to the capture session
(``store_gradient``), which copies and keeps them under their keys.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from . import _tree
from ._ops import quiet as _quiet

if TYPE_CHECKING:
    from ._capture import _Frame, _Session

__all__ = ["Gradients", "InputGradients"]


class _Leaf:
    """Marks where a tensor stood in a value whose gradients arrive one by one."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class Gradients:
    """Collects the gradients of one value's tensors as backward produces them."""

    __slots__ = ("call", "grads", "handles", "key", "kind", "module", "op", "session", "skeleton")

    def __init__(
        self, session: _Session, key: str, frame: _Frame, op: str | None, kind: str, value: Any
    ) -> None:
        self.session = session
        self.key = key
        self.module = frame.name
        self.call = frame.call
        self.op = op
        self.kind = kind
        self.grads: dict[int, Any] = {}
        self.handles: list[Any] = []  # tensor hooks, removed when the session closes

        leaves = 0

        def leaf(t: torch.Tensor) -> _Leaf:
            nonlocal leaves
            marker = _Leaf(leaves)
            leaves += 1
            if not t.requires_grad:
                return marker
            self.handles.append(t.register_hook(partial(self._arrived, marker.index)))
            base = t._base
            if base is not None and base.requires_grad:
                # an in-place op on a view (``y += x`` after a Linear on 3-d input) rewires the
                # graph through its base and the view's own hooks never fire; the base's hook
                # still sees the gradient of the old values, from which the view's is cut out
                # (the geometry is kept, not the base: its memory must not outlive the graph)
                offset = int(t.storage_offset() - base.storage_offset())
                geometry = (tuple(base.shape), base.stride(), tuple(t.shape), t.stride(), offset)
                self.handles.append(
                    base.register_hook(partial(self._through_base, marker.index, geometry))
                )
            return marker

        # the value's structure with markers where its tensors were: gradients fill it in, and
        # the live tensors themselves are not kept alive
        self.skeleton = _tree.map_tensors(leaf, value)

    def _through_base(
        self,
        index: int,
        geometry: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], int],
        grad: torch.Tensor,
    ) -> None:
        if index in self.grads or not self.session.open:
            return  # the view's own hook fired: no in-place op rewired it
        base_shape, base_stride, shape, stride, offset = geometry
        with _quiet(), torch.no_grad():
            full = torch.empty_strided(
                base_shape, base_stride, dtype=grad.dtype, device=grad.device
            )
            full.copy_(grad)
            self._arrived(index, full.as_strided(shape, stride, offset))

    def _arrived(self, index: int, grad: torch.Tensor) -> None:
        session = self.session
        if not session.open or index in self.grads:
            # a tensor that outlives one backward pass (a parameter or input returned as is)
            # keeps its hook: a later pass's gradient belongs to a later call, not to this one
            return
        with _quiet():
            self.grads[index] = session.copy_value(grad, self.key)
            value = _tree.map_tensors(
                lambda marker: self.grads.get(marker.index), self.skeleton, leaf=_Leaf
            )
            session.store_gradient(self.key, self.module, self.call, self.op, self.kind, value)


# A leaf whose views tell the autograd sequence number of "now" (a thread-local counter that
# numbers graph nodes in creation order), so that a module call's own nodes can be recognised.
_PROBE = torch.zeros(1, requires_grad=True)


def _now() -> int:
    node = _PROBE.view(1).grad_fn
    return node._sequence_nr() if node is not None else -1


class InputGradients:
    """Gradients w.r.t. one module call's positional inputs, through that call only.

    Nothing is put into the model's graph (an identity node per input would change the order in
    which autograd sums an input's gradient over its uses, and so its last bits). Instead, after
    the call, the graph nodes it created are found by sequence number, walking back from its
    outputs; hooks on the nodes that consume an input observe each contribution, and the
    contributions are summed in the copy.
    """

    __slots__ = (
        "call",
        "grads",
        "key",
        "module",
        "nodes",
        "session",
        "start",
        "structure",
        "targets",
    )

    def __init__(self, session: _Session, key: str, frame: _Frame, args: tuple[Any, ...]) -> None:
        self.session = session
        self.key = key
        self.module = frame.name
        self.call = frame.call
        self.start = _now()
        self.targets: dict[tuple[int, int], int] = {}
        # held until the call ends: a leaf's AccumulateGrad node lives only while referenced,
        # and a new one (with a new id) would replace it
        self.nodes: list[Any] = []
        self.structure = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        for index, arg in enumerate(args):
            if self.structure[index]:
                node = arg.grad_fn
                if node is None:  # a leaf: its AccumulateGrad node, reached through a view
                    node = arg.view_as(arg).grad_fn.next_functions[0][0]
                    self.targets[(id(node), 0)] = index
                else:
                    self.targets[(id(node), arg.output_nr)] = index
                self.nodes.append(node)
        self.grads: dict[int, torch.Tensor] = {}

    def watch(self, output: Any) -> list[Any]:
        """Hook the nodes, created by this call, that consume one of its inputs."""
        end = _now()
        handles = []
        stack = [t.grad_fn for t in _tree.tensors(output) if t.grad_fn is not None]
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if not self.start < node._sequence_nr() < end:
                continue  # made before or outside this call: not this call's computation
            edges = []
            for position, (parent, output_nr) in enumerate(node.next_functions):
                if parent is None:
                    continue
                index = self.targets.get((id(parent), output_nr))
                if index is not None:
                    edges.append((position, index))
                else:
                    stack.append(parent)
            if edges:
                handles.append(node.register_hook(partial(self._arrived, edges)))
        self.nodes.clear()
        return handles

    def _arrived(
        self, edges: list[tuple[int, int]], grad_inputs: tuple[Any, ...], grad_outputs: Any
    ) -> None:
        session = self.session
        if not session.open:
            return
        with _quiet():
            for position, index in edges:
                grad = grad_inputs[position]
                if grad is None:
                    continue
                if index in self.grads:
                    self.grads[index] = self.grads[index] + grad
                else:
                    self.grads[index] = session.copy_value(grad, self.key)
            value = tuple(self.grads.get(i) for i in range(len(self.structure)))
            session.store_gradient(self.key, self.module, self.call, None, "grad_in", value)
