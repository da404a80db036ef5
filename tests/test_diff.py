"""`bnctl diff`: shifts against numpy, every format against every other, the findings on models
built with each bug (and silence on healthy pairs), the CI gate, and the data drift against
statistics computed independently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bnctl.models import sample_net
from conftest import CHECKPOINTS, SAMPLES

ARCH = ("--arch", "bnctl.models:sample_net")


def _two_state_dicts(tmp_path, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = {}
    for name, c in (("x.bn", 6), ("y.bn", 4)):
        a.update(
            {
                f"{name}.weight": torch.rand(c, generator=g) + 0.5,
                f"{name}.bias": torch.randn(c, generator=g),
                f"{name}.running_mean": torch.randn(c, generator=g),
                f"{name}.running_var": torch.rand(c, generator=g) + 0.2,
                f"{name}.num_batches_tracked": torch.tensor(100),
            }
        )
    b = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).abs() if k.endswith("running_var") else v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 50 for k, v in a.items()}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    return a, b


def test_shifts_match_numpy(cli, tmp_path):
    a, b = _two_state_dicts(tmp_path)
    result = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "-f", "json")
    assert result.exit_code == 0, result.stderr
    layers = {l["name"]: l for l in json.loads(result.stdout)["steps"][0]["layers"]}
    for name in ("x.bn", "y.bn"):
        ma, va, mb, vb = (t[f"{name}.{k}"].double().numpy() for t, k in ((a, "running_mean"), (a, "running_var"), (b, "running_mean"), (b, "running_var")))
        shift = np.abs(mb - ma) / np.sqrt(va + 1e-5)
        log_ratio = np.log(vb + 1e-5) - np.log(va + 1e-5)
        got = layers[name]
        assert got["mean_shift_max"] == pytest.approx(shift.max(), rel=1e-12)
        assert got["mean_shift_mean"] == pytest.approx(shift.mean(), rel=1e-12)
        assert got["var_log_ratio_max"] == pytest.approx(np.abs(log_ratio).max(), rel=1e-12)
        assert got["var_log_ratio_mean"] == pytest.approx(log_ratio.mean(), rel=1e-12)
        assert got["weight_change_max"] == pytest.approx(np.abs(b[f"{name}.weight"].double().numpy() - a[f"{name}.weight"].double().numpy()).max(), rel=1e-12)
        assert got["num_batches_tracked_change"] == 50
        assert got["top_channels"][0] == int(np.argmax(shift)) and got["findings"] == []


OTHERS = ["sample.safetensors", "sample.ckpt", "sample.onnx", "sample.torchscript.pt", "sample.pt2"]


@pytest.mark.parametrize("other", OTHERS)
def test_a_checkpoint_against_its_copy_in_another_format_has_no_drift(cli, other):
    result = cli("diff", CHECKPOINTS / "sample.pt", CHECKPOINTS / other, "-f", "json", "--fail-above", "0")
    assert result.exit_code == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    step = doc["steps"][0]
    assert len(step["layers"]) == 10 and step["only_in_from"] == step["only_in_to"] == []
    assert doc["max_shift"] == 0 and all(l["var_log_ratio_max"] == 0 for l in step["layers"]) and doc["findings"] == []


def test_a_recalibrated_copy_shows_the_shifts_recalibrate_reported(cli, tmp_path):
    out = tmp_path / "r.pt"
    recal = cli("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", SAMPLES / "data_shifted", "-o", out, "--workers", "0", "-f", "json")
    reported = {l["name"]: l for l in json.loads(recal.stdout)["layers"]}
    result = cli("diff", CHECKPOINTS / "sample.pt", out, "-f", "json")
    doc = json.loads(result.stdout)
    for layer in doc["steps"][0]["layers"]:
        assert layer["mean_shift_mean"] == pytest.approx(reported[layer["name"]]["mean_shift"], rel=1e-5)
        assert np.exp(layer["var_log_ratio_mean"]) == pytest.approx(reported[layer["name"]]["var_ratio"], rel=1e-5)
    assert doc["findings"] == [] and "re-estimation" in doc["steps"][0]["notes"][0]
    assert cli("diff", CHECKPOINTS / "sample.pt", out, "--fail-above", "0.5").exit_code == 1


def _train(model, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.rand(8, 3, 32, 32, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_a_frozen_layer_that_kept_training_is_found_and_a_healthy_fine_tune_is_silent(cli, tmp_path):
    torch.manual_seed(0)
    model = sample_net()
    torch.save(model.state_dict(), tmp_path / "before.pt")
    frozen = model.layers[1].bn1
    frozen.weight.requires_grad_(False)
    frozen.bias.requires_grad_(False)  # "frozen", but left in train mode: its statistics move
    _train(model)
    torch.save(model.state_dict(), tmp_path / "after.pt")
    doc = json.loads(cli("diff", tmp_path / "before.pt", tmp_path / "after.pt", "-f", "json").stdout)
    assert {(f["layer"], f["kind"]) for f in doc["findings"]} == {("layers.1.bn1", "moved_while_frozen")}

    torch.manual_seed(0)
    healthy = sample_net()
    torch.save(healthy.state_dict(), tmp_path / "h0.pt")
    _train(healthy)
    torch.save(healthy.state_dict(), tmp_path / "h1.pt")
    assert json.loads(cli("diff", tmp_path / "h0.pt", tmp_path / "h1.pt", "-f", "json").stdout)["findings"] == []


def test_weights_averaged_without_re_estimating_the_statistics_is_found(cli, tmp_path):
    torch.manual_seed(0)
    a, b = _train(sample_net(), seed=1).state_dict(), _train(sample_net(), seed=2).state_dict()
    averaged = {k: (a[k] + b[k]) / 2 if v.is_floating_point() and "running" not in k else a[k] for k, v in a.items()}
    torch.save(a, tmp_path / "a.pt")
    torch.save(averaged, tmp_path / "avg.pt")
    doc = json.loads(cli("diff", tmp_path / "a.pt", tmp_path / "avg.pt", "-f", "json").stdout)
    assert {f["kind"] for f in doc["findings"]} == {"stale_statistics"}
    assert len(doc["findings"]) == 10


def test_a_counter_that_went_down_is_found(cli, tmp_path):
    a, b = _two_state_dicts(tmp_path)
    b = {k: torch.tensor(3) if k.endswith("num_batches_tracked") else v for k, v in b.items()}
    torch.save(b, tmp_path / "b.pt")
    doc = json.loads(cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "-f", "json").stdout)
    assert {f["kind"] for f in doc["findings"]} == {"counter_went_down"}


def test_names_that_differ_are_matched_by_order_and_leftovers_listed(cli, tmp_path):
    a, _ = _two_state_dicts(tmp_path)
    renamed = {k.replace("x.bn", "features.0").replace("y.bn", "features.1"): v for k, v in a.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    step = json.loads(cli("diff", tmp_path / "a.pt", tmp_path / "renamed.pt", "-f", "json").stdout)["steps"][0]
    assert [(l["name"], l["name_b"], l["matched_by"]) for l in step["layers"]] == [("x.bn", "features.0", "order"), ("y.bn", "features.1", "order")]
    extra = dict(a, **{f"z.bn.{k}": v for k, v in (("running_mean", torch.zeros(2)), ("running_var", torch.ones(2)))})
    torch.save(extra, tmp_path / "extra.pt")
    step = json.loads(cli("diff", tmp_path / "a.pt", tmp_path / "extra.pt", "-f", "json").stdout)["steps"][0]
    assert step["only_in_to"] == ["z.bn"] and len(step["layers"]) == 2


def test_a_sequence_gives_a_trend_and_every_format_and_the_plot(cli, tmp_path):
    _two_state_dicts(tmp_path)
    c = {k: v * 1.5 if v.is_floating_point() else v + 1 for k, v in torch.load(tmp_path / "b.pt").items()}
    torch.save(c, tmp_path / "c.pt")
    files = [tmp_path / n for n in ("a.pt", "b.pt", "c.pt")]
    table = cli("diff", *files, "--plot", tmp_path / "d.png")
    assert table.exit_code == 0 and "1->2" in table.stdout and "2->3" in table.stdout
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(cli("diff", *files, "-f", "json").stdout)
    assert len(doc["steps"]) == 2
    import io

    import pandas as pd

    frame = pd.read_csv(io.StringIO(cli("diff", *files, "-f", "csv").stdout))
    assert len(frame) == 4 and set(frame["name"]) == {"x.bn", "y.bn"}
    assert "| name" in cli("diff", *files, "-f", "markdown").stdout


def test_bad_input_is_one_error(cli, tmp_path):
    for args, words in (
        ((CHECKPOINTS / "sample.pt",), "two or more"),
        ((CHECKPOINTS / "sample.pt", CHECKPOINTS / "sample.onnx", "--data", SAMPLES / "data"), "one checkpoint"),
        ((CHECKPOINTS / "sample.pt", CHECKPOINTS / "sample.pt", "--key", "a", "--key", "b", "--key", "c"), "given 3 times"),
    ):
        result = cli("diff", *args)
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and words in result.stderr, result.stderr


def test_data_drift_of_the_first_layer_matches_statistics_computed_independently(cli):
    """stem.1 normalizes the first conv's output: its population statistics over the shifted
    images, computed here with the conv in eager PyTorch and the moments in numpy."""
    result = cli("diff", CHECKPOINTS / "sample.pt", *ARCH, "--data", SAMPLES / "data_shifted", "--workers", "0", "-f", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    layer = doc["steps"][0]["layers"][0]
    assert layer["name"] == "stem.1" and doc["samples"] == 160
    model = sample_net()
    model.load_state_dict(torch.load(CHECKPOINTS / "sample.pt", weights_only=True))
    images = sorted(p for p in (SAMPLES / "data_shifted").rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1) for p in images])
    with torch.no_grad():
        y = model.stem[0](x).double().numpy()
    values = y.transpose(1, 0, 2, 3).reshape(y.shape[1], -1)
    mean, var = values.mean(axis=1), values.var(axis=1, ddof=1)
    stored_mean, stored_var = model.stem[1].running_mean.double().numpy(), model.stem[1].running_var.double().numpy()
    shift = np.abs(mean - stored_mean) / np.sqrt(stored_var + 1e-5)
    assert len(images) == 160
    assert layer["mean_shift_max"] == pytest.approx(shift.max(), rel=1e-6)
    assert layer["var_log_ratio_mean"] == pytest.approx((np.log(var + 1e-5) - np.log(stored_var + 1e-5)).mean(), rel=1e-6)
    assert cli("diff", CHECKPOINTS / "sample.pt", *ARCH, "--data", SAMPLES / "data_shifted", "--workers", "0", "--fail-above", "1").exit_code == 1


def test_library_diff(tmp_path):
    import bnctl

    _two_state_dicts(tmp_path)
    result = bnctl.diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert len(result.steps) == 1 and result.max_shift > 0 and "DiffResult(2 files" in repr(result)
    with pytest.raises(ValueError):
        bnctl.diff(tmp_path / "a.pt")
