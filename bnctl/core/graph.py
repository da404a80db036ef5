"""Trace a model into a torch.fx graph and read, from its data flow, what each BatchNorm
reads from and feeds into.

Two kinds of graph are read the same way:

- ``trace(model)``: torch.fx symbolic tracing that steps *into* every conv and linear module
  (subclasses that pad in ``forward`` included), so each becomes a functional call whose
  weight is a ``get_attr`` of a parameter; plain BatchNorm modules stay ``call_module``
  leaves, BN subclasses with their own ``forward`` are traced into;
- ``ExportedProgram.module()``: the aten graph of a ``.pt2`` file.

Nothing here changes a graph; :mod:`bnctl.fold` does.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .modules import is_plain_batchnorm

#: the layer kinds BN folds into
Kind = Literal["conv", "conv_transpose", "linear"]

aten = torch.ops.aten

# argument names of each function, in positional order, and their defaults
_CONV = (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
_CONV_T = (
    ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1},
)
_CONVOLUTION = (("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"), {})
_LINEAR = (("input", "weight", "bias"), {"bias": None})

LAYER_FUNCTIONS: dict[Any, tuple[Kind, tuple]] = {}
for _fns, _kind, _sig in (
    ((torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding), "conv", _CONV),
    ((torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d, aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input), "conv_transpose", _CONV_T),
    ((aten.convolution.default,), "convolution", _CONVOLUTION),
    ((F.linear, torch._C._nn.linear, aten.linear.default), "linear", _LINEAR),
):
    for _fn in _fns:
        LAYER_FUNCTIONS[_fn] = (_kind, _sig)

_BN_F = (("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"), {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
_BN_TORCH = (("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled"), {})
_BN_LEGIT = (("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"), {})
BN_FUNCTIONS: dict[Any, tuple] = {F.batch_norm: _BN_F, torch.batch_norm: _BN_TORCH, aten.batch_norm.default: _BN_TORCH, aten._native_batch_norm_legit_no_training.default: _BN_LEGIT}

# padding that repeats the input's own values commutes with a per-channel affine map
_PAD_FUNCTIONS = {F.pad, aten.pad.default}
_MIRROR_PADS = {aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default, aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default}


def bind(node: fx.Node, signature: tuple) -> dict[str, Any]:
    """The node's arguments by name (positional and keyword), defaults filled in."""
    names, defaults = signature
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def set_arg(node: fx.Node, signature: tuple, name: str, value: Any) -> None:
    """Set argument ``name`` of ``node``, positionally where it was passed positionally."""
    names = signature[0]
    index = names.index(name)
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


class FoldTracer(fx.Tracer):
    """Symbolic tracer that turns conv/linear modules into functional calls (see module doc)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_ConvNd, nn.Linear)):
            return False
        if isinstance(m, _BatchNorm):
            return is_plain_batchnorm(m)
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        # torch.fx finds the name of each parameter it meets by scanning named_parameters()
        # (quadratic in the parameter count); a dict built once gives the same names
        self._names = {id(p): n for n, p in root.named_parameters()} if isinstance(root, nn.Module) else {}
        if self.proxy_buffer_attributes and isinstance(root, nn.Module):
            self._names.update({id(b): n for n, b in root.named_buffers()})
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        name = self._names.get(id(attr_val)) if isinstance(attr_val, torch.Tensor) else None
        if name is None or (not isinstance(attr_val, nn.Parameter) and not self.proxy_buffer_attributes):
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if isinstance(m, _BatchNorm) and not is_plain_batchnorm(m):
            # BN's input-rank check branches on the symbolic tensor; the real run checks it
            m._check_input_dim = lambda _input: None  # type: ignore[method-assign]
            try:
                return super().call_module(m, forward, args, kwargs)
            finally:
                del m._check_input_dim
        return super().call_module(m, forward, args, kwargs)


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as an fx GraphModule (raises whatever torch.fx raises on untraceable code)."""
    graph = FoldTracer().trace(model)
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def shallow_copy(module: nn.Module) -> nn.Module:
    """A module object of its own (mode, attributes, tensor slots, submodules) that still
    shares its tensors with ``module``."""
    root = copy.copy(module)
    stack = [(root, module)]  # a stack, not recursion: module trees can be deep
    while stack:
        new, old = stack.pop()
        new._parameters = dict(old._parameters)
        new._buffers = dict(old._buffers)
        new._modules = {k: copy.copy(m) if m is not None else None for k, m in old._modules.items()}
        stack.extend((new._modules[k], m) for k, m in old._modules.items() if m is not None)
    return root


def trace_graph(model: nn.Module, given: int | None = None) -> fx.Graph:
    """The fx graph of ``model`` as :class:`FoldTracer` traces it (no GraphModule built).

    With ``given`` (how many positional inputs the model is called with), the parameters of
    ``forward`` after those keep their default values in the graph where the default is a
    plain constant (``embed=False``, ``mask=None``), so that ``if embed:`` traces."""
    return FoldTracer().trace(model, concrete_args=_defaults_after(model, given))


def _defaults_after(model: nn.Module, given: int | None) -> dict[str, Any] | None:
    """``{name: default}`` of ``forward``'s parameters after the first ``given``, where each
    has a constant default (None, bool, int, float, str); None where any does not."""
    import inspect

    if given is None:
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    rest = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][given:]
    if not rest or any(p.default is p.empty or not isinstance(p.default, (type(None), bool, int, float, str)) for p in rest):
        return None
    return {p.name: p.default for p in rest}


