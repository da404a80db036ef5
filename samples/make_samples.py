"""Regenerate everything in samples/: the image folders, the trained sample model in every
format bnctl reads, and the deliberately broken checkpoints.

    python samples/make_samples.py        # ~1 minute on 2 CPU cores; `make samples` does the same

The images are drawn deterministically (numpy + Pillow, fixed seeds): four classes of
shapes and textures on random backgrounds, 32x32 RGB. ``data/`` holds held-out images in
class subfolders; ``data_shifted/`` holds the same images darker and with lower contrast
(the recalibration demo). The model is ``bnctl.models.sample_net``.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch import nn

from bnctl.models import sample_net

HERE = Path(__file__).resolve().parent
CLASSES = ("circle", "square", "stripes", "triangle")
SIZE = 32
PER_CLASS_ON_DISK = 40
TRAIN_PER_CLASS = 1000
EPOCHS = 10


def draw(kind: str, rng: np.random.Generator) -> Image.Image:
    """One 32x32 image of ``kind``: a random background, the shape in a random colour, noise."""
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(v) for v in (np.array(bg) + rng.integers(80, 176, 3)) % 256)
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(6, 13))
    cx, cy = (int(v) for v in rng.integers(r, SIZE - r, 2))
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:  # stripes: a texture over the whole image, random period and orientation
        period = int(rng.integers(3, 7))
        vertical = bool(rng.integers(0, 2))
        for p in range(0, SIZE, period):
            box = [p, 0, p + period // 2, SIZE] if vertical else [0, p, SIZE, p + period // 2]
            d.rectangle(box, fill=fg)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def shift(img: Image.Image) -> Image.Image:
    """Darker and lower contrast: x -> 0.45 x + 10 (on 0..255)."""
    arr = np.asarray(img, dtype=np.float32) * 0.45 + 10
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Pillow RGB images -> float tensor (N, 3, H, W) in [0, 1] (bnctl's default preprocessing)."""
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255


def dataset(per_class: int, seed: int) -> tuple[list[Image.Image], torch.Tensor]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(per_class):
        for label, kind in enumerate(CLASSES):
            images.append(draw(kind, rng))
            labels.append(label)
    return images, torch.tensor(labels)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=EPOCHS * (len(x) // 64))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 63, 64):
            idx = order[i : i + 64]
            batch = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flips
            batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {epoch + 1}/{EPOCHS}: loss {loss.item():.3f}")
    model.eval()
    return opt


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def write_folder(folder: Path, images: list[Image.Image], labels: torch.Tensor, transform=None) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for i, (img, label) in enumerate(zip(images, labels.tolist())):
        sub = folder / CLASSES[label]
        sub.mkdir(parents=True, exist_ok=True)
        (transform(img) if transform else img).save(sub / f"{i:04d}.png", optimize=True)


def save_formats(model: nn.Module, opt, out: Path, example: torch.Tensor) -> None:
    """The trained model in every format bnctl reads."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    state = model.state_dict()
    torch.save(state, out / "sample.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "sample.safetensors", metadata={"arch": "bnctl.models:sample_net"})
    torch.save(
        {
            "epoch": EPOCHS - 1,
            "global_step": EPOCHS * (TRAIN_PER_CLASS * len(CLASSES) // 64),
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [],
            "hyper_parameters": {"num_classes": len(CLASSES), "widths": [16, 32, 48]},
        },
        out / "sample.ckpt",
    )
    torch.jit.save(torch.jit.script(model), out / "sample.torchscript.pt")
    torch.export.save(torch.export.export(model, (example,)), out / "sample.pt2")
    torch.onnx.export(model, (example,), str(out / "sample.onnx"), dynamo=True, optimize=False, input_names=["image"], output_names=["logits"], external_data=False)
    torch.save(model, out / "sample.module.pt")
    converted = {k: (torch.zeros_like(v) if k.endswith("num_batches_tracked") else v) for k, v in state.items()}
    torch.save(converted, out / "converted_zero_counter.pt")


def save_broken(model: nn.Module, out: Path, example: torch.Tensor) -> None:
    """Checkpoints with a known BatchNorm defect each, for inspect and audit."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    state = model.state_dict()

    nan = {k: v.clone() for k, v in state.items()}
    nan["layers.2.bn2.running_var"][:5] = float("nan")  # what an fp16 overflow in training leaves
    nan["layers.2.bn2.running_mean"][7] = float("inf")
    torch.save(nan, out / "nan_stats.pt")

    fresh = {k: v.clone() for k, v in state.items()}
    for prefix in ("layers.1.bn1", "head.2"):  # statistics re-initialised after surgery, counters kept
        fresh[f"{prefix}.running_mean"].zero_()
        fresh[f"{prefix}.running_var"].fill_(1.0)
    torch.save(fresh, out / "never_updated.pt")

    model.train()
    torch.jit.save(torch.jit.script(model), out / "train_mode.torchscript.pt")
    model.eval()

    no_stats = sample_net(track_running_stats=False)
    no_stats.load_state_dict({k: v for k, v in state.items() if not k.rpartition(".")[2].startswith(("running_", "num_batches"))})
    torch.jit.save(torch.jit.script(no_stats.eval()), out / "no_running_stats.torchscript.pt")


def save_deploy(onnx_path: Path, out: Path) -> None:
    """deploy/int8_range.onnx: sample.onnx with one channel of the stem's BN at a running
    variance of 1e-9 (a dead filter), so that folding it gives that channel weights ~100x
    the others' and per-tensor int8 rounds the rest away (audit BN403, fold's int8 report)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    var = next(t for t in model.graph.initializer if t.name == bn.input[4])
    values = numpy_helper.to_array(var).copy()
    values[3] = 1e-9
    var.CopyFrom(numpy_helper.from_array(values, var.name))
    out.mkdir(exist_ok=True)
    onnx.save(model, out / "int8_range.onnx")


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    start = time.perf_counter()
    train_images, train_labels = dataset(TRAIN_PER_CLASS, seed=1)
    test_images, test_labels = dataset(PER_CLASS_ON_DISK, seed=2)
    write_folder(HERE / "data", test_images, test_labels)
    write_folder(HERE / "data_shifted", test_images, test_labels, shift)
    model = sample_net()
    print(f"training {sum(p.numel() for p in model.parameters())} parameters on {len(train_labels)} images")
    opt = train(model, to_tensor(train_images), train_labels)
    x_test = to_tensor(test_images)
    x_shift = to_tensor([shift(i) for i in test_images])
    print(f"held-out accuracy: {accuracy(model, x_test, test_labels):.3f} (data/), {accuracy(model, x_shift, test_labels):.3f} (data_shifted/)")
    example = x_test[:1].clone()  # a slice would save the whole test set's storage
    save_formats(model, opt, HERE / "checkpoints", example)
    save_broken(model, HERE / "broken", example)
    save_deploy(HERE / "checkpoints" / "sample.onnx", HERE / "deploy")
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file() and f.suffix != ".py")
    print(f"samples: {total / 1e6:.2f} MB in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
