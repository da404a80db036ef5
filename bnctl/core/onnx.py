"""ONNX graphs in memory: node attributes and names, check inputs, and running a graph in
ONNX Runtime (optimizations off, so what runs is the graph as written)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InputError


def attribute(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_name(node: Any) -> str:
    """A readable name: the module path behind the node's weight (``stem.1.weight`` -> ``stem.1``),
    else the node's own name, else its output."""
    weight = node.input[1] if len(node.input) > 1 else ""
    if weight.endswith(".weight"):
        return weight[: -len(".weight")]
    return node.name or node.output[0]


def input_feeds(model: Any, shapes: Sequence[Sequence[int]] | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for the graph: its static shapes, or ``shapes`` (one per input)."""
    from onnx import helper

    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    rng = np.random.default_rng(seed)
    feeds = {}
    for index, value in enumerate(inputs):
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if shapes:
            if index >= len(shapes):
                raise InputError(f"the ONNX graph has {len(inputs)} inputs, --input-shape gave {len(shapes)}", "pass --input-shape once per graph input")
            dims = list(shapes[index])
        if any(d is None or d <= 0 for d in dims):
            raise InputError(f"ONNX input '{value.name}' has a dynamic shape {dims}", "pass --input-shape with concrete sizes, e.g. --input-shape 1,3,224,224")
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run(model: Any, feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """Outputs of ``model`` in ONNX Runtime on ``feeds``, as torch tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]
