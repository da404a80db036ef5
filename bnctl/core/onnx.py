"""ONNX graphs in memory: node attributes and names, check inputs, and running a graph in
ONNX Runtime (optimizations off, so what runs is the graph as written)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

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


#: the largest input bnctl allocates from a graph's own dims (elements)
MAX_INPUT_ELEMENTS = 1 << 28


def check_graph(model: Any) -> None:
    """An InputError where the graph cannot be evaluated as it stands: a node reads a value
    nothing produces, or the default domain's opset is older than ONNX Runtime runs (7)."""
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


def input_feeds(model: Any, shapes: Sequence[Sequence[int]] | None, seed: int = 0, notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Random inputs for the graph: its static shapes, or ``shapes`` (one per input). A
    symbolic first dim (the batch) alone is taken as 1, said in ``notes``."""
    from onnx import helper

    check_graph(model)
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
    import json
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch

    with tempfile.TemporaryDirectory(prefix="bnctl-ort-") as tmp:
        folder = Path(tmp)
        for index, (_, model) in enumerate(graphs):
            (folder / f"graph{index}.onnx").write_bytes(model.SerializeToString())
        np.savez(folder / "feeds.npz", *feeds.values())  # arr_0, arr_1, ... (any name is safe)
        (folder / "feeds.json").write_text(json.dumps(list(feeds)))
        script = Path(__file__).with_name("ort_child.py")
        try:
            proc = subprocess.run([sys.executable, str(script), tmp], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            names = " and ".join(what for what, _ in graphs)
            raise InputError(f"ONNX Runtime did not finish running {names} in {timeout:g} s; it was stopped", _CRASH_TIP) from None
        if proc.returncode == 3 and (folder / "error.txt").exists():
            index, _, message = (folder / "error.txt").read_text().partition("\t")
            raise InputError(f"ONNX Runtime cannot run {graphs[int(index)][0]}: {message}", "check the opset and IR version onnxruntime supports, and the input shapes")
        if proc.returncode != 0:
            done = sum(1 for i in range(len(graphs)) if (folder / f"outputs{i}.npz").exists())
            what = graphs[min(done, len(graphs) - 1)][0]
            if proc.returncode < 0:
                cause = f"crashed ({signal.Signals(-proc.returncode).name})" if -proc.returncode in signal.valid_signals() else f"was killed (signal {-proc.returncode})"
            else:
                last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
                cause = f"failed ({last[0]})"
            raise InputError(f"ONNX Runtime {cause} running {what}; nothing was written", _CRASH_TIP)
        results = []
        for index in range(len(graphs)):
            with np.load(folder / f"outputs{index}.npz", allow_pickle=False) as data:
                results.append([torch.from_numpy(data[f"o{k}"].copy()) for k in range(len(data.files))])
        return results


def computed_constants(model: Any, names: Sequence[str], known: dict[str, Any]) -> dict[str, np.ndarray]:
    """Values of ``names`` that the graph computes from constants alone (Constant, Identity,
    Cast chains of older exporters): the nodes they need, evaluated with ONNX's reference
    evaluator on their own. A name that depends on a graph input, or cannot be evaluated, is
    left out."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output if o}
    initializers = {i.name: i for i in graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info) if v.type.HasField("tensor_type")}
    out: dict[str, np.ndarray] = {}
    for name in names:
        needed, stack, seen, free = [], [name], set(), True
        while stack and free:
            value = stack.pop()
            if value in seen or value in known or value in initializers or not value:
                continue
            seen.add(value)
            node = producers.get(value)
            if node is None:  # a graph input: known only at run time
                free = False
                break
            if node.op_type == "CastLike" and len(node.input) > 1 and node.input[1] not in known and node.input[1] not in initializers and types.get(node.input[1]):
                # only the target's type matters: a Cast to it (exporters cast zero biases like the input)
                node = helper.make_node("Cast", [node.input[0]], list(node.output), to=types[node.input[1]])
            needed.append(node)
            stack.extend(node.input)
        if not free or not needed:
            continue
        order = {o: i for i, n in enumerate(graph.node) for o in n.output}
        nodes = sorted({id(n): n for n in needed}.values(), key=lambda n: order.get(n.output[0], 0))
        used = {i for n in nodes for i in n.input}
        inits = [initializers[i] for i in used if i in initializers]
        consts = [helper.make_node("Constant", [], [k], value=helper.make_tensor(k, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.shape(v), np.asarray(v).flatten().tolist()))
                  for k, v in known.items() if k in used and k not in initializers]
        try:
            sub = helper.make_model(helper.make_graph(consts + nodes, "constants", [], [helper.make_empty_tensor_value_info(name)], inits), opset_imports=model.opset_import)
            out[name] = np.asarray(ReferenceEvaluator(sub).run(None, {})[0])
        except Exception:  # noqa: BLE001 - what cannot be evaluated stays unknown
            continue
    return out
