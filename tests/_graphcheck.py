"""Helpers the graph-mode review tests share: a block run both ways, and their comparison.

The eager op capture is the reference (itself tested against cloning hooks elsewhere): a
graph-mode snapshot must have its keys in order, every record field, and every value bitwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from conftest import assert_same
from torch import nn

import tensorsnap
from tensorsnap import TensorSnapWarning
from tensorsnap._graph import _compiled

Context = Callable[[], Any]


def run(
    model: nn.Module, call: Callable[[], Any], graph: bool, context: Context | None = None
) -> Any:
    """``call()`` in one capture block; the snapshot and what the call returned."""
    torch.manual_seed(7)  # train-mode dropout draws the same masks in every run
    with (context or torch.no_grad)(), tensorsnap.capture(model, ops=True, graph=graph) as snap:
        out = call()
    return snap, out


def plain(call: Callable[[], Any], context: Context | None = None) -> Any:
    torch.manual_seed(7)
    with (context or torch.no_grad)():
        return call()


def detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v) for v in value)
    return value


def compare(graph: Any, eager: Any) -> None:
    assert list(graph) == list(eager)
    assert [tuple(r) for r in graph.records] == [tuple(r) for r in eager.records]
    for key in eager:
        assert_same(graph[key], eager[key], key)


def graph_is_eager(
    model: nn.Module, call: Callable[[], Any], context: Context | None = None, blocks: int = 3
) -> Any:
    """Graph-mode blocks (the first ones check a new graph's keys and compile it) whose last
    one must run the graph, compared with the eager capture and a plain run."""
    eager, out_eager = run(model, call, False, context)
    out_plain = plain(call, context)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TensorSnapWarning)  # no call may run eagerly
        for _ in range(blocks):
            graph, out_graph = run(model, call, True, context)
    assert _compiled[model].eager is None
    compare(graph, eager)
    assert_same(detached(out_graph), detached(out_eager))
    assert_same(detached(out_graph), detached(out_plain))
    return graph
