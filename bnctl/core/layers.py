"""BatchNorm layers as read: :class:`BNLayer`, and finding them in a state_dict or an ONNX
graph without torch (module trees and ``torch.export`` programs: :mod:`bnctl.core.modules`).

Each finder returns :class:`BNLayer` records holding what the source says and ``None``
for what it does not: a bare state_dict records no eps, momentum, module type or mode,
and those stay unknown rather than guessed. A layer's tensors are numpy arrays or torch
tensors, whichever the reader gave; everything here takes both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
import sys
from typing import Any

import numpy as np

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
    weight: Any = None  # numpy array or torch tensor
    bias: Any = None
    running_mean: Any = None
    running_var: Any = None
    num_batches_tracked: int | None = None
    materialized: bool = True
    uses: int = 1
    problems: list[str] = field(default_factory=list)  # tensors that could not be used, and why


def momentum_kind(value: Any) -> tuple[float | None, str | None]:
    if value is None:
        return None, "cumulative"
    return float(value), "ema"


def _torch_tensor(t: Any) -> bool:
    torch = sys.modules.get("torch")  # no torch tensor exists unless torch was imported
    return torch is not None and isinstance(t, torch.Tensor)


def _unusable(t: Any) -> str | None:
    """Why ``t`` is no array of real numbers (dense, with data), or None."""
    if isinstance(t, np.ndarray):
        return None if t.dtype.kind in "fiu" else f"has dtype {t.dtype}"
    if not _torch_tensor(t):
        return f"is a {type(t).__name__}, not a tensor"
    if t.is_meta:
        return "has no data (a meta tensor)"
    if t.layout != sys.modules["torch"].strided:
        return f"is {str(t.layout).replace('torch.', '')}, not dense"
    if t.is_complex() or t.dtype == sys.modules["torch"].bool:
        return f"has dtype {str(t.dtype).replace('torch.', '')}"
    return None


def counter(t: Any) -> int | None:
    """The counter's value; None where it is missing or not a finite number (:func:`usable` says why)."""
    if t is None or _unusable(t) is not None or tuple(t.shape) not in ((), (1,)):
        return None
    value = float(t.reshape(-1)[0])
    return int(value) if value == value and abs(value) != float("inf") else None


def _problem(t: Any, channels: int) -> str | None:
    """Why tensor ``t`` of a layer with ``channels`` channels cannot be used, or None."""
    why = _unusable(t)
    if why is None and tuple(t.shape) != (channels,):
        why = f"has shape {tuple(t.shape)}, not ({channels},)"
    return why


def _counter_problem(t: Any) -> list[str]:
    if t is not None and counter(t) is None:
        return ["num_batches_tracked is not one finite number"]
    return []


def usable(layer: BNLayer) -> BNLayer:
    """``layer`` with every tensor it cannot use left out and said in ``problems``: a meta,
    sparse, complex or boolean tensor, one whose shape is not ``(channels,)``, a counter that
    is not one finite number. The rest of the layer is still summarized."""
    if not layer.materialized:
        return layer
    shape = (layer.num_features,)
    if not layer.problems and all(  # the common case, kept short: dense numpy arrays of the right shape
        type(t) is np.ndarray and t.shape == shape and t.dtype.kind in "fiu" for t in (layer.weight, layer.bias, layer.running_mean, layer.running_var)
    ):
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


def from_state_dict(tensors: Mapping[str, Any]) -> list[BNLayer]:
    """BN layers of a state_dict: key prefixes holding both running_mean and running_var.

    Only the BN tensors are read (with a lazy mapping, nothing else leaves the disk).
    A BN with ``track_running_stats=False`` keeps only weight and bias in its state_dict,
    which cannot be told from any other affine layer without the module: pass ``--arch``.
    """
    groups: dict[str, dict[str, str]] = {}
    suffixes = set(_STATE_SUFFIXES)
    for key in tensors:
        prefix, _, leaf = key.rpartition(".")
        if leaf in suffixes:
            group = groups.get(prefix)
            if group is None:
                group = groups[prefix] = {}
            group[leaf] = key
    layers = []
    for prefix, keys in groups.items():
        if "running_mean" not in keys or "running_var" not in keys:
            continue
        mean, var = tensors[keys["running_mean"]], tensors[keys["running_var"]]
        shaped = mean if len(getattr(mean, "shape", ())) == 1 else var if len(getattr(var, "shape", ())) == 1 else None
        if shaped is None:
            continue  # statistics with no channel axis: not a BN (the name only looks like one)
        weight, bias, count = (tensors[keys[k]] if k in keys else None for k in ("weight", "bias", "num_batches_tracked"))
        layers.append(
            BNLayer(
                name=prefix,
                kind=None,
                num_features=int(shaped.shape[0]),
                weight=weight,
                bias=bias,
                running_mean=mean,
                running_var=var,
                num_batches_tracked=counter(count),
                problems=_counter_problem(count),
            )
        )
    return layers


