"""Samples from a data folder, as model inputs.

Default preprocessing of an image: RGB (or grayscale), resized to ``size`` (H, W) when given
(bilinear; JPEGs are decoded at reduced size first where that is enough), ``float32`` in
[0, 1], channels first, then ``(x - mean) / std`` when given. A ``transform`` (a function of
the Pillow image) replaces all of it. Tensor files are used as they are: ``.npy`` one array,
``.npz`` its arrays (one: a tensor; several: a dict of keyword arguments), ``.pt`` a tensor,
a tuple (the model's arguments) or a dict (its keyword arguments).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
TENSOR_SUFFIXES = {".npy", ".npz", ".pt"}


def sample_files(folder: Path) -> list[Path]:
    """Every image or tensor file under ``folder`` (recursive), in a stable order."""
    if not folder.is_dir():
        raise InputError(f"--data {folder}: no such folder", "point --data at a folder of images (class subfolders are fine) or .npy/.pt files")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | TENSOR_SUFFIXES)


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a tensor (see the module doc)."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grayscale: bool = False
    transform: Callable[[Any], Any] | None = None


def read_sample(path: Path, size: tuple[int, int] | None = None, preprocess: Preprocess | None = None) -> Any:
    """One sample: a tensor, or a tuple/dict of them (see the module doc)."""
    preprocess = preprocess or Preprocess(size=size)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            tensors = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        return next(iter(tensors.values())) if len(tensors) == 1 else tensors
    if suffix == ".pt":
        value = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(value, (torch.Tensor, tuple, list, dict)):
            raise ValueError("not a tensor, tuple or dict")
        return tuple(value) if isinstance(value, list) else value
    return _read_image(path, preprocess)


def _read_image(path: Path, p: Preprocess) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        mode = "L" if p.grayscale else "RGB"
        if p.size is not None and image.format == "JPEG":
            image.draft(mode, (p.size[1], p.size[0]))  # decode at 1/2, 1/4, 1/8 scale where enough
        image = image.convert(mode)
        if p.transform is not None:
            return p.transform(image)
        if p.size is not None and image.size != (p.size[1], p.size[0]):
            image = image.resize((p.size[1], p.size[0]), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1).contiguous()
    if p.mean is not None:
        tensor -= torch.tensor(p.mean, dtype=torch.float32).view(-1, 1, 1)
    if p.std is not None:
        tensor /= torch.tensor(p.std, dtype=torch.float32).view(-1, 1, 1)
    return tensor


def iter_samples(folder: Path, preprocess: Preprocess | None = None) -> Iterator[torch.Tensor]:
    """Readable samples of the folder; unreadable files are skipped."""
    for path in sample_files(folder):
        try:
            yield read_sample(path, preprocess=preprocess)
        except Exception:  # noqa: BLE001 - a broken file is skipped, not fatal
            continue


def example_batch(folder: Path, count: int = 16, preprocess: Preprocess | None = None) -> torch.Tensor:
    """Up to ``count`` samples stacked into one batch, read with ``preprocess``: samples of
    another shape than the first are left out."""
    size = preprocess.size if preprocess is not None else None
    check_one_size(sample_files(folder), preprocess)
    samples: list[torch.Tensor] = []
    for sample in iter_samples(folder, preprocess):
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


# --- batches for recalibration ----------------------------------------------------------------


def shard(files: list[Path], batch_size: int, rank: int, world: int) -> list[Path]:
    """This rank's files: global batches ``rank, rank + world, ...`` of the file order, so
    that N processes see exactly the batches one process would."""
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    return [f for b in batches[rank::world] for f in b]


class SampleFolder(torch.utils.data.Dataset):
    """Files as samples; an unreadable file gives None (dropped and counted by :func:`collate`)."""

    def __init__(self, files: list[Path], preprocess: Preprocess):
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        try:
            return read_sample(self.files[index], preprocess=self.preprocess)
        except Exception:  # noqa: BLE001 - a broken file is skipped, not fatal
            return None


def check_one_size(files: list[Path], preprocess: Preprocess | None) -> None:
    """An InputError naming the sizes found when images of several sizes would be stacked
    as they are (no ``--image-size``, no ``--transform``). Reads the image headers only."""
    if preprocess is not None and (preprocess.size is not None or preprocess.transform is not None):
        return
    from PIL import Image

    sizes: dict[tuple[int, int], int] = {}
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(path) as image:
                sizes[image.size] = sizes.get(image.size, 0) + 1
        except Exception:  # noqa: BLE001 - an unreadable file is skipped later, and said
            continue
    if len(sizes) > 1:
        common = sorted(sizes.items(), key=lambda kv: -kv[1])
        listing = ", ".join(f"{h}x{w} ({n})" for (w, h), n in common[:4]) + (f" and {len(common) - 4} more" if len(common) > 4 else "")
        (w, h), _ = common[0]
        raise InputError(f"the images have {len(sizes)} sizes (H x W: {listing}); a batch needs one", f"pass --image-size {h},{w} (or --transform) to resize them")


def ordered_samples(folder: Path, preprocess: Preprocess | None, seed: int) -> list[Path]:
    """Every sample file of ``folder``, checked to stack into batches (:func:`check_one_size`),
    in the order ``seed`` draws: ``bnctl recalibrate --seed`` reads them in this order. An
    InputError where the folder is missing or holds no sample."""
    files = sample_files(folder)
    if not files:
        raise InputError(f"--data {folder}: no image or tensor files", "put images (jpg, png, ...) or .npy/.npz/.pt samples in it (subfolders are fine)")
    check_one_size(files, preprocess)
    random.Random(seed).shuffle(files)
    return files


def collate(samples: list[Any]) -> tuple[Any, int]:
    """``(batch, skipped)``: the readable samples stacked, and how many were unreadable."""
    from torch.utils.data import default_collate

    good = [s for s in samples if s is not None]
    return (default_collate(good) if good else None), len(samples) - len(good)


def loader(files: list[Path], preprocess: Preprocess, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """Batches of ``files`` in order, decoded by ``workers`` processes."""
    return torch.utils.data.DataLoader(
        SampleFolder(files, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
