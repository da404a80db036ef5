"""BNs that fold into no layer: two in a row merge into one, and with ``--standalone affine``
each becomes a per-channel multiply-add. The written ONNX graph and .pt2 program hold no
BatchNorm op and match the original (ONNX Runtime / eager PyTorch) at the check size and a
second one."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import module_from

import bnctl

NETS = '''
import torch
from torch import nn


class Unfoldable(nn.Module):
    """BNs no layer can take: after a ReLU, two in a row before a sigmoid, one on the input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.BatchNorm2d(4)
        self.b = nn.BatchNorm2d(4)
        self.d = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.sigmoid(self.b(self.a(torch.relu(self.conv(x))))) + self.d(x).mean(1, keepdim=True)
'''


@pytest.fixture
def unfoldable(tmp_path):
    module = module_from(tmp_path, "unfoldable_nets.py", NETS, "unfoldable_nets_reference")
    torch.manual_seed(0)
    model = module.Unfoldable()
    for bn in (model.a, model.b, model.d):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    return f"{tmp_path / 'unfoldable_nets.py'}:Unfoldable", tmp_path / "sd.pt", model.eval()


def _ort(path, x):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_without_standalone_two_bns_in_a_row_merge_and_the_rest_stay():
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4), torch.nn.Sigmoid()).eval()
    for bn in (model[1], model[2]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 4, 5, 5)
    folded, report = bnctl.fold(model, x)
    assert [(e["bn"], e["side"], e["into"]) for e in report.folded] == [("1", "merged", "2")]
    assert report.bn_after == 1 and report.ok
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", ["onnx", "pt2"])
def test_standalone_affine_leaves_no_batchnorm_op(cli, tmp_path, unfoldable, suffix):
    arch, weights, model = unfoldable
    out = tmp_path / f"out.{suffix}"
    result = cli("fold", weights, "--arch", arch, "--input-shape", "2,3,8,8", "-o", out, "--standalone", "affine", "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    sides = {e["bn"]: e["side"] for e in report["folded"]}
    assert report["skipped"] == [] and report["bn_after"] == 0
    assert sides["a"] == "merged" and sides["b"] == "affine" and sides["d"] == "affine", sides
    for shape in ((2, 3, 8, 8), (5, 3, 8, 8)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
        with torch.no_grad():
            want = model(x).numpy()
        if suffix == "onnx":
            got = _ort(out, x)
        else:
            got = torch.export.load(out).module()(x).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if suffix == "onnx":
        ops = {n.op_type for n in onnx.load(out).graph.node}
        assert "BatchNormalization" not in ops and {"Mul", "Add"} <= ops
    else:
        program = torch.export.load(out)
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not any("batch_norm" in t for t in targets), targets


def test_standalone_affine_on_an_onnx_graph(cli, tmp_path, unfoldable):
    arch, weights, model = unfoldable
    exported = tmp_path / "exported.onnx"
    assert cli("export", weights, "--arch", arch, "--input-shape", "2,3,8,8", "--no-fold", "-o", exported).exit_code == 0
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(exported).graph.node) == 3
    plain = cli("fold", exported, "--input-shape", "2,3,8,8", "-o", tmp_path / "plain.onnx", "-f", "json")
    assert plain.exit_code == 0, plain.output
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(tmp_path / "plain.onnx").graph.node) == 2  # merged, not affine
    out = tmp_path / "affine.onnx"
    result = cli("fold", exported, "--input-shape", "2,3,8,8", "-o", out, "--standalone", "affine")
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(out).graph.node}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(out, x), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_standalone_affine_cannot_be_a_state_dict(cli, tmp_path, unfoldable):
    arch, weights, _ = unfoldable
    result = cli("fold", weights, "--arch", arch, "--input-shape", "2,3,8,8", "-o", tmp_path / "x.safetensors", "--standalone", "affine")
    assert result.exit_code == 2 and "--standalone affine rewrites the model's graph" in result.stderr
