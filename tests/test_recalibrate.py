"""bnctl.recalibrate against statistics computed independently in numpy over the same data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnctl.ops.recalibrate import recalibrate

from conftest import CHECKPOINTS, ROOT, SAMPLES

ARCH = ("--arch", "bnctl.models:sample_net")


def np_bn_train(h: np.ndarray, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> np.ndarray:
    """A BN in train mode, in numpy: normalize with the batch's own (biased) statistics."""
    axes = tuple(i for i in range(h.ndim) if i != 1)
    shape = [1, -1] + [1] * (h.ndim - 2)
    mu, var = h.mean(axis=axes, keepdims=True), h.var(axis=axes, keepdims=True)
    w = bn.weight.detach().double().numpy().reshape(shape)
    b = bn.bias.detach().double().numpy().reshape(shape)
    return (h - mu) / np.sqrt(var + bn.eps) * w + b


def population(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance over every sample and position of all chunks (channel = axis 1)."""
    h = np.concatenate(chunks)
    axes = tuple(i for i in range(h.ndim) if i != 1)
    return h.mean(axis=axes), h.var(axis=axes, ddof=1)


class Net(nn.Module):
    """conv -> Dropout -> BN (momentum None) -> relu -> conv -> BN (momentum 0) -> pool -> BN1d;
    plus a BN no input reaches."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.bn1 = nn.BatchNorm2d(4, momentum=None)
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.bn2 = nn.BatchNorm2d(5, momentum=0.0)
        self.bn3 = nn.BatchNorm1d(5)
        self.unused = nn.BatchNorm2d(7)

    def forward(self, x):
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.drop(self.conv1(x))))))
        return self.bn3(h.mean((2, 3)))


def test_statistics_match_numpy_with_uneven_batches_dropout_momentum_and_an_unreached_bn():
    torch.manual_seed(0)
    model = Net()
    model.train()  # recalibrate must not let Dropout run: the model's own mode does not matter
    data = torch.randn(11, 3, 6, 6) * 2 + 1
    batches = [data[:4], data[4:10], data[10:]]  # uneven; the last holds one sample
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    unused_before = model.unused.running_var.clone()
    report = recalibrate(model, batches)

    # independent computation: numpy statistics of each BN's input, BNs in train mode per batch
    a, b, c = [], [], []
    with torch.no_grad():
        for x in batches:
            h1 = model.conv1(x).double().numpy()
            a.append(h1)
            h2 = model.conv2(torch.from_numpy(np.maximum(np_bn_train(h1, model.bn1), 0)).float()).double().numpy()
            b.append(h2)
            c.append(np_bn_train(h2, model.bn2).mean(axis=(2, 3)))
    for bn, chunks in ((model.bn1, a), (model.bn2, b), (model.bn3, c)):
        mean, var = population(chunks)
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 3
    assert model.bn1.momentum is None and model.bn2.momentum == 0.0  # momentum kept, not used
    assert report.unreached == ["unused"] and torch.equal(model.unused.running_var, unused_before)
    assert report.samples == 11 and report.batches == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items()), "weights changed"
    assert model.training and model.drop.training, "modes are restored"


def test_update_bn_is_wrong_where_bnctl_is_exact():
    """swa_utils.update_bn runs Dropout and weights batches equally: its variance is off."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    data = torch.randn(9, 6)
    loader = [data[:8], data[8:]]
    with torch.no_grad():
        mean, var = population([model[0](data).double().numpy()])
    recalibrate(model, loader)
    np.testing.assert_allclose(model[2].running_var.double().numpy(), var, rtol=1e-5)
    from torch.optim.swa_utils import update_bn

    other = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    other.load_state_dict(model.state_dict())
    with pytest.raises(ValueError):  # a last batch of one sample: BatchNorm1d in train mode refuses it
        update_bn(loader, other)
    update_bn([data[:8]], other)
    assert not np.allclose(other[2].running_var.double().numpy(), var, rtol=1e-2)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, y):
        return self.bn(self.a(x) + self.b(y))


def test_multi_input_samples_from_pt_files_as_args_and_kwargs(tmp_path):
    torch.manual_seed(2)
    model = TwoInputs()
    xs, ys = torch.randn(7, 3), torch.randn(7, 2)
    for i in range(7):
        sample = (xs[i], ys[i]) if i % 2 else {"x": xs[i], "y": ys[i]}
        torch.save(sample, tmp_path / f"{i}.pt")
    from bnctl.io.data import Preprocess, loader, sample_files

    files = sample_files(tmp_path)
    tuples = [f for f in files if int(f.stem) % 2]
    dicts = [f for f in files if not int(f.stem) % 2]
    batches = [b for group in (tuples, dicts) for b, _ in loader(group, Preprocess(), 3, 0)]
    report = recalibrate(model, batches)
    with torch.no_grad():
        mean, var = population([(model.a(xs) + model.b(ys)).double().numpy()])
    np.testing.assert_allclose(model.bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.bn.running_var.double().numpy(), var, rtol=1e-5)
    assert report.samples == 7


# --- the command line -----------------------------------------------------------------------


def accuracy(checkpoint: Path, folder: Path) -> float:
    """samples/evaluate.py's accuracy (the demo's), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate", SAMPLES / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.accuracy(checkpoint, folder)


