"""Fold BatchNorm calls out of an fx graph: pair each BN with the conv/linear call next to it
(from :mod:`bnctl.graph`'s views of the data flow), rewrite that call's weights, drop the BN.

The graph is rewritten in place; the tensors are not. Every new tensor goes into an
:class:`Attrs` overlay over the module the graph came from, which is read but never
written, so the caller's model stays as it was. :func:`build_module` then makes a
GraphModule that owns copies of everything it uses; :func:`install` writes the overlay into a
GraphModule that is ours to change (the unlifted module of a ``.pt2``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ...core import graph as g
from .report import make_standalone
from .math import bn_scale_shift, fold_after, fold_before, in_channels, out_channels, unrepresentable


class Attrs:
    """The attributes a graph reads: those of ``root``, overridden by new tensors in ``new``."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.new: dict[str, torch.Tensor] = {}

    def get(self, target: str) -> Any:
        return self.new[target] if target in self.new else g.get_attr(self.root, target)

    def exists(self, target: str) -> bool:
        if target in self.new:
            return True
        try:
            return g.get_attr(self.root, target) is not None
        except AttributeError:
            return False

    def fresh(self, prefix: str, base: str) -> str:
        """An attribute path ``prefix + base[_n]`` that nothing uses yet."""
        name, i = prefix + base, 1
        while self.exists(name):
            name, i = f"{prefix}{base}_{i}", i + 1
        return name

    def set(self, target: str, value: torch.Tensor, like: torch.Tensor | None) -> None:
        """A new tensor at ``target``: a Parameter, unless ``like`` (the tensor it replaces) is a buffer."""
        if like is not None and not isinstance(like, nn.Parameter):
            self.new[target] = value.detach()
        else:
            requires_grad = bool(like.requires_grad) if like is not None else False
            self.new[target] = nn.Parameter(value.detach(), requires_grad=requires_grad)


# --- decisions --------------------------------------------------------------------------


def _bn_refusal(attrs: Attrs, bn: g.BNCall) -> str | None:
    """Why this BN cannot be folded whatever its neighbours are, or None."""
    if bn.targets["running_mean"] is None or bn.targets["running_var"] is None:
        return "it has no running statistics (track_running_stats=False): it normalizes with batch statistics"
    if bn.training:
        return "it is still in train mode after model.eval() (batch statistics)"
    if "<computed>" in bn.targets.values():
        return "its statistics or affine parameters are computed in forward, not stored"
    if bn.extra_outputs_used():
        return "its saved mean/var outputs are read"
    var, mean = attrs.get(bn.targets["running_var"]), attrs.get(bn.targets["running_mean"])
    if not (torch.isfinite(var).all() and torch.isfinite(mean).all()):
        return "its running statistics are not finite"
    if (var.double() + bn.eps <= 0).any():
        return "running_var + eps is not positive"
    return None


def _scale_shift(attrs: Attrs, bn: g.BNCall) -> tuple[torch.Tensor, torch.Tensor]:
    t = {k: (attrs.get(v) if v else None) for k, v in bn.targets.items()}
    return bn_scale_shift(t["running_mean"], t["running_var"], bn.eps, t["weight"], t["bias"])


def _layer_refusal(attrs: Attrs, layer: g.LayerCall, channels: int, side: str, bn: g.BNCall) -> str | None:
    """Why this BN cannot fold into ``layer`` on ``side``, whatever the wiring, or None."""
    if layer.weight_target is None:
        return f"the weight of {layer.name} is computed in forward, not read from a parameter"
    if not layer.bias_ok:
        return f"the bias of {layer.name} is computed in forward, not read from a parameter"
    weight = attrs.get(layer.weight_target)
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


def _producer(attrs: Attrs, bn: g.BNCall, channels: int) -> tuple[g.LayerCall | None, str]:
    """The conv/linear call whose output only this BN reads, or None and why not."""
    layer = g.layer_call(bn.input)
    if layer is None:
        return None, f"its input comes from {g.describe(bn.input)}"
    others = [u for u in bn.input.users if u is not bn.node and not g.shape_read(u)]
    if others:
        return None, f"the output of {layer.name} is also read by {', '.join(g.describe(u) for u in others)}"
    return (None, why) if (why := _layer_refusal(attrs, layer, channels, "after", bn)) else (layer, "")


