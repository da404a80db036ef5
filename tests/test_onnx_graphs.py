"""ONNX graphs as other exporters write them: deep graphs (no recursion over their depth),
BN parameters and conv weights behind Identity/Cast/Reshape, conv biases as their own Add,
and damaged graphs. Every written fold is run in ONNX Runtime against the original."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(ROOT / "benchmarks"))
import deep_graphs  # noqa: E402

from bnctl.ops.fold import onnx as onnx_fold  # noqa: E402


def _run(model, feeds):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _c(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _bn_params(rng, c, prefix="bn"):
    return [_c(f"{prefix}.weight", rng.uniform(0.5, 1.5, c)), _c(f"{prefix}.bias", rng.normal(size=c)), _c(f"{prefix}.running_mean", rng.normal(size=c)), _c(f"{prefix}.running_var", rng.uniform(0.3, 2, c))]


BN_INPUTS = ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]


def _model(nodes, inits, x_shape, y_shape, opset=13):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _fold_and_check(model, x, folded_count):
    new, folded, skipped, count = onnx_fold.fold_model(model)
    assert len(folded) == folded_count, skipped
    onnx.checker.check_model(new)
    want, got = _run(model, {"x": x}), _run(new, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return new, folded, skipped


def test_a_deep_graph_is_audited_and_folded_without_recursion(cli, tmp_path):
    # 300 blocks: ~3,600 nodes, and MatMuls whose second input is the whole chain before them
    # (the walk that used to recurse over it ran past Python's recursion limit)
    model = deep_graphs.chain(300)
    src, out = tmp_path / "deep.onnx", tmp_path / "folded.onnx"
    onnx.save(model, src)
    audit = cli("audit", src, "-f", "json")
    assert audit.exit_code == 0, audit.output  # BN402 infos only, below the default --fail-on error
    findings = json.loads(audit.stdout)["findings"]
    assert sum(f["check"] == "BN402" for f in findings) == 300
    result = cli("fold", src, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["folded"]) == 300 and report["skipped"] == []
    assert "through the bias Add, Identity between them" in {f["note"] for f in report["folded"]}
    x = np.random.default_rng(0).normal(size=(1, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(out, {"x": x}), _run(model, {"x": x}), rtol=1e-4, atol=1e-5)
    written = onnx.load(out)
    assert not any(n.op_type in ("BatchNormalization", "Identity", "Add") for n in written.graph.node[:-1])


def test_a_bn_after_identity_folds_into_the_conv(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3]), helper.make_node("Identity", ["a"], ["b"]), helper.make_node("BatchNormalization", ["b", *BN_INPUTS], ["y"])]
    model = _model(nodes, [_c("w", rng.normal(size=(5, 3, 3, 3))), *_bn_params(rng, 5)], [1, 3, 8, 8], [1, 5, 6, 6])
    new, folded, _ = _fold_and_check(model, rng.normal(size=(1, 3, 8, 8)).astype(np.float32), 1)
    assert folded[0]["into"] == "w" or folded[0]["into"].startswith("Conv") or folded[0]["into"]
    assert [n.op_type for n in new.graph.node] == ["Conv"]


@pytest.mark.parametrize("op, const_shape", [("Add", (1, 4, 1, 1)), ("Add", (4, 1, 1)), ("Sub", (4, 1, 1)), ("Add", ()), ("Add", (1,))])
def test_a_bn_after_conv_transpose_and_a_bias_add_folds(op, const_shape):
    rng = np.random.default_rng(2)
    bias = rng.normal(size=const_shape if const_shape else ())
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b0"], ["a"], kernel_shape=[2, 2], strides=[2, 2]), helper.make_node(op, ["a", "bias"], ["b"]), helper.make_node("BatchNormalization", ["b", *BN_INPUTS], ["y"])]
    inits = [_c("w", rng.normal(size=(3, 4, 2, 2))), _c("b0", rng.normal(size=4)), _c("bias", bias), *_bn_params(rng, 4)]
    model = _model(nodes, inits, [2, 3, 5, 5], [2, 4, 10, 10])
    new, folded, _ = _fold_and_check(model, rng.normal(size=(2, 3, 5, 5)).astype(np.float32), 1)
    assert [n.op_type for n in new.graph.node] == ["ConvTranspose"]
    assert "bias " + op in folded[0]["note"]


def test_a_constant_minus_the_conv_or_a_full_map_add_is_not_a_bias():
    rng = np.random.default_rng(3)
    for op, inputs, const in (("Sub", ["bias", "a"], rng.normal(size=(4, 1, 1))), ("Add", ["a", "bias"], rng.normal(size=(1, 4, 6, 6)))):
        nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3]), helper.make_node(op, inputs, ["b"]), helper.make_node("BatchNormalization", ["b", *BN_INPUTS], ["y"])]
        model = _model(nodes, [_c("w", rng.normal(size=(4, 3, 3, 3))), _c("bias", const), *_bn_params(rng, 4)], [1, 3, 8, 8], [1, 4, 6, 6])
        new, folded, skipped, _ = onnx_fold.fold_model(model)
        assert folded == [] and f"comes from {op}" in skipped[0]["reason"]
        x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(_run(new, {"x": x}), _run(model, {"x": x}), rtol=1e-6)


def test_gemm_and_matmul_with_a_bias_add_and_a_same_type_cast_fold():
    rng = np.random.default_rng(4)
    for layer in ("Gemm", "MatMul"):
        nodes = [helper.make_node(layer, ["x", "w"], ["a"]), helper.make_node("Add", ["bias", "a"], ["b"]), helper.make_node("Cast", ["b"], ["c"], to=TensorProto.FLOAT), helper.make_node("BatchNormalization", ["c", *BN_INPUTS], ["y"])]
        inits = [_c("w", rng.normal(size=(6, 5))), _c("bias", rng.normal(size=5)), *_bn_params(rng, 5)]
        model = _model(nodes, inits, [3, 6], [3, 5])
        new, folded, _ = _fold_and_check(model, rng.normal(size=(3, 6)).astype(np.float32), 1)
        assert "BatchNormalization" not in {n.op_type for n in new.graph.node}


def test_a_cast_to_another_type_keeps_the_bn_with_its_reason():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[1, 1]),
        helper.make_node("Cast", ["a"], ["b"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["b"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("BatchNormalization", ["c", *BN_INPUTS], ["y"]),
    ]
    model = _model(nodes, [_c("w", rng.normal(size=(4, 3, 1, 1))), *_bn_params(rng, 4)], [1, 3, 4, 4], [1, 4, 4, 4])
    _, folded, skipped, _ = onnx_fold.fold_model(model)
    assert folded == [] and "Cast to another type" in skipped[0]["reason"]


def test_bn_parameters_behind_reshape_unsqueeze_and_cast_fold():
    rng = np.random.default_rng(6)
    c = 4
    nodes = [helper.make_node("Identity", ["w"], ["w_id"]), helper.make_node("Conv", ["x", "w_id"], ["a"], kernel_shape=[3, 3])]
    inits = [_c("w", rng.normal(size=(c, 3, 3, 3))), _c("shape", [c], np.int64), _c("axes", [0], np.int64)]
    params = []
    for k, value in zip(("weight", "bias", "mean", "var"), (rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.3, 2, c))):
        inits.append(_c(f"{k}.raw", value.reshape(1, c), np.float64 if k == "var" else np.float32))
        if k == "weight":
            nodes.append(helper.make_node("Reshape", [f"{k}.raw", "shape"], [k]))
        elif k == "var":
            nodes += [helper.make_node("Squeeze", [f"{k}.raw", "axes"], [f"{k}.sq"]), helper.make_node("Cast", [f"{k}.sq"], [k], to=TensorProto.FLOAT)]
        else:
            nodes += [helper.make_node("Squeeze", [f"{k}.raw", "axes"], [f"{k}.sq"]), helper.make_node("Unsqueeze", [f"{k}.sq", "axes"], [f"{k}.un"]), helper.make_node("Squeeze", [f"{k}.un", "axes"], [k])]
        params.append(k)
    nodes.append(helper.make_node("BatchNormalization", ["a", *params], ["y"]))
    model = _model(nodes, inits, [1, 3, 8, 8], [1, c, 6, 6])
    new, _, _ = _fold_and_check(model, rng.normal(size=(1, 3, 8, 8)).astype(np.float32), 1)
    assert [n.op_type for n in new.graph.node] == ["Conv"]


def _damaged(kind: str) -> onnx.ModelProto:
    model = onnx.load(ROOT / "samples/checkpoints/sample.onnx")
    graph = model.graph
    if kind == "dims":  # an initializer whose dims no longer match its bytes
        tensor = next(t for t in graph.initializer if t.raw_data and len(t.dims) == 1)
        tensor.dims[0] += 3
    elif kind == "data_type":
        tensor = next(t for t in graph.initializer if t.raw_data and len(t.dims) == 1)
        tensor.data_type = TensorProto.DOUBLE
    elif kind == "bn_input":
        bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
        del bn.input[4]
    return model


@pytest.mark.parametrize("kind", ["dims", "data_type", "bn_input"])
def test_a_damaged_graph_is_one_clean_error_in_every_command(cli, tmp_path, kind):
    src = tmp_path / f"{kind}.onnx"
    onnx.save(_damaged(kind), src)
    for argv in (("inspect", src), ("audit", src), ("fold", src, "-o", tmp_path / "f.onnx")):
        result = cli(*argv)
        assert result.exit_code in (0, 1, 2), (argv, result.output)
        assert "internal error" not in result.output and "Traceback" not in result.output, (argv, result.output)
        if result.exit_code == 2:  # one error line (audit names the file in its report)
            assert "error: the ONNX graph is broken" in result.output
    fold = cli("fold", src, "-o", tmp_path / "f.onnx")
    assert fold.exit_code == 2 and "broken" in fold.stderr
    assert not (tmp_path / "f.onnx").exists()


def test_consecutive_bns_before_a_conv_both_fold():
    # BN -> BN -> Conv (no padding): the second folds into the conv, then the first does too
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("BatchNormalization", ["r", *[f"a.{k}" for k in ("weight", "bias", "running_mean", "running_var")]], ["b1"]),
        helper.make_node("BatchNormalization", ["b1", *BN_INPUTS], ["b2"]),
        helper.make_node("Conv", ["b2", "w"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = [_c("w", rng.normal(size=(5, 4, 1, 1))), *_bn_params(rng, 4, "a"), *_bn_params(rng, 4)]
    model = _model(nodes, inits, [1, 4, 6, 6], [1, 5, 6, 6])
    new, folded, _ = _fold_and_check(model, rng.normal(size=(1, 4, 6, 6)).astype(np.float32), 2)
    assert [n.op_type for n in new.graph.node] == ["Relu", "Conv"]


def test_an_attribute_of_the_wrong_type_is_a_clean_error_and_fails_the_audit(cli, tmp_path):
    model = onnx.load(ROOT / "samples/checkpoints/sample.onnx")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    for a in conv.attribute:
        if a.name == "group":
            a.type, a.s = onnx.AttributeProto.STRING, b""
    src = tmp_path / "attr.onnx"
    onnx.save(model, src)
    audit = cli("audit", src)
    assert audit.exit_code == 2 and "attribute 'group' of type STRING, which ONNX defines as INT" in audit.stdout, audit.output
    fold = cli("fold", src, "-o", tmp_path / "f.onnx")
    assert fold.exit_code == 2 and fold.stderr.startswith("error: the ONNX graph is broken"), fold.output


def test_a_string_that_is_not_utf8_is_a_clean_error(cli, tmp_path):
    model = onnx.load(ROOT / "samples/checkpoints/sample.onnx")
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "Rqqu"
    data = model.SerializeToString().replace(b"Rqqu", b"R\xeequ", 1)  # an op type, damaged on disk
    src = tmp_path / "utf8.onnx"
    src.write_bytes(data)
    result = cli("fold", src, "-o", tmp_path / "f.onnx")
    assert result.exit_code == 2 and "not UTF-8" in result.stderr and "internal error" not in result.output, result.output


def test_the_library_folds_an_onnx_graph_as_the_cli_does():
    """``bnctl.fold`` takes an ONNX ModelProto: the folded graph (checked here in ONNX Runtime
    directly, not by bnctl's report) computes what the original computes, with no BN left."""
    import bnctl

    original = onnx.load(str(ROOT / "samples" / "checkpoints" / "sample.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    folded, report = bnctl.fold(original, (x,))
    assert report.ok and report.folded and report.path == "onnx"
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert [n for n in original.graph.node if n.op_type == "BatchNormalization"]  # the input is not changed
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (original, folded)]
    name = run[0].get_inputs()[0].name
    expected, got = (r.run(None, {name: x})[0] for r in run)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
