"""``bnctl export``: a PyTorch model to ONNX with its BatchNorm layers ready for inference.

Eval mode (and a check that every BN really is in eval), SyncBatchNorm reverted, BN folded
(unless told not to), exported with torch.onnx (the torch.export-based exporter; the
TorchScript-based one as a fallback, said in the report), ``onnx.checker``, and ONNX Runtime
against PyTorch on the check inputs. The graph is returned; :mod:`bnctl.jobs.export` writes it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import verify
from ..core.modules import training_batchnorms
from ..errors import InputError
from ..io.shapes import Layout, describe_onnx, forward_names, settle_batch
from .fold.report import Checked, tolerance_for


@dataclass(kw_only=True)
class ExportReport(Checked):
    """What was done to the model, which exporter ran, and the parity and size figures."""

    exporter: str = ""
    opset: int | None = None
    steps: list[str] = field(default_factory=list)
    folded: int = 0
    bn_left: int = 0
    nodes_before: dict[str, int] = field(default_factory=dict)  # ONNX ops of the unfolded export
    nodes_after: dict[str, int] = field(default_factory=dict)
    bytes_before: int | None = None
    bytes_after: int = 0
    inputs: list[dict[str, Any]] = field(default_factory=list)  # the graph's inputs as written: {"name", "dtype", "shape"}
    outputs: list[str] = field(default_factory=list)
    checked_shapes: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    output: str | None = None
    written: bool = False
    int8_check: dict[str, Any] | None = None  # --int8-check (ops/int8_check.py)

    def ran_on(self, checked: list[tuple]) -> None:
        self.checked_shapes += [verify.shapes_text(check) for check in checked]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "difference"} | self.bound()


def _op_counts(data: bytes) -> dict[str, int]:
    import onnx

    return dict(Counter(n.op_type for n in onnx.load_from_string(data).graph.node).most_common())


def export(
    model: nn.Module,
    inputs: tuple,
    *,
    opset: int | None = None,
    layout: Layout = Layout(),
    fold: bool = True,
    tolerance: float | None = None,
    int8_check: bool = False,
) -> tuple[Any, ExportReport]:
    """Prepare ``model`` (a copy), export it to ONNX and check it in ONNX Runtime.

    ``layout`` (:class:`bnctl.io.shapes.Layout`): which input dims stay dynamic ("auto",
    the batch where the model allows it; "static"; or dim indices, each a named symbol) and
    the names: inputs after ``forward``'s parameters, outputs ``output``/``output_<i>``
    unless given. Returns the ONNX ``ModelProto`` and the report;
    ``report.ok`` says whether ONNX Runtime matched PyTorch within ``tolerance`` (by default
    the one of the outputs' dtype) on the inputs and, where a dim is dynamic, on inputs
    where every dynamic dim has another size. With ``int8_check``, ``report.int8_check``
    holds the output SQNR of the graph quantized by ONNX Runtime (:mod:`.int8_check`).
    ``model`` itself is not changed.
    """
    import onnx

    from ..core import onnx as onnx_run
    from ..io.exporter import onnx_bytes
    from .convert import to_batchnorm
    from .fold import onnx as onnx_fold
    from .fold.pytorch import fold as fold_model

    report = ExportReport(opset=opset)
    model = copy.deepcopy(model)
    model.eval()
    report.steps.append("model.eval()")
    training = training_batchnorms(model)
    if training:
        raise InputError(
            f"{', '.join(training[:3])} {'is' if len(training) == 1 else 'are'} still in train mode after model.eval(): the export would normalize with batch statistics", "fix the module's train() override (bnctl audit --input-shape ... names it)"
        )
    reference = verify.reference_outputs(model, inputs)
    report.tolerance, report.tolerance_source = tolerance_for(reference, tolerance)
    layout = settle_batch(model, inputs, layout, report.steps)
    if layout.input_names is None:  # the original's names: the folded GraphModule may name them otherwise
        layout = dataclasses.replace(layout, input_names=tuple(forward_names(model, len(inputs))))
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        model, converted = to_batchnorm(model, inputs)
        model.eval()
        report.steps.append(f"{len(converted.converted)} SyncBatchNorm reverted to BatchNorm1d/2d/3d")
    before, report.exporter = onnx_bytes(model, inputs, opset, layout)
    data = before
    if fold and not isinstance(model, torch.jit.ScriptModule):
        folded, fold_report = fold_model(model, inputs, tolerance=report.tolerance)
        report.folded = len(fold_report.folded)
        report.steps.append(f"{report.folded} of {fold_report.bn_before} BN folded in PyTorch ({fold_report.path})")
        model = folded
        data, report.exporter = onnx_bytes(model, inputs, opset, layout)
    proto = onnx.load_from_string(data)
    if fold and any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        # what PyTorch could not fold (or a TorchScript model): fold it in the graph
        proto, onnx_folded, _, _ = onnx_fold.fold_model(proto)
        report.folded += len(onnx_folded)
        report.steps.append(f"{len(onnx_folded)} BatchNormalization nodes folded in the ONNX graph")
        data = proto.SerializeToString()
    onnx.checker.check_model(proto)
    report.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    report.nodes_after, report.bytes_after = _op_counts(data), len(data)
    report.nodes_before, report.bytes_before = _op_counts(before), len(before)
    report.bn_left = report.nodes_after.get("BatchNormalization", 0)

    report.inputs = describe_onnx(proto)
    report.outputs = [o.name for o in proto.graph.output]
    graph_names = [d["name"] for d in report.inputs]

    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        return onnx_run.run(proto, {n: t.detach().numpy() for n, t in zip(graph_names, args)}, what="the exported graph")

    report.check_run(run, model, inputs, report.inputs, reference)
    if int8_check and report.ok:
        from .int8_check import int8_check as quantize_and_compare

        report.int8_check = quantize_and_compare(proto, {n: t.detach().numpy() for n, t in zip(graph_names, inputs)})
    return proto, report
