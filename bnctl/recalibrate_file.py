"""Recalibrate a checkpoint file on a data folder and write it back in its own format.

Process-wide speed settings live here, not in the library function: the model and 4-D
inputs go channels_last on CPU, and glibc's allocator is told to keep freed activation
buffers instead of returning them to the kernel after every batch.
"""

from __future__ import annotations

import ctypes
import os
import random
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import _atomic
from . import checkpoint as ckpt_mod
from .data import Preprocess, loader, sample_files, shard
from .errors import InputError
from .jobs import eager_only, guard_output, open_for
from .recalibration import NoBatchesError, RecalibrationReport, batchnorms, recalibrate


def tune_allocator() -> bool:
    """Keep freed memory in the heap (glibc): no mmap/munmap and page faults per batch."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``; starts the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and os.environ.get("BNCTL_DEVICE") == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def recalibrate_file(
    path: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    key: str | None = None,
    trust: bool = False,
    batch_size: int = 32,
    max_samples: int | None = None,
    preprocess: Preprocess = Preprocess(),
    workers: int = 0,
    device: str = "cpu",
    seed: int = 0,
    until_stable: float | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RecalibrationReport:
    """Recalibrate ``path`` on the samples of ``data`` and write ``output`` (rank 0 only)."""
    path, data, output = Path(path), Path(data), Path(output)
    guard_output(path, output)
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} is not positive", "use e.g. --batch-size 32")
    checkpoint, model = open_for("recalibrating", path, arch=arch, arch_args=arch_args, key=key, trust=trust)
    model = eager_only("recalibrating", checkpoint, model, path)
    if not batchnorms(model):
        raise InputError(f"{path.name}: the model has no BatchNorm layer with running statistics", "nothing to recalibrate")
    files = sample_files(data)
    if not files:
        raise InputError(f"--data {data}: no image or tensor files", "put images (jpg, png, ...) or .npy/.npz/.pt samples in it (subfolders are fine)")
    random.Random(seed).shuffle(files)
    if max_samples is not None:
        files = files[:max_samples]
    rank, world = _distributed()
    mine = shard(files, batch_size, rank, world)
    if on_start is not None:
        on_start(len(files))
    model = model.to(device)
    fast = device == "cpu"
    if fast:
        tune_allocator()
        model = model.to(memory_format=torch.channels_last)
    skipped = [0]

    def batches():
        for batch, bad in loader(mine, preprocess, batch_size, workers):
            skipped[0] += bad
            if batch is None:
                continue
            yield _channels_last(batch) if fast else batch

    try:
        report = recalibrate(model, batches(), until_stable=until_stable, device=None if fast else device, on_batch=on_batch)
    except NoBatchesError:
        raise InputError(f"--data {data}: none of its {len(files)} files could be read", "check the files; supported: images, .npy, .npz, .pt") from None
    model = model.to(memory_format=torch.contiguous_format).to("cpu")
    if skipped[0]:
        report.notes.append(f"{skipped[0]} unreadable files skipped")
    if rank == 0:
        _write(checkpoint, model, output, trust)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return report


def _channels_last(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor) and batch.dim() == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def _write(checkpoint: ckpt_mod.Checkpoint, model: nn.Module, output: Path, trust: bool) -> None:
    """The input's format with the new statistics: the whole training checkpoint, the
    safetensors file (metadata kept), or the pickled module."""
    if checkpoint.content == "module":
        with _atomic.atomic_path(output) as tmp:
            torch.save(model, tmp)
        return
    from .arch import strip_wrapper_prefixes

    state = model.state_dict()
    names = strip_wrapper_prefixes({k: k for k in checkpoint.tensors.keys()}, state.keys())  # model key -> file key
    updated = {names[k]: v.detach().cpu().contiguous() for k, v in state.items() if k in names}
    if checkpoint.format == ckpt_mod.Format.SAFETENSORS:
        from safetensors.torch import save_file

        tensors = {k: checkpoint.tensors[k] for k in checkpoint.tensors.keys()}
        tensors.update(updated)
        header = {k: str(v) for k, v in checkpoint.metadata.items()} or None
        with _atomic.atomic_path(output) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
        return
    whole = torch.load(checkpoint.path, weights_only=not trust, map_location="cpu")
    entry = whole
    for part in (checkpoint.key or "").split("."):
        if part:
            entry = entry[part]
    for k, v in updated.items():
        entry[k] = v
    with _atomic.atomic_path(output) as tmp:
        torch.save(whole, tmp)


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """``"0.485,0.456,0.406"`` -> a tuple; an InputError otherwise."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{what} '{text}' is not a list of numbers", f"e.g. {what} 0.485,0.456,0.406") from None


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"224"`` -> (224, 224); ``"224,160"`` -> (224, 160)."""
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise InputError(f"--image-size '{text}' is not a size", "give H or H,W, e.g. --image-size 224")
    return (sizes[0], sizes[-1])


def resolve_transform(spec: str | None) -> Callable | None:
    if spec is None:
        return None
    from .arch import resolve_factory

    return resolve_factory(spec)

