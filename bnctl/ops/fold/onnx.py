"""Fold ONNX ``BatchNormalization`` nodes into the Conv, ConvTranspose or Gemm next to them.

The rest of the graph is left as it was: only the folded BN nodes go, the layer they fold
into gets new weight and bias initializers, and initializers nothing reads any more are
dropped. The arithmetic is :mod:`bnctl.ops.fold.math`'s, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.onnx import attribute, check_graph, computed_constants, node_name
from ...errors import InputError
from . import math as fold_math

_LAYER_KINDS = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "linear", "MatMul": "linear"}


@dataclass
class _Graph:
    """Name lookups over one ONNX graph, kept up to date by the rewrites below."""

    model: Any

    def __post_init__(self) -> None:
        from onnx import numpy_helper

        graph = self.model.graph
        self.init = {i.name: i for i in graph.initializer}
        # IR >= 4: an initializer that is also a graph input is a default a caller may feed
        # (ONNX Runtime's "overridable initializer"); IR 3 lists every initializer as an input
        inputs = {i.name for i in graph.input}
        self.fed = {name for name in self.init if name in inputs} if self.model.ir_version >= 4 else set()
        self.const = {name: numpy_helper.to_array(t) for name, t in self.init.items() if name not in self.fed}
        for node in graph.node:
            if node.op_type == "Constant" and attribute(node, "value") is not None:
                self.const[node.output[0]] = numpy_helper.to_array(attribute(node, "value"))
        self.outputs = {o.name for o in graph.output}

    def fill_in(self) -> None:
        """Evaluate the BN and layer inputs that the graph computes from constants alone
        (exporters build zero biases with Shape/Expand/CastLike), so they count as constants."""
        wanted = {
            name
            for node in self.model.graph.node
            if node.op_type in ("BatchNormalization", *_LAYER_KINDS)
            for name in node.input[1:]
            if name and name not in self.const and self._input_free(name, set())
        }
        if wanted:  # only the nodes these need are evaluated (never the model's convolutions)
            self.const.update(computed_constants(self.model, sorted(wanted), self.const))

    def _input_free(self, name: str, seen: set) -> bool:
        """Whether ``name``'s value depends on no graph input (a CastLike target type aside)."""
        if name in self.const or name in seen:
            return True
        seen.add(name)
        node = self.producer(name)
        if node is None:
            return False
        return all(self._input_free(i, seen) for k, i in enumerate(node.input) if i and not (node.op_type == "CastLike" and k == 1))

    def shape(self, name: str) -> list[int | None] | None:
        """The shape of a value from ONNX shape inference (None for a dim or a shape it does not know)."""
        if not hasattr(self, "_shapes"):
            import onnx

            try:
                inferred = onnx.shape_inference.infer_shapes(self.model).graph
            except Exception:  # noqa: BLE001 - shapes are a help, not a must
                inferred = self.model.graph
            self._shapes = {
                v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                for v in (*inferred.value_info, *inferred.input, *inferred.output)
                if v.type.tensor_type.HasField("shape")
            }
        return self._shapes.get(name)

    def rank(self, name: str) -> int | None:
        """The rank of a value, from ONNX shape inference (None when unknown)."""
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def producer(self, name: str) -> Any:
        return next((n for n in self.model.graph.node if name in n.output), None)

    def readers(self, name: str) -> list:
        return [n for n in self.model.graph.node if name in n.input]

    def put(self, node: Any, index: int, value: np.ndarray, hint: str) -> None:
        """Give input ``index`` of ``node`` a new constant (in place if only it reads the old one)."""
        from onnx import numpy_helper

        graph = self.model.graph
        old = node.input[index] if index < len(node.input) else ""
        if old and old in self.init and old not in self.fed and len(self.readers(old)) == 1 and old not in self.outputs:
            graph.initializer.remove(self.init[old])
            name = old
        else:
            base = f"{old or hint}_folded"
            name, i = base, 0
            while name in self.const or any(name in n.output for n in graph.node):
                i += 1
                name = f"{base}{i}"
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        graph.initializer.append(tensor)
        self.init[name], self.const[name] = tensor, value
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def prune(self) -> None:
        """Drop initializers and Constant nodes that nothing reads any more."""
        graph = self.model.graph
        while True:  # nodes whose outputs nothing reads (the subgraphs of replaced constants)
            read = {i for n in graph.node for i in n.input} | self.outputs
            dead = [n for n in graph.node if not any(o in read for o in n.output if o)]
            if not dead:
                break
            for node in dead:
                graph.node.remove(node)
        for tensor in [t for t in graph.initializer if t.name not in read and t.name not in self.fed]:
            graph.initializer.remove(tensor)
        if self.model.ir_version < 4:
            self._list_initializers_as_inputs()

    def _list_initializers_as_inputs(self) -> None:
        """IR 3 requires every initializer to be a graph input, and ONNX Runtime runs them as
        constants: the graph's own inputs first, as they were, then one per initializer."""
        from onnx import helper

        graph = self.model.graph
        initial = {i.name for i in graph.initializer} | set(self.init)
        own = [v for v in graph.input if v.name not in initial]
        listed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
        del graph.input[:]
        graph.input.extend(own + listed)


