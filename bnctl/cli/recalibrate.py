"""``bnctl recalibrate``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..io.source import CheckInputs, ModelSource
from ..jobs import DEVICES
from ..render.emit import emit
from .app import command
from .options import IMAGES, MODEL, PathArg, choices, format_option, resolve_transform

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Preprocess

Device = choices("Device", DEVICES)
RecalibrateFormat, RecalibrateFormatOpt = format_option("RecalibrationReport")


@command()
def recalibrate(
    path: PathArg,
    data: Annotated[Path, typer.Option("--data", help="Folder of samples: images (class subfolders fine), .npy, .npz or .pt files.", show_default=False, rich_help_panel="Data")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the recalibrated model, in the input's format (atomically; never the input).", show_default=False)],
    source: ModelSource = MODEL,
    preprocess: Preprocess = IMAGES,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.", rich_help_panel="Data")] = 32,
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="Use at most this many samples (a seeded random subset).", rich_help_panel="Data")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Processes decoding samples.", rich_help_panel="Data")] = 2,
    device: Annotated[Device, typer.Option("--device", help="Where the forward passes run.")] = Device("cpu"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample order and --max-samples subset.")] = 0,
    forward: Annotated[
        Optional[str],
        typer.Option(
            "--forward",
            help="pkg.mod:fn or file.py:fn: how a batch of samples is fed to the model (returns a tensor, a tuple of arguments or a dict of keyword arguments). Default: a tensor as the one argument, a tuple as the arguments, a dict as keyword arguments.",
            rich_help_panel="Data",
        ),
    ] = None,
    until_stable: Annotated[Optional[float], typer.Option("--until-stable", help="Stop once no layer's estimate moved more than this over 3 batches (one process only).")] = None,
    fmt: RecalibrateFormatOpt = RecalibrateFormat("table"),
) -> None:
    """Re-estimate every BatchNorm's running statistics exactly on a data folder (torchrun for many processes)."""
    from ..jobs.recalibrate import recalibrate_file
    from ..render.progress import sample_progress

    rank0 = int(os.environ.get("RANK", "0")) == 0
    with sample_progress(enabled=rank0 and sys.stderr.isatty()) as progress:
        report = recalibrate_file(
            source.at(path),
            output,
            inputs=CheckInputs(data=data, seed=seed, preprocess=preprocess),
            batch_size=batch_size,
            max_samples=max_samples,
            workers=workers,
            device=device.value,
            until_stable=until_stable,
            on_batch=progress.advance,
            on_start=progress.start,
            input_fn=resolve_transform(forward),
        )
    if not rank0:
        return
    emit(report, fmt.value)
    typer.echo(f"wrote {output}", err=True)
