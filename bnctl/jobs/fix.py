"""``bnctl audit --fix``'s job: audit one file, repair what can be repaired
(:mod:`bnctl.audit.fixes`), check the repaired model computes what the original computes in
eval mode, write it (never over the input), and audit the written file again."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _atomic
from ..io.kinds import OnnxGraph, Program, StateDict
from ..io.writers import like_input, state_dict_artifact
from ..audit.fixes import Repairs, fix_module, fix_onnx, fix_program
from ..core.registry import FIXABLE
from ..audit.runner import AuditConfig, AuditResult, audit
from ..errors import InputError
from ..io.source import CheckInputs, ModelSource
from .artifact import deliver


@dataclass
class FixReport:
    """What was repaired, what could not be, and the audit of the written file."""

    before: AuditResult
    repairs: Repairs = field(default_factory=Repairs)
    after: AuditResult | None = None
    output: str | None = None
    written: bool = False
    max_abs_error: float | None = None  # eval-mode outputs, repaired against original, on the check inputs

    def to_dict(self) -> dict[str, Any]:
        return {
            "fixed": [{"check": c, "layer": l, "change": m} for c, l, m in self.repairs.fixed],
            "unfixed": [{"check": c, "layer": l, "reason": m} for c, l, m in self.repairs.unfixed],
            "not_fixable": sorted({f.code for f in self.before.findings if f.code not in FIXABLE}),
            "output": self.output,
            "written": self.written,
            "max_abs_error": self.max_abs_error,
            "after": self.after.to_dict() if self.after is not None else None,
        }


def fix_file(source: ModelSource, output: str | Path | None, *, config: AuditConfig | None = None, inputs: CheckInputs = CheckInputs()) -> FixReport:
    """Repair the findings of ``source`` that :data:`FIXABLE` lists and write the result to
    ``output`` (None: only say what would change)."""
    config = config or AuditConfig()
    if output is not None:
        _atomic.refuse_overwrite(source.path, output)
    report = FixReport(audit([source.path], model=source, inputs=inputs, config=config))
    if report.before.errors:
        raise InputError(f"{source.path}: {report.before.errors[0].error}", "fix what makes the file unreadable first")
    codes: dict[str, set[str]] = {}
    for f in report.before.findings:
        if f.code in FIXABLE:
            codes.setdefault(f.code, set()).add(f.layer or "")
    opened = source.open()
    checkpoint, kind = opened.checkpoint, opened.kind
    repaired, examples = None, None
    if not codes:
        pass
    elif isinstance(kind, OnnxGraph):
        repaired, report.repairs = fix_onnx(kind.proto, codes.get("BN401", set()))
        if report.repairs.fixed:
            _check_onnx(repaired)  # run in ONNX Runtime: the graph that is written
    elif isinstance(kind, Program):
        program = opened.runnable("fixing")  # a .pt2 is loaded and run only with --trust
        repaired, module, report.repairs = fix_program(program, codes.get("BN201", set()))
        if report.repairs.fixed:
            from ..core import verify

            args, _ = program.example_inputs
            report.max_abs_error = verify.compare(verify.run(module, tuple(args)), verify.run(repaired.module(), tuple(args)))[0]
    else:
        repaired = opened.runnable("fixing")  # TorchScript needs --trust; a state_dict needs --arch
        original = copy.deepcopy(repaired)
        report.repairs = fix_module(repaired, codes)
        examples = inputs.make()
        if examples is not None:
            from ..core import verify

            report.max_abs_error = verify.compare(verify.reference_outputs(original.eval(), examples), verify.reference_outputs(repaired, examples))[0]
    if output is not None and report.repairs.fixed:
        output = Path(output)
        # the input's own kind; a state_dict as the model's state_dict (the file's other entries are not repaired)
        artifact = state_dict_artifact(repaired, output) if isinstance(kind, StateDict) else like_input(checkpoint, repaired, output)
        deliver(artifact, output, report, model=repaired if examples is not None else None, examples=examples)
        report.output = str(output)
        report.after = audit([output], model=source.at(output), inputs=inputs, config=config)
    return report


def _check_onnx(after: Any) -> None:
    """The repaired graph passes onnx.checker and runs in ONNX Runtime; else nothing is written."""
    import onnx

    from ..core import onnx as onnx_run
    from ..errors import one_line

    try:
        onnx.checker.check_model(after)
        feeds = onnx_run.input_feeds(after, None)
    except InputError:
        return  # dynamic input shapes: the checker's word stands
    except Exception as exc:  # noqa: BLE001 - the checker's ValidationError
        raise InputError(f"the repaired graph is not valid ONNX: {one_line(exc)}", "report this; nothing was written") from exc
    onnx_run.run(after, feeds, what="the repaired graph")  # an InputError (nothing written) if it cannot
