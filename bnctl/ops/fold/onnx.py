"""Fold ONNX ``BatchNormalization`` nodes into the Conv, ConvTranspose, Gemm or MatMul next to them.

The rest of the graph is left as it was: only the folded BN nodes go (with the Identity,
Cast and bias Add nodes between a BN and its layer), the layer they fold into gets new weight
and bias initializers, and initializers nothing reads any more are dropped. The arithmetic is
:mod:`bnctl.ops.fold.math`'s, in float64; the graph is :class:`.onnx_graph.Graph`, where a BN
folds is :mod:`.onnx_sources`, a Gemm/MatMul seen through a view :mod:`.onnx_views`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.int8 import readiness
from ...core.onnx import attribute, check_graph, node_name
from . import math as fold_math
from .onnx_affine import make_affine, merge_into_next
from .onnx_graph import LAYER_KINDS, Graph, bn_params, layer_weights, narrow, write_layer
from .onnx_sources import consumer_of, source_of
from .report import make_standalone


def fold_model(model: Any, *, plan: bool = False, standalone: str | None = None) -> tuple[Any, list[dict], list[dict], int]:
    """Fold the BN nodes of an ONNX ModelProto (a copy is changed, not ``model``).

    A BN folds into the Conv, ConvTranspose, Gemm or MatMul before it, also through what
    exporters put between them (Identity, a Cast to the same type, a bias ``Add``/``Sub`` of a
    per-channel constant), or into the Conv or Gemm after it. Weights the graph computes from
    constants alone are evaluated (only the nodes they need, no inputs). With ``plan``, only
    decide: which BN folds into which layer and why the others stay (no weights computed and
    no torch, except in float16/bfloat16 graphs, where whether the folded weights fit decides).
    A BN that folds into no layer but feeds another BN is merged into it (``side``
    ``"merged"``); with ``standalone="affine"`` every BN still left in inference mode becomes a
    per-channel Mul + Add (``side`` ``"affine"``). Time is linear in the graph's size.
    Returns the new model, the folded pairs, the skipped BNs with reasons, and the BN count.
    Raises InputError for a damaged graph.
    """
    import onnx

    check_graph(model)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = Graph(new)
    graph.fill_in()
    bns = [n for n in graph.order if n.op_type == "BatchNormalization"]
    folded, pending = [], bns
    while True:  # again over those kept: a BN that preceded a BN now folded may fold too (BN -> BN -> Conv)
        kept = []
        for bn in pending:
            done, entry = _fold_one(graph, bn, plan)
            if done:
                folded.append(entry)
            else:
                kept.append((bn, entry))
        if plan or len(kept) == len(pending):
            break
        pending = [bn for bn, _ in kept]
    if standalone == "affine" and not plan:
        made, kept = make_standalone(kept, lambda bn, reason: make_affine(graph, bn, reason))
        folded += made
    skipped = [entry for _, entry in kept]
    graph.prune()
    return new, folded, skipped, len(bns)


def _planned_int8(graph: Graph, bn: Any, weight: np.ndarray, scale: np.ndarray, kind: str, groups: int, side: str, dtype: Any) -> dict:
    """The int8 readiness the fold would give, without torch: the BN's scale multiplied into
    the weight's output channels (after) or input channels (before), in float64."""
    w = np.asarray(weight, dtype=np.float64)
    spatial = (1,) * (w.ndim - 2)
    if side == "after" and kind == "conv_transpose":
        cin, cout_g = w.shape[0], w.shape[1]
        new = (w.reshape(groups, cin // groups, cout_g, *w.shape[2:]) * scale.reshape(groups, 1, cout_g, *spatial)).reshape(w.shape)
    elif side == "after":
        new = w * scale.reshape(-1, *(1,) * (w.ndim - 1))
    else:
        cout, cin_g = w.shape[0], w.shape[1]
        new = (w.reshape(groups, cout // groups, cin_g, *w.shape[2:]) * scale.reshape(groups, 1, cin_g, *spatial)).reshape(w.shape)
    var = graph.const[bn.input[4]] if side == "after" else None
    return readiness(w, new.astype(dtype), 1 if kind == "conv_transpose" else 0, var)  # as it would be written


def _fold_one(graph: Graph, bn: Any, plan: bool) -> tuple[bool, dict]:
    """Fold one BN (with ``plan``, only decide): ``(True, {"bn", "into", "side", "note"})``,
    or ``(False, {"bn", "reason"})`` with the graph unchanged."""
    import onnx

    from .onnx_views import fold_through_view, linear_through_view

    name = node_name(bn)
    if attribute(bn, "training_mode", 0):
        return False, {"bn": name, "reason": "training_mode=1: it normalizes with batch statistics"}
    if any(o and (graph.readers(o) or o in graph.outputs) for o in bn.output[1:]):
        return False, {"bn": name, "reason": "its running mean/var outputs are read"}
    fed = [n for n in bn.input[1:5] if n in graph.fed]
    if fed:
        return False, {"bn": name, "reason": f"its inputs {', '.join(fed)} are initializers that are also graph inputs: a caller may feed other values at run time (kept, as ONNX Runtime's optimizer keeps them)"}
    runtime = [n for n in bn.input[1:5] if n not in graph.const]
    if runtime:
        return False, {"bn": name, "reason": f"its inputs {', '.join(runtime)} are known only at run time (graph inputs, or computed from them)"}
    scale, shift = bn_params(graph, bn)
    through = linear_through_view(graph, bn, scale.size)
    if through is not None:  # Gemm/MatMul -> Reshape/Transpose -> BN, as exporters write a Linear
        small = narrow(graph.const[through.layer.input[1]].dtype)
        why = None if plan and not small else fold_through_view(graph, bn, through, scale, shift, write=not plan)
        if why is None:
            entry = {"bn": name, "into": node_name(through.layer), "side": "after", "note": f"through the {through.view.op_type} between them"}
            return True, entry | ({"int8": through.int8} if through.int8 is not None else {})
        else:
            return False, {"bn": name, "reason": why}
    source, why = source_of(graph, bn, scale.size)
    layer, side = (source.layer, "after") if source is not None else (None, "")
    if layer is None:
        layer, side, why = consumer_of(graph, bn, shift, why)
    if layer is None:
        merged = None if plan else merge_into_next(graph, bn)
        return (True, merged) if merged is not None else (False, {"bn": name, "reason": why})
    weight, bias, why = layer_weights(graph, layer)
    if why is None and source is not None and source.bias is not None:  # the Add's constant is part of the layer's bias
        bias = source.bias if bias is None else np.asarray(bias, dtype=np.float64) + source.bias
    kind = LAYER_KINDS[layer.op_type]
    groups = int(attribute(layer, "group", 1))
    channels = fold_math.out_channels(weight, kind, groups) if weight is not None and side == "after" else (fold_math.in_channels(weight, kind, groups) if weight is not None else None)
    if why is None and channels != scale.size:
        why = f"{node_name(layer)} has {channels} channels, the BN {scale.size}"
    if why is not None:
        return False, {"bn": name, "reason": why}
    into = node_name(layer)
    note = source.note() if source is not None else None
    dtype = graph.const[layer.input[1]].dtype
    if plan and not narrow(dtype):  # float32 and wider hold any fold: the weight's int8 figures, in numpy
        return True, {"bn": name, "into": into, "side": side, "note": note, "int8": _planned_int8(graph, bn, weight, scale, kind, groups, side, dtype)}
    import torch

    fn = fold_math.fold_after if side == "after" else fold_math.fold_before
    new_w, new_b = fn(torch.from_numpy(np.array(weight, dtype=np.float64)), None if bias is None else torch.from_numpy(np.array(bias, dtype=np.float64)), torch.from_numpy(scale), torch.from_numpy(shift), kind, groups)
    why = fold_math.unrepresentable(new_w, new_b, dtype)
    if why is not None:
        return False, {"bn": name, "reason": why}
    if plan:
        return True, {"bn": name, "into": into, "side": side, "note": note, "int8": _planned_int8(graph, bn, weight, scale, kind, groups, side, dtype)}
    int8 = readiness(np.asarray(weight, dtype=np.float64), new_w.numpy().astype(dtype), 1 if kind == "conv_transpose" else 0, graph.const[bn.input[4]] if side == "after" else None)
    if layer.op_type == "MatMul":  # no bias input: the shift is an Add in the BN's place (or the bias Add's constant)
        graph.put(layer, 1, new_w.numpy().astype(dtype).T, f"{into}_weight")
        # after the bias Add (if any), whose constant is in the new shift: read past it
        start = source.add_input if source.add is not None else source.last.output[0]
        add = onnx.helper.make_node("Add", [start, ""], [bn.output[0]], name=f"{bn.name or name}_shift")
        graph.remove(bn)
        graph.insert_before(bn, add)
        graph.put(add, 1, new_b.numpy().astype(dtype), f"{name}_shift")
        return True, {"bn": name, "into": into, "side": side, "note": note or "MatMul has no bias: the shift is an Add", "int8": int8}
    write_layer(graph, layer, new_w, new_b, dtype)
    graph.remove(bn)
    if side == "after":
        graph.edit(layer, lambda n: n.output.__setitem__(0, bn.output[0]))
    else:
        graph.edit(layer, lambda n: n.input.__setitem__(0, bn.input[0]))
    return True, {"bn": name, "into": into, "side": side, "note": note, "int8": int8}
