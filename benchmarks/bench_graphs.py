"""Graph walks: audit and fold of deep ONNX graphs of about 1k, 5k and 20k nodes, one run.

    python benchmarks/bench_graphs.py [--nodes 1000,5000,20000]

The graphs are benchmarks/deep_graphs.py's chains (parameters behind Identity/Cast/Reshape,
conv biases as their own Add, a MatMul of two activations every fourth block). Each figure
is a whole process, start and `import` included, warm page cache:

- ``bnctl audit`` (torch-free: statistics and the foldable check);
- ``bnctl.ops.fold.onnx.fold_model`` alone (the rewrite, in a fresh process, torch import
  included since the fold math is torch's float64);
- ``bnctl fold`` (the rewrite, onnx.checker, both graphs run in ONNX Runtime, the table);
- what a user would run instead: ONNX Runtime's own basic graph optimizations, which fold
  BatchNormalization into Conv, writing the optimized graph (``optimized_model_filepath``).

Time per node should stay flat as the graph grows: the walks are linear.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import deep_graphs  # noqa: E402

NODES_PER_BLOCK = 12


def _seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1000,5000,20000")
    args = parser.parse_args()
    bnctl = [sys.executable, "-c", "import sys; from bnctl.cli import main; sys.argv[0] = 'bnctl'; main()"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in (int(n) for n in args.nodes.split(",")):
            model = deep_graphs.chain(max(1, round(target / NODES_PER_BLOCK)))
            nodes = len(model.graph.node)
            src = Path(tmp) / f"deep{nodes}.onnx"
            src.write_bytes(model.SerializeToString())
            audit = _seconds([*bnctl, "audit", str(src)])
            rewrite = _seconds([sys.executable, "-c", f"import onnx; from bnctl.ops.fold.onnx import fold_model; fold_model(onnx.load({str(src)!r}))"])
            fold = _seconds([*bnctl, "fold", str(src), "-o", str(Path(tmp) / "folded.onnx")])
            ort = _seconds(
                [
                    sys.executable,
                    "-c",
                    f"import onnxruntime as ort; o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC; o.optimized_model_filepath = {str(Path(tmp) / 'ort.onnx')!r}; ort.InferenceSession({str(src)!r}, o)",
                ]
            )
            rows.append((nodes, audit, rewrite, fold, ort))
    print(f"{'nodes':>7s} {'audit s':>8s} {'us/node':>8s} {'fold_model s':>13s} {'us/node':>8s} {'bnctl fold s':>13s} {'us/node':>8s} {'ORT basic opt s':>16s} {'fold / ORT':>11s}")
    for nodes, audit, rewrite, fold, ort in rows:
        print(f"{nodes:7d} {audit:8.2f} {audit / nodes * 1e6:8.0f} {rewrite:13.2f} {rewrite / nodes * 1e6:8.0f} {fold:13.2f} {fold / nodes * 1e6:8.0f} {ort:16.2f} {fold / ort:11.2f}")


if __name__ == "__main__":
    main()
