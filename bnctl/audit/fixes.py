"""The repairs of ``bnctl audit --fix`` (:data:`bnctl.core.registry.FIXABLE`), on models in
memory: each returns what it changed and what it could not repair, and writes nothing.

Every repair keeps the eval-mode function exactly: a BN set to eval mode normalizes with the
statistics it stores (only where they are real: finite and estimated from data); a conv bias
before a BN moves into the BN's running mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.onnx import attribute, node_name

#: statistics too broken to normalize with: recalibrate first
_NOT_REAL = "its statistics are not real (non-finite or never estimated): run bnctl recalibrate first"


@dataclass
class Repairs:
    """What a fix changed (``(code, layer, change)``) and could not (``(code, layer, why)``)."""

    fixed: list[tuple[str, str, str]] = field(default_factory=list)
    unfixed: list[tuple[str, str, str]] = field(default_factory=list)


def _real(mean: Any, var: Any) -> bool:
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    if not (np.isfinite(mean).all() and np.isfinite(var).all()) or (var < 0).any():
        return False
    return not ((mean == 0).all() and (var == 1).all())


def fix_onnx(model: Any, layers: set[str]) -> tuple[Any, Repairs]:
    """BN401 on a copy of ``model``: the BatchNormalization nodes named in ``layers`` become
    inference nodes (training_mode 0, only the normalized output), where their statistics
    are real constants and no other node reads their running mean/var outputs."""
    import onnx
    from onnx import numpy_helper

    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    repairs = Repairs()
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization":
            continue
        scale_name = node.input[1] if len(node.input) > 1 else ""
        name = scale_name[: -len(".weight")] if scale_name.endswith(".weight") else (node.name or f"BatchNormalization_{index}")
        if name not in layers and node_name(node) not in layers:
            continue
        extra = [o for o in node.output[1:] if o]
        if any(o in read for o in extra):
            repairs.unfixed.append(("BN401", name, "other nodes read its running mean/var outputs"))
            continue
        stats = [constants.get(n) for n in node.input[3:5]]
        if any(s is None for s in stats) or not _real(*stats):
            repairs.unfixed.append(("BN401", name, _NOT_REAL if all(s is not None for s in stats) else "its statistics are not constants"))
            continue
        was = attribute(node, "training_mode", 0)
        for a in [a for a in node.attribute if a.name in ("training_mode", "momentum")]:
            node.attribute.remove(a)
        del node.output[1:]
        repairs.fixed.append(("BN401", name, f"training_mode {was} -> 0" + (f", {len(extra)} running statistics outputs removed" if extra else "")))
    return new, repairs


def _submodule(model: Any, name: str) -> Any:
    """``model.get_submodule(name)``, also for TorchScript modules (which lack it)."""
    for part in filter(None, name.split(".")):
        model = getattr(model, part)
    return model


def fix_module(model: Any, codes: dict[str, set[str]]) -> Repairs:
    """BN201 and BN208 on ``model`` in place (an ``nn.Module`` or a loaded TorchScript module).
    ``codes`` maps a code to the layers its findings name."""
    import torch

    from ..core.modules import is_batchnorm
    from .model_checks import conv_bias_pairs

    repairs = Repairs()
    if codes.get("BN201"):
        training = [n for n, m in model.named_modules() if is_batchnorm(m) and m.training]
        broken = [n for n in training if not _real(getattr(_submodule(model, n), "running_mean", 0), getattr(_submodule(model, n), "running_var", 1))]
        model.eval()
        for name in training:
            if name in broken:
                repairs.unfixed.append(("BN201", name, "set to eval mode, but " + _NOT_REAL))
            else:
                repairs.fixed.append(("BN201", name, "train mode -> eval mode"))
    if codes.get("BN208"):
        for bn_name, layer_name in conv_bias_pairs(model):
            if bn_name not in codes["BN208"]:
                continue
            try:
                bn, layer = _submodule(model, bn_name), _submodule(model, layer_name)
            except AttributeError:
                repairs.unfixed.append(("BN208", bn_name, f"{layer_name} is not a submodule that can be changed"))
                continue
            if getattr(bn, "running_mean", None) is None or layer.bias is None or layer.bias.shape != bn.running_mean.shape:
                repairs.unfixed.append(("BN208", bn_name, f"{layer_name}'s bias does not match the BN's channels"))
                continue
            with torch.no_grad():
                bias = layer.bias.detach().to(torch.float64)
                bn.running_mean.copy_((bn.running_mean.to(torch.float64) - bias).to(bn.running_mean.dtype))
                layer.bias.zero_()
            repairs.fixed.append(("BN208", bn_name, f"{layer_name}.bias moved into running_mean and set to 0"))
    return repairs


def fix_program(program: Any, layers: set[str]) -> tuple[Any, Any, Repairs]:
    """BN201 on a ``torch.export`` program exported in train mode: its batch-norm calls for
    the layers named normalize with their stored statistics (``training=False``), where those
    are real, and its dropout calls stop dropping (a program exported in train mode has both).
    Returns the program exported again, its graph module, and the repairs."""
    import torch

    from ..core.modules import from_program

    found = {l.name: l for l in from_program(program)}
    sources = {**program.graph_signature.inputs_to_parameters, **program.graph_signature.inputs_to_buffers}
    layer_of = {}  # batch-norm node name -> layer, through the program's own graph signature
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.batch_norm.default and isinstance(node.args[3], torch.fx.Node):
            layer_of[node.name] = sources.get(node.args[3].name, node.name).rpartition(".")[0]
    module = program.module()
    repairs = Repairs()
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default or len(node.args) < 6 or node.args[5] is not True:
            continue
        name = layer_of.get(node.name, node.name)
        if name not in layers:
            continue
        layer = found.get(name)
        if layer is None or layer.running_mean is None or not _real(layer.running_mean.detach().numpy(), layer.running_var.detach().numpy()):
            repairs.unfixed.append(("BN201", name, _NOT_REAL))
            continue
        node.args = (*node.args[:5], False, *node.args[6:])
        repairs.fixed.append(("BN201", name, "batch_norm(training=True) -> training=False"))
    if not repairs.fixed:
        return program, module, repairs
    dropouts = [n for n in module.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.dropout.default and len(n.args) > 2 and n.args[2] is True]
    for node in dropouts:
        node.args = (node.args[0], node.args[1], False)
    if dropouts:
        repairs.fixed.append(("BN201", "", f"{len(dropouts)} dropout calls exported in train mode -> train=False"))
    module.recompile()
    args, kwargs = program.example_inputs
    return torch.export.export(module, tuple(args), kwargs or None), module, repairs
