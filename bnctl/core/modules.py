"""BatchNorm layers of module trees (eager, TorchScript loaded or only read, pickled) and of
``torch.export`` programs; the one "is this a BN?" (:func:`is_batchnorm`) and its relatives."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import VIEW_OPS, BNLayer, counter, momentum_kind, program_layer

#: Class names of the BatchNorm modules torch ships (also what TorchScript keeps as original_name).
BATCHNORM_CLASSES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


def is_batchnorm(module: nn.Module) -> bool:
    """True for torch's BN modules (also scripted or lazy) and frozen-BN modules.

    A frozen BN (torchvision's FrozenBatchNorm2d, detectron2's, bnctl's own) is a module
    whose class name says BatchNorm and which keeps running_mean and running_var buffers.
    """
    if isinstance(module, _BatchNorm) or _is_lazy_batchnorm(module):
        return True
    name = _class_name(module)
    if name in BATCHNORM_CLASSES:
        return True
    buffers = dict(module.named_buffers(recurse=False))
    return "BatchNorm" in name and "running_mean" in buffers and "running_var" in buffers


def is_plain_batchnorm(module: nn.Module) -> bool:
    """A torch BN module whose forward is PyTorch's own: safe to treat as one opaque call."""
    return isinstance(module, _BatchNorm) and (type(module).__module__.startswith("torch.") or type(module).forward is _BatchNorm.forward)


def batchnorms(model: nn.Module, *, estimating: bool = False) -> dict[str, nn.Module]:
    """Every BN module of ``model`` by name (:func:`is_batchnorm`). With ``estimating``, only
    torch BN modules with running statistics: those a train-mode forward updates."""
    if estimating:
        return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_mean is not None}
    return {n: m for n, m in model.named_modules() if is_batchnorm(m)}


def training_batchnorms(model: nn.Module) -> list[str]:
    """Names of the torch BN modules in train mode: they normalize with batch statistics."""
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]


def is_frozen(module: nn.Module) -> bool:
    """A frozen BN (bnctl's FrozenBatchNorm, torchvision's, detectron2's): its statistics never move."""
    return not isinstance(module, _BatchNorm) and "Frozen" in _class_name(module)


def _is_lazy_batchnorm(module: nn.Module) -> bool:
    return type(module).__name__.startswith("LazyBatchNorm")


def _class_name(module: nn.Module) -> str:
    """The class name as the user wrote it: a TorchScript module's (loaded or only read) original one."""
    if isinstance(module, torch.jit.ScriptModule) or not isinstance(module, nn.Module):
        return getattr(module, "original_name", type(module).__name__)
    return type(module).__name__


def from_module(module: nn.Module, *, mode_known: bool = True) -> list[BNLayer]:
    """BN layers of a module tree (eager or TorchScript), in ``named_modules`` order.

    ``mode_known=False`` reports train/eval mode as unknown: a module freshly built by
    ``--arch`` is in the mode its constructor left, not the mode of the checkpoint.
    """
    layers = []
    for name, m in module.named_modules():
        if not is_batchnorm(m):
            continue
        params = dict(m.named_parameters(recurse=False))
        buffers = dict(m.named_buffers(recurse=False))
        tensors = {**buffers, **params}
        lazy = _is_lazy_batchnorm(m) and m.has_uninitialized_params()
        if lazy:
            layers.append(BNLayer(name=name, kind=type(m).__name__, num_features=0, materialized=False))
            continue
        momentum, averaging = momentum_kind(getattr(m, "momentum", None)) if hasattr(m, "momentum") else (None, None)
        mean, var = tensors.get("running_mean"), tensors.get("running_var")
        weight = tensors.get("weight")
        num_features = getattr(m, "num_features", None)
        if num_features is None:
            num_features = next((t.numel() for t in (mean, weight) if t is not None), 0)
        layers.append(
            BNLayer(
                name=name,
                kind=_class_name(m),
                num_features=int(num_features),
                eps=float(m.eps) if hasattr(m, "eps") else None,
                momentum=momentum,
                averaging=averaging,
                # a frozen BN normalizes with its statistics in either mode: its mode means nothing
                training=(False if is_frozen(m) else bool(m.training)) if mode_known else None,
                track_running_stats=bool(getattr(m, "track_running_stats", mean is not None)),
                weight=weight.detach() if weight is not None else None,
                bias=tensors["bias"].detach() if tensors.get("bias") is not None else None,
                running_mean=mean,
                running_var=var,
                num_batches_tracked=counter(tensors.get("num_batches_tracked")),
            )
        )
    return layers


# --- torch.export program ----------------------------------------------------------------

# positions of (training, momentum, eps) in each aten batch-norm overload; training None = eval-only op
_EXPORT_BN_ARGS = {
    "batch_norm": (5, 6, 7),
    "native_batch_norm": (5, 6, 7),
    "_native_batch_norm_legit": (5, 6, 7),
    "_native_batch_norm_legit_functional": (5, 6, 7),
    "_native_batch_norm_legit_no_training": (None, 5, 6),
    "cudnn_batch_norm": (5, 6, 7),
    "miopen_batch_norm": (5, 6, 7),
}


def _from_parameter(value: Any, sources: dict) -> bool:
    """Whether the graph value ``value`` is a parameter or buffer placeholder seen through
    view-like ops (a loop over one chain, never recursion)."""
    while isinstance(value, torch.fx.Node):
        if value.op == "placeholder":
            return value.name in sources
        op = getattr(value.target, "_opname", None) or getattr(value.target, "__name__", str(value.target)).split(".")[0]
        if value.op != "call_function" or op not in VIEW_OPS or not value.args:
            return False
        value = value.args[0]
    return False


def from_program(program: Any) -> list[BNLayer]:
    """BN layers of a ``torch.export`` ExportedProgram, found as batch-norm calls in its graph.

    Statistics and affine tensors come from the program's state_dict through the graph
    signature; eps, momentum and train/eval mode from the call's arguments; the module
    class from the node's ``nn_module_stack``.
    """
    signature = program.graph_signature
    sources = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    state = {**program.state_dict, **getattr(program, "constants", {})}
    found: dict[str, BNLayer] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        op = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if op not in _EXPORT_BN_ARGS:
            continue
        i_train, i_mom, i_eps = _EXPORT_BN_ARGS[op]
        args = list(node.args)

        def source(i: int) -> str | None:
            arg = args[i] if i < len(args) else None
            return sources.get(arg.name) if isinstance(arg, torch.fx.Node) else None

        names = [source(i) for i in range(1, 5)]  # weight, bias, running_mean, running_var
        if names[2] is None and names[3] is None and args and _from_parameter(args[0], sources):
            continue  # weight standardization (timm's StdConv2d): batch_norm of a conv's own weight, not a BN layer
        tensors = [state.get(n) if n else None for n in names]
        anchor = names[2] or names[0]
        name = anchor.rpartition(".")[0] if anchor else str(node.name)
        if name in found:
            found[name].uses += 1
            continue
        stack = node.meta.get("nn_module_stack") or {}
        kind = list(stack.values())[-1][1].rsplit(".", 1)[-1] if stack else None
        if isinstance(kind, type):
            kind = kind.__name__
        momentum, averaging = momentum_kind(args[i_mom] if i_mom < len(args) else None)
        training = bool(args[i_train]) if i_train is not None and i_train < len(args) else False
        nbt = state.get(f"{name}.num_batches_tracked") if name else None
        found[name] = program_layer(name, kind, tensors, args[i_eps] if i_eps < len(args) else None, (momentum, averaging), training, nbt)
    return list(found.values())


# --- ONNX --------------------------------------------------------------------------------
