"""Accuracy of a sample-model checkpoint on a sample image folder (labels from subfolder names).

python samples/evaluate.py samples/checkpoints/sample.pt samples/data_shifted
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bnctl.io.data import read_sample
from bnctl.models import sample_net

CLASSES = ("circle", "square", "stripes", "triangle")


def accuracy(checkpoint: Path, folder: Path) -> float:
    model = sample_net()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    files = sorted(folder.rglob("*.png"))
    x = torch.stack([read_sample(f) for f in files])
    y = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


if __name__ == "__main__":
    ckpt, folder = Path(sys.argv[1]), Path(sys.argv[2])
    print(f"accuracy of {ckpt.name} on {folder.name}/: {accuracy(ckpt, folder):.1%}")
