"""The one path from an operation's result to a file, which every job that writes a model takes.

operation -> :mod:`bnctl.io.writers` builds the artifact (like the input, or as ``--to``
asks) -> :func:`deliver` runs *what will be written* on the check inputs (and at other
sizes where the file leaves dims dynamic), compared with the model it came from -> saved
atomically, only if it checked out. No job calls a saver itself.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..core import verify
from ..errors import InputError
from ..io import writers
from ..io.writers import Artifact


def deliver(
    artifact: Artifact,
    output: Path,
    report: Any = None,
    *,
    model: Any = None,
    examples: tuple | None = None,
    before_save: Callable[[Artifact], None] | None = None,
) -> bool:
    """Check ``artifact`` and save it to ``output``; returns whether it was written.

    With ``model`` and ``examples``, the artifact runs on them first (where it is not the
    in-memory ``model`` itself). A report that records comparisons (fold:
    :class:`~bnctl.ops.fold.report.Checked`) takes the differences, at other sizes too where
    the file leaves dims dynamic, and decides with its tolerance (``report.ok``); anything
    else must compute what ``model`` computes (both in eval mode), else an InputError and
    nothing written. Without check inputs, or where the operation already ran the very object
    that is written (an ONNX graph the fold or export compared in ONNX Runtime), nothing runs
    here. ``before_save`` (``--int8-check``) sees the artifact once it checked out.
    ``report.written`` is set.
    """
    checked = hasattr(report, "record")
    if model is not None and examples is not None:
        if checked:
            report.check_run(artifact.run, model, examples, artifact.inputs, getattr(report, "reference", None) or None)
        elif artifact.run is not model:
            with verify.eval_mode(model):
                expected = verify.reference_outputs(model, examples)
            run = artifact.run
            with verify.eval_mode(run) if isinstance(run, nn.Module) else contextlib.nullcontext():
                difference = verify.compare(expected, verify.run(run, examples))
            if not difference.within(1e-5):
                raise InputError(
                    f"the {artifact.target.value} file about to be written does not compute what the model computes (max abs error {difference.max_abs:.2g}); nothing was written", "report this with the model; --to another format may work"
                )
    if checked and not report.ok:
        return False
    if before_save is not None:
        before_save(artifact)
    writers.save(artifact, output)
    if report is not None and hasattr(report, "written"):
        report.written = True
    return True
