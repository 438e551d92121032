"""Gradients: of module and op outputs (tensor hooks), and of a call's inputs (graph-node hooks).

Both arrive during backward, one tensor at a time, and are handed to a :class:`GradientSink`
(the capture session), which copies and keeps them under their keys. ``names()`` asks
:class:`Reach` instead which of the values it saw a backward pass from the output could reach.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from functools import partial
from typing import Any, Protocol

import torch

from . import _tree
from ._ops import quiet as _quiet

__all__ = ["GradientSink", "Gradients", "InputGradients", "Reach"]

# -1 outside a backward pass
_in_backward = torch._C._current_graph_task_id


class GradientSink(Protocol):
    """What the gradient watchers need of the session that owns them."""

    @property
    def open(self) -> bool:
        """False once the capture block has ended: later gradients are not its."""

    def copy_value(self, value: Any, key: str) -> Any:
        """A copy of ``value`` as the capture keeps it."""

    def store_gradient(
        self, key: str, module: str, call: int, op: str | None, kind: str, value: Any
    ) -> None:
        """Add or update the gradient ``key`` with ``value`` (its parts that arrived so far)."""


class _Leaf:
    """Marks where a tensor stood in a value whose gradients arrive one by one."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Probe:
    """Hung on a view's graph node to learn when the node dies (a weak reference's callback)."""

    __slots__ = ("__weakref__",)

    def __call__(self, grad_outputs: Any) -> None:
        return None


class Gradients:
    """Collects the gradients of one value's tensors as backward produces them.

    The gradient structure mirrors the value's (:func:`._tree.map_tensors`: containers, objects
    such as caches, namedtuples such as ``PackedSequence``), with None where no gradient flowed.
    """

    __slots__ = (
        "call",
        "grads",
        "handles",
        "key",
        "kind",
        "module",
        "op",
        "rebased",
        "sink",
        "skeleton",
    )

    def __init__(
        self,
        sink: GradientSink,
        key: str,
        module: str,
        call: int,
        op: str | None,
        kind: str,
        value: Any,
    ) -> None:
        self.sink = sink
        self.key = key
        self.module = module
        self.call = call
        self.op = op
        self.kind = kind
        self.grads: dict[int, Any] = {}
        self.rebased: set[int] = set()
        self.handles: list[Any] = []  # tensor hooks, removed when the session closes

        leaves = 0

        def leaf(t: torch.Tensor) -> _Leaf:
            nonlocal leaves
            marker = _Leaf(leaves)
            leaves += 1
            if t.requires_grad:
                self.handles.append(t.register_hook(partial(self._arrived, marker.index)))
                base = t._base
                if base is not None and base.requires_grad and t.grad_fn is not None:
                    self._watch_base(marker.index, t, base)
            return marker

        # the value's structure with markers where its tensors were: gradients fill it in, and
        # the live tensors themselves are not kept alive
        self.skeleton = _tree.map_tensors(leaf, value)

    def _watch_base(self, index: int, t: torch.Tensor, base: torch.Tensor) -> None:
        """Recover the gradient of a view that an in-place op rewrites, whose own hook is lost.

        An in-place op on a view (``y += x`` after a Linear on 3-d input) rebases the graph onto
        the view's base: the view's node is no longer run, and its hooks never fire. The old
        node is then held only by the in-place op's node inside the base's ``CopySlices``, which
        releases it while backward runs it. So the view's gradient is cut out of its base's,
        but only when the view's node died inside a backward pass (or the view, still alive,
        has another node now): a view whose node simply never ran (used for its shape only,
        returned beside its base and unused) got no gradient, and gets None.
        """
        node: Any = t.grad_fn
        probe = _Probe()
        self.handles.append(node.register_prehook(probe))
        self.handles.append(_Liveness(probe, partial(self._node_died, index)))
        view = weakref.ref(t)
        offset = int(t.storage_offset() - base.storage_offset())
        # the geometry is kept, not the base: its memory must not outlive the graph
        geometry = (tuple(base.shape), base.stride(), tuple(t.shape), t.stride(), offset)
        self.handles.append(
            base.register_hook(
                partial(self._through_base, index, geometry, view, node._sequence_nr())
            )
        )

    def _node_died(self, index: int) -> None:
        if _in_backward() != -1:
            self.rebased.add(index)

    def _through_base(
        self,
        index: int,
        geometry: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], int],
        view: weakref.ref[torch.Tensor],
        node: int,
        grad: torch.Tensor,
    ) -> None:
        if index in self.grads or not self.sink.open:
            return  # the view's own hook fired: no in-place op rewired it
        alive = view()
        rebased = index in self.rebased or (
            alive is not None and alive.grad_fn is not None and alive.grad_fn._sequence_nr() != node
        )
        if not rebased:
            return  # no gradient flowed into the view
        base_shape, base_stride, shape, stride, offset = geometry
        with _quiet(), torch.no_grad():
            full = torch.empty_strided(
                base_shape, base_stride, dtype=grad.dtype, device=grad.device
            )
            full.copy_(grad)
            self._arrived(index, full.as_strided(shape, stride, offset))

    def _arrived(self, index: int, grad: torch.Tensor) -> None:
        sink = self.sink
        if not sink.open or index in self.grads:
            # a tensor that outlives one backward pass (a parameter or input returned as is)
            # keeps its hook: a later pass's gradient belongs to a later call, not to this one
            return
        with _quiet():
            self.grads[index] = sink.copy_value(grad, self.key)
            value = _tree.map_tensors(
                lambda marker: self.grads.get(marker.index), self.skeleton, leaf=_Leaf
            )
            sink.store_gradient(self.key, self.module, self.call, self.op, self.kind, value)


