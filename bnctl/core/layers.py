"""Find BatchNorm layers: in a state_dict, a module tree, a torch.export program, an ONNX graph.

Each finder returns :class:`BNLayer` records holding what the source says and ``None``
for what it does not: a bare state_dict records no eps, momentum, module type or mode,
and those stay unknown rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Class names of the BatchNorm modules torch ships (also what TorchScript keeps as original_name).
BATCHNORM_CLASSES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")

_STATE_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass
class BNLayer:
    """One BatchNorm layer as read from a file; ``None`` means the file does not say.

    ``momentum`` follows PyTorch's convention (weight of the new batch). ``averaging`` is
    ``"ema"`` for a float momentum, ``"cumulative"`` for ``momentum=None`` (a cumulative
    moving average) and ``None`` when unknown. ``uses`` counts the calls of the layer in a
    traced graph (1 elsewhere).
    """

    name: str
    kind: str | None
    num_features: int
    eps: float | None = None
    momentum: float | None = None
    averaging: str | None = None
    training: bool | None = None
    track_running_stats: bool | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    num_batches_tracked: int | None = None
    materialized: bool = True
    uses: int = 1
    problems: list[str] = field(default_factory=list)  # tensors that could not be used, and why


def _momentum(value: Any) -> tuple[float | None, str | None]:
    if value is None:
        return None, "cumulative"
    return float(value), "ema"


def _count(t: Any) -> int | None:
    """The counter's value; None where it is missing or not a finite number (:func:`usable` says why)."""
    if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided or t.numel() != 1 or t.is_complex():
        return None
    value = float(t.reshape(-1)[0])
    return int(value) if value == value and abs(value) != float("inf") else None


def _problem(t: Any, channels: int) -> str | None:
    """Why tensor ``t`` of a layer with ``channels`` channels cannot be used, or None."""
    if not isinstance(t, torch.Tensor):
        return f"is a {type(t).__name__}, not a tensor"
    if t.is_meta:
        return "has no data (a meta tensor)"
    if t.layout != torch.strided:
        return f"is {str(t.layout).replace('torch.', '')}, not dense"
    if t.is_complex() or t.dtype == torch.bool:
        return f"has dtype {str(t.dtype).replace('torch.', '')}"
    if tuple(t.shape) != (channels,):
        return f"has shape {tuple(t.shape)}, not ({channels},)"
    return None


def _counter_problem(t: Any) -> list[str]:
    if t is not None and _count(t) is None:
        return ["num_batches_tracked is not one finite number"]
    return []


def usable(layer: BNLayer) -> BNLayer:
    """``layer`` with every tensor it cannot use left out and said in ``problems``: a meta,
    sparse, complex or boolean tensor, one whose shape is not ``(channels,)``, a counter that
    is not one finite number. The rest of the layer is still summarized."""
    if not layer.materialized:
        return layer
    problems = list(layer.problems)
    kept = {}
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(layer, name)
        why = None if t is None else _problem(t, layer.num_features)
        if why is not None:
            problems.append(f"{name} {why}")
        kept[name] = None if why is not None else t
    if problems == layer.problems:
        return layer
    return replace(layer, problems=problems, **kept)


# --- state_dict -------------------------------------------------------------------------


def from_state_dict(tensors: Mapping[str, torch.Tensor]) -> list[BNLayer]:
    """BN layers of a state_dict: key prefixes holding both running_mean and running_var.

    Only the BN tensors are read (with a lazy mapping, nothing else leaves the disk).
    A BN with ``track_running_stats=False`` keeps only weight and bias in its state_dict,
    which cannot be told from any other affine layer without the module: pass ``--arch``.
    """
    groups: dict[str, dict[str, str]] = {}
    for key in tensors:
        prefix, _, leaf = key.rpartition(".")
        if leaf in _STATE_SUFFIXES:
            groups.setdefault(prefix, {})[leaf] = key
    layers = []
    for prefix, keys in groups.items():
        if "running_mean" not in keys or "running_var" not in keys:
            continue
        mean, var = tensors[keys["running_mean"]], tensors[keys["running_var"]]
        shaped = [t for t in (mean, var) if isinstance(t, torch.Tensor) and t.dim() == 1]
        if not shaped:
            continue  # statistics with no channel axis: not a BN (the name only looks like one)
        layers.append(
            BNLayer(
                name=prefix,
                kind=None,
                num_features=shaped[0].numel(),
                weight=tensors[keys["weight"]] if "weight" in keys else None,
                bias=tensors[keys["bias"]] if "bias" in keys else None,
                running_mean=mean,
                running_var=var,
                num_batches_tracked=_count(tensors[keys["num_batches_tracked"]]) if "num_batches_tracked" in keys else None,
            problems=_counter_problem(tensors[keys["num_batches_tracked"]]) if "num_batches_tracked" in keys else [],
            )
        )
    return layers


