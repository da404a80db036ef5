"""int8 readiness of folded layers: every figure recomputed here, in numpy, from the weights
as written (the folded module's, the written ONNX graph's), never taken from bnctl."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnctl


def _q(w, s):
    s = np.where(s > 0, s, 1.0)
    return np.clip(np.round(w / s), -127, 127) * s


def _sqnr(w, q):
    noise = float(((w - q) ** 2).sum())
    return None if noise == 0 else 10 * math.log10(float((w * w).sum()) / noise)


def expected(before: np.ndarray, after: np.ndarray, axis: int = 0) -> dict:
    """The int8 block, from the definitions: symmetric int8, scale max|w|/127 over the
    tensor or each output channel."""
    a, b = after.astype(np.float64), before.astype(np.float64)
    ca = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    per_channel_scale = np.abs(ca).max(axis=1, keepdims=True) / 127

    def median(c):
        q = _q(c, np.abs(c).max() / 127)
        per = [_sqnr(c[k], q[k]) for k in range(c.shape[0])]
        return float(np.median([math.inf if v is None else v for v in per]))

    return {
        "per_tensor_sqnr_db": _sqnr(a, _q(a, np.abs(a).max() / 127)),
        "per_channel_sqnr_db": _sqnr(ca, _q(ca, per_channel_scale)),
        "before_per_tensor_sqnr_db": _sqnr(b, _q(b, np.abs(b).max() / 127)),
        "median_channel_sqnr_db": median(ca),
        "range_growth": float(np.abs(a).max() / np.abs(b).max()),
        "range_channel": int(np.abs(ca).max(axis=1).argmax()),
    }


def _compare(block: dict, want: dict) -> None:
    for key, value in want.items():
        got = block[key]
        if value is None or (isinstance(value, float) and math.isinf(value)):
            assert got is None, (key, got)
        else:
            assert got == pytest.approx(value, abs=0.01 if key.endswith("_db") else 1e-6, rel=1e-6), (key, got, value)


def _net(tiny_var: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.ConvTranspose2d(16, 6, 2, stride=2), nn.BatchNorm2d(6))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    if tiny_var:
        model[1].running_var[11] = 1e-7
        model[1].eps = 1e-9
    return model.eval()


@pytest.mark.parametrize("tiny_var", [False, True])
def test_pytorch_fold_reports_int8_readiness_of_the_written_weights(tiny_var):
    model = _net(tiny_var)
    before = {0: model[0].weight.detach().numpy().copy(), 3: model[3].weight.detach().numpy().copy()}
    folded, report = bnctl.fold(model, torch.randn(1, 3, 12, 12))
    assert report.ok and len(report.folded) == 2
    written = {name: p.detach().numpy() for name, p in folded.named_parameters()}
    for entry, index, axis in ((report.folded[0], 0, 0), (report.folded[1], 3, 1)):
        after = next(v for k, v in written.items() if k.startswith(f"{index}.") and k.endswith("weight") and v.shape == before[index].shape)
        _compare(entry["int8"], expected(before[index], after, axis))
    from bnctl.render.reports import int8_lines

    lines = int8_lines(report.folded)
    if tiny_var:
        assert len(lines) == 1 and "channel 11 (running_var 1e-07)" in lines[0] and "quantize per channel" in lines[0]
    else:
        assert lines == []


def test_onnx_fold_reports_int8_from_the_written_graph(cli, tmp_path):
    rng = np.random.default_rng(1)
    var = rng.uniform(0.5, 2, 8)
    var[3] = 1e-9
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(8, np.float32), "g"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "m"),
        numpy_helper.from_array(var.astype(np.float32), "v"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3]), helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["y"], epsilon=1e-10)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], inits)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), src)
    result = cli("fold", src, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["folded"][0]
    written = onnx.load(out)
    conv = next(n for n in written.graph.node if n.op_type == "Conv")
    after = numpy_helper.to_array(next(t for t in written.graph.initializer if t.name == conv.input[1]))
    _compare(entry["int8"], expected(numpy_helper.to_array(inits[0]), after))
    assert entry["int8"]["range_channel"] == 3
    text = cli("fold", src, "-o", tmp_path / "g.onnx")
    assert "int8 after folding" in text.stdout and "channel 3 (running_var 1e-09)" in text.stdout


def _onnx_conv_bn(tmp_path, var):
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.normal(size=(len(var), 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(len(var), np.float32), "g"),
        numpy_helper.from_array(np.zeros(len(var), np.float32), "b"),
        numpy_helper.from_array(np.zeros(len(var), np.float32), "m"),
        numpy_helper.from_array(np.asarray(var, np.float32), "v"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3]), helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["y"], epsilon=1e-10)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, len(var), 6, 6])], inits)
    path = tmp_path / f"m{len(var)}_{min(var):g}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path, numpy_helper.to_array(inits[0]).astype(np.float64), np.asarray(var, dtype=np.float64)


def test_the_audit_flags_int8_fold_range_with_the_channel_and_only_there(cli, tmp_path):
    healthy, _, _ = _onnx_conv_bn(tmp_path, [1.0, 0.5, 2.0, 1.5])
    sick, weight, var = _onnx_conv_bn(tmp_path, [1.0, 0.5, 1e-9, 1.5, 0.8])
    doc = json.loads(cli("audit", healthy, "-f", "json").stdout)
    assert not any(f["check"] == "BN403" for f in doc["findings"])
    result = cli("audit", sick, "-f", "json")
    findings = [f for f in json.loads(result.stdout)["findings"] if f["check"] == "BN403"]
    assert len(findings) == 1 and "channel 2 (running_var 1e-09)" in findings[0]["message"], findings
    # the figures in the message, recomputed: the folded weight is w * 1/sqrt(var + eps) per channel
    folded = weight * (1 / np.sqrt(var + 1e-10)).reshape(-1, 1, 1, 1)
    want = expected(weight, folded.astype(np.float32))
    assert f"-> {want['median_channel_sqnr_db']:.1f} dB for the median channel" in findings[0]["message"]


def test_the_audit_flags_int8_fold_range_in_a_module(cli, tmp_path):
    for tiny, expect in ((True, True), (False, False)):
        model = _net(tiny)
        path = tmp_path / f"net{tiny}.pt"
        torch.save(model, path)
        doc = json.loads(cli("audit", path, "--trust", "-f", "json").stdout)
        hits = [f for f in doc["findings"] if f["check"] == "BN210"]
        assert bool(hits) == expect, doc["findings"]
        if expect:
            assert hits[0]["layer"] == "1" and "channel 11" in hits[0]["message"]


def _ort_sqnr(float_path, feeds, per_channel, tmp_path):
    """The output SQNR of ONNX Runtime's own static quantization, run here: QDQ, symmetric
    int8 weights and activations, calibrated on ``feeds``."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = [feeds]

        def get_next(self):
            return self.left.pop() if self.left else None

    out = tmp_path / f"q{int(per_channel)}.onnx"
    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(float_path), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    noise = sum(float(((r.astype(np.float64) - g) ** 2).sum()) for r, g in zip(ref, got))
    return 10 * math.log10(sum(float((r.astype(np.float64) ** 2).sum()) for r in ref) / noise)