def test_recalibrating_on_the_shifted_folder_restores_accuracy(cli, tmp_path):
    out = tmp_path / "recal.pt"
    result = cli("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", SAMPLES / "data_shifted", "-o", out, "--workers", "0", "-f", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 160 and len(report["layers"]) == 10 and report["unreached"] == []
    assert report["layers"][0]["name"] == "stem.1" and report["layers"][0]["var_ratio"] < 0.5  # darker, flatter input
    before = accuracy(CHECKPOINTS / "sample.pt", SAMPLES / "data_shifted")
    after = accuracy(out, SAMPLES / "data_shifted")
    assert after >= 0.95 > before


def test_output_keeps_the_input_format(cli, tmp_path):
    ckpt = tmp_path / "r.ckpt"
    assert cli("recalibrate", CHECKPOINTS / "sample.ckpt", *ARCH, "--data", SAMPLES / "data_shifted", "-o", ckpt, "--workers", "0").exit_code == 0
    whole = torch.load(ckpt, weights_only=True)
    original = torch.load(CHECKPOINTS / "sample.ckpt", weights_only=True)
    assert whole.keys() == original.keys() and whole["epoch"] == original["epoch"]
    assert whole["state_dict"].keys() == original["state_dict"].keys()
    assert not torch.equal(whole["state_dict"]["model.stem.1.running_var"], original["state_dict"]["model.stem.1.running_var"])
    assert torch.equal(whole["state_dict"]["model.stem.0.weight"], original["state_dict"]["model.stem.0.weight"])
    safe = tmp_path / "r.safetensors"
    assert cli("recalibrate", CHECKPOINTS / "sample.safetensors", *ARCH, "--data", SAMPLES / "data_shifted", "-o", safe, "--workers", "0").exit_code == 0
    from safetensors import safe_open

    with safe_open(str(safe), "pt") as f:
        assert f.metadata() == {"arch": "bnctl.models:sample_net"}


def test_unreadable_files_are_skipped_and_counted(cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, f in enumerate(sorted((SAMPLES / "data").rglob("*.png"))[:6]):
        (data / f"{i}.png").write_bytes(f.read_bytes())
    (data / "broken.png").write_bytes(b"not an image")
    result = cli("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", data, "-o", tmp_path / "o.pt", "--workers", "0", "-f", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 6 and report["notes"] == ["1 unreadable files skipped"]


def test_until_stable_stops_early(cli, tmp_path):
    result = cli("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", SAMPLES / "data", "-o", tmp_path / "o.pt", "--batch-size", "8", "--until-stable", "0.2", "--workers", "0", "-f", "json")
    report = json.loads(result.stdout)
    assert report["stopped_early"] and 24 <= report["samples"] < 160


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("empty", (), "no image or tensor files"),
        ("garbage", (), "none of its 2 files could be read"),
        ("arrays", (), "rejects samples of shape 2x4x8x8"),
        ("images", ("--grayscale",), "rejects samples of shape 2x1x32x32"),
    ],
)
def test_bad_data_is_one_error_exit_2_and_nothing_written(cli, tmp_path, setup, args, message):
    data = tmp_path / "data"
    data.mkdir()
    if setup == "garbage":
        (data / "a.png").write_bytes(b"x")
        (data / "b.npy").write_bytes(b"y")
    if setup == "arrays":
        for i in range(2):
            np.save(data / f"{i}.npy", np.zeros((4, 8, 8), dtype=np.float32))
    if setup == "images":
        for i, f in enumerate(sorted((SAMPLES / "data").rglob("*.png"))[:2]):
            (data / f"{i}.png").write_bytes(f.read_bytes())
    out = tmp_path / "out.pt"
    result = cli("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", data, "-o", out, "--workers", "0", *args)
    assert result.exit_code == 2, result.stdout
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert not out.exists()


VOLUME_NETS = """
import torch
from torch import nn


class Volumes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3)
        self.bn = nn.BatchNorm3d(3)

    def features(self, x):
        return self.conv(x)

    def forward(self, x):
        return self.bn(self.features(x))


class Slices(Volumes):  # 4-D batches (N, D, H, W) lifted to one channel: a 5-D weight, 4-D inputs
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3)

    def features(self, x):
        return self.conv(x.unsqueeze(1))


class Signals(Volumes):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.bn = nn.BatchNorm1d(3)
"""


@pytest.mark.parametrize("name,shape", [("Volumes", (2, 5, 6, 7)), ("Slices", (5, 6, 7)), ("Signals", (2, 9))])
def test_conv3d_and_conv1d_models_recalibrate_exactly(cli, tmp_path, name, shape):
    """channels_last is for 4-D tensors: a BatchNorm3d model on (C, D, H, W) volumes, one whose
    Conv3d sees 4-D batches lifted to 5-D, and a BatchNorm1d one on (C, L) signals recalibrate
    to the population statistics of the BN's input, in numpy, instead of crashing on the
    memory format."""
    import importlib.util

    arch = tmp_path / "volume_nets.py"
    arch.write_text(VOLUME_NETS)
    spec = importlib.util.spec_from_file_location("volume_nets_reference", arch)
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    torch.manual_seed(0)
    model = getattr(nets, name)().eval()
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    samples = [(rng.normal(size=shape) * 2 + 1).astype(np.float32) for _ in range(7)]
    for i, sample in enumerate(samples):
        np.save(data / f"{i}.npy", sample)
    out = tmp_path / "out.pt"
    result = cli("recalibrate", weights, "--arch", f"{arch}:{name}", "--data", data, "-o", out, "--batch-size", "3", "--workers", "0", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 7
    with torch.no_grad():
        h = model.features(torch.from_numpy(np.stack(samples))).double().numpy()
    mean, var = population([h])
    state = torch.load(out, weights_only=True)
    np.testing.assert_allclose(state["bn.running_mean"].double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["bn.running_var"].double().numpy(), var, rtol=1e-5, atol=1e-6)
    assert torch.equal(state["conv.weight"], model.conv.weight) and state["conv.weight"].is_contiguous()


def test_model_without_batchnorm_and_torchscript_are_refused(cli, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), plain)
    result = cli("recalibrate", plain, "--trust", "--data", SAMPLES / "data", "-o", tmp_path / "o.pt")
    assert result.exit_code == 2 and "no BatchNorm layer" in result.stderr
    script = cli("recalibrate", CHECKPOINTS / "sample.torchscript.pt", "--data", SAMPLES / "data", "-o", tmp_path / "o.pt")
    assert script.exit_code == 2 and "only with --trust" in script.stderr  # TorchScript is a program
    script = cli("recalibrate", CHECKPOINTS / "sample.torchscript.pt", "--trust", "--data", SAMPLES / "data", "-o", tmp_path / "o.pt")
    assert script.exit_code == 2 and "needs an eager PyTorch model" in script.stderr
    assert not (tmp_path / "o.pt").exists()


def test_torchrun_two_processes_give_the_single_process_statistics(tmp_path):
    common = [str(CHECKPOINTS / "sample.pt"), *ARCH, "--data", str(SAMPLES / "data_shifted"), "--batch-size", "16", "--workers", "0", "-f", "json"]
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "bnctl", "recalibrate", *common, "-o", str(single)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port, "-m", "bnctl", "recalibrate", *common, "-o", str(double)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads(two.stdout[two.stdout.index("{") :])
    assert report["world_size"] == 2 and report["samples"] == 160
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    for key in a:
        if "running" in key:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a[key], b[key]), key
