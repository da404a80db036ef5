"""Summaries against numpy, and every flag: one case that triggers it, one that does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnctl.core import layers, stats
from bnctl.core.registry import FLAGS
from bnctl.core.layers import BNLayer
from bnctl.io import checkpoint
from conftest import BROKEN, CHECKPOINTS


def healthy(c: int = 8, **overrides) -> BNLayer:
    g = torch.Generator().manual_seed(0)
    fields = dict(
        name="bn",
        kind="BatchNorm2d",
        num_features=c,
        eps=1e-5,
        momentum=0.1,
        averaging="ema",
        training=False,
        track_running_stats=True,
        weight=torch.rand(c, generator=g) + 0.5,
        bias=torch.randn(c, generator=g),
        running_mean=torch.randn(c, generator=g),
        running_var=torch.rand(c, generator=g) + 0.1,
        num_batches_tracked=100,
    )
    fields.update(overrides)
    return BNLayer(**fields)


def flags_of(layer: BNLayer) -> list[str]:
    return stats.summarize(layer)["flags"]


def test_healthy_layer_has_no_flags():
    assert flags_of(healthy()) == []


def test_summaries_match_numpy(reference):
    for row in stats.rows(layers.from_state_dict(reference)):
        mean = reference[f"{row['name']}.running_mean"].numpy().astype(np.float64)
        var = reference[f"{row['name']}.running_var"].numpy().astype(np.float64)
        w = reference[f"{row['name']}.weight"].numpy().astype(np.float64)
        assert row["mean_absmax"] == pytest.approx(np.abs(mean).max(), rel=1e-12)
        assert (row["var_min"], row["var_max"]) == (pytest.approx(var.min()), pytest.approx(var.max()))
        assert row["weight_absmin"] == pytest.approx(np.abs(w).min())
        assert row["scale_max"] == pytest.approx((np.abs(w) / np.sqrt(var + 1e-5)).max())


def _with(tensor_name: str, values):
    layer = healthy()
    t = getattr(layer, tensor_name).clone()
    for index, value in values.items():
        t[index] = value
    setattr(layer, tensor_name, t)
    return layer


TRIGGERS = {
    "nonfinite": lambda: _with("running_var", {2: float("nan")}),
    "negative_var": lambda: _with("running_var", {1: -0.5}),
    "var_below_eps": lambda: _with("running_var", {3: 1e-7}),
    "never_updated": lambda: healthy(running_mean=torch.zeros(8), running_var=torch.ones(8)),
    "no_running_stats": lambda: healthy(running_mean=None, running_var=None, track_running_stats=False, num_batches_tracked=None),
    "dead_channels": lambda: _with("weight", {0: 0.0, 5: 1e-9}),
    "fp16_risk": lambda: _with("running_mean", {0: 1e5}),
    "momentum_zero": lambda: healthy(momentum=0.0),
    "train_mode": lambda: healthy(training=True),
    "unmaterialized": lambda: BNLayer(name="lazy", kind="LazyBatchNorm2d", num_features=0, materialized=False),
    "bad_tensor": lambda: layers.usable(healthy(weight=torch.ones(5))),
    "fp16_precision": lambda: healthy(running_var=torch.full((8,), 1e-6), eps=1e-6),
    "eps_sensitive": lambda: healthy(eps=None, running_var=torch.full((8,), 1e-4)),
}

# a near miss for each flag: the same kind of change, on the healthy side of the line
NEAR_MISSES = {
    "nonfinite": lambda: _with("running_var", {2: 3e38}),
    "negative_var": lambda: _with("running_var", {1: 0.0 + 1e-4}),
    "var_below_eps": lambda: _with("running_var", {3: 2e-5}),
    "never_updated": lambda: healthy(running_mean=torch.zeros(8), running_var=torch.full((8,), 1.0 + 1e-6)),
    "no_running_stats": lambda: healthy(track_running_stats=True),
    "dead_channels": lambda: _with("weight", {0: 1e-4}),
    # |mean| 6e4 fits float16, and so does the folded shift: 6e4 * 0.5 / sqrt(1 + eps)
    "fp16_risk": lambda: healthy(running_mean=torch.full((8,), 6e4), weight=torch.full((8,), 0.5), running_var=torch.ones(8), bias=torch.zeros(8)),
    "momentum_zero": lambda: healthy(momentum=None, averaging="cumulative"),
    "train_mode": lambda: healthy(training=None),
    "unmaterialized": lambda: healthy(),
    "bad_tensor": lambda: layers.usable(healthy(weight=torch.ones(8))),
    "fp16_precision": lambda: healthy(running_var=torch.full((8,), 1e-3), eps=1e-5),
    # eps unknown, variances of 0.06 and up: 1e-3 instead of 1e-5 moves outputs by < 1%
    "eps_sensitive": lambda: healthy(eps=None, running_var=torch.full((8,), 0.06)),
}


def test_every_flag_has_a_trigger_and_a_near_miss():
    assert set(TRIGGERS) == set(FLAGS) == set(NEAR_MISSES)


@pytest.mark.parametrize("flag", FLAGS)
def test_flag_triggers(flag):
    assert flag in flags_of(TRIGGERS[flag]())


@pytest.mark.parametrize("flag", FLAGS)
def test_flag_near_miss_is_silent(flag):
    assert flag not in flags_of(NEAR_MISSES[flag]())


def test_never_updated_is_judged_by_values_not_the_counter():
    converted = checkpoint.load(CHECKPOINTS / "converted_zero_counter.pt").layers()
    assert all(l.num_batches_tracked == 0 for l in converted)
    assert all(not row["flags"] for row in stats.rows(converted))
    fresh_but_counted = healthy(running_mean=torch.zeros(8), running_var=torch.ones(8), num_batches_tracked=620)
    row = stats.summarize(fresh_but_counted)
    assert row["flags"] == ["never_updated"] and "num_batches_tracked=620" in row["details"][0]


def test_var_below_eps_uses_the_layers_eps_or_says_it_assumed_one():
    assert "var_below_eps" in flags_of(healthy(eps=1e-3, running_var=torch.full((8,), 5e-4)))
    assert "var_below_eps" not in flags_of(healthy(eps=1e-5, running_var=torch.full((8,), 5e-4)))
    unknown = stats.summarize(healthy(eps=None, running_var=torch.full((8,), 5e-6)))
    assert "var_below_eps" in unknown["flags"] and "does not record eps" in " ".join(unknown["details"])


def test_fp16_risk_from_the_folded_scale():
    # statistics fit in float16, but |weight| / sqrt(var + eps) = 10 / sqrt(1e-9 + 1e-9) ~ 2.2e5 does not
    layer = healthy(eps=1e-9, weight=torch.full((8,), 10.0), running_var=torch.full((8,), 1e-9))
    row = stats.summarize(layer)
    assert "fp16_risk" in row["flags"] and "folded scale" in " ".join(row["details"])


def test_nan_is_reported_not_hidden():
    row = stats.summarize(_with("running_var", {2: float("nan")}))
    assert np.isnan(row["var_max"]) and np.isnan(row["var_min"])


def test_missing_tensors_summarize_to_none():
    row = stats.summarize(healthy(weight=None, bias=None))
    assert row["weight_absmin"] is None and row["bias_absmax"] is None and row["flags"] == []


@pytest.mark.parametrize(
    "name,flag,layers_flagged",
    [
        ("nan_stats.pt", "nonfinite", ["layers.2.bn2"]),
        ("never_updated.pt", "never_updated", ["layers.1.bn1", "head.2"]),
        ("train_mode.torchscript.pt", "train_mode", "all"),
        ("no_running_stats.torchscript.pt", "no_running_stats", "all"),
    ],
)
def test_broken_samples_carry_their_flag(name, flag, layers_flagged):
    rows = stats.rows(checkpoint.load(BROKEN / name).layers())
    flagged = [r["name"] for r in rows if flag in r["flags"]]
    assert flagged == ([r["name"] for r in rows] if layers_flagged == "all" else layers_flagged)


def test_healthy_samples_have_no_flags():
    for name in ("sample.pt", "sample.onnx", "sample.pt2", "sample.torchscript.pt", "sample.safetensors"):
        assert not any(r["flags"] for r in stats.rows(checkpoint.load(CHECKPOINTS / name).layers())), name
