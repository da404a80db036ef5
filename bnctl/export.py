"""``bnctl export``: a PyTorch model to ONNX with its BatchNorm layers ready for inference.

Eval mode (and a check that every BN really is in eval), SyncBatchNorm reverted, BN folded
(unless told not to), exported with torch.onnx (the torch.export-based exporter; the
TorchScript-based one as a fallback, said in the report), ``onnx.checker``, the audit's ONNX
checks, and ONNX Runtime against PyTorch on the check inputs. Nothing is written beyond the
tolerance.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _atomic, verify
from .errors import InputError
from .folding import DEFAULT_TOLERANCE, reference_outputs


@dataclass
class ExportReport:
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
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    checked_shapes: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    output: str | None = None
    written: bool = False

    @property
    def ok(self) -> bool:
        return self.max_rel_error is not None and self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"ok": self.ok}


def _still_training(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]


def _operator(exc: BaseException) -> str | None:
    """The operator an exporter failed on, from its message (``aten::foo``, ``aten.foo.default``)."""
    text = str(exc)
    for pattern in (r"aten::[A-Za-z0-9_.]+", r"aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", r"torch\.ops\.[A-Za-z0-9_.]+", r"operator '?([A-Za-z0-9_:.]+)'?"):
        match = re.search(pattern, text)
        if match:
            return match.group(0)
    return None


def onnx_bytes(model: nn.Module, inputs: tuple, opset: int | None, dynamic_batch: bool) -> tuple[bytes, str]:
    """``model`` as ONNX bytes and the exporter that made them: torch.export-based first,
    TorchScript-based if that fails. An InputError naming the operator if both fail."""
    names = [f"input_{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["input"]
    errors = []
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                import onnxscript  # noqa: F401

                dynamic = tuple({0: torch.export.Dim("batch")} for _ in inputs) if dynamic_batch else None
                program = torch.onnx.export(model, inputs, dynamo=True, external_data=False, opset_version=opset, dynamic_shapes=dynamic, input_names=names, verbose=False)
                return program.model_proto.SerializeToString(), "torch.onnx (torch.export-based)"
            except ImportError:
                errors.append("onnxscript is not installed")
            except Exception as exc:  # noqa: BLE001 - try the other exporter
                errors.append(exc)
            buffer = io.BytesIO()
            try:
                axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
                torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=opset or 17, input_names=names, dynamic_axes=axes)
                return buffer.getvalue(), "torch.onnx (TorchScript-based fallback)"
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
    finally:
        logger.setLevel(level)
    named = [(e, _operator(e)) for e in errors if isinstance(e, BaseException)]
    exc, op = next(((e, o) for e, o in reversed(named) if o), (errors[-1] if errors else None, None))
    first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).strip().splitlines()[0]) if exc is not None and str(exc).strip() else "unknown error"
    raise InputError(
        f"the model does not export to ONNX{f' (operator {op})' if op else ''}: {first[:300]}",
        "replace or register that operator (torch.onnx custom symbolic / onnxscript), or export another part of the model",
    )


def _op_counts(data: bytes) -> dict[str, int]:
    import onnx

    return dict(Counter(n.op_type for n in onnx.load_from_string(data).graph.node).most_common())


def export(
    model: nn.Module,
    inputs: tuple,
    output: Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = False,
    fold: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Prepare ``model`` (a copy), export it to ``output`` and check it in ONNX Runtime."""
    import copy

    import onnx

    from . import onnx_graph
    from .audit.checks import from_rows, onnx_unfolded
    from .convert import to_batchnorm
    from .folding import fold as fold_model
    from .layers import from_onnx
    from .stats import rows

    report = ExportReport(opset=opset, tolerance=tolerance)
    model = copy.deepcopy(model)
    model.eval()
    report.steps.append("model.eval()")
    training = _still_training(model)
    if training:
        raise InputError(f"{', '.join(training[:3])} {'is' if len(training) == 1 else 'are'} still in train mode after model.eval(): the export would normalize with batch statistics",
                         "fix the module's train() override (bnctl audit --input-shape ... names it)")
    reference = reference_outputs(model, inputs)
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        model, converted = to_batchnorm(model, inputs)
        model.eval()
        report.steps.append(f"{len(converted.converted)} SyncBatchNorm reverted to BatchNorm1d/2d/3d")
    before, report.exporter = onnx_bytes(model, inputs, opset, dynamic_batch)
    data = before
    if fold and not isinstance(model, torch.jit.ScriptModule):
        folded, fold_report = fold_model(model, inputs, tolerance=tolerance)
        report.folded = len(fold_report.folded)
        report.steps.append(f"{report.folded} of {fold_report.bn_before} BN folded in PyTorch ({fold_report.path})")
        model = folded
        data, report.exporter = onnx_bytes(model, inputs, opset, dynamic_batch)
    proto = onnx.load_from_string(data)
    if fold and any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        # what PyTorch could not fold (or a TorchScript model): fold it in the graph
        proto, onnx_folded, _, _ = onnx_graph.fold_model(proto, onnx_graph.input_feeds(proto, [tuple(t.shape) for t in inputs]))
        report.folded += len(onnx_folded)
        report.steps.append(f"{len(onnx_folded)} BatchNormalization nodes folded in the ONNX graph")
        data = proto.SerializeToString()
    onnx.checker.check_model(proto)
    report.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    report.nodes_after, report.bytes_after = _op_counts(data), len(data)
    report.nodes_before, report.bytes_before = _op_counts(before), len(before)
    report.bn_left = report.nodes_after.get("BatchNormalization", 0)
    found = from_rows(rows(from_onnx(proto)), onnx=True) + onnx_unfolded(proto, None)
    report.findings = [{"check": code, "layer": layer, "message": message} for layer, code, message in found if code.startswith("BN4")]

    names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    checks = [inputs]
    if dynamic_batch:
        batch = inputs[0].shape[0]
        other = batch + 1 if batch > 1 else 3
        checks.append(tuple(torch.cat([t] * other)[:other] if isinstance(t, torch.Tensor) else t for t in inputs))
    worst_abs = worst_rel = 0.0
    for check in checks:
        expected = reference if check is inputs else reference_outputs(copy.deepcopy(model).eval(), check)
        got = onnx_graph.run(proto, {n: t.detach().numpy() for n, t in zip(names, check)})
        abs_err, rel_err = verify.compare(expected, got)
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
        report.checked_shapes.append(", ".join("x".join(map(str, t.shape)) for t in check if isinstance(t, torch.Tensor)))
    report.max_abs_error, report.max_rel_error = worst_abs, worst_rel
    report.output = str(output)
    if report.ok:
        _atomic.write_bytes(output, data)
        report.written = True
    return report


