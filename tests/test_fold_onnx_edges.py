"""``bnctl fold`` on ONNX graphs as they exist in the wild: IR version 3 (every initializer
also a graph input), overridable initializers, graphs ONNX Runtime crashes on, MatMul
followed by a reshape, float16. Every folded graph is run in ONNX Runtime against the
original; the report is never the evidence."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _init(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def _bn_inits(prefix, c, rng, dtype=np.float32):
    return [
        _init(f"{prefix}.weight", rng.uniform(0.5, 1.5, size=c), dtype),
        _init(f"{prefix}.bias", rng.normal(size=c), dtype),
        _init(f"{prefix}.running_mean", rng.normal(size=c), dtype),
        _init(f"{prefix}.running_var", rng.uniform(0.2, 2, size=c), dtype),
    ]


def _bn(prefix, x, y, **attrs):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")], [y], epsilon=1e-3, **attrs)


def _run(path_or_model, feeds):
    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _conv_net(rng, dtype=np.float32):
    """Conv -> BN -> Relu -> Conv -> BN -> GlobalAveragePool -> Flatten -> Gemm -> BN."""
    nodes = [
        helper.make_node("Conv", ["x", "c1.weight"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        _bn("bn1", "a", "b"),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("Conv", ["c", "c2.weight", "c2.bias"], ["d"], kernel_shape=[3, 3]),
        _bn("bn2", "d", "e"),
        helper.make_node("GlobalAveragePool", ["e"], ["f"]),
        helper.make_node("Flatten", ["f"], ["g"]),
        helper.make_node("Gemm", ["g", "fc.weight", "fc.bias"], ["h"], transB=1),
        _bn("bn3", "h", "y"),
    ]
    inits = [
        _init("c1.weight", rng.normal(size=(6, 3, 3, 3)), dtype),
        _init("c2.weight", rng.normal(size=(8, 6, 3, 3)) * 0.3, dtype),
        _init("c2.bias", rng.normal(size=8), dtype),
        _init("fc.weight", rng.normal(size=(5, 8)), dtype),
        _init("fc.bias", rng.normal(size=5), dtype),
        *_bn_inits("bn1", 6, rng, dtype),
        *_bn_inits("bn2", 8, rng, dtype),
        *_bn_inits("bn3", 5, rng, dtype),
    ]
    return nodes, inits


def _ir3_model(rng):
    """An IR-3 graph as old exporters wrote it: opset 8, every initializer listed as an input."""
    nodes, inits = _conv_net(rng)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
    graph = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)


def test_an_ir3_graph_folds_into_a_valid_ir3_graph(cli, tmp_path):
    rng = np.random.default_rng(0)
    model = _ir3_model(rng)
    onnx.checker.check_model(model)
    src, out = tmp_path / "old.onnx", tmp_path / "folded.onnx"
    onnx.save(model, src)
    result = cli("fold", src, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["folded"]) == 3, report
    folded = onnx.load(out)
    assert folded.ir_version == 3
    onnx.checker.check_model(folded, full_check=True)  # IR 3: every initializer is an input, and only those
    assert {i.name for i in folded.graph.initializer} <= {i.name for i in folded.graph.input}
    assert {i.name for i in folded.graph.input} == {"x"} | {i.name for i in folded.graph.initializer}
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out, {"x": x}), _run(src, {"x": x}), rtol=1e-4, atol=1e-5)


def test_an_ir3_graph_the_checker_rejects_still_folds_and_says_so(cli, tmp_path):
    """Published IR-3 files often fail onnx.checker (here: an initializer that is no input)
    yet run in ONNX Runtime: folded all the same, with a note."""
    rng = np.random.default_rng(1)
    model = _ir3_model(rng)
    drop = next(i for i, v in enumerate(model.graph.input) if v.name == "fc.bias")
    del model.graph.input[drop]
    try:
        onnx.checker.check_model(model)
        raise AssertionError("the test graph should be invalid")
    except onnx.checker.ValidationError:
        pass
    src, out = tmp_path / "bad.onnx", tmp_path / "folded.onnx"
    onnx.save(model, src)
    result = cli("fold", src, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any("not valid" in n for n in report["notes"]), report["notes"]
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out, {"x": x}), _run(src, {"x": x}), rtol=1e-4, atol=1e-5)


def test_bn_statistics_a_caller_may_feed_are_kept_as_runtime_inputs(cli, tmp_path):
    """IR >= 4: an initializer that is also a graph input is a default the caller may
    override; folding it as a constant is wrong as soon as it is fed."""
    rng = np.random.default_rng(2)
    nodes, inits = _conv_net(rng)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8]), helper.make_tensor_value_info("bn2.running_var", TensorProto.FLOAT, [8])]
    graph = helper.make_graph(nodes, "over", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    src, out = tmp_path / "over.onnx", tmp_path / "folded.onnx"
    onnx.save(model, src)
    result = cli("fold", src, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(f["bn"] for f in report["folded"]) == ["bn1", "bn3"]
    (kept,) = report["skipped"]
    assert kept["bn"] == "bn2" and "bn2.running_var" in kept["reason"] and "caller may feed" in kept["reason"]
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    fed = {"x": x, "bn2.running_var": np.full(8, 4.0, np.float32)}
    np.testing.assert_allclose(_run(out, fed), _run(src, fed), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_run(out, {"x": x}), _run(src, {"x": x}), rtol=1e-4, atol=1e-5)


# --- ONNX Runtime in a child process ------------------------------------------------------


def _endless_loop_model():
    """A real graph ONNX Runtime runs for ever: a Loop with a trip count of 2**62."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "c", "x"], ["y"], body=body)],
        "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array(2**62, np.int64), "n"), numpy_helper.from_array(np.array(True), "c")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_onnx_runtime_runs_in_a_child_and_gives_the_same_outputs():
    from bnctl.core import onnx as onnx_run

    rng = np.random.default_rng(5)
    nodes, inits = _conv_net(rng)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    (got,) = onnx_run.run(model, {"x": x})
    np.testing.assert_array_equal(got.numpy(), _run(model, {"x": x}))


