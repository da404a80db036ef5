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