def _consumer(attrs: Attrs, bn: g.BNCall, channels: int, shift: torch.Tensor) -> tuple[g.LayerCall | None, str, str | None]:
    """The conv/linear call that alone reads this BN's output, where folding is exact.

    Returns the layer (or None and why not) and a note on padding looked through.
    """
    users = [u for u in bn.output.users if not g.shape_read(u)]  # shape reads go to the BN's input
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
    if (why := _layer_refusal(attrs, layer, channels, "before", bn)) is not None:
        return None, why, None
    if note is None and layer.zero_pads() and bool(shift.abs().max() > 0):
        return None, f"it precedes {layer.name}, which pads with zeros that never went through the BN (not exact)", None
    return layer, "", note


# --- rewriting --------------------------------------------------------------------------


def _point_to(graph: fx.Graph, layer: g.LayerCall, arg: str, target: str) -> None:
    """Make argument ``arg`` of the layer call read attribute ``target``."""
    current = layer.args.get(arg)
    if isinstance(current, fx.Node) and current.op == "get_attr" and current.target == target:
        return
    with graph.inserting_before(layer.node), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tensor lives in the Attrs overlay until build_module
        node = graph.get_attr(target)
    g.set_arg(layer.node, layer.signature, arg, node)


def _attr_readers(graph: fx.Graph, target: str) -> int:
    return sum(len(n.users) for n in graph.nodes if n.op == "get_attr" and n.target == target)


def _fold_pair(graph: fx.Graph, attrs: Attrs, bn: g.BNCall, layer: g.LayerCall, side: str, scale: torch.Tensor, shift: torch.Tensor) -> tuple[str | None, dict]:
    """Rewrite the layer's weights to include the BN, and take the BN out of the graph.

    A layer whose parameters other calls also read gets folded copies for this call
    (the note returned says so); the other calls keep the originals. Returns that note and
    the int8 readiness of the weight as written (:func:`bnctl.core.int8.readiness`).
    """
    w_target = layer.weight_target
    b_target = layer.bias_node.target if layer.bias_node is not None else None
    weight = attrs.get(w_target)
    bias = attrs.get(b_target) if b_target else None
    fn = fold_after if side == "after" else fold_before
    new_w, new_b = fn(weight, bias, scale, shift, layer.kind, layer.groups)
    owner_path, _, w_name = w_target.rpartition(".")
    prefix = f"{owner_path}." if owner_path else ""
    calls = _attr_readers(graph, w_target)
    note = None
    if calls > 1 or (b_target is not None and _attr_readers(graph, b_target) > 1):
        note = f"{layer.name} is called {calls} times: folded into a copy for this call"
        w_target, b_target = attrs.fresh(prefix, f"{w_name}_folded"), attrs.fresh(prefix, "bias_folded")
    elif b_target is None:
        b_target = prefix + "bias" if not attrs.exists(prefix + "bias") else attrs.fresh(prefix, "bias_folded")
    attrs.set(w_target, new_w, weight)
    attrs.set(b_target, new_b, bias if bias is not None else weight)
    _point_to(graph, layer, "weight", w_target)
    _point_to(graph, layer, "bias", b_target)
    bn.output.replace_all_uses_with(layer.node if side == "after" else bn.input)
    _erase_bn(graph, bn)
    var = attrs.get(bn.targets["running_var"]) if side == "after" and bn.targets.get("running_var") else None
    return note, int8_of(weight, new_w.to(weight.dtype), layer.kind, var)


def int8_of(before: torch.Tensor, after: torch.Tensor, kind: str, running_var: torch.Tensor | None = None) -> dict:
    """The int8 block of a folded layer's weight (output channels on axis 1 of a transposed
    conv's, else 0), with the BN's ``running_var`` where its channels are the outputs."""
    from ...core.int8 import readiness

    var = None if running_var is None else running_var.detach().double().numpy()
    return readiness(before.detach().double().numpy(), after.detach().double().numpy(), 1 if kind == "conv_transpose" else 0, var)


