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

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from . import graph as g
from . import verify
from .errors import InputError
from .fold_math import Kind, bn_scale_shift, fold_after, fold_before, identity_bn, in_channels, out_channels

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


# --- the graph path ---------------------------------------------------------------------


def _bn_refusal(gm: nn.Module, bn: g.BNCall) -> str | None:
    """Why this BN cannot be folded whatever its neighbours are, or None."""
    if bn.targets["running_mean"] is None or bn.targets["running_var"] is None:
        return "it has no running statistics (track_running_stats=False): it normalizes with batch statistics"
    if bn.training:
        return "it is still in train mode after model.eval() (batch statistics)"
    if "<computed>" in bn.targets.values():
        return "its statistics or affine parameters are computed in forward, not stored"
    if bn.extra_outputs_used():
        return "its saved mean/var outputs are read"
    var = g.get_attr(gm, bn.targets["running_var"])
    mean = g.get_attr(gm, bn.targets["running_mean"])
    if not (torch.isfinite(var).all() and torch.isfinite(mean).all()):
        return "its running statistics are not finite"
    if (var.double() + bn.eps <= 0).any():
        return "running_var + eps is not positive"
    return None


def _scale_shift(gm: nn.Module, bn: g.BNCall) -> tuple[torch.Tensor, torch.Tensor]:
    t = {k: (g.get_attr(gm, v) if v else None) for k, v in bn.targets.items()}
    return bn_scale_shift(t["running_mean"], t["running_var"], bn.eps, t["weight"], t["bias"])


def _layer_refusal(gm: nn.Module, layer: g.LayerCall, channels: int, side: str, bn: g.BNCall) -> str | None:
    """Why this BN cannot fold into ``layer`` on ``side``, whatever the wiring, or None."""
    if layer.weight_target is None:
        return f"the weight of {layer.name} is computed in forward, not read from a parameter"
    if not layer.bias_ok:
        return f"the bias of {layer.name} is computed in forward, not read from a parameter"
    weight = g.get_attr(gm, layer.weight_target)
    if not weight.is_floating_point():
        return f"{layer.name} has a {weight.dtype} weight"
    count = out_channels(weight, layer.kind, layer.groups) if side == "after" else in_channels(weight, layer.kind, layer.groups)
    if count != channels:
        return f"{layer.name} has {count} {'output' if side == 'after' else 'input'} channels, the BN {channels}"
    if layer.kind == "linear":
        rank = g.input_rank(bn.input)
        if rank != 2:
            return f"the BN normalizes dim 1 of a {rank}-D input, but {layer.name} (linear) works on the last dim"
    return None


def _producer(gm: nn.Module, bn: g.BNCall, channels: int) -> tuple[g.LayerCall | None, str]:
    """The conv/linear call whose output only this BN reads, or None and why not."""
    layer = g.layer_call(bn.input)
    if layer is None:
        return None, f"its input comes from {g.describe(bn.input)}"
    others = [u for u in bn.input.users if u is not bn.node]
    if others:
        return None, f"the output of {layer.name} is also read by {', '.join(g.describe(u) for u in others)}"
    return (None, why) if (why := _layer_refusal(gm, layer, channels, "after", bn)) else (layer, "")


def _consumer(gm: nn.Module, bn: g.BNCall, channels: int, shift: torch.Tensor) -> tuple[g.LayerCall | None, str, str | None]:
    """The conv/linear call that alone reads this BN's output, where folding is exact.

    Returns the layer (or None and why not) and a note on padding looked through.
    """
    users = list(bn.output.users)
    if len(users) != 1:
        names = ", ".join(g.describe(u) for u in users) or "nothing"
        return None, f"its output goes to {len(users)} places ({names})", None
    user, note = users[0], None
    if g.mirror_pad(user) and user.args[0] is bn.output and len(user.users) == 1:
        user, note = next(iter(user.users)), "through reflect/replicate padding"
    layer = g.layer_call(user)
    if layer is None or layer.args["input"] is not (bn.output if note is None else users[0]):
        return None, f"its output goes to {g.describe(user)}", None
    if layer.kind == "conv_transpose":
        return None, f"it precedes {layer.name} (transposed conv): border outputs see fewer taps, so its shift is not a bias", None
    if (why := _layer_refusal(gm, layer, channels, "before", bn)) is not None:
        return None, why, None
    if note is None and layer.zero_pads() and bool(shift.abs().max() > 0):
        return None, f"it precedes {layer.name}, which pads with zeros that never went through the BN (not exact)", None
    return layer, "", note


