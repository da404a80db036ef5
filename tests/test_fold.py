"""bnctl.fold on models built to hit each folding trap; outputs are compared with the
unfolded model run by PyTorch itself."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from buggy_models import KeepsBNTraining, overflows_float16
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnctl import fold
from bnctl.ops.fold import math as fold_math


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (fresh ones are identities)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.copy_(torch.randn(n, generator=gen))
                    m.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


def bn_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def check(model: nn.Module, *inputs: torch.Tensor):
    """Fold, and assert the folded model computes what the original computes."""
    model = randomize_bn(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
        got = folded(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert report.ok, report.to_dict()
    # the caller's model is left as it was
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return folded, report


def folded_bns(report) -> set[str]:
    return {f["bn"] for f in report.folded}


def skipped(report) -> dict[str, str]:
    return {s["bn"]: s["reason"] for s in report.skipped}


# --- pairs that must fold -----------------------------------------------------------------


class PadConv2d(nn.Conv2d):
    """TensorFlow-style 'same' padding inside forward, as EfficientNet ports do."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


def test_conv_subclass_that_pads_in_forward_folds_where_fx_fuse_does_not():
    from torch.fx.experimental.optimization import fuse

    model = nn.Sequential(PadConv2d(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    folded, report = check(model, torch.randn(2, 3, 16, 16))
    assert folded_bns(report) == {"1"} and report.bn_after == 0
    fx_fused = fuse(randomize_bn(copy.deepcopy(model)))
    assert bn_names(fx_fused), "torch.fx fuse was expected to leave this BN alone"


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose_grouped_folds(dims):
    conv_t = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dims - 1]
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dims - 1]
    model = nn.Sequential(conv_t(4, 6, 3, stride=2, groups=2, bias=False), bn(6))
    _, report = check(model, torch.randn(2, 4, *([5] * dims)))
    assert folded_bns(report) == {"1"}


def test_depthwise_conv_and_linear_fold():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
    )
    _, report = check(model, torch.randn(3, 4, 8, 8))
    assert folded_bns(report) == {"1", "6"}


def test_bn_before_linear_and_unpadded_conv_folds_into_the_consumer():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 3))
    _, report = check(model, torch.randn(4, 3, 2, 2))
    assert [{k: v for k, v in e.items() if k != "int8"} for e in report.folded] == [{"bn": "1", "into": "2", "side": "before", "note": None}]
    conv = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2))
    _, report = check(conv, torch.randn(2, 4, 7, 7))
    assert report.folded[0]["side"] == "before"


def test_bn_before_reflect_padded_conv_folds():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    _, report = check(model, torch.randn(2, 4, 6, 6))
    assert folded_bns(report) == {"1"}


class Shared(nn.Module):
    """One conv called on two paths, only one of them followed by BN (pytorch#197539)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_shared_conv_is_folded_into_a_copy_and_the_other_path_keeps_the_original():
    _, report = check(Shared(), torch.randn(2, 3, 8, 8))
    assert folded_bns(report) == {"bn"}
    assert "copy" in report.folded[0]["note"]


class BNAct(nn.BatchNorm2d):
    """A BN subclass with an activation in forward (timm's BatchNormAct2d pattern)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_bn_subclass_with_activation_folds_and_keeps_the_activation():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BNAct(6))
    folded, report = check(model, torch.randn(2, 3, 8, 8))
    assert folded_bns(report) == {"1"}
    assert "relu" in folded.code


def test_exported_program_folds_on_its_aten_graph():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.ConvTranspose2d(6, 4, 2, stride=2), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    folded, report = fold(ep)
    assert report.path == "torch.export" and report.bn_after == 0 and report.ok
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


# --- pairs that must be refused, each with its reason ----------------------------------


class ReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_producer_output_read_by_another_node_is_refused():
    _, report = check(ReadTwice(), torch.randn(2, 3, 5, 5))
    assert not report.folded
    assert "also read by add" in skipped(report)["bn"]


def test_activation_between_conv_and_bn_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2))
    _, report = check(model, torch.randn(2, 3, 8, 8))
    assert not report.folded
    assert "input comes from 1" in skipped(report)["2"]


def test_bn_before_zero_padded_conv_is_refused():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    _, report = check(model, torch.randn(2, 4, 6, 6))
    assert not report.folded
    assert "pads with zeros" in skipped(report)["1"]


