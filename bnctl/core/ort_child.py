"""Run ONNX graphs in ONNX Runtime, in a child process of its own (``core/onnx.run_all``).

ONNX Runtime is native code, and some graphs crash it (a segfault, even with optimizations
off): in the child, a crash ends the child, not bnctl. This file runs as a script and needs
only numpy and onnxruntime:

    python ort_child.py FOLDER
    python ort_child.py FOLDER quantize

``FOLDER`` holds ``graph0.onnx``, ``graph1.onnx``, ..., ``feeds.npz`` (``arr_0``, ...) and
``feeds.json`` (their input names); the outputs of
graph *i* go to ``outputs{i}.npz`` (``o0``, ``o1``, ... in output order). When ONNX Runtime
refuses a graph, ``error.txt`` says which graph (its index, a tab, ONNX Runtime's message)
and the exit status is 3. With ``quantize``, ``graph0.onnx`` is quantized instead, with ONNX
Runtime's static quantizer (QDQ, symmetric int8 weights and activations, calibrated on the
feeds), per tensor to ``per_tensor.onnx`` and per channel to ``per_channel.onnx``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's folder (bnctl/core, which holds an onnx.py) comes first on
# sys.path; ONNX Runtime's quantizer imports the real onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(folder: Path) -> int:
    import json

    import numpy as np
    import onnxruntime as ort

    names = json.loads((folder / "feeds.json").read_text())
    with np.load(folder / "feeds.npz", allow_pickle=False) as data:
        feeds = {name: data[f"arr_{k}"] for k, name in enumerate(names)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    options.log_severity_level = 4  # errors come back as exceptions; ONNX Runtime's own log stays quiet
    options.enable_cpu_mem_arena = False  # each graph's activations go back when it is done, not kept for the next
    index = 0
    while (folder / f"graph{index}.onnx").exists():
        try:
            session = ort.InferenceSession(str(folder / f"graph{index}.onnx"), options, providers=["CPUExecutionProvider"])
            wanted = {i.name for i in session.get_inputs()}
            outputs = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
            arrays = {f"o{k}": np.asarray(o) for k, o in enumerate(outputs)}
            if any(a.dtype == object for a in arrays.values()):
                raise TypeError("an output is a sequence or map, not a tensor")
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which words the error
            message = " ".join(str(exc).split())
            (folder / "error.txt").write_text(f"{index}\t{type(exc).__name__}: {message}")
            return 3
        np.savez(folder / f"outputs{index}.npz", **arrays)
        del session, outputs, arrays  # one graph's memory at a time
        index += 1
    return 0


def quantize(folder: Path) -> int:
    import json

    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    names = json.loads((folder / "feeds.json").read_text())
    with np.load(folder / "feeds.npz", allow_pickle=False) as data:
        feeds = {name: data[f"arr_{k}"] for k, name in enumerate(names)}

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = [feeds]

        def get_next(self) -> dict | None:
            return self.left.pop() if self.left else None

    for per_channel, name in ((False, "per_tensor.onnx"), (True, "per_channel.onnx")):
        try:
            quantize_static(
                str(folder / "graph0.onnx"),
                str(folder / name),
                Feeds(),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which words the error
            (folder / "error.txt").write_text(f"0\t{type(exc).__name__}: {' '.join(str(exc).split())}")
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(quantize(Path(sys.argv[1])) if sys.argv[2:] == ["quantize"] else main(Path(sys.argv[1])))
