"""``bnctl.fold``: fold BatchNorm into the conv and linear layers next to it, and prove the
model computes what it computed before.

Three paths, chosen by what the model is:

- ``fx``: an ``nn.Module`` that torch.fx can trace. Pairs come from the data flow of the
  traced graph (:mod:`bnctl.graph`); folded BN calls are removed from the graph.
- ``torch.export``: an ``ExportedProgram`` (a ``.pt2``); the same, on its aten graph.
- ``module-tree``: a module that cannot be traced, or a TorchScript module. Candidate pairs
  are a BN and the module registered right before it; each is kept only if the model's
  outputs stay within tolerance with it folded.

Whatever the path, the outputs on the check inputs before and after are compared and the
errors are in the report.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from . import graph as g
from . import graph_fold as gf
from . import verify
from .errors import InputError
from .fold_math import Kind, bn_scale_shift, fold_after, fold_before, identity_bn

DEFAULT_TOLERANCE = 1e-4


@dataclass
class FoldReport:
    """What was folded, what was not and why, and how far the outputs moved."""

    path: str
    folded: list[dict[str, Any]] = field(default_factory=list)  # {"bn", "into", "side", "note"}
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"bn", "reason"}
    bn_before: int = 0
    bn_after: int = 0
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    inputs: str = ""
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    format: str | None = None
    written: bool = False
    reference: list[torch.Tensor] = field(default_factory=list, repr=False)  # the original's outputs

    @property
    def ok(self) -> bool:
        """The outputs were compared and moved no more than the tolerance (relative)."""
        return self.max_rel_error is not None and self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of DESIGN.md's fold contract (non-finite numbers become null)."""

        def num(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        return {
            "path": self.path,
            "folded": self.folded,
            "skipped": self.skipped,
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "max_abs_error": num(self.max_abs_error),
            "max_rel_error": num(self.max_rel_error),
            "tolerance": self.tolerance,
            "ok": self.ok,
            "inputs": self.inputs,
            "notes": self.notes,
            "output": self.output,
            "output_format": self.format,
            "written": self.written,
        }


# --- the module-tree path ---------------------------------------------------------------


def _kind_of(module: nn.Module) -> Kind | None:
    """conv / conv_transpose / linear for torch modules and TorchScript modules of those classes."""
    name = getattr(module, "original_name", type(module).__name__)
    if isinstance(module, _ConvTransposeNd) or name.startswith("ConvTranspose"):
        return "conv_transpose"
    if isinstance(module, _ConvNd) or name in ("Conv1d", "Conv2d", "Conv3d"):
        return "conv"
    if isinstance(module, nn.Linear) or name == "Linear":
        return "linear"
    return None


def _is_bn(module: nn.Module) -> bool:
    name = getattr(module, "original_name", "")
    return isinstance(module, _BatchNorm) or name.startswith(("BatchNorm", "SyncBatchNorm"))


def _module_candidates(model: nn.Module) -> tuple[list[tuple[str, str]], list[dict]]:
    """(bn, producer) pairs: each BN and the leaf module registered just before it."""
    leaves = [(n, m) for n, m in model.named_modules() if n and (not list(m.children()) or _is_bn(m))]
    pairs, skipped = [], []
    for i, (name, module) in enumerate(leaves):
        if not _is_bn(module):
            continue
        prev = leaves[i - 1] if i else None
        if prev is None or _kind_of(prev[1]) is None:
            skipped.append({"bn": name, "reason": f"the module before it ({prev[0] if prev else 'none'}) is no conv or linear"})
            continue
        pairs.append((name, prev[0]))
    return pairs, skipped


def fold_identity(model: nn.Module, bn_name: str, layer_name: str, side: str = "after") -> None:
    """Fold in place, keeping every module: the layer takes the BN's scale, the BN becomes
    an identity (weight 1, mean 0, var 1 - eps) whose bias holds the shift when the layer
    has no bias of its own. Works on TorchScript modules too (values only change).

    Raises ValueError where the modules cannot hold the result.
    """
    bn = g.get_attr(model, bn_name)
    layer = g.get_attr(model, layer_name)
    kind = _kind_of(layer)
    if kind is None or bn.running_mean is None:
        raise ValueError("not a foldable pair")
    groups = int(getattr(layer, "groups", 1))
    scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, float(bn.eps), bn.weight, bn.bias)
    fn = fold_after if side == "after" else fold_before
    new_w, new_b = fn(layer.weight, layer.bias, scale, shift, kind, groups)
    keep_shift = layer.bias is None
    if keep_shift and (side == "before" or bn.bias is None):
        raise ValueError(f"{layer_name} has no bias to take the shift")
    with torch.no_grad():
        layer.weight.copy_(new_w)
        if not keep_shift:
            layer.bias.copy_(new_b)
        for key, value in identity_bn(scale.numel(), float(bn.eps), new_b if keep_shift else None, bn.running_mean.dtype).items():
            if getattr(bn, key, None) is not None:
                getattr(bn, key).copy_(value)