class _Liveness:
    """A removable handle that calls back once when ``probe`` dies (not after removal)."""

    __slots__ = ("ref",)

    def __init__(self, probe: _Probe, callback: Any) -> None:
        self.ref: weakref.ref[_Probe] | None = weakref.ref(probe, lambda _: callback())

    def remove(self) -> None:
        self.ref = None  # the weak reference dies with the handle: its callback never runs


# A leaf whose views tell the autograd sequence number of "now" (a thread-local counter that
# numbers graph nodes in creation order), so that a module call's own nodes can be recognised.
_PROBE = torch.zeros(1, requires_grad=True)


def _now() -> int:
    node = _PROBE.view(1).grad_fn
    return node._sequence_nr() if node is not None else -1


def _node_of(t: torch.Tensor) -> tuple[Any, int]:
    """The graph edge a tensor that requires grad is read through: ``(node, output_nr)``."""
    node = t.grad_fn
    if node is None:  # a leaf: its AccumulateGrad node, reached through a view
        view: Any = t.view_as(t).grad_fn
        return view.next_functions[0][0], 0
    return node, t.output_nr


class InputGradients:
    """Gradients w.r.t. one module call's positional inputs, through that call only.

    Nothing is put into the model's graph (an identity node per input would change the order in
    which autograd sums an input's gradient over its uses, and so its last bits). Instead, after
    the call, the graph nodes it created are found by sequence number, walking back from its
    outputs; hooks on the nodes that consume an input observe each contribution, and the
    contributions are summed in the copy.

    Every position that holds one tensor gets the gradient into that tensor through the call
    (``attn(h, h, h)`` reports it three times). An input the call returns as it is (``Identity``,
    ``Dropout`` in eval mode) gets the gradient of that tensor, which is the call's output
    gradient: autograd cannot tell the call's use of a tensor it returns from the caller's.
    """

    __slots__ = (
        "_sums",
        "call",
        "grads",
        "inputs",
        "key",
        "module",
        "nodes",
        "sink",
        "size",
        "start",
        "targets",
    )

    def __init__(
        self, sink: GradientSink | None, key: str, module: str, call: int, args: tuple[Any, ...]
    ) -> None:
        self.sink = sink
        self.key = key
        self.module = module
        self.call = call
        self.start = _now()
        self.size = len(args)
        self.targets: dict[tuple[int, int], list[int]] = {}
        self.inputs: dict[int, list[int]] = {}  # id of an input tensor -> its positions
        # held until the call ends: a leaf's AccumulateGrad node lives only while referenced,
        # and a new one (with a new id) would replace it
        self.nodes: list[Any] = []
        for index, arg in enumerate(args):
            if isinstance(arg, torch.Tensor) and arg.requires_grad:
                node, output_nr = _node_of(arg)
                self.targets.setdefault((id(node), output_nr), []).append(index)
                self.inputs.setdefault(id(arg), []).append(index)
                self.nodes.append(node)
        self.grads: dict[int, torch.Tensor] = {}
        self._sums: dict[int, torch.Tensor] = {}  # running sums, where copies are not exact

    def consumers(self, output: Any) -> tuple[list[tuple[Any, list[tuple[int, int]]]], list[Any]]:
        """The nodes this call created that read one of its inputs, each with its edges
        ``(position in next_functions, input index)``, and the inputs it returned as they are.
        """
        end = _now()
        found = []
        returned = []
        outputs = list(_tree.tensors(output))
        stack = []
        for t in outputs:
            if id(t) in self.inputs:
                returned.append(t)
            elif t.grad_fn is not None:
                stack.append(t.grad_fn)
        seen: set[int] = set()
        passed = {i for t in returned for i in self.inputs[id(t)]}
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if not self.start < node._sequence_nr() < end:
                continue  # made before or outside this call: not this call's computation
            edges: list[tuple[int, int]] = []
            for position, (parent, output_nr) in enumerate(node.next_functions):
                if parent is None:
                    continue
                indices = self.targets.get((id(parent), output_nr))
                if indices is None:
                    stack.append(parent)
                    continue
                # an input the call also returns gets its whole gradient from the tensor itself
                edges.extend((position, i) for i in indices if i not in passed)
            if edges:
                found.append((node, edges))
        self.nodes.clear()
        return found, returned

    def watch(self, output: Any) -> list[Any]:
        """Hook what carries this call's input gradients; returns the hooks' handles."""
        found, returned = self.consumers(output)
        handles = [node.register_hook(partial(self._through, edges)) for node, edges in found]
        for t in {id(t): t for t in returned}.values():
            handles.append(t.register_hook(partial(self._returned, self.inputs[id(t)])))
        return handles

    def _through(
        self, edges: list[tuple[int, int]], grad_inputs: tuple[Any, ...], grad_outputs: Any
    ) -> None:
        self._add([(index, grad_inputs[position]) for position, index in edges])

    def _returned(self, indices: list[int], grad: torch.Tensor) -> None:
        self._add([(index, grad) for index in indices])

    def _add(self, parts: list[tuple[int, Any]]) -> None:
        sink = self.sink
        if sink is None or not sink.open:
            return
        with _quiet():
            for index, grad in parts:
                if grad is None:
                    continue
                if index in self._sums:  # the copy is not the gradient itself: sum the parts
                    total = self._sums[index] = self._sums[index] + grad
                    self.grads[index] = sink.copy_value(total, self.key)
                elif index in self.grads:
                    self.grads[index] = self.grads[index] + grad
                else:
                    copy = self.grads[index] = sink.copy_value(grad, self.key)
                    if not _exact(copy, grad):
                        # device=, dtype= or stats=: a later part must add to the gradient in
                        # its own dtype and device, and the copy be made of the sum
                        self._sums[index] = grad.detach().clone()
            value = tuple(self.grads.get(i) for i in range(self.size))
            sink.store_gradient(self.key, self.module, self.call, None, "grad_in", value)


