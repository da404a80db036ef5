"""The fold and export bound ``|a - b| <= atol + rtol * |b|``: exact folds of models whose
outputs are near zero (a detector's sigmoid map) pass, real changes of ordinary outputs do
not. Folded graphs are checked in ONNX Runtime, not by the report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from bnctl.core.verify import compare


def _run(path, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _sigmoid_head(rng) -> onnx.ModelProto:
    """Conv (outputs ~1e4) -> BN that subtracts ~1e4 + 11 -> Sigmoid: outputs ~1e-5, whose
    unfolded rounding (float32 steps of 1e-3 at 1e4) the exact fold does not repeat."""
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "g", "beta", "mean", "var"], ["z"], epsilon=1e-5),
        helper.make_node("Sigmoid", ["z"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array((rng.normal(size=(c, 3, 3, 3)) * 0.1).astype(np.float32), "w"),
        numpy_helper.from_array(np.full(c, 1e4, np.float32), "b"),
        numpy_helper.from_array(np.ones(c, np.float32), "g"),
        numpy_helper.from_array(np.zeros(c, np.float32), "beta"),
        numpy_helper.from_array(np.full(c, 1e4 + 11, np.float32), "mean"),
        numpy_helper.from_array(np.ones(c, np.float32), "var"),
    ]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_an_exact_fold_of_a_near_zero_output_passes_and_says_which_bound_applied(cli, tmp_path):
    rng = np.random.default_rng(0)
    src, out = tmp_path / "head.onnx", tmp_path / "folded.onnx"
    onnx.save(_sigmoid_head(rng), src)
    x = rng.normal(size=(1, 3, 16, 16)).astype(np.float32)
    before = _run(src, {"x": x}).astype(np.float64)
    assert before.max() < 1e-4  # the detector-like output: every probability near zero

    result = cli("fold", src, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["written"] and len(report["folded"]) == 1
    assert report["bound_applied"] == "absolute" and report["atol"] == report["rtol"] == 1e-4
    # the scale-free error is far above the tolerance: the old rule refused this fold
    assert report["max_rel_error"] > 1e-4
    after = _run(out, {"x": x}).astype(np.float64)
    assert np.abs(after - before).max() < 1e-6
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(out).graph.node)


def test_a_real_change_of_an_ordinary_output_is_still_beyond_the_bound():
    rng = np.random.default_rng(1)
    ref = torch.from_numpy(rng.normal(scale=50.0, size=(4, 10)))
    moved = ref.clone()
    moved[0, 0] += 0.05 * float(ref.abs().max())  # 5% of the largest output
    diff = compare([ref], [moved])
    assert not diff.within(1e-4) and not diff.floor
    # a rounding-sized change of the same output is within it
    assert compare([ref], [ref * (1 + 1e-7)]).within(1e-4)


def test_the_bound_is_allclose_with_atol_scaled_to_the_output(tmp_path):
    rng = np.random.default_rng(2)
    ref = rng.normal(scale=20.0, size=(3, 7))
    got = ref + rng.normal(scale=1e-3, size=ref.shape)
    diff = compare([torch.from_numpy(ref)], [torch.from_numpy(got)])
    for tol in (1e-5, 1e-4, 3e-4, 1e-3):
        atol = tol * max(1.0, np.abs(ref).max())
        assert diff.within(tol) == bool(np.allclose(got, ref, rtol=tol, atol=atol))
    near_zero = rng.uniform(1e-6, 2e-5, size=(5,))
    diff = compare([torch.from_numpy(near_zero)], [torch.from_numpy(near_zero + 2e-7)])
    assert diff.floor and diff.within(1e-4) and diff.max_rel > 1e-4
    # NaN in other places, and other shapes, are never within any bound
    a = torch.tensor([1.0, float("nan")])
    assert not compare([a], [torch.tensor([1.0, 2.0])]).within(1e9)
    assert not compare([a], [torch.zeros(3)]).within(1e9)


def test_comparing_large_outputs_makes_no_float64_copy_of_them():
    # a 1x16x2048x2048 float32 output is 268 MB; float64 copies of both, their difference and
    # its ratio would add well over 1 GB. Peak memory, not time: measured in a fresh process. Chunks cost ~150 MB here; one float64 copy of the output would be 536 MB.
    import subprocess
    import sys

    code = (  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from this test process
        "import re, torch\n"
        "from bnctl.core.verify import compare\n"
        "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "a = torch.randn(1, 16, 2048, 2048); b = a + 1e-6\n"
        "before = peak()\n"
        "d = compare([a], [b])\n"
        "after = peak()\n"
        "assert d.within(1e-4) and d.max_abs > 0, d\n"
        "print((after - before) // 1024)\n"
    )
    added_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    assert added_mb < 400, added_mb  # one float64 copy of the output alone would be 536 MB
