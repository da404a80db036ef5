"""Models with one BatchNorm bug each, for the fold and audit tests (audit loads them with --arch tests/buggy_models.py:NAME)."""

from __future__ import annotations

import torch
from torch import nn


class KeepsBNTraining(nn.Module):
    """A train() override that keeps its BN training: invisible to model.eval()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.train()
        return self

    def forward(self, x):
        return self.bn(self.conv(x))


class KeepsDropoutActive(nn.Module):
    """Dropout left active after model.eval(): eval is not deterministic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def train(self, mode: bool = True):
        super().train(mode)
        self.drop.train()
        return self

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


def keeps_bn_training() -> nn.Module:
    return KeepsBNTraining()


def keeps_dropout_active() -> nn.Module:
    return KeepsDropoutActive()


def healthy() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())


class Histogram(nn.Module):
    """conv -> BN -> torch.histc: no ONNX exporter has an operator for histc."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.histc(self.bn(self.conv(x)), bins=4)


def histogram() -> nn.Module:
    return Histogram()


class BNAct(nn.BatchNorm2d):
    """A BN subclass that adds an activation in forward (timm's BatchNormAct2d pattern)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def bn_act() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BNAct(4))


def tiny_variance() -> nn.Module:
    """A BN whose var + eps is float16-subnormal in every channel (BN108)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-7), nn.ReLU())
    model[1].running_var.fill_(1e-6)
    return model


def overflows_float16() -> nn.Module:
    """Conv -> BN -> ReLU -> Conv -> BN, float32, in eval mode. In float16, the second BN's
    folded weights reach about 76,000, beyond float16's 65504 (gamma 300 over sqrt(var + eps)
    of about 0.03, times conv weights of 8), while the unfolded model stays finite: the first
    BN gives values near 1e-3 and the second subtracts its conv's bias as its mean."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8, eps=1e-3))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.fill_(1e-3)
        model[1].bias.fill_(1e-3)
        model[3].weight.fill_(8.0)
        model[4].weight.fill_(300.0)
        model[4].running_var.fill_(1e-6)
        model[4].running_mean.copy_(model[3].bias)
    return model.eval()