def _fresh(owner: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(owner, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _store(gm: nn.Module, target: str, value: torch.Tensor, like: torch.Tensor | None) -> None:
    """Put ``value`` at ``target`` (a new Parameter, or a buffer where a buffer was)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if name in owner._buffers:
        owner._buffers[name] = value.detach()
        return
    requires_grad = bool(like.requires_grad) if like is not None else False
    if name in owner.__dict__:
        delattr(owner, name)
    owner._parameters[name] = nn.Parameter(value.detach(), requires_grad=requires_grad)


def _point_to(gm: fx.GraphModule, layer: g.LayerCall, arg: str, target: str) -> None:
    """Make argument ``arg`` of the layer call read attribute ``target``."""
    current = layer.args.get(arg)
    if isinstance(current, fx.Node) and current.op == "get_attr" and current.target == target:
        return
    with gm.graph.inserting_before(layer.node):
        node = gm.graph.get_attr(target)
    g.set_arg(layer.node, layer.signature, arg, node)


def _fold_pair(gm: fx.GraphModule, bn: g.BNCall, layer: g.LayerCall, side: str, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
    """Rewrite the layer's weights to include the BN, and take the BN out of the graph.

    A layer whose parameters other calls also read gets folded copies for this call
    (returns a note saying so); the other calls keep the originals.
    """
    w_target = layer.weight_target
    b_target = layer.bias_node.target if layer.bias_node is not None else None
    weight = g.get_attr(gm, w_target)
    bias = g.get_attr(gm, b_target) if b_target else None
    fn = fold_after if side == "after" else fold_before
    new_w, new_b = fn(weight, bias, scale, shift, layer.kind, layer.groups)
    owner_path = w_target.rpartition(".")[0]
    owner = gm.get_submodule(owner_path)
    prefix = f"{owner_path}." if owner_path else ""
    shared = len(g.attr_users(gm, w_target)) > 1 or (b_target is not None and len(g.attr_users(gm, b_target)) > 1)
    note = None
    if shared:
        calls = len(g.attr_users(gm, w_target))
        note = f"{layer.name} is called {calls} times: folded into a copy for this call"
        w_target = prefix + _fresh(owner, w_target.rpartition(".")[2] + "_folded")
        _store(gm, w_target, new_w, weight)
        b_target = prefix + _fresh(owner, "bias_folded")
    else:
        _store(gm, w_target, new_w, weight)
        if b_target is None:
            b_target = prefix + ("bias" if getattr(owner, "bias", None) is None and "bias" not in owner._buffers else _fresh(owner, "bias_folded"))
    _store(gm, b_target, new_b, bias if bias is not None else weight)
    _point_to(gm, layer, "weight", w_target)
    _point_to(gm, layer, "bias", b_target)
    if side == "after":
        bn.output.replace_all_uses_with(layer.node)
    else:
        bn.output.replace_all_uses_with(bn.input)
    _erase_bn(gm, bn)
    return note


def _erase_bn(gm: fx.GraphModule, bn: g.BNCall) -> None:
    inputs = [a for a in bn.node.all_input_nodes if a.op == "get_attr"]
    for user in list(bn.node.users):
        gm.graph.erase_node(user)
    gm.graph.erase_node(bn.node)
    for node in inputs:
        if not node.users:
            gm.graph.erase_node(node)


def _prune(gm: fx.GraphModule) -> None:
    """Drop attributes and submodules that the rewritten graph no longer reads."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    # removing unused submodules first keeps the BN modules the graph shares with the
    # caller's model intact (their tensors leave with them)
    gm.delete_all_unused_submodules()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    tensors = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in tensors:
        if name in used or name.startswith(called):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if hasattr(owner, attr):
            delattr(owner, attr)
    gm.graph.lint()
    gm.recompile()


def fold_graph(gm: fx.GraphModule) -> tuple[list[dict], list[dict], int]:
    """Fold every BN of ``gm`` that can be folded exactly, in place.

    The graph's nodes should carry shapes (``ShapeProp``) where BN meets a linear layer.
    Returns the folded pairs, the skipped BNs with reasons, and how many BN calls there were.
    """
    folded: list[dict] = []
    skipped: list[dict] = []
    count = 0
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        bn = g.bn_call(gm, node)
        if bn is None:
            continue
        count += 1
        refusal = _bn_refusal(gm, bn)
        if refusal:
            skipped.append({"bn": bn.name, "reason": refusal})
            continue
        scale, shift = _scale_shift(gm, bn)
        channels = scale.numel()
        layer, why_after = _producer(gm, bn, channels)
        side, note = "after", None
        if layer is None:
            layer, why_before, note = _consumer(gm, bn, channels, shift)
            side = "before"
            if layer is None:
                skipped.append({"bn": bn.name, "reason": f"{why_after}; {why_before}"})
                continue
        copy_note = _fold_pair(gm, bn, layer, side, scale, shift)
        notes = [n for n in (note, copy_note) if n]
        folded.append({"bn": bn.name, "into": layer.name, "side": side, "note": "; ".join(notes) or None})
    _prune(gm)
    return folded, skipped, count


def count_bn(gm: fx.GraphModule) -> int:
    """BatchNorm calls left in a graph."""
    return sum(1 for n in gm.graph.nodes if g.bn_call(gm, n) is not None)


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
    if exported:
        original: Any = model.module()
        path = "torch.export"
    else:
        original = copy.deepcopy(model).eval()
        path = "fx"
    reference = reference_outputs(original, inputs)
    report = FoldReport(path=path, tolerance=tolerance, reference=reference, inputs=", ".join(f"{tuple(t.shape)}" for t in inputs if isinstance(t, torch.Tensor)))

    traced = None
    if isinstance(original, torch.jit.ScriptModule):
        report.notes.append("TorchScript cannot be traced by torch.fx: candidate pairs come from the module tree")
    elif exported:
        traced = copy.deepcopy(original)
    else:
        try:
            traced = g.trace(original)
        except Exception as exc:  # noqa: BLE001 - any tracing failure sends us down the fallback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            report.notes.append(f"torch.fx cannot trace the model ({type(exc).__name__}: {first[:200]}): candidate pairs come from the module tree")

    if traced is None or keep_modules:
        report.path = "module-tree" if traced is None else report.path
        result, report.folded, report.skipped, report.bn_before = _fold_keeping_modules(original, traced, inputs, reference, tolerance)
        report.bn_after = report.bn_before - len(report.folded)
        if report.folded and (keep_modules or isinstance(result, torch.jit.ScriptModule)):
            report.notes.append(f"the {len(report.folded)} folded BN layers stay as identity modules (weight 1, mean 0, var 1 - eps, bias = the shift where the layer has no bias)")
    else:
        ShapeProp(traced).propagate(*inputs)
        report.folded, report.skipped, report.bn_before = fold_graph(traced)
        report.bn_after = count_bn(traced)
        result = traced
    report.max_abs_error, report.max_rel_error = verify.compare(reference, verify.run(result, inputs))
    return result, report


def _fold_keeping_modules(original: Any, traced: fx.GraphModule | None, inputs: tuple, reference: list, tolerance: float) -> tuple[Any, list, list, int]:
    """The module-tree fold, or (with a traced graph) the graph's pairs applied as identities."""
    bn_count = sum(1 for _, m in original.named_modules() if _is_bn(m))
    if traced is None:
        result, folded, skipped = _fold_module_tree(original, inputs, reference, tolerance)
        if not isinstance(result, torch.jit.ScriptModule):
            _drop_identities(result, folded)
        return result, folded, skipped, bn_count
    ShapeProp(traced).propagate(*inputs)
    pairs, skipped, _ = fold_graph(traced)
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


def input_shapes_help(shapes: Sequence[str]) -> list[tuple[int, ...]]:
    """Parse ``--input-shape`` values."""
    return [verify.parse_shape(s) for s in shapes]
