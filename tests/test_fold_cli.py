"""``bnctl fold`` end to end: every sample format in, every output format out, each written
file read back with PyTorch / ONNX Runtime and compared with the original sample model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from bnctl.models import sample_net

from conftest import CHECKPOINTS, SAMPLES

ARCH = ("--arch", "bnctl.models:sample_net")
SHAPE = ("--input-shape", "2,3,32,32")


@pytest.fixture(scope="module")
def original(reference):
    model = sample_net()
    model.load_state_dict(reference)
    return model.eval()


def ort_run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def load_output(path, fmt):
    """A callable for the written file, loaded by the library that owns the format."""
    if fmt == "pt2":
        return torch.export.load(path).module()
    if fmt == "torchscript":
        return torch.jit.load(path)
    if fmt == "module":
        return torch.load(path, weights_only=False)
    if fmt == "state-dict":
        model = sample_net()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    return lambda x: torch.from_numpy(ort_run(path, x.numpy()))


def count_bn(path, fmt) -> int:
    if fmt == "onnx":
        return sum(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
    if fmt == "pt2":
        return sum("batch_norm" in str(n.target) for n in torch.export.load(path).graph.nodes)
    return -1


CASES = [
    ("sample.pt", ARCH + SHAPE, "pt2"),
    ("sample.safetensors", ARCH + SHAPE, "state-dict"),
    ("sample.ckpt", ARCH + SHAPE, "onnx"),
    ("sample.torchscript.pt", ("--trust",) + SHAPE, "torchscript"),
    ("sample.pt2", ("--trust",), "pt2"),
    ("sample.onnx", (), "onnx"),
    ("sample.module.pt", ("--trust",) + SHAPE, "module"),
]


@pytest.mark.parametrize("name,args,fmt", CASES, ids=[c[0] for c in CASES])
def test_every_sample_format_folds_and_the_written_file_computes_the_same(cli, tmp_path, original, name, args, fmt):
    out = tmp_path / f"folded.{ {'pt2': 'pt2', 'onnx': 'onnx'}.get(fmt, 'pt') }"
    result = cli("fold", CHECKPOINTS / name, "-o", out, "--to", fmt, "--format", "json", *args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["folded"]) == 10 and report["skipped"] == [] and report["written"]
    assert {"bn": "layers.1.shortcut.1", "into": "layers.1.shortcut.0"}.items() <= report["folded"][5].items()
    assert report["max_abs_error"] < 1e-4
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_output(out, fmt)(x), original(x), rtol=1e-4, atol=1e-5)
    if fmt in ("pt2", "onnx"):
        assert count_bn(out, fmt) == 0


def test_data_folder_gives_the_check_inputs(cli, tmp_path):
    out = tmp_path / "f.pt2"
    result = cli("fold", CHECKPOINTS / "sample.pt", *ARCH, "--data", SAMPLES / "data", "-o", out, "-f", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["inputs"].startswith("(16, 3, 32, 32)")  # then the sizes the dynamic batch was checked at too
    assert report["input_dims"][0]["shape"][1:] == [3, 32, 32]


def test_table_output_names_the_pairs_and_the_file(cli, tmp_path):
    out = tmp_path / "f.ts"
    result = cli("fold", CHECKPOINTS / "sample.torchscript.pt", "--trust", *SHAPE, "-o", out)
    assert result.exit_code == 0
    assert "layers.2.shortcut.1" in result.stdout and "Folded 10 of 10" in result.stdout
    assert out.exists()


# --- bad input: exit 2, one error line, nothing written ------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        ((CHECKPOINTS / "sample.pt", *ARCH), "needs example inputs"),
        ((CHECKPOINTS / "sample.pt", *SHAPE), "needs the model it belongs to"),
        ((CHECKPOINTS / "sample.pt", *ARCH, "--input-shape", "2,5,32,32"), "rejects inputs of shape 2x5x32x32"),
        ((CHECKPOINTS / "sample.pt", *ARCH, "--input-shape", "2,three"), "is not a shape"),
        ((CHECKPOINTS / "sample.onnx", "--to", "pt2"), "can only be written as ONNX"),
        ((CHECKPOINTS / "sample.pt2", "--trust", "--input-shape", "4,3,32,32"), "rejects inputs"),
        ((CHECKPOINTS / "sample.pt2",), "a program: folding loads and runs it, which bnctl does only with --trust"),
        ((CHECKPOINTS / "sample.torchscript.pt", *SHAPE), "a program: folding loads and runs it, which bnctl does only with --trust"),
    ],
)
def test_bad_input_is_one_error_and_exit_2(cli, tmp_path, args, message):
    out = tmp_path / "out.pt2"
    result = cli("fold", *args, "-o", out)
    assert result.exit_code == 2, result.stdout
    assert result.stderr.startswith("error: ") and message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_input_is_never_overwritten(cli, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes((CHECKPOINTS / "sample.onnx").read_bytes())
    before = src.read_bytes()
    result = cli("fold", src, "-o", src)
    assert result.exit_code == 2 and "refusing to overwrite" in result.stderr
    assert src.read_bytes() == before


def test_beyond_tolerance_exits_1_and_writes_nothing(cli, tmp_path):
    out = tmp_path / "f.pt2"
    result = cli("fold", CHECKPOINTS / "sample.pt", *ARCH, *SHAPE, "--tolerance", "0", "-o", out)
    assert result.exit_code == 1
    assert "beyond the tolerance 0 (given with --tolerance)" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


# --- hand-built ONNX graphs -------------------------------------------------------------


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _bn_inits(prefix, c, rng):
    return [
        _init(f"{prefix}.weight", rng.normal(size=c)),
        _init(f"{prefix}.bias", rng.normal(size=c)),
        _init(f"{prefix}.running_mean", rng.normal(size=c)),
        _init(f"{prefix}.running_var", rng.uniform(0.2, 2, size=c)),
    ]


def _bn(prefix, x, y):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")], [y], epsilon=1e-3)


def test_onnx_conv_transpose_gemm_and_bn_before_conv_fold(cli, tmp_path):
    """ConvTranspose+BN (ONNX optimizers leave it), BN before an unpadded Conv, Gemm+BN;
    a BN before a zero-padded Conv is kept."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "ct.weight"], ["a"], strides=[2, 2], group=2),
        _bn("bn1", "a", "b"),
        helper.make_node("Relu", ["b"], ["c"]),
        _bn("bn2", "c", "d"),
        helper.make_node("Conv", ["d", "conv.weight", "conv.bias"], ["e"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["e"], ["f"]),
        _bn("bn3", "f", "g"),
        helper.make_node("Conv", ["g", "pad.weight"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["h"], ["i"]),
        helper.make_node("Flatten", ["i"], ["j"]),
        helper.make_node("Gemm", ["j", "fc.weight", "fc.bias"], ["k"], transB=1, alpha=0.5),
        _bn("bn4", "k", "y"),
    ]
    inits = [
        _init("ct.weight", rng.normal(size=(4, 3, 3, 3))),
        _init("conv.weight", rng.normal(size=(5, 6, 3, 3))),
        _init("conv.bias", rng.normal(size=5)),
        _init("pad.weight", rng.normal(size=(5, 5, 3, 3))),
        _init("fc.weight", rng.normal(size=(7, 5))),
        _init("fc.bias", rng.normal(size=7)),
        *_bn_inits("bn1", 6, rng),
        *_bn_inits("bn2", 6, rng),
        *_bn_inits("bn3", 5, rng),
        *_bn_inits("bn4", 7, rng),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    src, out = tmp_path / "hand.onnx", tmp_path / "folded.onnx"
    onnx.save(model, src)
    result = cli("fold", src, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert {(f["bn"], f["into"], f["side"]) for f in report["folded"]} == {("bn1", "ct", "after"), ("bn2", "conv", "before"), ("bn4", "fc", "after")}
    assert "pads with zeros" in report["skipped"][0]["reason"]
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 1
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, x), ort_run(src, x), rtol=1e-4, atol=1e-4)


def test_onnx_bn_with_statistics_from_a_graph_input_is_kept_with_a_reason(cli, tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[1, 1]), helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["y"])]
    inits = [_init("w", rng.normal(size=(3, 3, 1, 1))), _init("s", np.ones(3)), _init("b", np.zeros(3)), _init("m", np.zeros(3))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]), helper.make_tensor_value_info("v", TensorProto.FLOAT, [3])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    src = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), src)
    result = cli("fold", src, "-o", tmp_path / "out.onnx", "--input-shape", "1,3,4,4", "--input-shape", "3", "-f", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["folded"] == [] and "v" in report["skipped"][0]["reason"] and "run time" in report["skipped"][0]["reason"]
    out = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in out.graph.node] == ["Conv", "BatchNormalization"]
    feeds = {"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32), "v": np.full(3, 4.0, np.float32)}
    same = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for p in (src, tmp_path / "out.onnx")]
    np.testing.assert_allclose(same[0], same[1], rtol=1e-6)