def export_file(
    path: str | Path,
    output: str | Path,
    *,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    key: str | None = None,
    trust: bool = False,
    input_shapes: Sequence[Sequence[int]] = (),
    data: Path | None = None,
    **options: Any,
) -> ExportReport:
    """Read ``path`` (a state_dict with ``arch``, a pickled module, a ``.pt2``) and :func:`export` it."""
    from .jobs import check_inputs, guard_output, open_for

    path, output = Path(path), Path(output)
    guard_output(path, output)
    checkpoint, model = open_for("exporting", path, arch=arch, arch_args=arch_args, key=key, trust=trust)
    if checkpoint.content == "onnx":
        raise InputError(f"{path.name} is already ONNX", "to fold its BatchNorm nodes use bnctl fold; to check it use bnctl audit")
    if checkpoint.program is not None:
        model = checkpoint.program.module()
    if checkpoint.program is not None and options.get("dynamic_batch"):
        raise InputError(f"{path.name} is a torch.export program with fixed input shapes: its batch size cannot be made dynamic", "export the original model (state_dict + --arch) with --dynamic-batch")
    inputs = check_inputs(input_shapes, data)
    if inputs is None and checkpoint.program is not None:
        inputs = tuple(checkpoint.program.example_inputs[0])
    if inputs is None:
        raise InputError("exporting needs example inputs", "pass --input-shape 1,3,224,224 (once per model input) or --data DIR")
    return export(model, inputs, output, **options)
