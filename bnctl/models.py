"""Small real models defined in the project, for samples/, tests and benchmarks.

``sample_net`` is the model of ``samples/``: a ResNet-style CNN (BatchNorm2d after every
conv, projection shortcuts) with a Linear + BatchNorm1d head and Dropout. It is defined
here, inside the package, so that ``--arch bnctl.models:sample_net`` works anywhere bnctl
is installed and a pickled SampleNet loads with ``--trust``.
"""

from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, track_running_stats: bool = True):
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, track_running_stats=track_running_stats)  # noqa: E731
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SampleNet(nn.Module):
    """A ResNet-style classifier for small RGB images (32x32 in samples/)."""

    def __init__(self, num_classes: int = 4, widths: tuple[int, ...] = (16, 32, 48), hidden: int = 32, dropout: float = 0.2, track_running_stats: bool = True):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, w0, 3, 1, 1, bias=False),
            nn.BatchNorm2d(w0, track_running_stats=track_running_stats),
            nn.ReLU(inplace=True),
        )
        blocks = []
        cin = w0
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2, track_running_stats=track_running_stats))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin, hidden, bias=False),
            nn.BatchNorm1d(hidden, track_running_stats=track_running_stats),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.head(self.pool(self.layers(self.stem(x))))


def sample_net(num_classes: int = 4, widths: tuple[int, ...] = (16, 32, 48), hidden: int = 32, track_running_stats: bool = True) -> SampleNet:
    """The samples/ architecture (``--arch bnctl.models:sample_net``)."""
    return SampleNet(num_classes=num_classes, widths=tuple(widths), hidden=hidden, track_running_stats=track_running_stats)