def _fold_module_tree(model: nn.Module, inputs: tuple, reference: list[torch.Tensor], tolerance: float) -> tuple[nn.Module, list[dict], list[dict]]:
    """Candidates from the module tree, each kept only if the outputs stay within tolerance."""
    pairs, skipped = _module_candidates(model)
    folded: list[dict] = []
    work = copy.deepcopy(model)
    for bn_name, layer_name in pairs:
        trial = copy.deepcopy(work)
        try:
            fold_identity(trial, bn_name, layer_name)
        except ValueError as exc:
            skipped.append({"bn": bn_name, "reason": str(exc)})
            continue
        _, rel = verify.compare(reference, verify.run(trial, inputs))
        if rel <= tolerance:
            work = trial
            folded.append({"bn": bn_name, "into": layer_name, "side": "after", "note": "verified on the check inputs"})
        else:
            skipped.append({"bn": bn_name, "reason": f"folding into {layer_name} changed the outputs (rel. error {rel:.2g})"})
    return work, folded, skipped


def _drop_identities(model: nn.Module, folded: list[dict]) -> None:
    """Replace each identity BN of a plain module tree with nn.Identity, its shift in the layer's bias."""
    for entry in folded:
        bn = model.get_submodule(entry["bn"])
        layer = model.get_submodule(entry["into"])
        if layer.bias is None:
            layer.bias = nn.Parameter(bn.bias.detach().clone().to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
        parent_name, _, attr = entry["bn"].rpartition(".")
        setattr(model.get_submodule(parent_name), attr, nn.Identity())


# --- the library function ---------------------------------------------------------------


def trace_for_fold(model: nn.Module) -> fx.Graph:
    """``model``'s fx graph, traced in eval mode (BN subclasses bake their mode in)."""
    with _eval_mode(model):
        return g.trace_graph(model)


def fold_traced(graph: fx.Graph, model: nn.Module, inputs: tuple) -> tuple[fx.GraphModule, list[dict], list[dict], int]:
    """Fold a traced model's graph and build the folded module; no verification.

    ``model`` is read, never changed: the result owns copies of what it uses.
    """
    attrs = gf.Attrs(model)
    # in eval mode: the modes of the modules the graph calls decide, and their copies keep them
    with _eval_mode(model):
        gf.propagate_shapes(graph, model, inputs)
        folded, skipped, count = gf.fold_graph(graph, attrs)
        result = gf.build_module(graph, attrs, type(model).__name__)
    result.training = False
    return result, folded, skipped, count


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, then every module's mode as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def reference_outputs(model: Any, inputs: tuple) -> list[torch.Tensor]:
    """The model's outputs on ``inputs``; an InputError naming the shapes if it rejects them."""
    try:
        return verify.run(model, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here means the inputs do not fit
        shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs if isinstance(t, torch.Tensor))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"the model rejects inputs of shape {shapes}: {first[:300]}", "pass the shape its forward expects with --input-shape (one per input)") from exc