def _unrepresentable(attrs: Attrs, layer: g.LayerCall, side: str, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
    """Why the folded weights would not fit the layer's dtype (float16, bfloat16), or None."""
    weight = attrs.get(layer.weight_target)
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return None
    bias = attrs.get(layer.bias_node.target) if layer.bias_node is not None else None
    fn = fold_after if side == "after" else fold_before
    exact_w, exact_b = fn(weight.double(), None if bias is None else bias.double(), scale, shift, layer.kind, layer.groups)
    return unrepresentable(exact_w, exact_b, weight.dtype)


def _erase_bn(graph: fx.Graph, bn: g.BNCall) -> None:
    inputs = [a for a in bn.node.all_input_nodes if a.op == "get_attr"]
    for user in list(bn.node.users):
        graph.erase_node(user)
    graph.erase_node(bn.node)
    for node in inputs:
        if not node.users:
            graph.erase_node(node)


def fold_graph(graph: fx.Graph, attrs: Attrs, standalone: str | None = None) -> tuple[list[dict], list[dict], int]:
    """Fold every BN call of ``graph`` that folds exactly; the graph changes in place, new
    tensors go to ``attrs``.

    Nodes should carry shapes (:func:`propagate_shapes`) where BN meets a linear layer.
    Returns the folded pairs, the skipped BNs with reasons, and how many BN calls there were.
    """
    folded: list[dict] = []
    pending = [node for node in graph.nodes if g.bn_call(attrs.root, node) is not None]
    count = len(pending)
    while True:  # again over those kept: a BN before a BN that folded may fold now (BN -> BN -> Conv)
        kept = []
        for node in pending:
            bn = None if node._erased else g.bn_call(attrs.root, node)
            if bn is None:
                continue
            entry = _fold_one(graph, attrs, bn)
            if "into" in entry:
                folded.append(entry)
            else:
                kept.append((node, entry))
        if len(kept) == len(pending):
            break
        pending = [node for node, _ in kept]
    if standalone == "affine":
        made, kept = make_standalone(kept, lambda node, reason: _make_affine(graph, attrs, g.bn_call(attrs.root, node), reason))
        folded += made
    skipped = [entry for _, entry in kept]
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    return folded, skipped, count


def _merge_into_next(graph: fx.Graph, attrs: Attrs, bn: g.BNCall, scale: torch.Tensor, shift: torch.Tensor) -> dict | None:
    """Merge ``bn`` into the BN call that alone reads its output (inference mode, same
    channels, affine parameters stored): the second takes ``scale1*scale2`` and
    ``scale2*shift1 + shift2`` as weight and bias, mean 0 and var ``1 - eps``; ``bn`` goes.
    None where there is no such pair."""
    users = [u for u in bn.output.users if not g.shape_read(u)]
    second = g.bn_call(attrs.root, users[0]) if len(users) == 1 else None
    if second is None or second.input is not bn.output or _bn_refusal(attrs, second) or second.targets["weight"] is None or second.targets["bias"] is None:
        return None
    if not 0 < second.eps < 1 or "<computed>" in second.targets.values():
        return None
    s2, t2 = _scale_shift(attrs, second)
    if s2.shape != scale.shape:
        return None
    for key, value in (("weight", scale * s2), ("bias", s2 * shift + t2), ("running_mean", torch.zeros_like(scale)), ("running_var", torch.full_like(scale, 1.0 - second.eps))):
        like = attrs.get(second.targets[key])
        attrs.set(second.targets[key], value.to(like.dtype), like)
    bn.output.replace_all_uses_with(bn.input)
    _erase_bn(graph, bn)
    return {"bn": bn.name, "into": second.name, "side": "merged", "note": "two BNs in a row: merged into one"}


def _make_affine(graph: fx.Graph, attrs: Attrs, bn: g.BNCall | None, reason: str) -> dict | None:
    """Replace a BN call in inference mode by ``x * scale + shift`` (``torch.mul``/``torch.add``
    with constants shaped ``(C, 1, ..., 1)`` for its input's rank, which lower to mul/add in
    every exporter); None (the BN stays) where it normalizes with batch statistics or the
    rank is unknown (:func:`propagate_shapes` with ``every_bn``)."""
    if bn is None or _bn_refusal(attrs, bn):
        return None
    meta = bn.input.meta.get("tensor_meta") if isinstance(bn.input, fx.Node) else None
    if meta is None or len(meta.shape) < 2:
        return None
    scale, shift = _scale_shift(attrs, bn)
    like = attrs.get(bn.targets["running_var"])
    shape = (-1,) + (1,) * (len(meta.shape) - 2)
    owner = bn.name.rpartition(".")[0]
    prefix = f"{owner}." if owner else ""
    leaf = bn.name.rpartition(".")[2]
    names = []
    for part, value in (("scale", scale), ("shift", shift)):
        target = attrs.fresh(prefix, f"{leaf}_affine_{part}")
        attrs.set(target, value.to(like.dtype).reshape(shape), like)
        names.append(target)
    with graph.inserting_before(bn.node), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tensors live in the Attrs overlay until build_module
        scaled = graph.call_function(torch.mul, (bn.input, graph.get_attr(names[0])))
        out = graph.call_function(torch.add, (scaled, graph.get_attr(names[1])))
    bn.output.replace_all_uses_with(out)
    _erase_bn(graph, bn)
    return {"bn": bn.name, "into": "a per-channel mul + add", "side": "affine", "note": f"--standalone affine; it folds into no layer: {reason}"}


def _fold_one(graph: fx.Graph, attrs: Attrs, bn: g.BNCall) -> dict:
    """Fold one BN call where it folds exactly: ``{"bn", "into", "side", "note"}``, or
    ``{"bn", "reason"}`` with the graph unchanged."""
    refusal = _bn_refusal(attrs, bn)
    if refusal:
        return {"bn": bn.name, "reason": refusal}
    scale, shift = _scale_shift(attrs, bn)
    channels = scale.numel()
    layer, why_after = _producer(attrs, bn, channels)
    side, note = "after", None
    if layer is None:
        layer, why_before, note = _consumer(attrs, bn, channels, shift)
        side = "before"
        if layer is None:
            merged = _merge_into_next(graph, attrs, bn, scale, shift)
            return merged or {"bn": bn.name, "reason": f"{why_after}; {why_before}"}
    lost = _unrepresentable(attrs, layer, side, scale, shift)
    if lost is not None:
        return {"bn": bn.name, "reason": lost}
    copy_note, int8 = _fold_pair(graph, attrs, bn, layer, side, scale, shift)
    notes = [n for n in (note, copy_note) if n]
    return {"bn": bn.name, "into": layer.name, "side": side, "note": "; ".join(notes) or None, "int8": int8}


def propagate_shapes(graph: fx.Graph, root: nn.Module, inputs: tuple, every_bn: bool = False) -> None:
    """Record tensor shapes on the nodes (one interpreted forward pass), but only where a
    decision needs one: a BN next to a linear layer (is its input (N, C) or (N, C, L)?), or
    with ``every_bn`` any BN (the rank of a BN made affine)."""

    def next_to_linear(node: fx.Node) -> bool:
        bn = g.bn_call(root, node)
        if bn is None:
            return False
        around = [bn.input, *bn.output.users]
        return any((layer := g.layer_call(n)) is not None and layer.kind == "linear" for n in around)

    if any((every_bn and g.bn_call(root, n) is not None) or next_to_linear(n) for n in graph.nodes):
        module = root if isinstance(root, fx.GraphModule) and root.graph is graph else fx.GraphModule(root, graph)
        ShapeProp(module).propagate(*inputs)


def count_bn(gm: fx.GraphModule) -> int:
    """BatchNorm calls left in a graph module."""
    return sum(1 for n in gm.graph.nodes if g.bn_call(gm, n) is not None)


# --- the result as a module -------------------------------------------------------------


def _own(value: Any) -> Any:
    """A copy of a tensor (a Parameter stays one) or of a module with its tensors."""
    if isinstance(value, nn.Parameter):
        return nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, nn.Module):
        copy = g.shallow_copy(value)
        for module in copy.modules():
            for store in (module._parameters, module._buffers):
                for key, tensor in store.items():
                    if tensor is not None:
                        store[key] = _own(tensor)
        return copy
    return value


