"""``bnctl export``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..io.source import CheckInputs, ModelSource
from ..render.emit import emit
from .app import command, fail
from .options import CHECKS, MODEL, DynamicOpt, InputNamesOpt, Int8CheckOpt, OutputNamesOpt, PathArg, format_option, layout

ExportFormat, ExportFormatOpt = format_option("ExportReport")


@command()
def export(
    path: PathArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The ONNX file to write (atomically; only if ONNX Runtime matches PyTorch).", show_default=False)],
    source: ModelSource = MODEL,
    inputs: CheckInputs = CHECKS,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset. Default: the exporter's.")] = None,
    dynamic: DynamicOpt = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", metavar="", help="Same as --dynamic 0: the batch dim must stay dynamic (an error where the model fixes it).")] = False,
    input_names: InputNamesOpt = None,
    output_names: OutputNamesOpt = None,
    no_fold: Annotated[bool, typer.Option("--no-fold", metavar="", help="Keep the BatchNorm nodes.")] = False,
    tolerance: Annotated[
        Optional[float],
        typer.Option(
            "--tolerance",
            help="ONNX Runtime vs PyTorch bound: every element within |a-b| <= atol + rtol*|b|, rtol the tolerance, atol the tolerance times the largest |output| (at least 1); beyond it: exit 1, nothing written. Default: by the outputs' dtype (float32 1e-4, float16 1e-2, bfloat16 5e-2).",
            show_default=False,
        ),
    ] = None,
    int8_check: Int8CheckOpt = False,
    fmt: ExportFormatOpt = ExportFormat("table"),
) -> None:
    """Export to ONNX ready for inference: eval, SyncBN reverted, BN folded, checked in ONNX Runtime."""
    from ..jobs.export import export_file
    from ..render.progress import stages

    with stages(sys.stderr.isatty()) as stage:
        report = export_file(
            source.at(path),
            output,
            inputs=inputs,
            stage=stage,
            opset=opset,
            layout=layout(dynamic, input_names, output_names, dynamic_batch),
            fold=not no_fold,
            tolerance=tolerance,
            int8_check=int8_check,
        )
    emit(report, fmt.value)
    if report.written:
        typer.echo(f"wrote {output}", err=True)
    if not report.ok:
        fail(
            f"ONNX Runtime differs from PyTorch by {report.errors_text()}, beyond the tolerance {report.tolerance:g} ({report.tolerance_source}): {report.bound_text()}; nothing written",
            "check the operators listed above, or raise --tolerance if that difference is acceptable",
            1,
        )