def from_onnx(model: Any) -> list[BNLayer]:
    """BN layers of an ONNX model: its BatchNormalization nodes.

    Tensors come from initializers (or Constant nodes); momentum is converted from ONNX's
    convention (weight of the running value) to PyTorch's (weight of the new batch).
    ``training_mode=1`` or extra outputs mean the node computes batch statistics.
    """
    from .onnx import attribute, check_batchnorms, computed_constants, constant_values

    check_batchnorms(model)
    values = constant_values(model)
    stats_inputs = [n for node in model.graph.node if node.op_type == "BatchNormalization" for n in node.input[1:5] if n and n not in values]
    if stats_inputs:  # older exporters compute them from constants (Constant -> Identity -> Cast)
        values.update(computed_constants(model, stats_inputs, values))
    channels = _ChannelsOf(model)

    def tensor(name: str) -> np.ndarray | None:
        return values.get(name)

    layers = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization":
            continue
        attrs = {name: attribute(node, name) for name in ("training_mode", "epsilon", "momentum") if attribute(node, name) is not None}
        weight, bias, mean, var = (tensor(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input)))
        scale_name = node.input[1] if len(node.input) > 1 else ""
        name = scale_name[: -len(".weight")] if scale_name.endswith(".weight") else (node.name or f"BatchNormalization_{index}")
        training = bool(attrs.get("training_mode", 0)) or len([o for o in node.output if o]) > 1
        runtime = any(n and n not in values for n in node.input[3:5])  # statistics fed at run time: unknown here
        layers.append(
            BNLayer(
                name=name,
                kind="BatchNormalization",
                num_features=next((int(t.size) for t in (mean, weight, bias, var) if t is not None), 0) or channels(node),
                eps=float(attrs.get("epsilon", 1e-5)),
                momentum=float(f"{1.0 - float(attrs.get('momentum', 0.9)):.6g}"),  # float32 attr: 0.9 -> 0.1
                averaging="ema",
                training=training,
                track_running_stats=None if runtime else mean is not None,
                weight=weight,
                bias=bias,
                running_mean=mean,
                running_var=var,
            )
        )
    return layers


