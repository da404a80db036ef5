"""``bnctl diff``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from ..errors import InputError
from ..render.emit import emit
from .app import command, fail
from .options import IMAGES, MODELS, OptionGroup, check_inputs, format_option, preprocess

if TYPE_CHECKING:  # pragma: no cover
    from ..io.source import CheckInputs

DiffFormat, DiffFormatOpt = format_option("DiffResult", help="Output format.")


def _samples(data: Path | None = None, **images: Any) -> CheckInputs:
    """``--data`` and the image options as the CheckInputs ``bnctl recalibrate --seed 0`` reads."""
    return check_inputs(None, data, 0, preprocess(**images))


#: --data and the image options; this group before MODELS in diff's signature, and --data after
#: the image options, keep the order ``bnctl diff --help`` has always listed them in
SAMPLES = OptionGroup(
    (*IMAGES.params, ("data", Annotated[Optional[Path], typer.Option("--data", help="Compare one checkpoint's statistics with the exact statistics of this folder's samples (nothing is written).", rich_help_panel="Data")], None)),
    _samples,
)


@command()
def diff(
    paths: Annotated[list[Path], typer.Argument(help="Two or more checkpoints, any formats, compared in order; or one with --data.", show_default=False)],
    samples: CheckInputs = SAMPLES,
    sources: Callable[[list[Path]], list[Any]] = MODELS,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass (--data).", rich_help_panel="Data")] = 32,
    workers: Annotated[int, typer.Option("--workers", help="Processes decoding samples (--data).", rich_help_panel="Data")] = 2,
    fmt: DiffFormatOpt = DiffFormat("table"),
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the output to this file (atomically) instead of stdout.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw each layer's largest mean shift to this PNG (needs matplotlib: pip install 'bnctl\\[plot]').")] = None,
    fail_above: Annotated[Optional[float], typer.Option("--fail-above", help="Exit 1 when a layer's mean moved more than this many old standard deviations (a CI gate).")] = None,
) -> None:
    """Show how BatchNorm statistics moved between checkpoints, or how far a data folder is from them."""
    from .._atomic import refuse_overwrite
    from ..ops import diff as diff_op
    from ..render import diff as render

    for target in (output, plot):
        refuse_overwrite(list(paths), target)
    if samples.data is not None:
        if len(paths) != 1:
            raise InputError(f"--data compares one checkpoint with a data folder, {len(paths)} were given", "pass one checkpoint with --data, or two or more without it")
        result = diff_op.drift_folder(sources(paths)[0], samples, batch_size=batch_size, workers=workers)
    else:
        if len(paths) < 2:
            raise InputError("diff needs two or more checkpoints (or one with --data)", "e.g. bnctl diff before.pt after.pt, or bnctl diff model.pt --arch ... --data images/")
        result = diff_op.diff(*sources(paths))
    result.fail_above = fail_above
    emit(result, fmt.value, output)
    if plot is not None:
        render.plot(result, plot)
        typer.echo(f"wrote {plot}", err=True)
    if not result.ok:
        if fmt.value != "table":
            typer.echo(render.summary_line(result), err=True)
        fail(f"a layer's mean moved {result.max_shift:.3g} old standard deviations, beyond --fail-above {fail_above:g}", "look at the layers above; recalibrate (bnctl recalibrate) if the data is what the model now serves", 1)