def fold(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Any = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    keep_modules: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """Fold every BatchNorm of ``model`` that folds exactly; the model itself is not changed.

    ``example_inputs`` (a tensor or a tuple of them; a ``.pt2`` program brings its own) feed
    the verification: the report holds the max abs and relative output error of the folded
    model against the original in eval mode, and ``report.ok`` says whether it is within
    ``tolerance``. With ``keep_modules``, no module is removed: each folded BN becomes an
    identity (see :func:`fold_identity`) so the state_dict loads into the original class.
    """
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
        reference = reference_outputs(original, inputs)
        traced = model.module()  # a second unlifted module, to rewrite
    elif isinstance(model, torch.jit.ScriptModule):
        original = copy.deepcopy(model).eval()
        reference = reference_outputs(original, inputs)
        notes.append("TorchScript cannot be traced by torch.fx: candidate pairs come from the module tree")
    else:
        with _eval_mode(model):
            if any(isinstance(m, _BatchNorm) and m.training for m in model.modules()):
                model = copy.deepcopy(model)  # a BN kept training: forward passes would update its statistics
            reference = reference_outputs(model, inputs)
            try:
                traced = trace_for_fold(model)
            except Exception as exc:  # noqa: BLE001 - any tracing failure sends us down the fallback
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                notes.append(f"torch.fx cannot trace the model ({type(exc).__name__}: {first[:200]}): candidate pairs come from the module tree")
            # the module-tree and keep-modules paths rewrite a copy, taken in eval mode
            original = copy.deepcopy(model) if traced is None or keep_modules else model
    path = "torch.export" if exported else "fx"
    report = FoldReport(path=path, tolerance=tolerance, reference=reference, notes=notes, inputs=", ".join(f"{tuple(t.shape)}" for t in inputs if isinstance(t, torch.Tensor)))

    if traced is None or keep_modules:
        report.path = "module-tree" if traced is None else report.path
        result, report.folded, report.skipped, report.bn_before = _fold_keeping_modules(original, traced, inputs, reference, tolerance)
        report.bn_after = report.bn_before - len(report.folded)
        if report.folded and (keep_modules or isinstance(result, torch.jit.ScriptModule)):
            report.notes.append(f"the {len(report.folded)} folded BN layers stay as identity modules (weight 1, mean 0, var 1 - eps, bias = the shift where the layer has no bias)")
    else:
        if exported:
            attrs = gf.Attrs(traced)
            gf.propagate_shapes(traced.graph, traced, inputs)
            report.folded, report.skipped, report.bn_before = gf.fold_graph(traced.graph, attrs)
            gf.install(traced, attrs)
            result = traced
        else:
            result, report.folded, report.skipped, report.bn_before = fold_traced(traced, model, inputs)
        report.bn_after = gf.count_bn(result)
    report.max_abs_error, report.max_rel_error = verify.compare(reference, verify.run(result, inputs))
    return result, report


def _fold_keeping_modules(original: Any, traced: fx.GraphModule | fx.Graph | None, inputs: tuple, reference: list, tolerance: float) -> tuple[Any, list, list, int]:
    """The module-tree fold, or (with a traced graph) the graph's pairs applied as identities."""
    bn_count = sum(1 for _, m in original.named_modules() if _is_bn(m))
    if traced is None:
        result, folded, skipped = _fold_module_tree(original, inputs, reference, tolerance)
        if not isinstance(result, torch.jit.ScriptModule):
            _drop_identities(result, folded)
        return result, folded, skipped, bn_count
    root = traced if isinstance(traced, fx.GraphModule) else original
    graph = traced.graph if isinstance(traced, fx.GraphModule) else traced
    gf.propagate_shapes(graph, root, inputs)
    pairs, skipped, _ = gf.fold_graph(graph, gf.Attrs(root))
    result = copy.deepcopy(original)
    folded = []
    modules = dict(result.named_modules())
    for entry in pairs:
        if entry["note"] and "copy" in entry["note"] or entry["bn"] not in modules or entry["into"] not in modules:
            skipped.append({"bn": entry["bn"], "reason": f"folds into {entry['into']} only as a graph rewrite; a state_dict of the unchanged class cannot hold it"})
            continue
        try:
            fold_identity(result, entry["bn"], entry["into"], entry["side"])
        except ValueError as exc:
            skipped.append({"bn": entry["bn"], "reason": f"{exc}; a state_dict of the unchanged class cannot hold it"})
            continue
        folded.append(entry)
    return result, folded, skipped, bn_count
