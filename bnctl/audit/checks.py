"""The statistics and ONNX checks of :mod:`bnctl.core.registry` (no torch: they read what
inspect reads); the configuration and behaviour checks, which need a module, are in
:mod:`bnctl.audit.model_checks`. Each function returns findings as :class:`Raw`
``(layer or None, code, message)``; the runner adds the file and filters them."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..core.registry import FLAG_CODES


class Raw(NamedTuple):
    """A finding before the runner adds the file and filters it: the layer (None: the whole
    model), the check's code, and the message (see :meth:`bnctl.core.registry.Check.message`)."""

    layer: str | None
    code: str
    message: str


def from_rows(rows: list[dict[str, Any]], onnx: bool) -> list[Raw]:
    """Statistics and mode findings from inspect's rows (no module needed)."""
    found: list[Raw] = []
    for row in rows:
        for flag, detail in zip(row["flags"], row["details"]):
            code = FLAG_CODES.get(flag)
            if code == "BN201" and onnx:
                code, detail = "BN401", "BatchNormalization runs in training mode (training_mode=1 or running mean/var outputs)"
            if code is not None:
                found.append(Raw(row["name"], code, detail))
        if row["averaging"] == "cumulative":
            found.append(Raw(row["name"], "BN205", "momentum=None: running statistics are a cumulative average"))
        if row["kind"] == "SyncBatchNorm":
            found.append(Raw(row["name"], "BN207", "SyncBatchNorm in a saved model: convert it back to BatchNorm for inference"))
    modes = [r for r in rows if r["training"] is not None]
    training = [r["name"] for r in modes if r["training"]]
    if training and len(training) < len(modes):
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        found.append(Raw(None, "BN202", f"{len(training)} of {len(modes)} BN layers are in train mode ({shown}), the rest in eval"))
    eps_values = sorted({r["eps"] for r in rows if r["eps"] is not None})
    if len(eps_values) > 1:
        counts = ", ".join(f"eps={e:g} in {sum(r['eps'] == e for r in rows)}" for e in eps_values)
        found.append(Raw(None, "BN209", f"BN layers use different eps values: {counts}"))
    return found


def onnx_unfolded(model: Any) -> list[Raw]:
    """BN402: BatchNormalization nodes that bnctl fold would fold; BN403: those whose fold
    would cost the weight more than :data:`bnctl.core.int8.DROP_DB` of int8 SQNR. A damaged
    graph raises the InputError that fold would (the file's audit fails; a gate is never
    green by accident)."""
    from ..ops.fold import onnx as onnx_fold

    _, folded, _, _ = onnx_fold.fold_model(model, plan=True)
    found = [Raw(f["bn"], "BN402", f"foldable into {f['into']}, the layer {'before' if f['side'] == 'after' else 'after'} it: bnctl fold removes it") for f in folded]
    return found + int8_findings(folded, "BN403")


def int8_findings(folded: list[dict[str, Any]], code: str) -> list[Raw]:
    """``code`` findings for the planned folds whose int8 readiness drops by more than
    :data:`bnctl.core.int8.DROP_DB`, worded as the fold report words them."""
    from ..core import int8

    return [Raw(f["bn"], code, int8.advice(f["bn"], f["into"], f["int8"]).removeprefix("int8 ")) for f in folded if f.get("int8") and int8.drop_db(f["int8"]) > int8.DROP_DB]


def onnx_findings(model: Any) -> list[dict[str, Any]]:
    """The ONNX checks (BN4xx) on a graph, as ``{"check", "layer", "message"}`` dicts."""
    from ..core.layers import from_onnx
    from ..core.stats import rows

    found = from_rows(rows(from_onnx(model)), onnx=True) + onnx_unfolded(model)
    return [{"check": code, "layer": layer, "message": message} for layer, code, message in found if code.startswith("BN4")]
