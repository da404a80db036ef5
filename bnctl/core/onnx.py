"""ONNX graphs in memory: node attributes and names, check inputs, and running a graph in
ONNX Runtime (optimizations off, so what runs is the graph as written)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InputError


#: the attributes bnctl reads, and the type ONNX defines for each (AttributeProto's numbers)
_ATTRIBUTE_TYPES = {"epsilon": 1, "momentum": 1, "alpha": 1, "beta": 1, "training_mode": 2, "group": 2, "transA": 2, "transB": 2, "to": 2, "allowzero": 2, "auto_pad": 3, "pads": 7, "perm": 7, "axes": 7, "kernel_shape": 7, "strides": 7}


def attribute(node: Any, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name`` (``default`` where it has none); an
    InputError where an attribute bnctl reads has another type than ONNX defines (a damaged file)."""
    import onnx

    for a in node.attribute:
        if a.name == name:
            expected = _ATTRIBUTE_TYPES.get(name)
            if expected is not None and a.type != expected:
                raise InputError(
                    f"the ONNX graph is broken: node {node.name or node.op_type} has attribute '{name}' of type {onnx.AttributeProto.AttributeType.Name(a.type) if a.type in onnx.AttributeProto.AttributeType.values() else a.type}, which ONNX defines as {onnx.AttributeProto.AttributeType.Name(expected)}",
                    "the file is damaged or was edited by hand; export it again",
                )
            return onnx.helper.get_attribute_value(a)
    return default


def node_name(node: Any) -> str:
    """A readable name: the module path behind the node's weight (``stem.1.weight`` -> ``stem.1``),
    else the node's own name, else its output."""
    weight = node.input[1] if len(node.input) > 1 else ""
    if weight.endswith(".weight"):
        return weight[: -len(".weight")]
    return node.name or node.output[0]


#: the largest input bnctl allocates from a graph's own dims (elements)
MAX_INPUT_ELEMENTS = 1 << 28


def check_batchnorms(model: Any) -> None:
    """An InputError where a BatchNormalization node lacks one of its five inputs (X, scale,
    B, mean, var): ONNX defines no such node, and nothing can say what it computes."""
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") and (len(node.input) < 5 or not all(node.input[:5])):
            raise InputError(
                f"the ONNX graph is broken: BatchNormalization node {node.name or node.output[0]} has {sum(1 for i in node.input[:5] if i)} of its 5 inputs (X, scale, B, mean, var)",
                "the file is damaged or was edited by hand; export it again",
            )


def check_graph(model: Any) -> None:
    """An InputError where the graph cannot be evaluated as it stands: a BatchNormalization
    without its five inputs, a node reads a value nothing produces, or the default domain's opset is older than ONNX Runtime runs (7)."""
    check_batchnorms(model)
    graph = model.graph
    known = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    for node in graph.node:
        if node.op_type == "Constant" or not node.op_type:
            known.update(node.output)
            continue
        missing = next((name for name in node.input if name not in known), None)
        if missing is not None:
            raise InputError(
                f"the ONNX graph is broken: node {node.name or node.op_type} reads '{missing}', which no node, initializer or input produces (or not before it)",
                "the file is damaged or was edited by hand; export it again",
            )
        known.update(node.output)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < 7:
        raise InputError(f"the ONNX graph uses opset {opset}; ONNX Runtime runs opset 7 and later", "convert it with onnx.version_converter, or export it again")


