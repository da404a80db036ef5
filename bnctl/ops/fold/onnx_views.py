"""ONNX: a BN that follows a Gemm or MatMul through a Reshape or Transpose, as exporters
write a Linear whose output is viewed as channels: ``Linear -> view(N, C, 1, 1) ->
BatchNorm2d`` (Gemm -> Reshape -> BN) or ``Linear -> transpose(1, 2) -> BatchNorm1d``
(MatMul -> Add -> Transpose -> BN). ONNX Runtime's optimizer folds these; so does bnctl,
where the view keeps the layer's output features as the BN's channel axis:

- Transpose: ``perm[1]`` is the last axis (the features);
- Reshape: from ``(N, C)`` to ``(N, C, 1, ..., 1)`` (shapes from ONNX shape inference).

The scale goes into the weight's feature columns, the shift into the bias (the Gemm's C,
the MatMul's Add, or a new Add after a MatMul that has none); the view stays and the BN goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.onnx import attribute
from ...core.int8 import readiness
from . import math as fold_math
from .onnx_graph import layer_weights, write_layer


@dataclass
class Through:
    """The nodes of one Gemm/MatMul [-> Add] -> Reshape/Transpose -> BN chain."""

    layer: Any
    add: Any  # the MatMul's bias Add, or None
    view: Any
    int8: dict | None = None  # the folded weight's int8 readiness, once written


def linear_through_view(graph: Any, bn: Any, channels: int) -> Through | None:
    """The chain ending in ``bn`` if it is one that folds exactly, else None."""
    view = graph.producer(bn.input[0])
    if view is None or view.op_type not in ("Reshape", "Transpose") or not graph.only_reader(view.output[0], bn):
        return None
    source, add = graph.producer(view.input[0]), None
    if source is not None and source.op_type == "Add" and graph.only_reader(source.output[0], view):
        consts = [i for i in source.input if i in graph.const]
        others = [i for i in source.input if i not in graph.const]
        if len(consts) != 1 or len(others) != 1 or graph.const[consts[0]].size != channels or graph.const[consts[0]].shape[-1:] != (channels,):
            return None
        add, source = source, graph.producer(others[0])
    if source is None or source.op_type not in ("Gemm", "MatMul") or (add is not None and source.op_type != "MatMul"):
        return None
    if not graph.only_reader(source.output[0], add or view) or len(source.input) < 2 or source.input[1] not in graph.const or source.input[1] in graph.fed:
        return None
    weight = graph.const[source.input[1]]
    features = weight.shape[0] if source.op_type == "Gemm" and attribute(source, "transB", 0) else weight.shape[-1]
    if weight.ndim != 2 or features != channels or not _keeps_features(graph, view):
        return None
    return Through(source, add, view)


def _keeps_features(graph: Any, view: Any) -> bool:
    """Whether the view puts the last axis of its input (the features) on axis 1."""
    if view.op_type == "Transpose":
        perm = list(attribute(view, "perm", []) or [])
        return len(perm) >= 2 and perm[1] == len(perm) - 1
    before, after = graph.shape(view.input[0]), graph.shape(view.output[0])
    if not before or not after or len(before) != 2 or len(after) < 2:
        return False
    return before[1] is not None and after[1] == before[1] and all(d == 1 for d in after[2:])


def fold_through_view(graph: Any, bn: Any, through: Through, scale: np.ndarray, shift: np.ndarray, write: bool = True) -> str | None:
    """Rewrite the chain with the BN folded into the layer (only check, without ``write``);
    a reason instead where the folded weights do not fit the layer's dtype (nothing changed then)."""
    import onnx
    import torch

    layer, add, view = through.layer, through.add, through.view
    weight, bias, why = layer_weights(graph, layer)
    if why is not None:
        return why
    if add is not None:
        const = next(i for i in add.input if i in graph.const)
        bias = graph.const[const].reshape(-1).astype(np.float64)
    new_w, new_b = fold_math.fold_after(
        torch.from_numpy(np.array(weight, dtype=np.float64)),
        None if bias is None else torch.from_numpy(np.array(bias, dtype=np.float64)),
        torch.from_numpy(scale),
        torch.from_numpy(shift),
        "linear",
    )
    dtype = graph.const[layer.input[1]].dtype
    why = fold_math.unrepresentable(new_w, new_b, dtype)
    if why is not None or not write:
        return why
    through.int8 = readiness(np.asarray(weight, dtype=np.float64), new_w.numpy().astype(dtype), 0, graph.const[bn.input[4]])
    hint = layer.name or layer.output[0]
    if layer.op_type == "Gemm":
        write_layer(graph, layer, new_w, new_b, dtype)
    else:
        graph.put(layer, 1, new_w.numpy().astype(dtype).T, f"{hint}_weight")
        if add is None:  # a MatMul has no bias: the shift becomes an Add before the view
            add = onnx.helper.make_node("Add", [layer.output[0], ""], [f"{layer.output[0]}_shifted"], name=f"{bn.name or hint}_shift")
            graph.insert_before(view, add)
            graph.put(add, 1, new_b.numpy().astype(dtype), f"{hint}_bias")
            graph.edit(view, lambda n: n.input.__setitem__(0, add.output[0]))
        else:
            index = list(add.input).index(next(i for i in add.input if i in graph.const))
            graph.put(add, index, new_b.numpy().astype(dtype).reshape(graph.const[add.input[index]].shape), f"{hint}_bias")
    graph.remove(bn)
    graph.edit(view, lambda n: n.output.__setitem__(0, bn.output[0]))
    return None