def test_bn_before_conv_transpose_is_refused():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3))
    _, report = check(model, torch.randn(2, 4, 6, 6))
    assert "transposed" in skipped(report)["1"]


def test_bn1d_on_three_dim_linear_output_is_refused():
    # Linear maps the last dim; BatchNorm1d on (N, C, L) normalizes dim 1: not the same features
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    _, report = check(model, torch.randn(2, 4, 4))
    assert "3-D input" in skipped(report)["1"]


def test_bn_in_train_mode_and_bn_without_running_stats_are_refused():
    model = KeepsBNTraining()
    randomize_bn(model)
    model.bn.train()
    folded, report = fold(model, torch.randn(4, 3, 6, 6))
    assert "train mode" in skipped(report)["bn"]
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    _, report = fold(no_stats, torch.randn(4, 3, 6, 6))
    assert "track_running_stats=False" in skipped(report)["1"]


class Untraceable(nn.Module):
    """Data-dependent control flow stops torch.fx; the registration order also lies:
    ``conv_b`` is registered right before ``bn`` but the BN reads ``conv_a``."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3)
        self.conv_b = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv_c = nn.Conv2d(4, 4, 1)
        self.bn_c = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.bn(self.conv_a(x)) + self.conv_b(x)
        return self.bn_c(self.conv_c(x))


def test_untraceable_model_keeps_only_candidates_that_verify():
    folded, report = check(Untraceable(), torch.randn(2, 3, 8, 8))
    assert report.path == "module-tree"
    assert folded_bns(report) == {"bn_c"}
    assert "changed the outputs" in skipped(report)["bn"]
    assert isinstance(folded.bn_c, nn.Identity)


def test_keep_modules_gives_a_state_dict_for_the_unchanged_class():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3), nn.BatchNorm1d(3)))
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model, x, keep_modules=True)
    assert folded_bns(report) == {"1", "5"} and report.ok
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3), nn.BatchNorm1d(3)).eval()
    fresh.load_state_dict(folded.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-4, atol=1e-5)
    assert torch.allclose(fresh[5].running_mean, torch.zeros(3)) and torch.allclose(fresh[5].bias, torch.zeros(3))


def test_missing_inputs_and_rejected_shapes_are_input_errors():
    from bnctl.errors import InputError

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(InputError, match="example inputs"):
        fold(model)
    with pytest.raises(InputError, match="rejects inputs of shape 1x5x8x8"):
        fold(model, torch.randn(1, 5, 8, 8))


# --- the math, against PyTorch running the two layers -----------------------------------


def test_fold_math_keeps_dtype_and_handles_no_affine():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float16)
    scale, shift = fold_math.bn_scale_shift(torch.randn(4), torch.rand(4) + 0.5, 1e-5)
    new_w, new_b = fold_math.fold_after(w, None, scale, shift, "conv")
    assert new_w.dtype == torch.float16 and new_b.dtype == torch.float16
    torch.testing.assert_close(new_b.double(), shift, rtol=1e-3, atol=1e-3)


LAYERS = {
    ("conv", 1): (nn.Conv1d, nn.BatchNorm1d),
    ("conv", 2): (nn.Conv2d, nn.BatchNorm2d),
    ("conv", 3): (nn.Conv3d, nn.BatchNorm3d),
    ("conv_transpose", 1): (nn.ConvTranspose1d, nn.BatchNorm1d),
    ("conv_transpose", 2): (nn.ConvTranspose2d, nn.BatchNorm2d),
    ("conv_transpose", 3): (nn.ConvTranspose3d, nn.BatchNorm3d),
}


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["conv", "conv_transpose", "linear"]),
    dims=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    affine=st.booleans(),
    bias=st.booleans(),
    before=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_folding_any_layer_keeps_outputs(kind, dims, groups, per_group_in, per_group_out, kernel, stride, eps, affine, bias, before, seed):
    torch.manual_seed(seed)
    cin, cout = groups * per_group_in, groups * per_group_out
    if kind == "linear":
        layer = nn.Linear(cin, cout, bias=bias)
        bn_cls, x = nn.BatchNorm1d, torch.randn(3, cin)
    else:
        conv_cls, bn_cls = LAYERS[(kind, dims)]
        layer = conv_cls(cin, cout, kernel, stride=stride, groups=groups, bias=bias)
        x = torch.randn(2, cin, *([5] * dims))
    if before and kind != "conv_transpose":
        model = nn.Sequential(nn.Tanh(), bn_cls(cin, eps=eps, affine=affine), layer)
        bn_index = "1"
    else:
        model = nn.Sequential(layer, bn_cls(cout, eps=eps, affine=affine))
        bn_index = "1"
    _, report = check(model, x)
    assert folded_bns(report) == {bn_index}


def test_folded_module_keeps_the_modes_model_eval_gives():
    """A BN that stays in train mode after model.eval() stays so in the folded module, and the
    folded module is independent of the caller's model (its mode and its tensors)."""
    model = randomize_bn(KeepsBNTraining())
    model.train()
    x = torch.randn(4, 3, 6, 6)
    stats = model.bn.running_mean.clone()
    folded, report = fold(model, x)
    assert report.ok and folded.bn.training and not folded.training
    assert torch.equal(model.bn.running_mean, stats), "fold's forward passes updated the caller's BN"
    model.eval()
    assert model.training is False and folded.bn.training
    assert folded.bn.running_mean.data_ptr() != model.bn.running_mean.data_ptr()


