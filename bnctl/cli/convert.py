"""``bnctl convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..io.source import CheckInputs, ModelSource
from ..jobs import SAVE_AS
from ..ops import CONVERT_TARGETS
from ..render.emit import emit
from .app import command
from .options import CHECKS, MODEL, PathArg, choices, format_option

ConvertTo = choices("ConvertTo", CONVERT_TARGETS)
SaveAs = choices("SaveAs", SAVE_AS)
ConvertFormat, ConvertFormatOpt = format_option("ConvertReport")


@command()
def convert(
    path: PathArg,
    to: Annotated[ConvertTo, typer.Option("--to", help="syncbn: BN -> SyncBatchNorm; batchnorm: SyncBN/frozen -> BatchNorm1d/2d/3d; frozen: BN -> FrozenBatchNorm; groupnorm: BN -> GroupNorm (changes the function).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the converted model (atomically; never the input).", show_default=False)],
    source: ModelSource = MODEL,
    inputs: CheckInputs = CHECKS,
    groups: Annotated[int, typer.Option("--groups", help="GroupNorm groups: the largest divisor of each layer's channels not above this.")] = 32,
    save_as: Annotated[SaveAs, typer.Option("--as", help="module: the whole module pickled (bnctl and your classes importable to load it); state-dict: the weights of the converted architecture.")] = SaveAs("module"),
    fmt: ConvertFormatOpt = ConvertFormat("table"),
) -> None:
    """Convert BatchNorm layers: to SyncBatchNorm and back, to and from FrozenBatchNorm, to GroupNorm."""
    from ..jobs.convert import convert_file

    report = convert_file(source.at(path), output, to.value, inputs=inputs, groups=groups, save_as=save_as.value)
    emit(report, fmt.value)
    typer.echo(f"wrote {output}", err=True)
