"""``bnctl export``'s job: read the model, :func:`bnctl.ops.export.export` it, list the
audit's ONNX findings on the graph, write it if ONNX Runtime matched PyTorch."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from .. import _atomic
from ..errors import InputError
from ..io import writers
from ..io.kinds import OnnxGraph
from ..io.shapes import Layout
from ..io.source import CheckInputs, ModelSource
from ..ops.export import ExportReport, export
from .artifact import deliver


def export_file(source: ModelSource, output: str | Path, *, inputs: CheckInputs = CheckInputs(), stage: Callable[[str], None] = lambda text: None, **options: Any) -> ExportReport:
    """Read ``source`` (a state_dict with ``arch``, a pickled module, a ``.pt2``), export it
    (``options`` are :func:`~bnctl.ops.export.export`'s) and write ``output`` if it checks out."""
    from ..audit.checks import onnx_findings

    output = Path(output)
    _atomic.refuse_overwrite(source.path, output)
    stage(f"reading {source.path}")
    opened = source.open()
    name = opened.checkpoint.path.name
    if isinstance(opened.kind, OnnxGraph):
        raise InputError(f"{name} is already ONNX", "to fold its BatchNorm nodes use bnctl fold; to check it use bnctl audit")
    model = opened.runnable("exporting")
    program = opened.checkpoint.program
    if program is not None:
        model = opened.kind.as_module(opened.trusted)
        layout = options.get("layout", Layout())
        if layout.dims not in ("auto", "static"):
            raise InputError(f"{name} is a torch.export program: its dynamic dims were chosen when it was exported", "export the original model (state_dict + --arch) with --dynamic")
        options["layout"] = dataclasses.replace(layout, dims="static")  # the program's own shapes (its guards fix them)
    examples = inputs.make()
    if examples is None and program is not None:
        examples = tuple(program.example_inputs[0])
    if examples is None:
        raise InputError("exporting needs example inputs", "pass --input-shape 1,3,224,224 (once per model input) or --data DIR")
    stage("exporting, folding and checking in ONNX Runtime")
    proto, report = export(model, examples, **options)
    report.findings = onnx_findings(proto)
    report.output = str(output)
    deliver(writers.onnx_artifact(proto, output), output, report)  # the graph the operation checked in ONNX Runtime
    return report