def graph_inputs(model: Any) -> list[Any]:
    """The graph's inputs a caller feeds: its ``graph.input`` entries that are not initializers, in order."""
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def input_feeds(model: Any, shapes: Sequence[Sequence[int]] | None, seed: int = 0, notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Random inputs for the graph: its static shapes, or ``shapes`` (one per input). A
    symbolic first dim (the batch) alone is taken as 1, said in ``notes``."""
    from onnx import helper

    check_graph(model)
    inputs = graph_inputs(model)
    rng = np.random.default_rng(seed)
    feeds = {}
    for index, value in enumerate(inputs):
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if shapes:
            if index >= len(shapes):
                raise InputError(f"the ONNX graph has {len(inputs)} inputs, --input-shape gave {len(shapes)}", "pass --input-shape once per graph input")
            dims = list(shapes[index])
        if not shapes and dims and (dims[0] is None or dims[0] <= 0) and all(d is not None and d > 0 for d in dims[1:]):
            dims[0] = 1
            if notes is not None:
                notes.append(f"ONNX input '{value.name}' has a symbolic batch size: checked at batch 1 (--input-shape for another)")
        if any(d is None or d <= 0 for d in dims):
            raise InputError(f"ONNX input '{value.name}' has a dynamic shape {dims}", "pass --input-shape with concrete sizes, e.g. --input-shape 1,3,224,224")
        if int(np.prod(dims, dtype=np.float64)) > MAX_INPUT_ELEMENTS:
            raise InputError(f"ONNX input '{value.name}' has shape {dims}, too large to make a check input of", "pass --input-shape with the size you run the model at")
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


#: how long ONNX Runtime may take for the graphs of one check (seconds)
RUN_TIMEOUT = 600.0
_CRASH_TIP = "ONNX Runtime mishandles this graph: try another onnxruntime version (pip install -U onnxruntime), or fold or export the PyTorch model instead"


def run(model: Any, feeds: dict[str, np.ndarray], what: str = "the ONNX graph", timeout: float = RUN_TIMEOUT) -> list[Any]:
    """Outputs of ``model`` in ONNX Runtime on ``feeds``, as torch tensors (:func:`run_all`)."""
    return run_all([(what, model)], feeds, timeout)[0]


def run_all(graphs: Sequence[tuple[str, Any]], feeds: dict[str, np.ndarray], timeout: float = RUN_TIMEOUT) -> list[list[Any]]:
    """Outputs of each ``(what, model)`` in ONNX Runtime on ``feeds`` (each graph takes the
    feeds it has inputs for), as torch tensors; optimizations off, so what runs is the graph
    as written.

    ONNX Runtime runs in a child process (:mod:`bnctl.core.ort_child`), so a graph that
    crashes it, or runs past ``timeout`` seconds, is an :class:`InputError` naming ONNX
    Runtime and ``what`` instead of the end of bnctl. A graph ONNX Runtime refuses is an
    InputError with its message.
    """
    import tempfile
    from pathlib import Path

    import torch

    with tempfile.TemporaryDirectory(prefix="bnctl-ort-") as tmp:
        folder = Path(tmp)
        _child(folder, graphs, feeds, timeout)
        results = []
        for index in range(len(graphs)):
            with np.load(folder / f"outputs{index}.npz", allow_pickle=False) as data:
                results.append([torch.from_numpy(data[f"o{k}"]) for k in range(len(data.files))])  # each a fresh array
        return results


def quantized(model: Any, feeds: dict[str, np.ndarray], timeout: float = RUN_TIMEOUT) -> tuple[Any, Any]:
    """``model`` quantized by ONNX Runtime's static quantizer (QDQ, symmetric int8 weights and
    activations, calibrated on ``feeds``): ``(per tensor, per channel)`` ModelProtos, made in
    the child process :func:`run_all` uses, with the same clean errors."""
    import tempfile
    from pathlib import Path

    import onnx

    with tempfile.TemporaryDirectory(prefix="bnctl-ort-") as tmp:
        folder = Path(tmp)
        _child(folder, [("the graph to quantize", model)], feeds, timeout, mode="quantize")
        return onnx.load(folder / "per_tensor.onnx"), onnx.load(folder / "per_channel.onnx")


def _child(folder: Any, graphs: Sequence[tuple[str, Any]], feeds: dict[str, np.ndarray], timeout: float, mode: str | None = None) -> None:
    """Write the graphs and feeds to ``folder`` and run :mod:`bnctl.core.ort_child` on it
    (``mode``: ``quantize``); an InputError for a refusal, a crash or a time-out."""
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    for index, (_, model) in enumerate(graphs):
        (folder / f"graph{index}.onnx").write_bytes(model.SerializeToString())
    np.savez(folder / "feeds.npz", *feeds.values())  # arr_0, arr_1, ... (any name is safe)
    (folder / "feeds.json").write_text(json.dumps(list(feeds)))
    script = Path(__file__).with_name("ort_child.py")
    verb = "quantizing" if mode == "quantize" else "running"
    try:
        proc = subprocess.run([sys.executable, str(script), str(folder), *([mode] if mode else [])], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        names = " and ".join(what for what, _ in graphs)
        raise InputError(f"ONNX Runtime did not finish {verb} {names} in {timeout:g} s; it was stopped", _CRASH_TIP) from None
    if proc.returncode == 3 and (folder / "error.txt").exists():
        index, _, message = (folder / "error.txt").read_text().partition("\t")
        action = "quantize" if mode == "quantize" else "run"
        raise InputError(f"ONNX Runtime cannot {action} {graphs[int(index)][0]}: {message}", "check the opset and IR version onnxruntime supports, and the input shapes")
    if proc.returncode != 0:
        done = sum(1 for i in range(len(graphs)) if (folder / f"outputs{i}.npz").exists())
        what = graphs[min(done, len(graphs) - 1)][0]
        if proc.returncode < 0:
            cause = f"crashed ({signal.Signals(-proc.returncode).name})" if -proc.returncode in signal.valid_signals() else f"was killed (signal {-proc.returncode})"
        else:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            cause = f"failed ({last[0]})"
        raise InputError(f"ONNX Runtime {cause} {verb} {what}; nothing was written", _CRASH_TIP)


def tensor_array(tensor: Any) -> np.ndarray:
    """An initializer or Constant's value as a numpy array; an InputError naming the tensor
    where its ``dims`` or ``data_type`` do not match the data it holds (a damaged file)."""
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # noqa: BLE001 - every way a tensor's bytes and header disagree
        raise InputError(
            f"the ONNX graph is broken: tensor '{tensor.name}' (dims {list(tensor.dims)}, data_type {tensor.data_type}) does not match the data it holds ({exc})",
            "the file is damaged or was edited by hand; export it again",
        ) from None


def constant_values(model: Any) -> dict[str, np.ndarray]:
    """The graph's initializers and the values of its ``Constant(value=...)`` nodes, by name."""
    graph = model.graph
    values = {t.name: tensor_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output and attribute(node, "value") is not None:
            values[node.output[0]] = tensor_array(attribute(node, "value"))
    return values


def subgraph_reads(node: Any) -> set[str]:
    """The outer values that the subgraphs of ``node`` (If, Loop, Scan bodies) read: names no
    node, input or initializer of the subgraph itself produces. Walked with a stack, not by
    recursion."""
    from onnx import AttributeProto

    reads: set[str] = set()
    stack = [g for a in node.attribute for g in ([a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else [])]
    while stack:
        sub = stack.pop()
        own = {i.name for i in sub.input} | {i.name for i in sub.initializer} | {o for n in sub.node for o in n.output}
        for inner in sub.node:
            reads.update(i for i in inner.input if i and i not in own)
            for a in inner.attribute:
                stack.extend([a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else [])
    return reads


#: ops that compute no function of their inputs alone: never folded into constants
_NOT_CONSTANT = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


def _numpy_op(node: Any, args: list[np.ndarray | None], opset: int) -> list[np.ndarray] | None:
    """The outputs of the few ops exporters put between a constant and its reader (Identity,
    Cast, Reshape, Unsqueeze, Squeeze), in numpy; None for any other op or case."""
    from onnx import helper

    op = node.op_type
    if op == "Identity" and args:
        return [args[0]]
    if op == "Cast" and args:
        return [np.asarray(args[0]).astype(helper.tensor_dtype_to_np_dtype(int(attribute(node, "to"))))]
    if op == "Reshape" and len(args) > 1 and args[1] is not None:
        shape = [int(d) for d in np.asarray(args[1]).reshape(-1)]
        if not attribute(node, "allowzero", 0):
            shape = [args[0].shape[i] if d == 0 and i < args[0].ndim else d for i, d in enumerate(shape)]
        return [np.reshape(args[0], shape)]
    if op in ("Unsqueeze", "Squeeze") and args:
        axes = attribute(node, "axes") if opset < 13 else (np.asarray(args[1]).reshape(-1).tolist() if len(args) > 1 and args[1] is not None else None)
        if op == "Squeeze":
            return [np.squeeze(args[0], axis=None if axes is None else tuple(int(a) for a in axes))]
        if axes is None:
            return None
        rank = args[0].ndim + len(axes)
        return [np.expand_dims(args[0], tuple(sorted(int(a) % rank for a in axes)))]
    return None


def computed_constants(model: Any, names: Sequence[str], known: dict[str, Any]) -> dict[str, np.ndarray]:
    """Values of ``names`` that the graph computes from ``known`` values alone (Constant,
    Identity, Cast, Reshape chains of older exporters, Shape/Expand/CastLike zero biases).

    One pass forward finds what depends on no other value, one walk back (a stack, shared by
    all names) the nodes the names need; each is evaluated once, in graph order: in numpy for
    the common ops, else with ONNX's reference evaluator on that node alone. A name that
    depends on anything else (a graph input, a random op, a subgraph), or whose nodes cannot
    be evaluated, is left out. Time is linear in the graph's size.
    """
    from onnx import AttributeProto, helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info) if v.type.HasField("tensor_type")}
    free = set(known)
    producers: dict[str, Any] = {}
    for node in graph.node:
        for out in node.output:
            if out:
                producers[out] = node
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_CONSTANT or any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if all(not i or i in free or (node.op_type == "CastLike" and k == 1 and types.get(i)) for k, i in enumerate(node.input)):
            free.update(o for o in node.output if o)
    wanted = [n for n in dict.fromkeys(names) if n and n in free and n not in known]
    needed: dict[int, Any] = {}
    stack = list(wanted)
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed[id(node)] = node
        stack.extend(i for i in node.input if i and i not in known)
    values: dict[str, Any] = {}
    for node in graph.node:
        if id(node) not in needed:
            continue
        if node.op_type == "CastLike" and len(node.input) > 1 and node.input[1] not in known and node.input[1] not in values:
            # only the target's type matters: a Cast to it (exporters cast zero biases like the input)
            node = helper.make_node("Cast", [node.input[0]], list(node.output), to=types[node.input[1]])
        args = [None if not i else values[i] if i in values else known.get(i) for i in node.input]
        if any(i and a is None for i, a in zip(node.input, args)):
            continue  # an input that could not be evaluated
        try:
            outs = _numpy_op(node, args, opset)
            if outs is None:
                outs = _evaluate_node(node, node.input, args, model.opset_import)
        except Exception:  # noqa: BLE001 - what cannot be evaluated stays unknown
            continue
        values.update((o, np.asarray(v)) for o, v in zip(node.output, outs) if o)
    return {n: values[n] for n in wanted if n in values}


def _evaluate_node(node: Any, names: Sequence[str], args: list[Any], opset_imports: Any) -> list[Any]:
    """The outputs of one node on constant inputs, with ONNX's reference evaluator."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    feeds = {n: np.asarray(a) for n, a in zip(names, args) if n}
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    sub = helper.make_model(helper.make_graph([node], "constant", inputs, outputs), opset_imports=opset_imports)
    return ReferenceEvaluator(sub).run(None, feeds)