# --- module tree (eager, TorchScript, pickled) ------------------------------------------


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


def _is_frozen(module: nn.Module) -> bool:
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
        momentum, averaging = _momentum(getattr(m, "momentum", None)) if hasattr(m, "momentum") else (None, None)
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
                training=(False if _is_frozen(m) else bool(m.training)) if mode_known else None,
                track_running_stats=bool(getattr(m, "track_running_stats", mean is not None)),
                weight=weight.detach() if weight is not None else None,
                bias=tensors["bias"].detach() if tensors.get("bias") is not None else None,
                running_mean=mean,
                running_var=var,
                num_batches_tracked=_count(tensors.get("num_batches_tracked")),
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
        momentum, averaging = _momentum(args[i_mom] if i_mom < len(args) else None)
        training = bool(args[i_train]) if i_train is not None and i_train < len(args) else False
        nbt = state.get(f"{name}.num_batches_tracked") if name else None
        found[name] = BNLayer(
            name=name,
            kind=kind,
            num_features=next((t.numel() for t in tensors if t is not None), 0),
            eps=float(args[i_eps]) if i_eps < len(args) else None,
            momentum=momentum,
            averaging=averaging,
            training=training,
            track_running_stats=tensors[2] is not None,
            weight=tensors[0],
            bias=tensors[1],
            running_mean=tensors[2],
            running_var=tensors[3],
            num_batches_tracked=_count(nbt),
        )
    return list(found.values())


# --- ONNX --------------------------------------------------------------------------------


def from_onnx(model: Any) -> list[BNLayer]:
    """BN layers of an ONNX model: its BatchNormalization nodes.

    Tensors come from initializers (or Constant nodes); momentum is converted from ONNX's
    convention (weight of the running value) to PyTorch's (weight of the new batch).
    ``training_mode=1`` or extra outputs mean the node computes batch statistics.
    """
    from onnx import helper, numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t

    def tensor(name: str) -> torch.Tensor | None:
        proto = constants.get(name)
        return None if proto is None else torch.from_numpy(numpy_helper.to_array(proto).copy())

    layers = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight, bias, mean, var = (tensor(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input)))
        scale_name = node.input[1] if len(node.input) > 1 else ""
        name = scale_name[: -len(".weight")] if scale_name.endswith(".weight") else (node.name or f"BatchNormalization_{index}")
        training = bool(attrs.get("training_mode", 0)) or len([o for o in node.output if o]) > 1
        layers.append(
            BNLayer(
                name=name,
                kind="BatchNormalization",
                num_features=next((t.numel() for t in (mean, weight) if t is not None), 0),
                eps=float(attrs.get("epsilon", 1e-5)),
                momentum=float(f"{1.0 - float(attrs.get('momentum', 0.9)):.6g}"),  # float32 attr: 0.9 -> 0.1
                averaging="ema",
                training=training,
                track_running_stats=mean is not None,
                weight=weight,
                bias=bias,
                running_mean=mean,
                running_var=var,
            )
        )
    return layers


def find(checkpoint: Any, module: nn.Module | None = None) -> list[BNLayer]:
    """The BN layers of a :class:`~bnctl.checkpoint.Checkpoint`.

    With ``module`` (built from ``--arch`` and loaded with the checkpoint's state_dict),
    layers come from that module, so kinds, eps and momentum are known; its mode is not.
    Tensors that cannot be used are left out, with the reason (:func:`usable`).
    """
    if module is not None:
        found = from_module(module, mode_known=False)
    elif checkpoint.tensors is not None:
        found = from_state_dict(checkpoint.tensors)
    elif checkpoint.module is not None:
        found = from_module(checkpoint.module)
    elif checkpoint.script is not None:
        found = from_module(checkpoint.script)
    elif checkpoint.program is not None:
        found = from_program(checkpoint.program)
    else:
        found = from_onnx(checkpoint.onnx_model)
    return [usable(layer) for layer in found]
