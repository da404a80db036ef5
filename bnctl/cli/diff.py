"""``bnctl diff``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..errors import InputError
from .app import command, emit_text, fail
from .options import IMAGES, ArchArgOpt, TrustOpt, choices

if TYPE_CHECKING:  # pragma: no cover
    from ..io.data import Preprocess

DiffFormat = choices("DiffFormat", ("table", "json", "csv", "markdown"))


def _per_file(values: list[str] | None, count: int, option: str) -> list[str | None]:
    """An option given once (for every file) or once per file."""
    values = values or []
    if len(values) in (0, 1):
        return (values or [None]) * count
    if len(values) != count:
        raise InputError(f"{option} was given {len(values)} times for {count} files", f"give {option} once for every file, or once per file in order")
    return list(values)


@command()
def diff(
    paths: Annotated[list[Path], typer.Argument(help="Two or more checkpoints, any formats, compared in order; or one with --data.", show_default=False)],
    arch: Annotated[Optional[list[str]], typer.Option("--arch", help="Build the model of a state_dict: 'pkg.module:factory' or 'file.py:factory'. Once for every file, or once per file.", rich_help_panel="Model")] = None,
    arch_arg: ArchArgOpt = None,
    key: Annotated[Optional[list[str]], typer.Option("--key", help="Entry of a training checkpoint to read. Once for every file, or once per file.", rich_help_panel="Model")] = None,
    trust: TrustOpt = False,
    data: Annotated[Optional[Path], typer.Option("--data", help="Compare one checkpoint's statistics with the exact statistics of this folder's samples (nothing is written).", rich_help_panel="Data")] = None,
    preprocess: Preprocess = IMAGES,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass (--data).", rich_help_panel="Data")] = 32,
    workers: Annotated[int, typer.Option("--workers", help="Processes decoding samples (--data).", rich_help_panel="Data")] = 2,
    fmt: Annotated[DiffFormat, typer.Option("--format", "-f", help="Output format.")] = DiffFormat("table"),
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the output to this file (atomically) instead of stdout.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw each layer's largest mean shift to this PNG (needs matplotlib: pip install 'bnctl\\[plot]').")] = None,
    fail_above: Annotated[Optional[float], typer.Option("--fail-above", help="Exit 1 when a layer's mean moved more than this many old standard deviations (a CI gate).")] = None,
) -> None:
    """Show how BatchNorm statistics moved between checkpoints, or how far a data folder is from them."""
    from .._atomic import refuse_overwrite
    from ..io.arch import parse_arch_args
    from ..io.source import ModelSource
    from ..ops import diff as diff_op
    from ..render import diff as render

    for target in (output, plot):
        refuse_overwrite(list(paths), target)
    args = parse_arch_args(arch_arg or [])
    if data is not None:
        if len(paths) != 1:
            raise InputError(f"--data compares one checkpoint with a data folder, {len(paths)} were given", "pass one checkpoint with --data, or two or more without it")
        source = ModelSource(paths[0], _per_file(arch, 1, "--arch")[0], args, _per_file(key, 1, "--key")[0], trust)
        result = _drift(source, data, preprocess, batch_size, workers)
    else:
        if len(paths) < 2:
            raise InputError("diff needs two or more checkpoints (or one with --data)", "e.g. bnctl diff before.pt after.pt, or bnctl diff model.pt --arch ... --data images/")
        archs, keys = _per_file(arch, len(paths), "--arch"), _per_file(key, len(paths), "--key")
        result = diff_op.diff(*(ModelSource(p, a, args, k, trust) for p, a, k in zip(paths, archs, keys)))
    result.fail_above = fail_above
    if fmt.value == "table":
        if output is None:
            from .app import console

            console().print(render.table(result))
        else:
            import io

            from rich.console import Console

            recorder = Console(record=True, file=io.StringIO(), width=200)
            recorder.print(render.table(result))
            emit_text(recorder.export_text(), output)
    elif fmt.value == "json":
        from ..render.json import dumps

        emit_text(dumps(result.to_dict()), output)
    elif fmt.value == "csv":
        emit_text(render.to_csv(result), output)
    else:
        emit_text(render.to_markdown(result), output)
    if plot is not None:
        render.plot(result, plot)
        typer.echo(f"wrote {plot}", err=True)
    if not result.ok:
        if fmt.value != "table":
            typer.echo(render.summary_line(result), err=True)
        fail(f"a layer's mean moved {result.max_shift:.3g} old standard deviations, beyond --fail-above {fail_above:g}", "look at the layers above; recalibrate (bnctl recalibrate) if the data is what the model now serves", 1)


def _drift(source, data: Path, preprocess, batch_size: int, workers: int):
    """The statistics of ``data`` against ``source``'s (the samples read as recalibrate reads them)."""
    from ..io.data import check_one_size, loader, sample_files
    from ..ops import diff as diff_op

    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} is not positive", "use e.g. --batch-size 32")
    files = sample_files(data) if data.is_dir() else []
    if not files:
        raise InputError(f"--data {data}: no image or tensor files", "put images (jpg, png, ...) or .npy/.npz/.pt samples in it (subfolders are fine)")
    check_one_size(files, preprocess)
    random.Random(0).shuffle(files)  # the order bnctl recalibrate reads them in (--seed 0): the same batches
    batches = (batch for batch, _ in loader(files, preprocess, batch_size, workers) if batch is not None)
    return diff_op.drift(source, batches)