#: aten batch-norm ops of exported programs; those without a ``training`` argument are eval-only
EXPORT_BN_OPS = ("batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "miopen_batch_norm")


def from_program_json(program: Any) -> list[BNLayer]:
    """BN layers of a ``.pt2`` program read as JSON (:class:`bnctl.io.pt2.ProgramView`): its
    batch-norm calls, their tensors through the graph signature, eps, momentum and mode from
    the call's arguments, the module class from ``nn_module_stack``. What
    :func:`bnctl.core.modules.from_program` finds in a loaded program, without torch."""
    sources = {}
    for spec in program.signature.get("input_specs", []):
        for kind, field_name in (("parameter", "parameter_name"), ("buffer", "buffer_name"), ("tensor_constant", "tensor_constant_name")):
            entry = spec.get(kind) if isinstance(spec, dict) else None
            if isinstance(entry, dict) and isinstance(entry.get("arg"), dict):
                sources[entry["arg"].get("name")] = entry.get(field_name)
    state = program.tensors
    found: dict[str, BNLayer] = {}
    producers = {}
    for node in program.graph.get("nodes", []):
        for out in node.get("outputs", []) if isinstance(node, dict) else []:
            tensor = out.get("as_tensor") if isinstance(out, dict) else None
            if isinstance(tensor, dict):
                producers[tensor.get("name")] = node
    for index, node in enumerate(program.graph.get("nodes", [])):
        target = str(node.get("target", "")) if isinstance(node, dict) else ""
        parts = target.split(".")
        if len(parts) < 4 or parts[:3] != ["torch", "ops", "aten"] or parts[3] not in EXPORT_BN_OPS:
            continue
        args = {i.get("name"): i.get("arg") or {} for i in node.get("inputs", []) if isinstance(i, dict)}

        def source(name: str) -> str | None:
            tensor = args.get(name, {}).get("as_tensor") if isinstance(args.get(name), dict) else None
            return sources.get(tensor.get("name")) if isinstance(tensor, dict) else None

        names = [source(n) for n in ("weight", "bias", "running_mean", "running_var")]
        data = args.get("input", {}).get("as_tensor") if isinstance(args.get("input"), dict) else None
        if names[2] is None and names[3] is None and isinstance(data, dict) and _from_parameter(data.get("name"), producers, sources):
            continue  # weight standardization (timm's StdConv2d): batch_norm of a conv's own weight, not a BN layer
        tensors = [state.get(n) if n else None for n in names]
        anchor = names[2] or names[0]
        name = anchor.rpartition(".")[0] if anchor else str(node.get("name", f"batch_norm_{index}"))
        if name in found:
            found[name].uses += 1
            continue
        stack = str((node.get("metadata") or {}).get("nn_module_stack", ""))
        kind = stack.split(";")[-1].rsplit(",", 1)[-1].rsplit(".", 1)[-1] if stack else None
        momentum_arg = args.get("momentum", {})
        momentum, averaging = momentum_kind(momentum_arg.get("as_float") if "as_float" in momentum_arg else None) if "momentum" in args else (None, None)
        eps = args.get("eps", {}).get("as_float")
        nbt = state.get(f"{name}.num_batches_tracked") if name else None
        training = bool(args.get("training", {}).get("as_bool", False))
        found[name] = program_layer(name, kind or None, tensors, eps, (momentum, averaging), training, nbt)
    return list(found.values())


#: ops that only reshape or copy a tensor: a value seen through them is the same tensor
VIEW_OPS = ("view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "clone", "contiguous", "alias", "_to_copy", "permute", "transpose")


def _from_parameter(name: Any, producers: dict, sources: dict) -> bool:
    """Whether the program value ``name`` is a parameter or buffer seen through view-like ops
    (a loop over one chain, never recursion)."""
    for _ in range(len(producers) + 1):
        if name in sources:
            return True
        node = producers.get(name)
        target = str(node.get("target", "")) if isinstance(node, dict) else ""
        parts = target.split(".")
        if len(parts) < 4 or parts[3] not in VIEW_OPS:
            return False
        first = next((i.get("arg", {}).get("as_tensor") for i in node.get("inputs", []) if isinstance(i, dict) and isinstance(i.get("arg"), dict) and "as_tensor" in i["arg"]), None)
        name = first.get("name") if isinstance(first, dict) else None
    return False


def program_layer(name: str, kind: str | None, tensors: list, eps: Any, momentum: tuple, training: bool, counter_tensor: Any) -> BNLayer:
    """A BN call of an exported program as a layer: ``tensors`` are weight, bias, running mean
    and var (None where absent), ``momentum`` is :func:`momentum_kind`'s pair."""
    return BNLayer(
        name=name,
        kind=kind,
        num_features=next((int(t.shape[0]) if len(t.shape) else 1 for t in tensors if t is not None), 0),
        eps=float(eps) if eps is not None else None,
        momentum=momentum[0],
        averaging=momentum[1],
        training=training,
        track_running_stats=tensors[2] is not None,
        weight=tensors[0],
        bias=tensors[1],
        running_mean=tensors[2],
        running_var=tensors[3],
        num_batches_tracked=counter(counter_tensor),
    )


class _ChannelsOf:
    """BatchNormalization channel counts from ONNX shape inference, run once per graph and only
    when a node's tensors do not tell (0 when unknown)."""

    def __init__(self, model: Any) -> None:
        self.model, self.dims = model, None

    def __call__(self, node: Any) -> int:
        if self.dims is None:
            import onnx

            try:
                inferred = onnx.shape_inference.infer_shapes(self.model).graph
            except Exception:  # noqa: BLE001 - shapes are a help, not a must
                inferred = self.model.graph
            self.dims = {v.name: v.type.tensor_type.shape.dim for v in (*inferred.value_info, *inferred.input, *inferred.output)}
        for name in (node.input[0], node.output[0]):
            dims = self.dims.get(name)
            if dims is not None and len(dims) > 1 and dims[1].HasField("dim_value"):
                return int(dims[1].dim_value)
        return 0
