"""Where a BN in an ONNX graph folds: the layer before it, seen through what exporters put
between them (Identity, a Cast to the same type, one bias ``Add``/``Sub`` of a per-channel
constant), or the Conv or Gemm after it. Each walk is bounded and iterative."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.onnx import attribute, node_name
from .onnx_graph import LAYER_KINDS, Graph


def _zero_pads(layer: Any) -> bool:
    auto_pad = attribute(layer, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True
    return any(int(p) != 0 for p in attribute(layer, "pads", []) or [])


class Source:
    """The layer a BN's input comes from, and what lies between them: Identity nodes, Casts
    to the same type, and at most one bias ``Add``/``Sub`` of a per-channel constant."""

    def __init__(self, layer: Any, passed: list[Any], add: Any, add_input: str, bias: np.ndarray | None) -> None:
        self.layer, self.passed, self.add, self.add_input, self.bias = layer, passed, add, add_input, bias
        self.last = passed[0] if passed else layer  # the node whose output the BN read

    def note(self) -> str | None:
        if not self.passed:
            return None
        kinds = list(dict.fromkeys(("bias " if n is self.add else "") + n.op_type for n in reversed(self.passed)))
        return f"through the {', '.join(kinds)} between them"


def _per_channel(graph: Graph, node: Any, channels: int, rank: int | None) -> tuple[str, np.ndarray] | None:
    """``(the other input, the constant as a (channels,) bias)`` for an Add or Sub that adds a
    per-channel constant (shaped ``(C,)``, ``(C, 1, 1)``, ``(1, C, 1, 1)`` or a scalar) to
    its other input; None otherwise. ``x - c`` is a bias ``-c``; ``c - x`` is not a bias."""
    a, b = (list(node.input) + ["", ""])[:2]
    const_a, const_b = a in graph.const, b in graph.const
    if const_a == const_b or (node.op_type == "Sub" and const_a):
        return None
    name, other = (a, b) if const_a else (b, a)
    value = np.asarray(graph.const[name], dtype=np.float64)
    if rank is None or value.ndim > rank:
        return None
    padded = (1,) * (rank - value.ndim) + value.shape
    if rank < 2 or padded[0] != 1 or padded[1] not in (1, channels) or any(d != 1 for d in padded[2:]):
        return None
    bias = np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)
    return other, (-bias if node.op_type == "Sub" else bias)


def source_of(graph: Graph, bn: Any, channels: int) -> tuple[Source | None, str]:
    """The layer before the BN that it folds into exactly, walking back through Identity,
    same-type Casts and one per-channel bias Add/Sub, each value read only by the next node;
    or None and why not."""
    name, reader, passed, casts = bn.input[0], bn, [], []
    add, add_input, bias = None, "", None
    for _ in range(len(graph.order) + 1):  # a walk back never repeats a node
        node = graph.producer(name)
        if node is None:
            return None, "its input comes from a graph input" if not passed else f"its input comes from a graph input through {passed[-1].op_type}"
        if not graph.only_reader(name, reader):
            readers = len(graph.readers(name)) - 1 + (name in graph.outputs)
            return None, f"the output of {node_name(node)} is also read by {readers} other node(s)" + (" or is a graph output" if name in graph.outputs else "")
        if node.op_type in ("Identity", "Cast"):
            passed.append(node)
            if node.op_type == "Cast":
                casts.append(node)
            name, reader = node.input[0], node
            continue
        if node.op_type in ("Add", "Sub") and add is None:
            other = next((i for i in node.input if i and i not in graph.const), None)
            rank = _output_rank(graph, _through_passes(graph, other))  # the layer's output rank
            operand = _per_channel(graph, node, channels, rank)
            if operand is not None:
                add_input, bias = operand
                add = node
                passed.append(node)
                name, reader = add_input, node
                continue
        if node.op_type not in LAYER_KINDS:
            return None, f"its input comes from {node.op_type}" + (f" (through {', '.join(n.op_type for n in reversed(passed))})" if passed else "")
        if node.op_type == "MatMul" and graph.rank(name) != 2:
            return None, f"{node_name(node)} (MatMul) output has rank {graph.rank(name)}: its features are not the BN's channels"
        weight = graph.const.get(node.input[1]) if len(node.input) > 1 else None
        if any(weight is None or int(attribute(c, "to", 0)) != onnx_dtype(weight.dtype) for c in casts):
            return None, f"its input comes from {node_name(node)} through a Cast to another type"
        return Source(node, passed, add, add_input, bias), ""
    return None, "its input comes through a cycle"


def _through_passes(graph: Graph, name: str | None) -> Any:
    """The producer of ``name``, looking past Identity nodes and Casts."""
    node = graph.producer(name) if name else None
    for _ in range(len(graph.order)):
        if node is None or node.op_type not in ("Identity", "Cast"):
            break
        node = graph.producer(node.input[0])
    return node


def _output_rank(graph: Graph, layer: Any) -> int | None:
    """The rank of a Conv/ConvTranspose/Gemm/MatMul output (that of its constant weight for a
    convolution, 2 for Gemm, from shape inference for MatMul); None for other nodes."""
    if layer is None or layer.op_type not in LAYER_KINDS:
        return None
    if layer.op_type == "Gemm":
        return 2
    if layer.op_type == "MatMul":
        return graph.rank(layer.output[0])
    weight = graph.const.get(layer.input[1]) if len(layer.input) > 1 else None
    return None if weight is None else weight.ndim


def onnx_dtype(dtype: Any) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def consumer_of(graph: Graph, bn: Any, shift: np.ndarray, why_after: str) -> tuple[Any, str, str]:
    """The Conv or Gemm after the BN that it folds into exactly (the BN's shift must not meet
    zero padding), or None and why neither side folds."""
    y = bn.output[0]
    readers = graph.readers(y)
    if len(readers) != 1 or y in graph.outputs:
        return None, "", f"{why_after}; its output goes to {len(readers)} nodes" + (" and the graph output" if y in graph.outputs else "")
    consumer = readers[0]
    if consumer.op_type not in ("Conv", "Gemm") or consumer.input[0] != y:
        return None, "", f"{why_after}; its output goes to {consumer.op_type}"
    if consumer.op_type == "Gemm" and attribute(consumer, "transA", 0):
        return None, "", f"{why_after}; it feeds a transposed Gemm input"
    if consumer.op_type == "Conv" and _zero_pads(consumer) and bool(np.abs(shift).max() > 0):
        return None, "", f"{why_after}; it precedes {node_name(consumer)}, which pads with zeros that never went through the BN (not exact)"
    return consumer, "before", ""
