"""The module-tree path of a fold: for models torch.fx cannot trace, and TorchScript modules.

Candidate pairs are a BN and the leaf module registered right before it; each is kept only
if the model's outputs stay within tolerance with it folded. Folds happen in place on
copies, keeping every module: the BN becomes an identity (:func:`fold_identity`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ...core import graph as g
from ...core import verify
from ...core.graph import Kind
from ...core.modules import is_batchnorm
from . import fx as gf
from .math import bn_scale_shift, fold_after, fold_before, identity_bn


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


def _module_candidates(model: nn.Module) -> tuple[list[tuple[str, str]], list[dict]]:
    """(bn, producer) pairs: each BN and the leaf module registered just before it."""
    leaves = [(n, m) for n, m in model.named_modules() if n and (not list(m.children()) or is_batchnorm(m))]
    pairs, skipped = [], []
    for i, (name, module) in enumerate(leaves):
        if not is_batchnorm(module):
            continue
        if not hasattr(module, "eps"):  # a traced TorchScript BN: eps lives in the code
            skipped.append({"bn": name, "reason": "a traced TorchScript module keeps its eps in code, not as an attribute: fold it to TorchScript (--to torchscript), which folds on the graph"})
            continue
        prev = leaves[i - 1] if i else None
        if prev is None or _kind_of(prev[1]) is None:
            skipped.append({"bn": name, "reason": f"the module before it ({prev[0] if prev else 'none'}) is no conv or linear"})
            continue
        pairs.append((name, prev[0]))
    return pairs, skipped


def fold_identity(model: nn.Module, bn_name: str, layer_name: str, side: str = "after") -> dict:
    """Fold in place, keeping every module: the layer takes the BN's scale, the BN becomes
    an identity (weight 1, mean 0, var 1 - eps) whose bias holds the shift when the layer
    has no bias of its own. Works on TorchScript modules too (values only change).

    Returns the int8 readiness of the folded weight. Raises ValueError where the modules
    cannot hold the result.
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
    int8 = gf.int8_of(layer.weight, new_w.to(layer.weight.dtype), kind, bn.running_var if side == "after" else None)
    with torch.no_grad():
        layer.weight.copy_(new_w)
        if not keep_shift:
            layer.bias.copy_(new_b)
        for key, value in identity_bn(scale.numel(), float(bn.eps), new_b if keep_shift else None, bn.running_mean.dtype).items():
            if getattr(bn, key, None) is not None:
                getattr(bn, key).copy_(value)
    return int8


def _fold_module_tree(model: nn.Module, inputs: tuple, reference: list[torch.Tensor], tolerance: float) -> tuple[nn.Module, list[dict], list[dict]]:
    """Candidates from the module tree, each kept only if the outputs stay within tolerance."""
    pairs, skipped = _module_candidates(model)
    folded: list[dict] = []
    work = copy.deepcopy(model)
    for bn_name, layer_name in pairs:
        trial = copy.deepcopy(work)
        try:
            int8 = fold_identity(trial, bn_name, layer_name)
        except ValueError as exc:
            skipped.append({"bn": bn_name, "reason": str(exc)})
            continue
        difference = verify.compare(reference, verify.run(trial, inputs))
        if difference.within(tolerance):
            work = trial
            folded.append({"bn": bn_name, "into": layer_name, "side": "after", "note": "verified on the check inputs", "int8": int8})
        else:
            skipped.append({"bn": bn_name, "reason": f"folding into {layer_name} changed the outputs (max abs error {difference.max_abs:.2g}, rel. error {difference.max_rel:.2g})"})
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


def fold_keeping_modules(original: Any, traced: fx.GraphModule | fx.Graph | None, inputs: tuple, reference: list, tolerance: float) -> tuple[Any, list, list, int]:
    """The module-tree fold, or (with a traced graph) the graph's pairs applied as identities."""
    bn_count = sum(1 for _, m in original.named_modules() if is_batchnorm(m))
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