def test_an_onnx_graph_whose_only_symbolic_dim_is_the_batch_is_checked_at_batch_1(cli, tmp_path):
    model = onnx.load(CHECKPOINTS / "sample.onnx")
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_value")
    dim.dim_param = "batch"
    onnx.save(model, tmp_path / "sym.onnx")
    result = cli("fold", tmp_path / "sym.onnx", "-o", tmp_path / "f.onnx", "-f", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["inputs"] == "(1, 3, 32, 32)" and any("symbolic batch size" in n for n in report["notes"])
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)  # the written graph keeps the symbolic batch
    got, want = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0] for p in (tmp_path / "f.onnx", tmp_path / "sym.onnx"))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --- TorchScript: folded on its graph ------------------------------------------------------


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_folds_on_its_graph_traced_or_scripted(cli, tmp_path, original, how):
    """A traced module has no eps attribute (it lives in the code); both kinds fold with
    torch.jit.freeze, every BN of the sample net leaves the graph, and the written module
    computes what the original does."""
    x = torch.randn(2, 3, 32, 32)
    program = torch.jit.trace(original, x) if how == "trace" else torch.jit.script(original)
    src, out = tmp_path / f"{how}.pt", tmp_path / "folded.pt"
    torch.jit.save(program, src)
    result = cli("fold", src, "--trust", *SHAPE, "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["path"] == "torchscript" and report["bn_after"] == 0 and report["skipped"] == []
    assert {f["bn"] for f in report["folded"]} == {n for n, m in original.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    folded = torch.jit.load(out)
    assert not [n for n in folded.graph.nodes() if n.kind() == "aten::batch_norm"]
    y = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(folded(y), original(y), rtol=1e-5, atol=1e-5)


def test_a_traced_module_to_a_state_dict_keeps_each_bn_with_a_reason(cli, tmp_path, original):
    src = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(original, torch.randn(1, 3, 32, 32)), src)
    result = cli("fold", src, "--trust", *SHAPE, "-o", tmp_path / "w.safetensors", "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["folded"] == [] and report["skipped"]
    assert all("--to torchscript" in s["reason"] for s in report["skipped"])


def test_dtype_float16_folds_what_fits_and_keeps_what_would_overflow(cli, tmp_path):
    """--dtype float16 on a float32 model: bn 4's folded weights would pass 65504 (torch.fx's
    fuse writes inf there); it is kept with the reason, bn 1 folds, the written program
    matches the float16 model."""
    from buggy_models import overflows_float16

    model = overflows_float16()
    torch.save(model, tmp_path / "m.pt")
    out = tmp_path / "half.pt2"
    result = cli("fold", tmp_path / "m.pt", "--trust", "--input-shape", "2,3,10,10", "--dtype", "float16", "-o", out, "-f", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [f["bn"] for f in report["folded"]] == ["1"] and report["skipped"][0]["bn"] == "4" and "65504" in report["skipped"][0]["reason"]
    assert report["tolerance"] == 1e-2 and report["input_dims"][0]["dtype"] == "float16"
    program = torch.export.load(out).module()
    x = torch.randn(2, 3, 10, 10).half()
    want, got = model.half()(x).double(), program(x).double()
    assert torch.isfinite(got).all() and float((got - want).abs().max() / want.abs().max()) <= 1e-2
    onnx_refused = cli("fold", CHECKPOINTS / "sample.onnx", "--dtype", "float16", "-o", tmp_path / "x.onnx")
    assert onnx_refused.exit_code == 2 and "--dtype casts a PyTorch module" in onnx_refused.stderr