def shape_read(node: Any) -> bool:
    """Whether ``node`` reads only the shape, rank, dtype or device of its input (``x.shape``,
    ``x.size()``, ``x.dim()``): not a use of the values, so it does not keep a BN from folding."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda")
    return node.op == "call_method" and node.target in ("size", "dim", "ndimension", "numel")


# --- views of the nodes that matter -----------------------------------------------------


@dataclass
class LayerCall:
    """One call of a conv, conv-transpose or linear function in the graph."""

    node: fx.Node
    kind: Kind
    signature: tuple
    args: dict[str, Any]

    @property
    def weight_node(self) -> Any:
        return self.args["weight"]

    @property
    def bias_node(self) -> Any:
        return self.args.get("bias")

    @property
    def weight_target(self) -> str | None:
        """The parameter the weight is read from, or None when forward computes it."""
        w = self.weight_node
        return w.target if isinstance(w, fx.Node) and w.op == "get_attr" else None

    @property
    def bias_ok(self) -> bool:
        """The bias is absent or read straight from a parameter."""
        b = self.bias_node
        return b is None or (isinstance(b, fx.Node) and b.op == "get_attr")

    @property
    def name(self) -> str:
        target = self.weight_target
        return target.rsplit(".", 1)[0] if target and "." in target else (target or self.node.name)

    @property
    def groups(self) -> int:
        return int(self.args.get("groups", 1))

    def zero_pads(self) -> bool:
        """Whether the call pads its input with zeros (conv only)."""
        if self.kind != "conv":
            return False
        padding = self.args.get("padding", 0)
        if padding == "valid":
            return False
        if padding == "same":
            weight = self.weight_node.meta.get("val") if isinstance(self.weight_node, fx.Node) else None
            kernel = tuple(weight.shape[2:]) if weight is not None else (2,)
            return any(k > 1 for k in kernel)
        values = padding if isinstance(padding, (list, tuple)) else [padding]
        return any(int(p) != 0 for p in values)


def layer_call(node: Any) -> LayerCall | None:
    """A :class:`LayerCall` view of ``node``, or None if it is no conv/linear call."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in LAYER_FUNCTIONS:
        return None
    kind, signature = LAYER_FUNCTIONS[node.target]
    args = bind(node, signature)
    if kind == "convolution":
        kind = "conv_transpose" if args["transposed"] else "conv"
    return LayerCall(node, kind, signature, args)


@dataclass
class BNCall:
    """One BatchNorm application: a ``call_module`` of a plain BN, or a functional call."""

    node: fx.Node
    name: str
    input: Any
    output: fx.Node  # the node whose value is the normalized tensor
    training: bool
    eps: float
    targets: dict[str, str | None]  # weight, bias, running_mean, running_var -> attribute path
    signature: tuple | None = None  # None for call_module

    def extra_outputs_used(self) -> bool:
        """A functional BN whose saved mean/var outputs something reads."""
        if self.node.target is not aten._native_batch_norm_legit_no_training.default:
            return False
        return any(u.target is operator.getitem and u.args[1] != 0 for u in self.node.users)


def bn_call(gm: fx.GraphModule, node: fx.Node) -> BNCall | None:
    """A :class:`BNCall` view of ``node``, or None if it applies no BatchNorm."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, _BatchNorm):
            return None
        targets = {k: (f"{node.target}.{k}" if getattr(module, k, None) is not None else None) for k in ("weight", "bias", "running_mean", "running_var")}
        uses_batch = module.training or module.running_mean is None
        return BNCall(node, node.target, node.args[0], node, uses_batch, float(module.eps), targets)
    if node.op != "call_function" or node.target not in BN_FUNCTIONS:
        return None
    signature = BN_FUNCTIONS[node.target]
    args = bind(node, signature)
    targets = {}
    for k in ("weight", "bias", "running_mean", "running_var"):
        value = args.get(k)
        targets[k] = value.target if isinstance(value, fx.Node) and value.op == "get_attr" else None
        if isinstance(value, fx.Node) and value.op != "get_attr":
            targets[k] = "<computed>"
    output = node
    if node.target is aten._native_batch_norm_legit_no_training.default:
        firsts = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(firsts) != 1:
            return None
        output = firsts[0]
    stat = targets["running_mean"]
    name = stat.rsplit(".", 1)[0] if stat and "." in stat and stat != "<computed>" else node.name
    training = bool(args.get("training", False)) or args.get("running_mean") is None
    return BNCall(node, name, args["input"], output, training, float(args["eps"]), targets, signature)


def mirror_pad(node: Any) -> bool:
    """A padding call that repeats input values (reflect, replicate, circular)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in _MIRROR_PADS:
        return True
    if node.target in _PAD_FUNCTIONS:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        return mode in ("reflect", "replicate", "circular")
    return False


def describe(node: Any) -> str:
    """A short human name for a node: the module path, function or method it calls."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{node.target}"
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    if node.op == "output":
        return "the model output"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "get_attr":
        return f"attribute {node.target}"
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return name.replace("aten.", "").split(".")[0] if "aten" in str(target) else name


def input_rank(node: Any) -> int | None:
    """The rank of a node's value, from shape propagation (None when unknown)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def get_attr(gm: nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