def _exact(copy: Any, grad: torch.Tensor) -> bool:
    """Whether ``copy`` is a plain clone of ``grad`` (same type, dtype and device)."""
    return type(copy) is type(grad) and copy.dtype == grad.dtype and copy.device == grad.device


class Reach:
    """Which gradient keys a backward pass from the model's output can produce (``names()``).

    Each key is noted with its anchors, the graph nodes or tensors its gradient would arrive
    through; at the end, a key whose anchors the output's graph does not reach is one a real
    backward pass leaves out (a view used for its shape only, an input read only for its size).
    """

    def __init__(self) -> None:
        self.anchors: dict[str, list[Any]] = {}

    def value(self, key: str, value: Any) -> bool:
        """Note the tensors of ``value``; False when none requires grad."""
        tensors = [t for t in _tree.tensors(value) if t.requires_grad]
        if tensors:
            self.anchors[key] = [(t, t.grad_fn) for t in tensors]
        return bool(tensors)

    def inputs(self, key: str, gradients: InputGradients, output: Any) -> bool:
        """Note what would carry a call's input gradients; False when nothing would."""
        found, returned = gradients.consumers(output)
        anchors: list[Any] = [node for node, _ in found]
        anchors += [(t, t.grad_fn) for t in returned]
        if anchors:
            self.anchors[key] = anchors
        return bool(anchors)

    def unreached(self, output: Any) -> set[str]:
        """The noted keys that no backward pass from the tensors of ``output`` reaches."""
        nodes, leaves = _graph(_tree.tensors(output))
        return {
            key
            for key, anchors in self.anchors.items()
            if not any(_reached(anchor, nodes, leaves) for anchor in anchors)
        }


def _graph(tensors: Iterable[torch.Tensor]) -> tuple[set[int], set[int]]:
    """Ids of the graph nodes behind ``tensors``, and of the leaf tensors they accumulate into."""
    nodes: set[int] = set()
    leaves: set[int] = set()
    stack = []
    for t in tensors:
        if t.grad_fn is not None:
            stack.append(t.grad_fn)
        elif t.requires_grad:
            leaves.add(id(t))
    while stack:
        node = stack.pop()
        if id(node) in nodes:
            continue
        nodes.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.add(id(variable))
        stack.extend(parent for parent, _ in node.next_functions if parent is not None)
    return nodes, leaves


def _reached(anchor: Any, nodes: set[int], leaves: set[int]) -> bool:
    if not isinstance(anchor, tuple):
        return id(anchor) in nodes
    t, node = anchor
    if node is None:
        return id(t) in leaves
    if id(node) in nodes:
        return True
    # a view rewritten in place since: its gradient comes through its base (Gradients)
    base = t._base
    return t.grad_fn is not node and base is not None and id(base.grad_fn) in nodes
