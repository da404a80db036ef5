"""Checkpoints as training loops leave them: torch.optim.swa_utils.AveragedModel state_dicts,
training checkpoints with a model and an EMA entry, and averaged models whose BN statistics
were never re-estimated. Models and files are made by torch's own code."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

import bnctl  # noqa: F401

ARCH = ("--arch", "bnctl.models:sample_net")


def _trained(seed: int = 0) -> nn.Module:
    """The sample architecture with statistics and weights as a few training steps leave them."""
    from bnctl.models import sample_net

    torch.manual_seed(seed)
    model = sample_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(8, 3, 32, 32)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _swa(model: nn.Module, re_estimate: bool) -> AveragedModel:
    """An AveragedModel as the SWA recipe builds it: averaged over a few later weights; with
    ``re_estimate``, update_bn afterwards, as it must be."""
    swa = AveragedModel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        loss = model(torch.randn(8, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        swa.update_parameters(model)
    if re_estimate:
        update_bn([torch.randn(8, 3, 32, 32) for _ in range(4)], swa)
    else:  # the buffers of the step it was created, as older torch and ignite's EMA (pytorch/ignite#2590) left them
        for m in swa.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    return swa


def test_an_averaged_model_state_dict_loads_into_the_arch(cli, tmp_path):
    from bnctl.models import sample_net

    torch.manual_seed(1)
    swa = _swa(sample_net(), re_estimate=True)
    path = tmp_path / "swa.pt"
    torch.save(swa.state_dict(), path)
    assert "n_averaged" in swa.state_dict()
    result = cli("fold", path, *ARCH, "--input-shape", "2,3,32,32", "-o", tmp_path / "f.pt2", "-f", "json")
    assert result.exit_code == 0, result.output
    assert any("n_averaged" in n for n in json.loads(result.stdout)["notes"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(torch.export.load(tmp_path / "f.pt2").module()(x).numpy(), swa.module.eval()(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("re_estimate", [False, True])
def test_an_averaged_model_whose_statistics_were_not_re_estimated_is_flagged(cli, tmp_path, re_estimate):
    from bnctl.models import sample_net

    torch.manual_seed(2)
    swa = _swa(sample_net(), re_estimate)  # built from a fresh model: its BN buffers are 0/1
    path = tmp_path / "swa.pt"
    torch.save(swa.state_dict(), path)
    doc = json.loads(cli("audit", path, "-f", "json").stdout)
    stale = [f for f in doc["findings"] if f["check"] == "BN110"]
    if re_estimate:
        assert stale == []
    else:
        assert stale and "n_averaged=3" in stale[0]["message"] and "recalibrate" in stale[0]["message"]


def test_every_model_entry_of_a_training_checkpoint_is_audited_and_named(cli, tmp_path):
    model = _trained()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.9)
        ema.get_submodule("stem.1").running_var[0] = float("nan")  # only the EMA entry is broken
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": {"state": {}, "param_groups": []}}, path)
    doc = json.loads(cli("audit", path, "-f", "json").stdout)
    files = {f["file"] for f in doc["files"]}
    assert files == {f"{path}[model]", f"{path}[model_ema]"}, files
    nan = [f for f in doc["findings"] if f["check"] == "BN101"]
    assert [f["file"] for f in nan] == [f"{path}[model_ema]"] and nan[0]["layer"] == "stem.1"
    text = cli("audit", path)
    assert f"{path}[model_ema]:stem.1: BN101" in text.stdout
    # --key audits the one entry asked for
    one = json.loads(cli("audit", path, "--key", "model", "-f", "json").stdout)
    assert [f["file"] for f in one["files"]] == [str(path)]


def test_an_ema_entry_with_the_model_s_own_buffers_is_flagged(cli, tmp_path):
    model = _trained()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.95).add_(0.01)  # the weights were averaged; the buffers were copied as they were
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, path)
    doc = json.loads(cli("audit", path, "-f", "json").stdout)
    stale = [f for f in doc["findings"] if f["check"] == "BN110"]
    assert len(stale) == 1 and stale[0]["file"] == f"{path}[ema]" and "the same as entry 'model'" in stale[0]["message"]


def test_eps_sensitivity_is_the_closed_form_and_eps_silences_it(cli, tmp_path):
    import re

    bn = nn.BatchNorm2d(6)
    var = np.array([2.0, 0.5, 1e-4, 3e-3, 0.0, 1.0])
    with torch.no_grad():
        bn.running_var.copy_(torch.from_numpy(var))
        bn.running_mean.uniform_(-1, 1)
    path = tmp_path / "ported.pt"
    torch.save({f"bn.{k}": v for k, v in bn.state_dict().items()}, path)
    doc = json.loads(cli("audit", path, "-f", "json").stdout)
    found = [f for f in doc["findings"] if f["check"] == "BN111"]
    assert len(found) == 1, doc["findings"]
    tf = float(re.search(r"up to ([0-9.]+)% with eps 0\.001", found[0]["message"]).group(1))
    want = np.abs(np.sqrt((var + 1e-5) / (var + 1e-3)) - 1).max() * 100  # the closed form, in numpy
    assert tf == pytest.approx(want, abs=0.05)
    assert "up to inf with eps 0" in found[0]["message"]  # a channel of variance 0 without eps
    beyond = int((np.abs(np.sqrt((var + 1e-5) / (var + 1e-3)) - 1) > 0.01).sum())
    assert f"({beyond} of 6 channels beyond 1%)" in found[0]["message"]
    quiet = json.loads(cli("audit", path, "--eps", "1e-3", "-f", "json").stdout)
    assert not any(f["check"] == "BN111" for f in quiet["findings"])
    # a file that records eps (TorchScript) is never flagged
    script = tmp_path / "bn.ts"
    torch.jit.save(torch.jit.script(nn.Sequential(bn).eval()), script)
    assert not any(f["check"] == "BN111" for f in json.loads(cli("audit", script, "-f", "json").stdout)["findings"])


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d, as timm writes it: weight standardization by F.batch_norm on the weight."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        weight = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return torch.nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d: fixed buffers, identity statistics after a Caffe2 conversion."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = StdConv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.frozen = FrozenBatchNorm2d(8)

    def forward(self, x):
        return self.frozen(self.bn(self.conv(x)))


def test_weight_standardization_and_frozen_identity_statistics_are_no_findings(cli, tmp_path):
    torch.manual_seed(3)
    model = StdNet().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    script, program = tmp_path / "std.ts", tmp_path / "std.pt2"
    torch.jit.save(torch.jit.script(model), script)
    torch.export.save(torch.export.export(model, (x,)), program)
    for path in (script, program):
        doc = json.loads(cli("audit", path, "-f", "json").stdout)
        codes = {f["check"] for f in doc["findings"]}
        assert not codes & {"BN201", "BN202", "BN203", "BN204", "BN401", "BN104"}, (path.name, doc["findings"])
        layers = json.loads(cli("inspect", path, "-f", "json").stdout)["layers"]
        assert "bn" in {row["name"] for row in layers} and not any(row["training"] for row in layers), layers


def test_recalibrate_key_ema_writes_the_entry_back_and_leaves_the_rest(cli, tmp_path):
    from conftest import SAMPLES

    model = _trained()
    ema = copy.deepcopy(model)
    for m in ema.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()  # an EMA whose statistics were never re-estimated
    path, out = tmp_path / "ckpt.pt", tmp_path / "fixed.pt"
    torch.save({"epoch": 7, "model": model.state_dict(), "ema": ema.state_dict()}, path)
    result = cli("recalibrate", path, *ARCH, "--key", "ema", "--data", SAMPLES / "data", "--workers", "0", "-o", out)
    assert result.exit_code == 0, result.output
    before, after = torch.load(path, weights_only=True), torch.load(out, weights_only=True)
    assert after["epoch"] == 7 and set(after) == set(before)
    for key, value in before["model"].items():  # the other entry, bit for bit
        assert torch.equal(after["model"][key], value), key
    changed = [k for k in before["ema"] if not torch.equal(after["ema"][k], before["ema"][k])]
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    audit = json.loads(cli("audit", out, "-f", "json").stdout)
    assert not any(f["check"] in ("BN104", "BN110") for f in audit["findings"])
    stale = json.loads(cli("audit", path, "-f", "json").stdout)
    assert any(f["check"] == "BN110" and f["file"] == f"{path}[ema]" for f in stale["findings"])


def test_with_data_statistics_far_from_what_the_weights_produce_are_flagged(cli, tmp_path):
    from conftest import CHECKPOINTS, SAMPLES

    healthy = json.loads(cli("audit", CHECKPOINTS / "sample.pt", *ARCH, "--data", SAMPLES / "data", "-f", "json").stdout)
    assert not any(f["check"] == "BN110" for f in healthy["findings"]), healthy["findings"]
    state = torch.load(CHECKPOINTS / "sample.pt", weights_only=True)
    for key in state:  # the trained weights with statistics that are not theirs (a model's copy, never re-estimated)
        if key.endswith("running_mean"):
            state[key] = torch.randn_like(state[key]) * 3
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(state[key]) * 20 + 5
    path = tmp_path / "copied.pt"
    torch.save(state, path)
    without = json.loads(cli("audit", path, *ARCH, "-f", "json").stdout)
    assert not any(f["check"] == "BN110" for f in without["findings"])  # nothing to tell it by without data
    doc = json.loads(cli("audit", path, *ARCH, "--data", SAMPLES / "data", "-f", "json").stdout)
    found = [f for f in doc["findings"] if f["check"] == "BN110"]
    assert len(found) == 1 and "samples of --data" in found[0]["message"], doc["findings"]


def test_a_program_with_a_static_batch_is_not_batch_dependent(cli, tmp_path):
    # torch.export fixed the batch at 2: single samples are refused by its guard, which says
    # nothing about batch dependence (BN302 compares a batch with its samples one by one)
    model = StdNet().eval()
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), path)
    doc = json.loads(cli("audit", path, "--trust", "--input-shape", "2,3,8,8", "-f", "json").stdout)
    assert not any(f["check"] == "BN302" for f in doc["findings"]), doc["findings"]
    assert "behaviour" in doc["files"][0]["checks"]
