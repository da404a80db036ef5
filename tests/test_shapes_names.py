"""Shapes, dtypes and names of the files fold and export write: dims static or dynamic as
asked and as reported, input names from forward, output names, integer inputs, the opset
asked for. Every written file is run (ONNX Runtime, torch.export.load) at sizes other than
the check inputs and compared with the original PyTorch model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

TWO_INPUTS = '''
import torch
from torch import nn


class ImageAndTokens(nn.Module):
    """A conv branch with BN and an embedding of integer tokens, added."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.emb = nn.Embedding(100, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, image, tokens):
        a = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        return self.fc(a + self.emb(tokens).mean(1))
'''


@pytest.fixture
def two_inputs(tmp_path):
    """(arch spec, checkpoint, the model) of a two-input model with trained-looking BN statistics."""
    import importlib.util

    (tmp_path / "nets.py").write_text(TWO_INPUTS)
    spec = importlib.util.spec_from_file_location("nets_under_test", tmp_path / "nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.ImageAndTokens()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.normal_()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    return f"{tmp_path / 'nets.py'}:ImageAndTokens", tmp_path / "w.pt", model.eval()


def _ort(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_export_names_dtypes_and_one_symbol_per_dynamic_dim(cli, tmp_path, two_inputs):
    arch, weights, model = two_inputs
    out = tmp_path / "m.onnx"
    result = cli("export", weights, "--arch", arch, "--input-shape", "1,3,16,16", "--input-shape", "1,5:int64", "--dynamic", "0,2,3", "--output-names", "logits", "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    graph = onnx.load(out).graph
    inputs = {i.name: ([d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim], i.type.tensor_type.elem_type) for i in graph.input}
    assert inputs == {"image": (["batch", 3, "height", "width"], onnx.TensorProto.FLOAT), "tokens": (["batch", 5], onnx.TensorProto.INT64)}
    assert [o.name for o in graph.output] == ["logits"]
    report = json.loads(result.stdout)
    assert [d["name"] for d in report["inputs"]] == ["image", "tokens"] and report["outputs"] == ["logits"]
    image = torch.randn(4, 3, 24, 40)  # another batch, height and width than the check inputs
    tokens = torch.randint(0, 100, (4, 5))
    want = model(image, tokens).detach().numpy()
    got = _ort(out, {"image": image.numpy(), "tokens": tokens.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_export_default_frees_the_batch_and_says_which_dims_are_static(cli, tmp_path, two_inputs):
    arch, weights, model = two_inputs
    out = tmp_path / "m.onnx"
    result = cli("export", weights, "--arch", arch, "--input-shape", "2,3,16,16", "--input-shape", "2,5:int64", "-o", out)
    assert result.exit_code == 0, result.output
    assert "image (batch, 3, 16, 16) float32; tokens (batch, 5) int64; static dims: image 1, 2, 3; tokens 1" in result.stdout
    image, tokens = torch.randn(5, 3, 16, 16), torch.randint(0, 100, (5, 5))
    np.testing.assert_allclose(_ort(out, {"image": image.numpy(), "tokens": tokens.numpy()}), model(image, tokens).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_export_writes_the_opset_asked_for(cli, tmp_path, two_inputs):
    arch, weights, model = two_inputs
    out = tmp_path / "m13.onnx"
    result = cli("export", weights, "--arch", arch, "--input-shape", "2,3,16,16", "--input-shape", "2,5:int64", "--opset", "13", "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    written = onnx.load(out)
    assert next(o.version for o in written.opset_import if o.domain in ("", "ai.onnx")) == 13
    assert json.loads(result.stdout)["opset"] == 13
    image, tokens = torch.randn(2, 3, 16, 16), torch.randint(0, 100, (2, 5))
    np.testing.assert_allclose(_ort(out, {"image": image.numpy(), "tokens": tokens.numpy()}), model(image, tokens).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_fold_to_pt2_with_dynamic_height_and_width_runs_at_another_size(cli, tmp_path, two_inputs):
    """The issue's detector case: a fold checked at 16x16 must accept 24x40 when asked."""
    arch, weights, model = two_inputs
    out = tmp_path / "f.pt2"
    result = cli("fold", weights, "--arch", arch, "--input-shape", "1,3,16,16", "--input-shape", "1,5:int64", "--dynamic", "0,2,3", "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["input_dims"][0]["shape"] == ["batch", 3, "height", "width"] and report["input_dims"][1]["dtype"] == "int64"
    program = torch.export.load(out).module()
    image, tokens = torch.randn(3, 3, 24, 40), torch.randint(0, 100, (3, 5))
    torch.testing.assert_close(program(image, tokens), model(image, tokens), rtol=1e-4, atol=1e-5)


def test_fold_report_says_a_pt2_is_static_where_the_model_fixes_it(cli, tmp_path):
    """A flatten into a linear layer fixes height and width: the batch stays free, and the
    report lists the other dims as static."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    src = tmp_path / "flat.pt"
    torch.save(model, src)
    result = cli("fold", src, "--trust", "--input-shape", "2,3,8,8", "-o", tmp_path / "f.pt2", "-f", "json")
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["input_dims"]
    assert entry["shape"][1:] == [3, 8, 8] and isinstance(entry["shape"][0], str)
    refused = cli("fold", src, "--trust", "--input-shape", "2,3,8,8", "--dynamic", "0,2,3", "-o", tmp_path / "g.pt2")
    assert refused.exit_code == 2 and "does not allow dims 0,2,3 to vary" in refused.stderr and "Traceback" not in refused.output


@pytest.mark.parametrize(
    "args,message",
    [
        (("--input-shape", "1,5:int8"), "unknown dtype 'int8'"),
        (("--input-shape", "1,5", "--dynamic", "a"), "--dynamic 'a' is not a list of dim indices"),
        (("--input-shape", "1,5", "--dynamic", "4"), "no input has dim 4"),
    ],
)
def test_bad_shape_options_are_one_error(cli, tmp_path, args, message):
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).eval()
    torch.save(model, tmp_path / "m.pt")
    result = cli("fold", tmp_path / "m.pt", "--trust", *args, "-o", tmp_path / "f.pt2")
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("error:") == 1, result.output


def test_a_check_input_of_batch_1_still_gives_a_free_batch(cli, tmp_path):
    """The help's own example, --input-shape 1,...: the .pt2 used to accept batch 1 only."""
    from bnctl.models import sample_net

    from conftest import CHECKPOINTS

    out = tmp_path / "f.pt2"
    result = cli("fold", CHECKPOINTS / "sample.pt", "--arch", "bnctl.models:sample_net", "--input-shape", "1,3,32,32", "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout)["input_dims"][0]["shape"][0], str)
    model = sample_net()
    model.load_state_dict(torch.load(CHECKPOINTS / "sample.pt", weights_only=True))
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(torch.export.load(out).module()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


class BatchOfOne(nn.Module):
    """Flattens with view(1, 144): it takes batch 1 only."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).view(1, 4 * 6 * 6)


def test_a_model_that_takes_batch_1_only_folds_with_its_batch_static(cli, tmp_path):
    torch.save(BatchOfOne().eval(), tmp_path / "one.pt")
    result = cli("fold", tmp_path / "one.pt", "--trust", "--input-shape", "1,3,8,8", "-o", tmp_path / "f.pt2", "-f", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input_dims"][0]["shape"] == [1, 3, 8, 8]


@pytest.mark.parametrize(
    "args,message",
    [
        (("--output-names", "a,b"), "--output-names gave 2 names, the model has 1 output"),
        (("--input-names", "x"), "--input-names gave 1 name, the model takes 2 inputs"),
        (("--input-names", "a,a"), "needs distinct, non-empty names"),
    ],
)
def test_bad_names_are_one_error_and_nothing_is_written(cli, tmp_path, two_inputs, args, message):
    arch, weights, _ = two_inputs
    out = tmp_path / "m.onnx"
    result = cli("export", weights, "--arch", arch, "--input-shape", "2,3,16,16", "--input-shape", "2,5:int64", *args, "-o", out)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("error:") == 1, result.output
    assert not out.exists()


def test_fold_to_onnx_takes_names_and_a_pt2_refuses_them(cli, tmp_path, two_inputs):
    arch, weights, model = two_inputs
    out = tmp_path / "f.onnx"
    result = cli("fold", weights, "--arch", arch, "--input-shape", "2,3,16,16", "--input-shape", "2,5:int64", "--input-names", "pixels,ids", "--output-names", "scores", "-o", out)
    assert result.exit_code == 0, result.output
    graph = onnx.load(out).graph
    assert [i.name for i in graph.input] == ["pixels", "ids"] and [o.name for o in graph.output] == ["scores"]
    image, tokens = torch.randn(3, 3, 16, 16), torch.randint(0, 100, (3, 5))
    np.testing.assert_allclose(_ort(out, {"pixels": image.numpy(), "ids": tokens.numpy()}), model(image, tokens).detach().numpy(), rtol=1e-4, atol=1e-5)
    refused = cli("fold", weights, "--arch", arch, "--input-shape", "2,3,16,16", "--input-shape", "2,5:int64", "--output-names", "scores", "-o", tmp_path / "f.pt2")
    assert refused.exit_code == 2 and "name the inputs and outputs of an ONNX graph" in refused.stderr
    assert not (tmp_path / "f.pt2").exists()


EVEN_BATCH = '''
import torch
from torch import nn