def test_a_graph_onnx_runtime_never_finishes_is_stopped_with_a_clean_error():
    import pytest

    from bnctl.core import onnx as onnx_run
    from bnctl.errors import InputError

    with pytest.raises(InputError, match="ONNX Runtime did not finish running the endless graph in 2 s"):
        onnx_run.run(_endless_loop_model(), {"x": np.ones(1, np.float32)}, what="the endless graph", timeout=2)


def test_a_crash_of_onnx_runtime_is_a_clean_error_naming_the_graph():
    """The child that runs ONNX Runtime dies of SIGSEGV (sent to it while it runs): bnctl
    goes on and reports it."""
    import os
    import signal
    import subprocess
    import threading
    import time

    import pytest

    from bnctl.core import onnx as onnx_run
    from bnctl.errors import InputError

    def crash_child():
        for _ in range(200):
            found = subprocess.run(["pgrep", "-f", "-P", str(os.getpid()), "ort_child.py"], capture_output=True, text=True).stdout.split()
            if found:
                time.sleep(1.0)  # ONNX Runtime loaded and looping
                os.kill(int(found[0]), signal.SIGSEGV)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=crash_child)
    killer.start()
    with pytest.raises(InputError, match=r"ONNX Runtime crashed \(SIGSEGV\) running the endless graph; nothing was written"):
        onnx_run.run(_endless_loop_model(), {"x": np.ones(1, np.float32)}, what="the endless graph", timeout=60)
    killer.join()


def test_a_graph_onnx_runtime_refuses_is_one_error_line(cli, tmp_path):
    rng = np.random.default_rng(6)
    nodes, inits = _conv_net(rng)
    nodes.insert(0, helper.make_node("NoSuchOp", ["x"], ["x2"]))
    nodes[1].input[0] = "x2"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    src = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), src)
    result = cli("fold", src, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "ONNX Runtime cannot run the input graph odd.onnx" in result.stderr and "NoSuchOp" in result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists()


# --- dtypes ---------------------------------------------------------------------------------


def _fp16_model(rng, overflow: bool = False):
    nodes, inits = _conv_net(rng, np.float16)
    if overflow:
        # bn2's scale is about 9500 (gamma 300, var + eps 1e-3), its conv's weights 8: folded,
        # 76,000 passes float16's 65504; unfolded, the conv's outputs stay small (bn1 gives
        # values near 1e-3) and bn2 subtracts the conv's bias as its mean: finite
        values = {i.name: numpy_helper.to_array(i) for i in inits}
        changed = {
            "bn1.weight": np.full(6, 1e-3),
            "bn1.bias": np.full(6, 1e-3),
            "bn2.running_var": np.full(8, 1e-6),
            "bn2.weight": np.full(8, 300.0),
            "bn2.running_mean": values["c2.bias"],
            "c2.weight": np.full((8, 6, 3, 3), 8.0),
        }
        for init in inits:
            if init.name in changed:
                init.CopyFrom(_init(init.name, changed[init.name], np.float16))
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_float16_graph_folds_at_the_float16_tolerance_and_says_so(cli, tmp_path):
    rng = np.random.default_rng(7)
    src, out = tmp_path / "half.onnx", tmp_path / "folded.onnx"
    onnx.save(_fp16_model(rng), src)
    result = cli("fold", src, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tolerance"] == 1e-2 and "float16" in report["tolerance_source"]
    assert len(report["folded"]) == 3
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float16)
    want, got = _run(src, {"x": x}).astype(np.float64), _run(out, {"x": x}).astype(np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-2
    table = cli("fold", src, "-o", tmp_path / "again.onnx")
    assert "tolerance 0.01, the default for float16 outputs" in table.stdout


def test_a_given_tolerance_is_said_to_be_given(cli, tmp_path):
    rng = np.random.default_rng(8)
    src = tmp_path / "half.onnx"
    onnx.save(_fp16_model(rng), src)
    report = json.loads(cli("fold", src, "-o", tmp_path / "f.onnx", "-f", "json", "--tolerance", "0.05").stdout)
    assert report["tolerance"] == 0.05 and report["tolerance_source"] == "given with --tolerance"


def test_a_bn_whose_folded_weights_overflow_float16_is_kept_and_the_rest_folds(cli, tmp_path):
    rng = np.random.default_rng(9)
    src, out = tmp_path / "half.onnx", tmp_path / "folded.onnx"
    onnx.save(_fp16_model(rng, overflow=True), src)
    result = cli("fold", src, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(f["bn"] for f in report["folded"]) == ["bn1", "bn3"]
    (kept,) = report["skipped"]
    assert kept["bn"] == "bn2" and "float16" in kept["reason"] and "65504" in kept["reason"]
    folded = onnx.load(out)
    assert all(np.isfinite(numpy_helper.to_array(i).astype(np.float64)).all() for i in folded.graph.initializer)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float16)
    want, got = _run(src, {"x": x}).astype(np.float64), _run(out, {"x": x}).astype(np.float64)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-2, atol=1e-2 * np.abs(want[finite]).max())


# --- a Linear viewed as channels: Gemm/MatMul -> Reshape/Transpose -> BN ----------------------


def _linear_then_view_models():
    import torch
    from torch import nn

    class Tokens(nn.Module):
        """Linear over (N, L, C), transposed to (N, C, L) for BatchNorm1d (MatMul -> Add -> Transpose -> BN)."""

        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(16, 8), nn.BatchNorm1d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.fc(x).transpose(1, 2)))

    class Vector(nn.Module):
        """Linear over (N, C), viewed as (N, C, 1, 1) for BatchNorm2d (Gemm -> Reshape -> BN)."""

        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(16, 8), nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.fc(x).reshape(-1, 8, 1, 1)))

    class NoBias(Tokens):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8, bias=False)

    return [(Tokens, (2, 5, 16)), (Vector, (2, 16)), (NoBias, (2, 5, 16))]


