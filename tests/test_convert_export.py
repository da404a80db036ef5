"""bnctl convert and bnctl export: round trips with identical eval outputs, GroupNorm, refusals,
and ONNX export of every sample model checked in ONNX Runtime against the original."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bnctl.ops.convert import FrozenBatchNorm, convert, largest_divisor
from bnctl.errors import InputError
from bnctl.models import sample_net

from conftest import CHECKPOINTS, ROOT

BUGGY = ROOT / "tests" / "buggy_models.py"
ARCH = ("--arch", "bnctl.models:sample_net")


def trained(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.3)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def sample(reference):
    model = sample_net()
    model.load_state_dict(reference)
    return model.eval()


MODELS = {
    "bn1d-2d": (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (4, 5)),
    "bn1d-3d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)), (4, 3, 9)),
    "bn2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)), (2, 3, 7, 7)),
    "bn3d": (lambda: nn.Sequential(nn.Conv3d(3, 6, 3), nn.BatchNorm3d(6)), (2, 3, 5, 5, 5)),
}


@pytest.mark.parametrize("name", [*MODELS, "sample"])
def test_round_trips_give_identical_eval_outputs(name, sample):
    if name == "sample":
        model, x = sample, torch.rand(3, 3, 32, 32)
    else:
        factory, shape = MODELS[name]
        model, x = trained(factory()), torch.randn(*shape)
    expected = model(x)
    original_classes = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    sync, report = convert(model, "syncbn")
    assert all(isinstance(m, nn.SyncBatchNorm) for m in sync.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)) and report.converted
    back, report = convert(sync, "batchnorm", inputs=(x,))
    assert [type(m) for m in back.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == original_classes
    assert torch.equal(back.eval()(x), expected)

    frozen, _ = convert(model, "frozen")
    assert any(isinstance(m, FrozenBatchNorm) for m in frozen.modules())
    assert not list(frozen.parameters()) or all(not isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    for m in frozen.modules():  # nothing in a frozen BN follows the mode
        if isinstance(m, FrozenBatchNorm):
            m.train()
    assert torch.equal(frozen(x), expected)
    thawed, report = convert(frozen, "batchnorm")  # no inputs: the frozen layer remembers its class
    assert [type(m) for m in thawed.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == original_classes
    assert torch.equal(thawed.eval()(x), expected)
    assert torch.equal(model(x), expected), "the input model was changed"


def test_syncbn_keeps_statistics_eps_momentum_requires_grad_and_mode():
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)))
    model[1].weight.requires_grad_(False)
    model[1].train()
    sync, _ = convert(model, "syncbn")
    bn = sync[1]
    assert bn.eps == 1e-3 and bn.momentum == 0.3 and bn.training and not bn.weight.requires_grad and bn.bias.requires_grad
    assert torch.equal(bn.running_var, model[1].running_var) and int(bn.num_batches_tracked) == int(model[1].num_batches_tracked)


def test_syncbn_back_needs_to_see_the_input_rank():
    sync, _ = convert(trained(MODELS["bn2d"][0]()), "syncbn")
    back, report = convert(sync, "batchnorm")  # the convolution next to each layer tells its rank
    assert all(c["to"] == "BatchNorm2d" for c in report.converted)
    alone, _ = convert(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), "syncbn")  # nothing tells
    with pytest.raises(InputError, match="input rank"):
        convert(alone, "batchnorm")


def test_groupnorm_of_the_sample_model_runs_and_has_no_bn_left(sample):
    x = torch.rand(2, 3, 32, 32)
    gn, report = convert(sample, "groupnorm", inputs=(x,), groups=32)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gn.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.modules()) == 10
    assert gn.stem[1].num_groups == 16 and gn.layers[2].bn1.num_groups == 24  # largest divisors of 16 and 48 <= 32
    assert torch.equal(gn.stem[1].weight, sample.stem[1].weight)
    assert gn(x).shape == (2, 4) and report.max_abs_error > 0
    assert "fine-tuning" in report.notes[0]
    assert largest_divisor(48, 32) == 24 and largest_divisor(7, 32) == 7 and largest_divisor(12, 5) == 4


def test_bn_subclass_with_its_own_forward_is_refused_by_name(cli, tmp_path):
    import buggy_models

    torch.save(buggy_models.bn_act().state_dict(), tmp_path / "w.pt")
    result = cli("convert", tmp_path / "w.pt", "--arch", f"{BUGGY}:bn_act", "--to", "syncbn", "-o", tmp_path / "o.pt")
    assert result.exit_code == 2 and "1 is a BNAct" in result.stderr and "would drop" in result.stderr
    assert not (tmp_path / "o.pt").exists()


def test_convert_cli_writes_a_loadable_module_and_a_state_dict(cli, tmp_path, sample):
    out = tmp_path / "frozen.pt"
    result = cli("convert", CHECKPOINTS / "sample.pt", *ARCH, "--to", "frozen", "--input-shape", "2,3,32,32", "-o", out, "-f", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["converted"]) == 10 and report["max_abs_error"] == 0.0
    loaded = torch.load(out, weights_only=False)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), sample(x))
    # inspect and audit read the frozen layers, and a frozen layer's mode is no finding
    inspected = json.loads(cli("inspect", out, "--trust", "-f", "json").stdout)
    assert {layer["kind"] for layer in inspected["layers"]} == {"FrozenBatchNorm"} and inspected["summary"]["flagged"] == 0
    assert cli("audit", out, "--trust").exit_code == 0
    sd = tmp_path / "sync_sd.pt"
    assert cli("convert", CHECKPOINTS / "sample.pt", *ARCH, "--to", "syncbn", "--as", "state-dict", "-o", sd).exit_code == 0
    state = torch.load(sd, weights_only=True)
    assert state.keys() == sample.state_dict().keys()
    # a .safetensors name writes safetensors (the state_dict builder every job shares), with the same tensors
    st = tmp_path / "sync_sd.safetensors"
    assert cli("convert", CHECKPOINTS / "sample.pt", *ARCH, "--to", "syncbn", "--as", "state-dict", "-o", st).exit_code == 0
    from safetensors.torch import load_file

    tensors = load_file(st)
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)
    unknown = cli("convert", CHECKPOINTS / "sample.pt", *ARCH, "--to", "layernorm", "-o", tmp_path / "x.pt")
    assert unknown.exit_code == 2 and "syncbn" in unknown.output and "groupnorm" in unknown.output


# --- export ---------------------------------------------------------------------------------


EXPORTS = [
    ("sample.pt", ARCH),
    ("sample.safetensors", ARCH),
    ("sample.ckpt", ARCH),
    ("sample.module.pt", ("--trust",)),
    ("sample.torchscript.pt", ("--trust",)),
    ("sample.pt2", ("--trust",)),
]


NETS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
"""


