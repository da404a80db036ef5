"""Deep ONNX graphs as other exporters write them, for the graph-walk benchmark and tests.

``chain(blocks)`` is a chain of ``blocks`` conv blocks, each written the way paddle2onnx and
older torch exporters write them: the conv weight and every BN parameter pass through an
``Identity`` (or a ``Cast`` to float32, or a ``Reshape`` of a constant), the conv bias is its
own ``Add`` of a reshaped constant, an ``Identity`` sits between the bias Add and the BN, and
every fourth block ends in ``softmax(x @ x^T) @ x`` (``MatMul`` of two activations) whose
second input is the whole chain before it. Node count is about 13 per block.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def chain(blocks: int, channels: int = 4, size: int = 4, seed: int = 0) -> onnx.ModelProto:
    """A valid opset-13, IR-7 graph ``x (1, channels, size, size) -> y`` of ``blocks`` blocks."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    x = "x"
    const("shape_c111", np.array([channels, 1, 1], np.int64))
    for b in range(blocks):
        p = f"b{b}"
        const(f"{p}.conv.w", (rng.normal(size=(channels, channels, 3, 3)) / (3 * channels**0.5)).astype(np.float32))
        nodes.append(helper.make_node("Identity", [f"{p}.conv.w"], [f"{p}.w_id"]))
        nodes.append(helper.make_node("Conv", [x, f"{p}.w_id"], [f"{p}.conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name=f"{p}.conv"))
        const(f"{p}.conv.b", rng.normal(size=channels).astype(np.float32))
        nodes.append(helper.make_node("Reshape", [f"{p}.conv.b", "shape_c111"], [f"{p}.b_r"]))
        nodes.append(helper.make_node("Add", [f"{p}.conv", f"{p}.b_r"], [f"{p}.biased"]))
        nodes.append(helper.make_node("Identity", [f"{p}.biased"], [f"{p}.pre_bn"]))
        params = []
        for k, value in (("weight", rng.uniform(0.5, 1.5, channels)), ("bias", rng.normal(size=channels) * 0.1), ("running_mean", rng.normal(size=channels) * 0.1), ("running_var", rng.uniform(0.5, 2.0, channels))):
            raw = const(f"{p}.bn.{k}.raw", value.astype(np.float64 if k == "running_var" else np.float32))
            if k == "running_var":  # a Cast of a float64 constant, as tf2onnx writes some
                nodes.append(helper.make_node("Cast", [raw], [f"{p}.bn.{k}"], to=TensorProto.FLOAT))
            else:
                nodes.append(helper.make_node("Identity", [raw], [f"{p}.bn.{k}"]))
            params.append(f"{p}.bn.{k}")
        nodes.append(helper.make_node("BatchNormalization", [f"{p}.pre_bn", *params], [f"{p}.bn"], epsilon=1e-5, name=f"{p}.bn"))
        nodes.append(helper.make_node("Relu", [f"{p}.bn"], [f"{p}.out"]))
        x = f"{p}.out"
        if b % 4 == 3:  # softmax(x @ x^T) @ x: an activation on both sides of a MatMul
            nodes.append(helper.make_node("Transpose", [x], [f"{p}.t"], perm=[0, 1, 3, 2]))
            nodes.append(helper.make_node("MatMul", [x, f"{p}.t"], [f"{p}.mm"]))
            nodes.append(helper.make_node("Softmax", [f"{p}.mm"], [f"{p}.sm"], axis=-1))
            nodes.append(helper.make_node("MatMul", [f"{p}.sm", x], [f"{p}.att"]))
            x = f"{p}.att"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7, producer_name="bnctl-deep-graphs")
