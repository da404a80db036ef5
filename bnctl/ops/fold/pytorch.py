"""``bnctl.fold``: fold BatchNorm into the conv and linear layers next to it, and prove the
model computes what it computed before.

Three paths, chosen by what the model is:

- ``fx``: an ``nn.Module`` that torch.fx can trace. Pairs come from the data flow of the
  traced graph (:mod:`bnctl.core.graph`); folded BN calls are removed from the graph.
- ``torch.export``: an ``ExportedProgram`` (a ``.pt2``); the same, on its aten graph.
- ``torchscript``: a TorchScript module (scripted or traced), folded on its graph by
  ``torch.jit.freeze`` (:mod:`.script`).
- ``module-tree``: a module that cannot be traced (and TorchScript when every module must
  stay). Candidate pairs are a BN and the module registered right before it; each is kept
  only if the model's outputs stay within tolerance with it folded.

Whatever the path, the outputs on the check inputs before and after are compared and the
errors are in the report.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...core import graph as g
from ...core import verify
from ...core.modules import training_batchnorms
from ...errors import InputError, one_line
from . import fx as gf
from .report import FoldReport, tolerance_for
from .script import fold_script
from .tree import fold_keeping_modules


def trace_for_fold(model: nn.Module, given: int | None = None) -> fx.Graph:
    """``model``'s fx graph, traced in eval mode (BN subclasses bake their mode in); the
    parameters of ``forward`` after the ``given`` inputs keep their constant defaults."""
    with verify.eval_mode(model):
        return g.trace_graph(model, given)


def fold_traced(graph: fx.Graph, model: nn.Module, inputs: tuple, standalone: str | None = None) -> tuple[fx.GraphModule, list[dict], list[dict], int]:
    """Fold a traced model's graph and build the folded module; no verification.

    ``model`` is read, never changed: the result owns copies of what it uses.
    """
    attrs = gf.Attrs(model)
    # in eval mode: the modes of the modules the graph calls decide, and their copies keep them
    with verify.eval_mode(model):
        gf.propagate_shapes(graph, model, inputs, every_bn=standalone is not None)
        folded, skipped, count = gf.fold_graph(graph, attrs, standalone)
        result = gf.build_module(graph, attrs, type(model).__name__)
    result.training = False
    return result, folded, skipped, count


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def fold(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any = None,
    *,
    tolerance: float | None = None,
    keep_modules: bool = False,
    standalone: str | None = None,
) -> tuple[Any, FoldReport]:
    """Fold every BatchNorm of ``model`` that folds exactly; the model itself is not changed.

    ``model`` may be an ``nn.Module``, a TorchScript module, a ``torch.export`` program or an
    ONNX ``ModelProto`` (folded on its graph and checked in ONNX Runtime:
    :func:`.onnx_checked.fold_graph`, where ``example_inputs`` may be left out for a graph
    with static input shapes); the folded model comes back in the same kind.

    ``example_inputs`` (a tensor or a tuple of them; a ``.pt2`` program brings its own) feed
    the verification: the report holds the max abs and relative output error of the folded
    model against the original in eval mode, and ``report.ok`` says whether it is within
    ``tolerance`` (by default, the one of the outputs' dtype: :data:`.report.TOLERANCES`). With ``keep_modules``, no module is removed: each folded BN becomes an
    identity (see :func:`fold_identity`) so the state_dict loads into the original class.
    With ``standalone="affine"``, every BN that folds into no layer becomes a per-channel
    mul + add on the traced paths (fx and torch.export), and the report lists it with side
    ``"affine"``.
    """
    if type(model).__name__ == "ModelProto":  # onnx's, without importing onnx for every fold
        from .onnx_checked import fold_graph

        return fold_graph(model, example_inputs, tolerance=tolerance, standalone=standalone)
    exported = isinstance(model, torch.export.ExportedProgram)
    if example_inputs is None and exported and model.example_inputs is not None:
        example_inputs = model.example_inputs[0]
    if example_inputs is None:
        raise InputError("folding needs example inputs to trace and verify the model", "pass --input-shape 1,3,224,224 (one per model input) or --data DIR")
    inputs = _as_inputs(example_inputs)
    notes: list[str] = []
    traced = None
    if exported:
        original: Any = model.module()
        reference = verify.reference_outputs(original, inputs)
        traced = model.module()  # a second unlifted module, to rewrite
    elif isinstance(model, torch.jit.ScriptModule):
        original = copy.deepcopy(model).eval()
        reference = verify.reference_outputs(original, inputs)
        if keep_modules:
            notes.append("TorchScript cannot be traced by torch.fx: candidate pairs come from the module tree")
    else:
        with verify.eval_mode(model):
            if training_batchnorms(model):
                model = copy.deepcopy(model)  # a BN kept training: forward passes would update its statistics
            reference = verify.reference_outputs(model, inputs)
            try:
                traced = trace_for_fold(model, len(inputs))
            except Exception as exc:  # noqa: BLE001 - any tracing failure sends us down the fallback
                notes.append(f"torch.fx cannot trace the model ({type(exc).__name__}: {one_line(exc, limit=200)}): candidate pairs come from the module tree")
            # the module-tree and keep-modules paths rewrite a copy, taken in eval mode
            original = copy.deepcopy(model) if traced is None or keep_modules else model
    path = "torch.export" if exported else "fx"
    tolerance, source = tolerance_for(reference, tolerance)
    report = FoldReport(path=path, tolerance=tolerance, tolerance_source=source, reference=reference, notes=notes, inputs=verify.shapes_text(inputs, tuples=True))

    if standalone is not None and (traced is None or keep_modules or isinstance(model, torch.jit.ScriptModule)):
        report.notes.append(f"--standalone {standalone} rewrites traced graphs (fx, torch.export); on this path the BNs that fold into no layer stay BNs")
    if isinstance(model, torch.jit.ScriptModule) and not keep_modules:
        report.path = "torchscript"
        result, report.folded, report.skipped, report.bn_before = fold_script(original)
        report.bn_after = report.bn_before - len(report.folded)
        report.notes.append("folded by torch.jit.freeze on the module's graph: the written module keeps forward only, not other methods or attributes")
    elif traced is None or keep_modules:
        report.path = "module-tree" if traced is None else report.path
        result, report.folded, report.skipped, report.bn_before = fold_keeping_modules(original, traced, inputs, reference, tolerance)
        report.bn_after = report.bn_before - len(report.folded)
        if report.folded and (keep_modules or isinstance(result, torch.jit.ScriptModule)):
            report.notes.append(f"the {len(report.folded)} folded BN layers stay as identity modules (weight 1, mean 0, var 1 - eps, bias = the shift where the layer has no bias)")
    else:
        if exported:
            attrs = gf.Attrs(traced)
            gf.propagate_shapes(traced.graph, traced, inputs, every_bn=standalone is not None)
            report.folded, report.skipped, report.bn_before = gf.fold_graph(traced.graph, attrs, standalone)
            gf.install(traced, attrs)
            result = traced
        else:
            result, report.folded, report.skipped, report.bn_before = fold_traced(traced, model, inputs, standalone)
        report.bn_after = gf.count_bn(result)
    report.record(verify.compare(reference, verify.run(result, inputs)))
    return result, report