def build_module(graph: fx.Graph, attrs: Attrs, class_name: str) -> fx.GraphModule:
    """A GraphModule running ``graph`` that owns everything it reads: the new tensors of
    ``attrs`` and copies of the rest of ``attrs.root``'s (one code generation, no pruning)."""
    namespace = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in namespace:
            namespace[node.target] = attrs.new[node.target] if node.target in attrs.new else _own(attrs.get(node.target))
            if node.op == "call_module":  # a module whose own tensors were replaced (a BN merged into it)
                for target, value in attrs.new.items():
                    if target.startswith(f"{node.target}."):
                        owner_path, _, name = target[len(node.target) + 1 :].rpartition(".")
                        owner = namespace[node.target].get_submodule(owner_path)
                        (owner._buffers if name in owner._buffers else owner._parameters)[name] = value
    return fx.GraphModule(namespace, graph, class_name=class_name)


def install(gm: fx.GraphModule, attrs: Attrs) -> None:
    """Write ``attrs``' new tensors into ``gm`` (whose graph was folded) and drop what the
    graph no longer reads."""
    for target, value in attrs.new.items():
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if name in owner._buffers:
            owner._buffers[name] = value.detach()
            continue
        if name in owner.__dict__:
            delattr(owner, name)
        owner._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    gm.delete_all_unused_submodules()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    for name in [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [n for n, _ in gm.named_buffers(remove_duplicate=False)]:
        if name not in used and not name.startswith(called):
            owner_path, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner_path), attr)
    gm.recompile()
