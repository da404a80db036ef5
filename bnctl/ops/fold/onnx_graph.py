"""One ONNX graph as the fold changes it: producers and readers indexed (every look-up O(1),
a fold linear in the graph's size), constants known or computed from constants, new
initializers put in, and the node and initializer lists written back once; and what a BN and
the layer it folds into hold (``bn_params``, ``layer_weights``, ``write_layer``)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...core.onnx import attribute, node_name
from ...errors import InputError

#: the layers a BN folds into, and the layout :mod:`bnctl.ops.fold.math` gives their weights
LAYER_KINDS = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "linear", "MatMul": "linear"}


class Graph:
    """One ONNX graph with its producers and readers indexed, kept up to date by the rewrites
    below, so that every look-up is O(1) and a fold is linear in the graph's size. Nodes are
    removed and inserted in the index; :meth:`prune` writes the node and initializer lists
    back once, at the end."""

    def __init__(self, model: Any) -> None:
        from ...core.onnx import constant_values

        self.model = model
        graph = model.graph
        self.init = {i.name: i for i in graph.initializer}
        # IR >= 4: an initializer that is also a graph input is a default a caller may feed
        # (ONNX Runtime's "overridable initializer"); IR 3 lists every initializer as an input
        inputs = {i.name for i in graph.input}
        self.fed = {name for name in self.init if name in inputs} if model.ir_version >= 4 else set()
        self.const = {name: value for name, value in constant_values(model).items() if name not in self.fed}
        self.outputs = {o.name for o in graph.output}
        self.order: list[Any] = list(graph.node)
        self.gone: set[int] = set()  # ids of removed nodes
        self.before: dict[int, list[Any]] = {}  # id of a node -> nodes inserted before it
        self._producers: dict[str, Any] = {}
        self._readers: dict[str, dict[int, Any]] = {}
        self.names = set(self.init) | inputs | self.outputs
        for node in self.order:
            self._link(node)

    def _reads(self, node: Any) -> set[str]:
        from ...core.onnx import subgraph_reads

        return {i for i in node.input if i} | (subgraph_reads(node) if node.attribute else set())

    def _link(self, node: Any) -> None:
        for name in self._reads(node):
            self._readers.setdefault(name, {})[id(node)] = node
        for out in node.output:
            if out:
                self._producers[out] = node
                self.names.add(out)

    def _unlink(self, node: Any) -> None:
        for name in self._reads(node):
            self._readers.get(name, {}).pop(id(node), None)
        for out in node.output:
            if out and self._producers.get(out) is node:
                del self._producers[out]

    def edit(self, node: Any, change: Callable[[Any], None]) -> None:
        """Apply ``change(node)`` (new inputs or outputs) and keep the index true."""
        self._unlink(node)
        change(node)
        self._link(node)

    def remove(self, node: Any) -> None:
        self._unlink(node)
        self.gone.add(id(node))

    def insert_before(self, node: Any, new: Any) -> None:
        self.before.setdefault(id(node), []).append(new)
        self._link(new)

    def fill_in(self) -> None:
        """Evaluate the BN, layer and bias inputs that the graph computes from constants alone
        (exporters build zero biases with Shape/Expand/CastLike, and reshape constants), so
        they count as constants. Only the nodes these need are evaluated."""
        from ...core.onnx import computed_constants

        wanted = [name for node in self.order if node.op_type in ("BatchNormalization", "Add", "Sub", *LAYER_KINDS) for name in (node.input if node.op_type in ("Add", "Sub") else node.input[1:]) if name and name not in self.const]
        if wanted:
            self.const.update(computed_constants(self.model, wanted, self.const))

    def shape(self, name: str) -> list[int | None] | None:
        """The shape of a value from ONNX shape inference (None for a dim or a shape it does not know)."""
        if not hasattr(self, "_shapes"):
            import onnx

            try:
                inferred = onnx.shape_inference.infer_shapes(self.model).graph
            except Exception:  # noqa: BLE001 - shapes are a help, not a must
                inferred = self.model.graph
            self._shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim] for v in (*inferred.value_info, *inferred.input, *inferred.output) if v.type.tensor_type.HasField("shape")}
        return self._shapes.get(name)

    def rank(self, name: str) -> int | None:
        """The rank of a value, from ONNX shape inference (None when unknown)."""
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def producer(self, name: str) -> Any:
        return self._producers.get(name)

    def readers(self, name: str) -> list:
        return list(self._readers.get(name, {}).values())

    def only_reader(self, name: str, node: Any) -> bool:
        """Whether ``node`` is the one reader of ``name`` (and it is no graph output)."""
        readers = self._readers.get(name, {})
        return len(readers) == 1 and id(node) in readers and name not in self.outputs

    def put(self, node: Any, index: int, value: np.ndarray, hint: str) -> None:
        """Give input ``index`` of ``node`` a new constant (in place if only it reads the old one)."""
        from onnx import numpy_helper

        old = node.input[index] if index < len(node.input) else ""
        if old and old in self.init and old not in self.fed and self.only_reader(old, node):
            name = old
        else:
            base = f"{old or hint}_folded"
            name, i = base, 0
            while name in self.const or name in self.names:
                i += 1
                name = f"{base}{i}"
        self.init[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.const[name] = value
        self.names.add(name)

        def change(n: Any) -> None:
            while len(n.input) <= index:
                n.input.append("")
            n.input[index] = name

        self.edit(node, change)

    def prune(self) -> None:
        """Write the node list back without removed nodes and without nodes whose outputs
        nothing reads any more (the subgraphs of replaced constants), and the initializers
        that something still reads; one sweep from the outputs back."""
        graph = self.model.graph
        nodes = [m for n in self.order for m in (*self.before.get(id(n), []), n) if id(m) not in self.gone]
        needed = set(self.outputs)
        kept = []
        for node in reversed(nodes):
            if any(o in needed for o in node.output if o):
                kept.append(node)
                needed.update(self._reads(node))
        kept.reverse()
        order = {name: k for k, name in enumerate(t.name for t in graph.initializer)}
        tensors = sorted((t for name, t in self.init.items() if name in needed or name in self.fed), key=lambda t: order.get(t.name, len(order)))
        del graph.node[:]
        graph.node.extend(kept)
        del graph.initializer[:]
        graph.initializer.extend(tensors)
        self.order, self.gone, self.before = list(graph.node), set(), {}
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


def bn_params(graph: Graph, node: Any) -> tuple[np.ndarray, np.ndarray]:
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


def layer_weights(graph: Graph, layer: Any) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
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


def write_layer(graph: Graph, layer: Any, weight: Any, bias: Any, dtype: np.dtype) -> None:
    """Give ``layer`` the folded ``weight`` and ``bias`` (float64 tensors) in ``dtype``, in its own layout."""
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


def narrow(dtype: Any) -> bool:
    """A float dtype narrower than float32 (float16, bfloat16), where a fold can overflow."""
    return np.dtype(dtype).kind in "fV" and np.dtype(dtype).itemsize < 4