class EvenBatch(nn.Module):
    """As in PyTorch's own fusion tests: x.view(-1, 36) merges two samples, so only even batches run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 5)
        self.bn = nn.BatchNorm1d(3)
        self.fc = nn.Linear(36, 4)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).view(-1, 36))
'''


@pytest.mark.parametrize("command, suffix", [("fold", "pt2"), ("fold", "onnx"), ("export", "onnx")])
def test_a_model_that_fixes_its_batch_is_written_with_a_static_batch_and_says_so(cli, tmp_path, command, suffix):
    from conftest import module_from

    module = module_from(tmp_path, "evennet.py", EVEN_BATCH, "evennet_reference")
    torch.manual_seed(0)
    model = module.EvenBatch()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    torch.save(model.state_dict(), tmp_path / "even.pt")
    out = tmp_path / f"out.{suffix}"
    result = cli(command, tmp_path / "even.pt", "--arch", f"{tmp_path / 'evennet.py'}:EvenBatch", "--input-shape", "2,3,10", "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    said = report.get("notes", []) + report.get("steps", [])
    assert any("rejects a batch of 3" in n and "static" in n for n in said), said
    shapes = report.get("input_dims") or report.get("inputs")
    assert shapes[0]["shape"] == [2, 3, 10]
    x = torch.randn(2, 3, 10)
    with torch.no_grad():
        want = model.eval()(x).numpy()
    if suffix == "onnx":
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    else:
        got = torch.export.load(out).module()(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
