"""Recalibrate a checkpoint file on a data folder and write it back in its own format.

Process-wide speed settings live here, not in the library function: on CPU, 4-D inputs
go channels_last and 5-D ones channels_last_3d, with the model's weights of that rank (the
first batch decides), and glibc's allocator is told to keep freed activation buffers
instead of returning them to the kernel after every batch.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import _atomic
from ..core.modules import batchnorms
from ..errors import InputError
from ..io.data import loader, ordered_samples, shard
from ..io.source import CheckInputs, ModelSource
from ..io.writers import like_input
from ..ops.recalibrate import NoBatchesError, RecalibrationReport, recalibrate
from .artifact import deliver


def tune_allocator() -> bool:
    """Keep freed memory in the heap (glibc): no mmap/munmap and page faults per batch."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def _distributed(device: str) -> tuple[int, int]:
    """``(rank, world_size)``; starts the process group under torchrun (WORLD_SIZE > 1):
    NCCL when the forward passes run on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def recalibrate_file(
    source: ModelSource,
    output: str | Path,
    *,
    inputs: CheckInputs,
    batch_size: int = 32,
    max_samples: int | None = None,
    workers: int = 0,
    device: str = "cpu",
    until_stable: float | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RecalibrationReport:
    """Recalibrate ``source`` on every sample of ``inputs.data`` (read with ``inputs.preprocess``,
    in an order and ``max_samples`` subset drawn from ``inputs.seed``) and write ``output``
    in the input's format (rank 0 only)."""
    output = Path(output)
    _atomic.refuse_overwrite(source.path, output)
    if inputs.data is None:
        raise InputError("recalibrating needs a data folder", "pass --data DIR")
    data = Path(inputs.data)
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} is not positive", "use e.g. --batch-size 32")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: this torch build has no CUDA, or no GPU is visible", "run with --device cpu, or install a CUDA build of torch on a machine with a GPU")
    opened = source.open()
    checkpoint, model = opened.checkpoint, opened.eager("recalibrating")
    if not batchnorms(model, estimating=True):
        raise InputError(f"{checkpoint.path.name}: the model has no BatchNorm layer with running statistics", "nothing to recalibrate")
    files = ordered_samples(data, inputs.preprocess, inputs.seed)
    if max_samples is not None:
        files = files[:max_samples]
    rank, world = _distributed(device)
    mine = shard(files, batch_size, rank, world)
    if on_start is not None:
        on_start(len(files))
    model = model.to(device)
    fast = device == "cpu"
    if fast:
        tune_allocator()
    skipped = [0]
    layout: list = []  # the memory format the first batch chose (or None), with the model laid out in it

    def batches():
        for batch, bad in loader(mine, inputs.preprocess, batch_size, workers):
            skipped[0] += bad
            if batch is None:
                continue
            if fast:
                if not layout:
                    layout.append(_memory_format(batch))
                    _lay_out(model, layout[0])
                batch = _in_format(batch, layout[0])
            yield batch

    try:
        report = recalibrate(model, batches(), until_stable=until_stable, device=None if fast else device, on_batch=on_batch, input_fn=input_fn)
    except NoBatchesError:
        raise InputError(f"--data {data}: none of its {len(files)} files could be read", "check the files; supported: images, .npy, .npz, .pt") from None
    if layout:
        _lay_out(model, layout[0], back=True)
    model = model.to("cpu")
    if skipped[0]:
        report.notes.append(f"{skipped[0]} unreadable files skipped")
    if rank == 0:  # the input's own format, with the new statistics
        deliver(like_input(checkpoint, model, output, strip=source.strip_prefix, add=source.add_prefix), output, report)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return report


#: the channels-last memory format of each input rank (faster convolutions on CPU)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _memory_format(batch: Any) -> torch.memory_format | None:
    """channels_last for a 4-D batch, channels_last_3d for a 5-D one; None for any other
    rank and for a batch of several inputs (nothing is converted then)."""
    return _CHANNELS_LAST.get(batch.dim()) if isinstance(batch, torch.Tensor) else None


def _rank(memory_format: torch.memory_format) -> int:
    return next(rank for rank, fmt in _CHANNELS_LAST.items() if fmt == memory_format)


def _in_format(batch: Any, memory_format: torch.memory_format | None) -> Any:
    """``batch`` in ``memory_format`` where it has that format's rank; as it is otherwise."""
    if memory_format is not None and isinstance(batch, torch.Tensor) and batch.dim() == _rank(memory_format):
        return batch.contiguous(memory_format=memory_format)
    return batch


def _lay_out(model: nn.Module, memory_format: torch.memory_format | None, *, back: bool = False) -> None:
    """The parameters and buffers of ``model`` of the rank of ``memory_format`` (the others
    never: a 5-D weight has no channels_last) in that format, or with ``back`` contiguous
    again; in place, each tensor staying the module's own object."""
    if memory_format is None:
        return
    rank, target = _rank(memory_format), torch.contiguous_format if back else memory_format
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.dim() == rank:
                tensor.data = tensor.data.contiguous(memory_format=target)