def test_float16_model_keeps_a_bn_whose_folded_weights_overflow_and_folds_the_rest():
    """A half-precision model: torch.fx's fuse writes inf weights for bn2; bnctl keeps bn2
    with the reason and folds bn1, at the float16 tolerance."""
    from torch.fx.experimental.optimization import fuse

    model = overflows_float16().half()
    x = torch.randn(2, 3, 10, 10).half()
    fused = fuse(copy.deepcopy(model))
    assert not all(torch.isfinite(p).all() for p in fused.parameters())  # the trap
    folded, report = fold(model, x)
    assert [f["bn"] for f in report.folded] == ["1"]
    (kept,) = report.skipped
    assert kept["bn"] == "4" and "float16" in kept["reason"] and "inf" in kept["reason"]
    assert all(torch.isfinite(p).all() for p in folded.parameters())
    assert report.tolerance == 1e-2 and "float16" in report.tolerance_source
    want, got = model(x).double(), folded(x).double()
    assert torch.isfinite(want).all()
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-2


class ReadsShapes(nn.Module):
    """As D-RCNet's 3D attention does: ``B, C, ... = x.shape`` of a BN's output (and of a
    conv's) next to the conv that reads its values."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv3d(2, 4, 3)
        self.bn0 = nn.BatchNorm3d(4)
        self.bn = nn.BatchNorm3d(4)
        self.qkv = nn.Conv3d(4, 6, 1)

    def forward(self, x):
        a = self.conv0(x)
        n0 = a.size(0)
        x = self.bn(self.bn0(a))
        b, c, d, h, w = x.shape
        y = self.qkv(x)
        return y.reshape(b, -1, d * h * w).mean(-1) + n0 * 0


def test_shape_reads_do_not_keep_a_bn_from_folding():
    folded, report = check(ReadsShapes(), torch.randn(2, 2, 5, 5, 5))
    assert folded_bns(report) == {"bn0", "bn"}, report.skipped


class EmbedFlag(nn.Module):
    """As torchcrepe's Crepe: ``forward(x, embed=False)`` branches on a flag the caller never passes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 5)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, embed=False):
        x = self.bn(self.conv(x[:, None]))
        if embed:
            return x
        return self.fc(x.mean(-1))


def test_a_forward_flag_left_at_its_default_traces_and_folds():
    folded, report = check(EmbedFlag(), torch.randn(2, 32))
    assert report.path == "fx" and folded_bns(report) == {"bn"}, (report.path, report.notes, report.skipped)


class TwoBNsBeforeAConv(nn.Module):
    """As D-RCNet's downsampling: a residual sum, a BN, a second BN, then a 1x1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv3d(2, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm3d(4)
        self.bn_b = nn.BatchNorm3d(4)
        self.proj = nn.Conv3d(4, 6, 1)

    def forward(self, x):
        y = self.conv0(x)
        return self.proj(self.bn_b(self.bn_a(y + x.repeat(1, 2, 1, 1, 1))))


def test_a_bn_before_a_bn_before_a_conv_folds_too():
    folded, report = check(TwoBNsBeforeAConv(), torch.randn(2, 2, 4, 4, 4))
    assert folded_bns(report) == {"bn_a", "bn_b"}, report.skipped