@pytest.mark.parametrize("command", ["fold", "export"])
def test_int8_check_figures_are_onnx_runtimes_own(cli, tmp_path, command):
    from conftest import CHECKPOINTS

    data = tmp_path / "data"
    data.mkdir()
    sample = np.random.default_rng(5).normal(size=(3, 32, 32)).astype(np.float32)
    np.save(data / "0.npy", sample)
    out = tmp_path / "out.onnx"
    source = [CHECKPOINTS / "sample.onnx"] if command == "fold" else [CHECKPOINTS / "sample.pt", "--arch", "bnctl.models:sample_net"]
    result = cli(command, *source, "--data", data, "-o", out, "--int8-check", "-f", "json")
    assert result.exit_code == 0, result.output
    block = json.loads(result.stdout)["int8_check"]
    graph = onnx.load(out)
    name = graph.graph.input[0].name
    feeds = {name: sample[None]}
    assert block["per_tensor_output_sqnr_db"] == pytest.approx(_ort_sqnr(out, feeds, False, tmp_path), abs=0.01)
    assert block["per_channel_output_sqnr_db"] == pytest.approx(_ort_sqnr(out, feeds, True, tmp_path), abs=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out.onnx", "q0.onnx", "q1.onnx"]  # nothing more was written


def test_int8_check_needs_an_onnx_output(cli, tmp_path):
    from conftest import CHECKPOINTS

    result = cli("fold", CHECKPOINTS / "sample.pt", "--arch", "bnctl.models:sample_net", "--input-shape", "1,3,32,32", "-o", tmp_path / "f.pt2", "--int8-check")
    assert result.exit_code == 2 and "--int8-check quantizes an ONNX graph" in result.stderr
    assert not (tmp_path / "f.pt2").exists()
