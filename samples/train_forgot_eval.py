"""A short fine-tuning run of the sample model on samples/data, with two BatchNorm bugs users
keep hitting: the validation loop forgets model.eval(), and the model is traced for deployment
straight after training, still in train mode.

    python samples/train_forgot_eval.py --epochs 1          # runs, and says nothing
    bnctl trace samples/train_forgot_eval.py --epochs 1    # finds both bugs as they happen
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bnctl.io.data import read_sample  # noqa: E402
from bnctl.models import sample_net  # noqa: E402

CLASSES = ("circle", "square", "stripes", "triangle")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sample_net()
    model.load_state_dict(torch.load(HERE / "checkpoints" / "sample.pt", weights_only=True))
    files = sorted((HERE / "data").rglob("*.png"))
    images = torch.stack([read_sample(f) for f in files])
    labels = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    shuffle = torch.randperm(len(files))
    images, labels = images[shuffle], labels[shuffle]
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    for epoch in range(args.epochs):
        model.train()
        for start in range(0, len(images), 32):
            loss = torch.nn.functional.cross_entropy(model(images[start : start + 32]), labels[start : start + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():  # validation: model.eval() forgotten
            correct = (model(images).argmax(1) == labels).float().mean()
        print(f"epoch {epoch}: accuracy {correct:.2f}")
    torch.jit.trace(model, images[:2], check_trace=False)  # for deployment: model.eval() forgotten again


if __name__ == "__main__":
    main()
