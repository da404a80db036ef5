"""``bnctl fold``."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..io.source import CheckInputs, ModelSource
from ..io.targets import Target
from ..render.emit import emit
from .app import command, fail
from .options import CHECKS, MODEL, DynamicOpt, InputNamesOpt, Int8CheckOpt, OutputNamesOpt, PathArg, format_option, layout

FoldFormat, FoldFormatOpt = format_option("FoldReport")


class Standalone(str, enum.Enum):
    affine = "affine"


class FoldDtype(str, enum.Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@command()
def fold(
    path: PathArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the folded model (atomically; never the input).", show_default=False)],
    source: ModelSource = MODEL,
    inputs: CheckInputs = CHECKS,
    to: Annotated[
        Optional[Target],
        typer.Option("--to", help="Output format. Default: the extension (.pt2 .onnx .safetensors .ts), else TorchScript for TorchScript input, ONNX for ONNX, pt2 otherwise.", show_default=False),
    ] = None,
    tolerance: Annotated[
        Optional[float],
        typer.Option(
            "--tolerance",
            help="Output change allowed: every element within |a-b| <= atol + rtol*|b|, rtol the tolerance, atol the tolerance times the largest |output| (at least 1); beyond it: exit 1, nothing written. Default: by the outputs' dtype (float32 1e-4, float16 1e-2, bfloat16 5e-2).",
            show_default=False,
        ),
    ] = None,
    dynamic: DynamicOpt = None,
    input_names: InputNamesOpt = None,
    output_names: OutputNamesOpt = None,
    dtype: Annotated[
        Optional[FoldDtype],
        typer.Option("--dtype", help="Cast the model and the check inputs to this dtype before folding (float16 or bfloat16 for deployment): a BN whose folded weights overflow it or lose its precision is kept, with the reason.", show_default=False),
    ] = None,
    int8_check: Int8CheckOpt = False,
    standalone: Annotated[
        Optional[Standalone],
        typer.Option("--standalone", help="What becomes of a BN that folds into no layer: affine makes it a per-channel multiply-add (ONNX Mul + Add), for runtimes without a BatchNorm op. Default: it stays, with its reason.", show_default=False),
    ] = None,
    fmt: FoldFormatOpt = FoldFormat("table"),
) -> None:
    """Fold BatchNorm into the conv/linear layers next to it, check the outputs did not change, write the model."""
    from ..jobs.fold import fold_file
    from ..render.progress import stages

    with stages(sys.stderr.isatty()) as stage:
        report = fold_file(
            source.at(path),
            output,
            inputs=inputs,
            to=to,
            tolerance=tolerance,
            layout=layout(dynamic, input_names, output_names),
            dtype=dtype.value if dtype else None,
            int8_check=int8_check,
            standalone=standalone.value if standalone else None,
            stage=stage,
        )
    emit(report, fmt.value)
    if report.written:
        typer.echo(f"wrote {output} ({report.format})", err=True)
    if not report.ok:
        fail(
            f"the folded model's outputs moved by {report.errors_text()}, beyond the tolerance {report.tolerance:g} ({report.tolerance_source}): {report.bound_text()}; nothing written",
            "look at the layers folded above; raise --tolerance only if that change is acceptable",
            1,
        )
