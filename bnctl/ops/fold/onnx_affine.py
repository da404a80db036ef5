"""What becomes of a BatchNormalization node that folds into no layer: merged into the BN
right after it (two BNs in a row are one per-channel affine map, so one BN), or, with
``fold --standalone affine``, rewritten as a per-channel ``Mul`` + ``Add`` for runtimes and
accelerators that have no BatchNormalization op. Both exact up to float rounding; the graph
is :class:`.onnx_graph.Graph`, changed in place."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.onnx import attribute, node_name
from .onnx_graph import Graph, bn_params


def _inference_bn(graph: Graph, node: Any) -> bool:
    """A BatchNormalization in inference mode whose four parameters are constants."""
    return node.op_type == "BatchNormalization" and not attribute(node, "training_mode", 0) and not any(o for o in node.output[1:]) and len(node.input) >= 5 and all(n in graph.const for n in node.input[1:5])


def merge_into_next(graph: Graph, bn: Any) -> dict | None:
    """Merge ``bn`` into the BN that alone reads its output (same channels, both in inference
    mode with constant statistics): the second becomes ``scale1*scale2 * x + (scale2*shift1 +
    shift2)`` written as a BN with mean 0 and var ``1 - eps``; ``bn`` goes. None where there
    is no such pair."""
    y = bn.output[0]
    readers = graph.readers(y)
    if len(readers) != 1 or not graph.only_reader(y, readers[0]) or not _inference_bn(graph, bn) or not _inference_bn(graph, readers[0]):
        return None
    second = readers[0]
    if second.input[0] != y:
        return None
    s1, t1 = bn_params(graph, bn)
    s2, t2 = bn_params(graph, second)
    eps = float(attribute(second, "epsilon", 1e-5))
    if s1.shape != s2.shape or not 0 < eps < 1 or not (np.isfinite(s1).all() and np.isfinite(s2).all()):
        return None
    into = node_name(second)
    dtype = graph.const[second.input[1]].dtype
    hint = second.name or second.output[0]
    graph.put(second, 1, (s1 * s2).astype(dtype), f"{hint}_scale")
    graph.put(second, 2, (s2 * t1 + t2).astype(dtype), f"{hint}_bias")
    graph.put(second, 3, np.zeros_like(s1).astype(graph.const[second.input[3]].dtype), f"{hint}_mean")
    graph.put(second, 4, np.full_like(s1, 1.0 - eps).astype(graph.const[second.input[4]].dtype), f"{hint}_var")
    graph.remove(bn)
    graph.edit(second, lambda n: n.input.__setitem__(0, bn.input[0]))
    return {"bn": node_name(bn), "into": into, "side": "merged", "note": "two BNs in a row: merged into one"}


def make_affine(graph: Graph, bn: Any, reason: str) -> dict | None:
    """Rewrite ``bn`` as ``Mul`` by its per-channel scale then ``Add`` of its shift, constants
    shaped ``(C, 1, ..., 1)`` for its input's rank; None (the BN stays) where it is not in
    inference mode with constant statistics, or the rank is unknown."""
    import onnx

    if not _inference_bn(graph, bn):
        return None
    rank = graph.rank(bn.input[0]) or graph.rank(bn.output[0])
    if rank is None or rank < 2:
        return None
    scale, shift = bn_params(graph, bn)
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        return None
    dtype = graph.const[bn.input[1]].dtype
    shape = (-1,) + (1,) * (rank - 2)
    name = node_name(bn)
    base = bn.name or bn.output[0]
    mid = f"{base}_scaled"
    while mid in graph.names:
        mid += "_"
    mul = onnx.helper.make_node("Mul", [bn.input[0], ""], [mid], name=f"{base}_mul")
    add = onnx.helper.make_node("Add", [mid, ""], [bn.output[0]], name=f"{base}_add")
    graph.remove(bn)
    graph.insert_before(bn, mul)
    graph.insert_before(bn, add)
    graph.put(mul, 1, scale.reshape(shape).astype(dtype), f"{name}_scale")
    graph.put(add, 1, shift.reshape(shape).astype(dtype), f"{name}_shift")
    return {"bn": name, "into": "a per-channel Mul + Add", "side": "affine", "note": f"--standalone affine; it folds into no layer: {reason}"}