def _exported(model, shape, dynamo):
    import io

    import torch

    x = torch.randn(*shape)
    if dynamo:
        return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def test_a_linear_viewed_as_channels_folds_through_the_view(cli, tmp_path):
    import pytest
    import torch

    for cls, shape in _linear_then_view_models():
        for dynamo in (False, True):
            torch.manual_seed(0)
            model = cls().eval()
            with torch.no_grad():
                model.bn.running_mean.normal_()
                model.bn.running_var.uniform_(0.5, 2)
                model.bn.weight.normal_()
                model.bn.bias.normal_()
            graph = _exported(model, shape, dynamo)
            if "BatchNormalization" not in [n.op_type for n in graph.graph.node]:
                pytest.fail(f"{cls.__name__}: the exporter already folded the BN; the test needs it kept")
            src, out = tmp_path / f"{cls.__name__}{dynamo}.onnx", tmp_path / f"{cls.__name__}{dynamo}_f.onnx"
            onnx.save(graph, src)
            result = cli("fold", src, "-o", out, "-f", "json")
            assert result.exit_code == 0, result.output
            report = json.loads(result.stdout)
            assert len(report["folded"]) == 1 and "through the" in report["folded"][0]["note"], (cls.__name__, dynamo, report)
            folded = onnx.load(out)
            onnx.checker.check_model(folded, full_check=True)
            assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
            x = torch.randn(*shape)
            name = folded.graph.input[0].name
            np.testing.assert_allclose(_run(out, {name: x.numpy()}), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_reshape_that_moves_the_features_off_the_channel_axis_is_kept():
    """(N, 8) viewed as (N, 2, 4): the BN's 2 channels are not the Gemm's 8 features."""
    from bnctl.ops.fold.onnx import fold_model

    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
        helper.make_node("Reshape", ["h", "shape"], ["v"]),
        _bn("bn", "v", "y"),
    ]
    inits = [_init("w", rng.normal(size=(8, 16))), _init("b", rng.normal(size=8)), numpy_helper.from_array(np.array([2, 2, 4], np.int64), "shape"), *_bn_inits("bn", 2, rng)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _, folded, skipped, _ = fold_model(model)
    assert folded == [] and skipped[0]["bn"] == "bn"


def test_the_audit_does_not_call_a_bn_foldable_that_fold_keeps(cli, tmp_path):
    """The audit's BN402 (foldable) agrees with fold on a float16 graph where bn2's folded
    weights would overflow."""
    src = tmp_path / "half.onnx"
    onnx.save(_fp16_model(np.random.default_rng(9), overflow=True), src)
    result = cli("audit", src, "--format", "json")
    foldable = {f["layer"] for f in json.loads(result.stdout)["findings"] if f["check"] == "BN402"}
    assert foldable == {"bn1", "bn3"}, result.stdout
