"""An ONNX graph folded and checked: :func:`fold_graph`, what ``bnctl.fold`` does with a
``ModelProto`` (and ``bnctl fold model.onnx``): :func:`~.onnx.fold_model`, ``onnx.checker``
before and after, and both graphs run in one ONNX Runtime child process on the check inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import InputError, one_line
from .report import FoldReport, tolerance_for


def fold_graph(model: Any, inputs: Any = None, *, tolerance: float | None = None, seed: int = 0, standalone: str | None = None, name: str = "the input graph") -> tuple[Any, FoldReport]:
    """Fold the BN nodes of the ONNX ``model`` (a copy; ``model`` is not changed) and compare
    the folded graph with it in ONNX Runtime.

    ``inputs``: the check inputs, one array or tensor per graph input in order (a dict by
    name also works); None draws random ones of the graph's static input shapes from ``seed``.
    ``report.ok`` says whether every output is within ``tolerance`` (by default the one of
    the outputs' dtype). A graph the checker refuses is folded all the same, said in the
    notes; a valid graph must stay valid. ``name`` is how errors call the input graph.
    """
    import onnx

    from ...core import onnx as onnx_run
    from ...core import verify
    from . import onnx as onnx_fold

    notes: list[str] = []
    arrays = list(inputs.values()) if isinstance(inputs, dict) else list(inputs) if isinstance(inputs, (tuple, list)) else None if inputs is None else [inputs]
    arrays = None if arrays is None else [a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a) for a in arrays]
    feeds = onnx_run.input_feeds(model, [tuple(a.shape) for a in arrays] if arrays else None, seed, notes)
    if arrays:
        feeds = {n: a.astype(v.dtype) for (n, v), a in zip(feeds.items(), arrays)}
    try:
        onnx.checker.check_model(model)
        valid = True
    except UnicodeDecodeError as exc:  # a name or string field that is not UTF-8: bytes damaged
        raise InputError(f"the ONNX graph is broken: a string in it is not UTF-8 ({exc})", "the file is damaged or was edited by hand; export it again") from None
    except onnx.checker.ValidationError as exc:  # published IR-3 files often fail it, yet run
        valid = False
        notes.append(f"the input graph is not valid ONNX ({one_line(exc)}); folded all the same, and the folded graph checked in ONNX Runtime")
    new, folded, skipped, count = onnx_fold.fold_model(model, standalone=standalone)
    if valid:
        onnx.checker.check_model(new)  # a valid graph stays valid: anything else is bnctl's bug
    report = FoldReport(path="onnx", folded=folded, skipped=skipped, bn_before=count, bn_after=count - len(folded))
    report.inputs = verify.shapes_text(list(feeds.values()), tuples=True)
    report.notes += notes
    try:  # both in one ONNX Runtime child process: a crash there is an error here, not the end
        reference, got = onnx_run.run_all([(name, model), ("the folded graph", new)], feeds)
    except InputError as exc:
        if f"cannot run {name}" not in exc.message:
            raise
        raise InputError(f"{exc.message} (check inputs {report.inputs})", "pass --input-shape with the graph's input shape, or check the opset and IR version onnxruntime supports") from None
    report.tolerance, report.tolerance_source = tolerance_for(reference, tolerance)
    report.record(verify.compare(reference, got))
    report.feeds = feeds
    return new, report