def _bn_params(graph: _Graph, node: Any) -> tuple[np.ndarray, np.ndarray]:
    """The BN's ``(scale, shift)`` in float64 (the formula of :func:`.math.bn_scale_shift`)."""
    missing = [name for name in node.input[1:5] if name not in graph.const]
    if missing:
        raise InputError(
            f"BatchNormalization node '{node.name or node.output[0]}' has non-constant inputs ({', '.join(missing)}): its statistics are computed in the graph",
            "fold the model before it is exported to ONNX, or fold the PyTorch checkpoint with bnctl fold",
        )
    gamma, beta, mean, var = (graph.const[n].astype(np.float64) for n in node.input[1:5])
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(var + float(attribute(node, "epsilon", 1e-5)))
    return scale, beta - mean * scale


def _layer_weights(graph: _Graph, layer: Any) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """The layer's weight and bias as a Conv-like layout, or why they cannot be used."""
    fed = [n for n in layer.input[1:3] if n in graph.fed]
    if fed:
        return None, None, f"{node_name(layer)} reads {', '.join(fed)}, an initializer a caller may feed as a graph input"
    if len(layer.input) < 2 or layer.input[1] not in graph.const:
        return None, None, f"the weight of {node_name(layer)} is not a constant"
    weight = graph.const[layer.input[1]]
    bias = graph.const.get(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
    if len(layer.input) > 2 and layer.input[2] and bias is None:
        return None, None, f"the bias of {node_name(layer)} is not a constant"
    if layer.op_type == "MatMul":
        if weight.ndim != 2:
            return None, None, f"{node_name(layer)} multiplies by a {weight.ndim}-D constant"
        return weight.T, None, None
    if layer.op_type == "Gemm":
        if not attribute(layer, "transB", 0):
            weight = weight.T
        if bias is not None:
            if bias.size not in (1, weight.shape[0]):
                return None, None, f"{node_name(layer)} has a full-matrix C"
            bias = np.broadcast_to(bias.reshape(-1), (weight.shape[0],)) * float(attribute(layer, "beta", 1.0))
        weight = weight * float(attribute(layer, "alpha", 1.0))
    return weight, bias, None


def _write_layer(graph: _Graph, layer: Any, weight: Any, bias: Any, dtype: np.dtype) -> None:
    import onnx

    w = weight.numpy().astype(dtype)
    if layer.op_type == "Gemm":
        if not attribute(layer, "transB", 0):
            w = w.T
        for a in list(layer.attribute):
            if a.name in ("alpha", "beta"):
                layer.attribute.remove(a)
        layer.attribute.extend([onnx.helper.make_attribute("alpha", 1.0), onnx.helper.make_attribute("beta", 1.0)])
    hint = layer.name or layer.output[0]
    graph.put(layer, 1, w, f"{hint}_weight")
    graph.put(layer, 2, bias.numpy().astype(dtype), f"{hint}_bias")


def _narrow(dtype: Any) -> bool:
    """A float dtype narrower than float32 (float16, bfloat16), where a fold can overflow."""
    return np.dtype(dtype).kind in "fV" and np.dtype(dtype).itemsize < 4


def _zero_pads(layer: Any) -> bool:
    auto_pad = attribute(layer, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True
    return any(int(p) != 0 for p in attribute(layer, "pads", []) or [])


def fold_model(model: Any, *, plan: bool = False) -> tuple[Any, list[dict], list[dict], int]:
    """Fold the BN nodes of an ONNX ModelProto (a copy is changed, not ``model``).

    Weights the graph computes from constants alone are evaluated (only the nodes they need,
    no inputs). With ``plan``, only decide: which BN folds into which layer and why the
    others stay (no weights computed and no torch, except in float16/bfloat16 graphs, where
    whether the folded weights fit decides).
    Returns the new model, the folded pairs, the skipped BNs with reasons, and the BN count.
    Raises InputError for a BN whose statistics are not constants.
    """
    import onnx

    from .onnx_views import fold_through_view, linear_through_view

    check_graph(model)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = _Graph(new)
    graph.fill_in()
    folded, skipped = [], []
    bns = [n for n in new.graph.node if n.op_type == "BatchNormalization"]
    for bn in bns:
        name = node_name(bn)
        if attribute(bn, "training_mode", 0):
            skipped.append({"bn": name, "reason": "training_mode=1: it normalizes with batch statistics"})
            continue
        if any(o and (graph.readers(o) or o in graph.outputs) for o in bn.output[1:]):
            skipped.append({"bn": name, "reason": "its running mean/var outputs are read"})
            continue
        fed = [n for n in bn.input[1:5] if n in graph.fed]
        if fed:
            skipped.append({"bn": name, "reason": f"its inputs {', '.join(fed)} are initializers that are also graph inputs: a caller may feed other values at run time (kept, as ONNX Runtime's optimizer keeps them)"})
            continue
        runtime = [n for n in bn.input[1:5] if n not in graph.const]
        if runtime:
            skipped.append({"bn": name, "reason": f"its inputs {', '.join(runtime)} are known only at run time (graph inputs, or computed from them)"})
            continue
        scale, shift = _bn_params(graph, bn)
        through = linear_through_view(graph, bn, scale.size)
        if through is not None:  # Gemm/MatMul -> Reshape/Transpose -> BN, as exporters write a Linear
            narrow = _narrow(graph.const[through.layer.input[1]].dtype)
            why = None if plan and not narrow else fold_through_view(graph, bn, through, scale, shift, write=not plan)
            if why is None:
                folded.append({"bn": name, "into": node_name(through.layer), "side": "after", "note": f"through the {through.view.op_type} between them"})
            else:
                skipped.append({"bn": name, "reason": why})
            continue
        layer, side, why = _neighbour(graph, bn, shift)
        if layer is None:
            skipped.append({"bn": name, "reason": why})
            continue
        weight, bias, why = _layer_weights(graph, layer)
        kind = _LAYER_KINDS[layer.op_type]
        groups = int(attribute(layer, "group", 1))
        channels = fold_math.out_channels(weight, kind, groups) if weight is not None and side == "after" else (fold_math.in_channels(weight, kind, groups) if weight is not None else None)
        if why is None and channels != scale.size:
            why = f"{node_name(layer)} has {channels} channels, the BN {scale.size}"
        if why is not None:
            skipped.append({"bn": name, "reason": why})
            continue
        into = node_name(layer)
        dtype = graph.const[layer.input[1]].dtype
        if plan and not _narrow(dtype):  # float32 and wider hold any fold: no weights to compute
            folded.append({"bn": name, "into": into, "side": side, "note": None})
            continue
        import torch

        fn = fold_math.fold_after if side == "after" else fold_math.fold_before
        new_w, new_b = fn(torch.from_numpy(np.array(weight, dtype=np.float64)), None if bias is None else torch.from_numpy(np.array(bias, dtype=np.float64)), torch.from_numpy(scale), torch.from_numpy(shift), kind, groups)
        why = fold_math.unrepresentable(new_w, new_b, dtype)
        if why is not None:
            skipped.append({"bn": name, "reason": why})
            continue
        if plan:
            folded.append({"bn": name, "into": into, "side": side, "note": None})
            continue
        if layer.op_type == "MatMul":  # no bias input: the shift becomes an Add in the BN's place
            graph.put(layer, 1, new_w.numpy().astype(dtype).T, f"{into}_weight")
            add = onnx.helper.make_node("Add", [layer.output[0], ""], [bn.output[0]], name=f"{bn.name or name}_shift")
            graph.put(add, 1, new_b.numpy().astype(dtype), f"{name}_shift")
            index = list(new.graph.node).index(bn)
            new.graph.node.remove(bn)
            new.graph.node.insert(index, add)
            folded.append({"bn": name, "into": into, "side": side, "note": "MatMul has no bias: the shift is an Add"})
            continue
        _write_layer(graph, layer, new_w, new_b, dtype)
        if side == "after":
            layer.output[0] = bn.output[0]
        else:
            layer.input[0] = bn.input[0]
        new.graph.node.remove(bn)
        folded.append({"bn": name, "into": into, "side": side, "note": None})
    graph.prune()
    return new, folded, skipped, len(bns)


def _neighbour(graph: _Graph, bn: Any, shift: np.ndarray) -> tuple[Any, str, str]:
    """The layer before (preferred) or after the BN that it folds into exactly."""
    x, y = bn.input[0], bn.output[0]
    producer = graph.producer(x)
    if producer is not None and producer.op_type in _LAYER_KINDS:
        readers = graph.readers(x)
        if producer.op_type == "MatMul" and graph.rank(x) != 2:
            why_after = f"{node_name(producer)} (MatMul) output has rank {graph.rank(x)}: its features are not the BN's channels"
        elif len(readers) == 1 and x not in graph.outputs:
            return producer, "after", ""
        else:
            why_after = f"the output of {node_name(producer)} is also read by {len(readers) - 1} other node(s)"
    else:
        why_after = f"its input comes from {producer.op_type if producer is not None else 'a graph input'}"
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