def test_a_module_bnctl_wrote_from_an_arch_file_loads_back_from_any_folder(tmp_path):
    """bnctl convert --arch path/nets.py:Net pickles classes of module `nets`; the file records
    where nets.py was, so that --trust loads it again from another folder without PYTHONPATH
    (and a second bnctl write keeps the record). Where nets.py is gone: one clean error."""
    import os
    import subprocess
    import sys

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "nets.py").write_text(NETS)
    code = f"import sys; sys.path.insert(0, {str(project)!r}); import nets, torch; torch.manual_seed(0); torch.save(nets.Net().state_dict(), {str(project / 'sd.pt')!r})"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def bnctl(*args, cwd):
        return subprocess.run([sys.executable, "-m", "bnctl", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)

    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
    shape = ("--input-shape", "2,3,16,16")
    for target in ("frozen", "groupnorm"):
        made = bnctl("convert", project / "sd.pt", "--arch", f"{project / 'nets.py'}:Net", "--to", target, *shape, "-o", project / f"{target}.pt", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    back = bnctl("convert", project / "frozen.pt", "--trust", "--to", "batchnorm", *shape, "-o", elsewhere / "bn.pt", cwd=elsewhere)
    assert back.returncode == 0, back.stderr
    for written in (project / "groupnorm.pt", elsewhere / "bn.pt"):  # the second write recorded nets.py too
        shown = bnctl("inspect", written, "--trust", "--format", "json", cwd=elsewhere)
        assert shown.returncode == 0, shown.stderr
    assert [row["kind"] for row in json.loads(shown.stdout)["layers"]] == ["BatchNorm2d"]
    sys.path.insert(0, str(project))  # torch's own reader, with nets importable, ignores the record
    earlier = sys.modules.pop("nets", None)  # another test's nets.py, imported in this process by --arch
    try:
        original, converted = torch.load(project / "sd.pt"), torch.load(elsewhere / "bn.pt", weights_only=False)
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("nets", None)
        if earlier is not None:
            sys.modules["nets"] = earlier
    for key, value in original.items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0)
    (project / "nets.py").rename(project / "moved.py")
    gone = bnctl("inspect", project / "frozen.pt", "--trust", cwd=elsewhere)
    assert gone.returncode == 2 and "Traceback" not in gone.stderr, gone.stderr
    assert gone.stderr.count("error:") == 1 and "nets.py" in gone.stderr and "gone" in gone.stderr and "tip:" in gone.stderr


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name,args", EXPORTS, ids=[e[0] for e in EXPORTS])
def test_every_sample_model_exports_and_onnx_runtime_matches(cli, tmp_path, sample, name, args, dynamic):
    out = tmp_path / "model.onnx"
    shape = () if name == "sample.pt2" else ("--input-shape", "2,3,32,32")
    flags = ("--dynamic-batch",) if dynamic else ()
    result = cli("export", CHECKPOINTS / name, *args, *shape, *flags, "-o", out, "-f", "json")
    if name == "sample.pt2" and dynamic:
        assert result.exit_code == 2 and "dynamic dims were chosen when it was exported" in result.stderr and not out.exists()
        return
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["written"] and report["bn_left"] == 0 and report["findings"] == []
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = 5 if dynamic else (1 if name == "sample.pt2" else 2)
    x = torch.rand(batch, 3, 32, 32)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, sample(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_export_reverts_syncbn_and_reports_it(cli, tmp_path, sample):
    sync, _ = convert(sample, "syncbn")
    torch.save(sync, tmp_path / "sync.pt")
    result = cli("export", tmp_path / "sync.pt", "--trust", "--input-shape", "2,3,32,32", "-o", tmp_path / "m.onnx", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert any("SyncBatchNorm reverted" in s for s in json.loads(result.stdout)["steps"])


def test_export_refuses_a_bn_that_stays_in_train_mode(cli, tmp_path):
    import buggy_models

    torch.save(buggy_models.keeps_bn_training().state_dict(), tmp_path / "w.pt")
    result = cli("export", tmp_path / "w.pt", "--arch", f"{BUGGY}:keeps_bn_training", "--input-shape", "2,3,8,8", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "bn is still in train mode after model.eval()" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_that_does_not_export_names_the_operator(cli, tmp_path):
    import buggy_models

    torch.save(buggy_models.histogram().state_dict(), tmp_path / "w.pt")
    result = cli("export", tmp_path / "w.pt", "--arch", f"{BUGGY}:histogram", "--input-shape", "2,3,8,8", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2, result.stdout
    assert "histc" in result.stderr.splitlines()[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_export_beyond_tolerance_exits_1_and_writes_nothing(cli, tmp_path):
    result = cli("export", CHECKPOINTS / "sample.pt", *ARCH, "--input-shape", "2,3,32,32", "--tolerance", "0", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "beyond the tolerance 0 (given with --tolerance)" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_groupnorm_never_makes_groups_of_one_value():
    """A BatchNorm1d over (N, C) as GroupNorm(C, C) normalizes each single value to 0: the
    output becomes its bias and the input is erased (opacus' converter does this)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
    x = torch.randn(6, 4)
    for inputs in ((x,), None):
        gn, report = convert(model, "groupnorm", inputs=inputs, groups=32)
        assert gn[1].num_groups == 4 and "2 values each" in report.converted[0]["note"]
        with torch.no_grad():
            out = gn(x)
        assert float(out.std(dim=0).max()) > 0.1  # the input still matters (groups of one value: std 0 everywhere)
    with pytest.raises(InputError, match="erases the input"):
        convert(nn.Sequential(nn.Linear(4, 1), nn.BatchNorm1d(1)).eval(), "groupnorm", inputs=(x,))


def test_each_converted_layer_reports_its_own_output_change(sample):
    """output_change of every GroupNorm layer against F.group_norm / F.batch_norm on the
    input that layer saw (captured here with a hook of our own); 0 for FrozenBatchNorm."""
    import torch.nn.functional as F

    x = torch.randn(2, 3, 32, 32)
    gn, report = convert(sample, "groupnorm", inputs=(x,), groups=32)
    seen = {}
    modules = dict(sample.named_modules())
    hooks = [modules[c["name"]].register_forward_pre_hook(lambda m, a, n=c["name"]: seen.setdefault(n, a[0].detach())) for c in report.converted]
    with torch.no_grad():
        sample.eval()(x)
    for h in hooks:
        h.remove()
    groups = {n: m.num_groups for n, m in gn.named_modules() if isinstance(m, nn.GroupNorm)}
    for entry in report.converted:
        bn, inp = modules[entry["name"]], seen[entry["name"]]
        old = F.batch_norm(inp, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        new = F.group_norm(inp, groups[entry["name"]], bn.weight, bn.bias, bn.eps)
        expected = float((new - old).abs().max() / old.abs().max())
        assert entry["output_change"] == pytest.approx(expected, rel=1e-5, abs=1e-7), entry["name"]
    _, frozen = convert(sample, "frozen", inputs=(x,))
    assert all(c["output_change"] < 1e-6 for c in frozen.converted)
