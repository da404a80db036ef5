"""Samples from a data folder, as model inputs.

Default preprocessing of an image: RGB, resized to ``size`` (H, W) when given (bilinear),
``float32`` in [0, 1], channels first. No mean/std normalization.
Tensor files (.npy, .pt) are used as they are, one sample each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
TENSOR_SUFFIXES = {".npy", ".pt"}


def sample_files(folder: Path) -> list[Path]:
    """Every image or tensor file under ``folder`` (recursive), in a stable order."""
    if not folder.is_dir():
        raise InputError(f"--data {folder}: no such folder", "point --data at a folder of images (class subfolders are fine) or .npy/.pt files")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | TENSOR_SUFFIXES)


def read_sample(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One sample as a tensor (see the module doc for the preprocessing)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if suffix == ".pt":
        value = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(value, torch.Tensor):
            raise ValueError("not a single tensor")
        return value
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def iter_samples(folder: Path, size: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """Readable samples of the folder; unreadable files are skipped."""
    for path in sample_files(folder):
        try:
            yield read_sample(path, size)
        except Exception:  # noqa: BLE001 - a broken file is skipped, not fatal
            continue


def example_batch(folder: Path, count: int = 16, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Up to ``count`` samples stacked into one batch (images resized to the first one's size)."""
    samples: list[torch.Tensor] = []
    for sample in iter_samples(folder, size):
        if samples and sample.shape != samples[0].shape:
            if sample.dim() != 3 or size is not None:
                continue
            size = tuple(samples[0].shape[1:])  # type: ignore[assignment]
            continue
        samples.append(sample.float())
        if len(samples) == count:
            break
    if not samples:
        raise InputError(f"--data {folder}: no readable image or tensor file", "supported: " + ", ".join(sorted(IMAGE_SUFFIXES | TENSOR_SUFFIXES)))
    return torch.stack(samples)
