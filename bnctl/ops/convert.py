"""``bnctl.convert``: BatchNorm surgery. BN <-> SyncBatchNorm, BN <-> FrozenBatchNorm, BN -> GroupNorm.

Every conversion returns a new model (the input is not changed) and a report of each layer
converted. A BN subclass whose ``forward`` does more than BatchNorm (an activation, say) is
refused by name: converting it would silently drop what its forward adds (timm#1254).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError
from . import CONVERT_TARGETS

BN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
TARGETS = CONVERT_TARGETS


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers (nothing trains,
    nothing updates, ``train()`` changes nothing). Its output equals an eval-mode BN's bit for bit.

    ``source`` is the class it was converted from (``BatchNorm2d``, ...), so it converts back.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, source: str = "BatchNorm2d"):
        super().__init__()
        self.num_features, self.eps, self.source = num_features, eps, source
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, source={self.source}"


@dataclass
class ConvertReport:
    """Each layer converted (name, from, to, note) and how far the outputs moved, if checked."""

    target: str
    converted: list[dict[str, Any]] = field(default_factory=list)
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"to": self.target, "converted": self.converted, "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error, "notes": self.notes}


_STOCK = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _check_plain(name: str, module: nn.Module) -> None:
    """Refuse a BN subclass whose forward is not PyTorch's (it may do more than normalize)."""
    if isinstance(module, _BatchNorm) and type(module) not in _STOCK and not _inherits_stock_forward(module):
        raise InputError(
            f"{name} is a {type(module).__qualname__}, a BatchNorm subclass with its own forward: converting it would drop what that forward adds",
            "convert that class by hand (or make its extra step a separate module), then run bnctl convert again",
        )


def _inherits_stock_forward(module: nn.Module) -> bool:
    return any(type(module).forward is cls.forward for cls in _STOCK)


def _replace(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> tuple[nn.Module, list[tuple[str, nn.Module, nn.Module]]]:
    """A copy of ``model`` with every module ``make`` returns a replacement for replaced."""
    model = copy.deepcopy(model)
    done = []
    for name, module in list(model.named_modules()):
        new = make(name, module) if name else None
        if new is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
        done.append((name, module, new))
    return model, done


def _carry(source: nn.Module, target: nn.Module) -> nn.Module:
    """Copy statistics, affine parameters (requires_grad kept) and mode onto ``target``."""
    with torch.no_grad():
        for key in ("weight", "bias"):
            value = getattr(source, key, None)
            if value is None:
                continue
            slot = getattr(target, key)
            if isinstance(slot, nn.Parameter):
                slot.copy_(value)
                slot.requires_grad_(value.requires_grad if isinstance(value, nn.Parameter) else False)
            else:
                slot.copy_(value)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            value, slot = getattr(source, key, None), getattr(target, key, None)
            if value is not None and slot is not None:
                slot.copy_(value)
    target.train(source.training)
    return target


def to_syncbn(model: nn.Module) -> tuple[nn.Module, ConvertReport]:
    """Every BatchNorm1d/2d/3d (FrozenBatchNorm too) -> SyncBatchNorm."""
    report = ConvertReport("syncbn")

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, nn.SyncBatchNorm) or not isinstance(m, (_BatchNorm, FrozenBatchNorm)):
            return None
        _check_plain(name, m)
        affine = getattr(m, "affine", True)
        tracking = getattr(m, "track_running_stats", True)
        new = nn.SyncBatchNorm(m.num_features, m.eps, getattr(m, "momentum", 0.1), affine, tracking)
        return _carry(m, new)

    model, done = _replace(model, make)
    report.converted = [{"name": n, "from": type(a).__name__, "to": "SyncBatchNorm", "note": None} for n, a, _ in done]
    return model, report


def input_ranks(model: nn.Module, inputs: tuple | None) -> dict[str, int]:
    """The rank of each BN-like module's input when ``model`` runs on ``inputs`` in eval mode."""
    return {name: len(shape) for name, shape in input_shapes(model, inputs).items()}


def input_shapes(model: nn.Module, inputs: tuple | None) -> dict[str, tuple[int, ...]]:
    """The shape of each BN-like module's input when ``model`` runs on ``inputs`` in eval mode."""
    if inputs is None:
        return {}
    ranks: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            ranks.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, (_BatchNorm, FrozenBatchNorm))]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return ranks


def ranks_from_data_flow(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Input rank of each BN module, from the conv or linear that feeds it or that it feeds
    (a ConvNd's weight has N + 2 dims, its input rank); empty where the model cannot be traced."""
    from ..core import graph as g

    try:
        graph = g.trace_graph(model)
    except Exception:  # noqa: BLE001 - untraceable: the check inputs must tell
        return {}
    modules = dict(model.named_modules())
    ranks: dict[str, tuple[int, str]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), (_BatchNorm, FrozenBatchNorm)) or not node.args:
            continue
        neighbours = [("fed by", g.layer_call(node.args[0]))] + [("feeds", g.layer_call(user)) for user in node.users]
        for how, layer in neighbours:
            if layer is None or (how == "feeds" and layer.args.get("input") is not node):
                continue
            weight = g.get_attr(model, layer.weight_target) if layer.weight_target else None
            if layer.kind == "linear":
                ranks[node.target] = (2, f"{how} the linear layer {layer.name}")
            elif isinstance(weight, torch.Tensor):
                ranks[node.target] = (weight.dim(), f"{how} the {weight.dim() - 2}-D convolution {layer.name}")
            else:
                continue
            break
    return ranks


def to_batchnorm(model: nn.Module, inputs: tuple | None = None) -> tuple[nn.Module, ConvertReport]:
    """SyncBatchNorm and FrozenBatchNorm -> BatchNorm1d/2d/3d, the class chosen from the input
    rank seen on ``inputs`` (a FrozenBatchNorm also knows the class it came from)."""
    report = ConvertReport("batchnorm")
    ranks = input_ranks(model, inputs)
    flow = {} if ranks else ranks_from_data_flow(model)

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if not isinstance(m, (nn.SyncBatchNorm, FrozenBatchNorm)):
            return None
        _check_plain(name, m)
        if name in ranks:
            cls, how = BN_BY_RANK.get(ranks[name]), f"input rank {ranks[name]} seen on the check inputs"
        elif name in flow:
            rank, neighbour = flow[name]
            cls, how = BN_BY_RANK.get(rank), f"input rank {rank}: {neighbour}"
        elif isinstance(m, FrozenBatchNorm):
            cls, how = getattr(nn, m.source, None), "the class it was frozen from"
        else:
            raise InputError(f"{name}: a SyncBatchNorm says nothing about its input rank, and neither the data flow (no conv or linear next to it) nor check inputs tell", "pass --input-shape so bnctl sees which BatchNorm1d/2d/3d each layer is")
        if cls is None:
            raise InputError(f"{name}: no BatchNorm class for {how}", "check --input-shape")
        affine = getattr(m, "affine", True)
        tracking = getattr(m, "track_running_stats", True)
        new = cls(m.num_features, m.eps, getattr(m, "momentum", 0.1), affine, tracking)
        report.converted.append({"name": name, "from": type(m).__name__, "to": cls.__name__, "note": how})
        return _carry(m, new)

    model, _ = _replace(model, make)
    return model, report


def to_frozen(model: nn.Module) -> tuple[nn.Module, ConvertReport]:
    """Every BN with running statistics -> :class:`FrozenBatchNorm` (same eval outputs)."""
    report = ConvertReport("frozen")

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if not isinstance(m, _BatchNorm):
            return None
        _check_plain(name, m)
        if m.running_mean is None:
            raise InputError(f"{name} has no running statistics (track_running_stats=False): there is nothing to freeze", "recalibrate it first, or leave it as it is")
        source = type(m).__name__ if type(m) in _STOCK[:3] else "BatchNorm2d"
        new = FrozenBatchNorm(m.num_features, m.eps, source)
        new.train(m.training)
        with torch.no_grad():
            for key in ("running_mean", "running_var"):
                getattr(new, key).copy_(getattr(m, key))
            if m.weight is not None:
                new.weight.copy_(m.weight)
                new.bias.copy_(m.bias)
        report.converted.append({"name": name, "from": type(m).__name__, "to": "FrozenBatchNorm", "note": None})
        return new

    model, _ = _replace(model, make)
    return model, report


def largest_divisor(channels: int, at_most: int) -> int:
    """The largest divisor of ``channels`` not above ``at_most``."""
    return max(d for d in range(1, min(channels, at_most) + 1) if channels % d == 0)


def to_groupnorm(model: nn.Module, groups: int = 32, inputs: tuple | None = None) -> tuple[nn.Module, ConvertReport]:
    """Every BN -> GroupNorm with the largest group count dividing the channels, not above
    ``groups``, whose groups hold at least 2 values: a group of one value normalizes to 0 and
    erases the input (a BatchNorm1d over (N, C), or any BN after global pooling). The values
    per position come from ``inputs`` where given, else one is assumed. Gamma and beta are
    carried over, statistics dropped. This changes the function."""
    if groups < 1:
        raise InputError(f"--groups {groups} is not positive", "e.g. --groups 32")
    report = ConvertReport("groupnorm")
    shapes = input_shapes(model, inputs)

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if not isinstance(m, (_BatchNorm, FrozenBatchNorm)):
            return None
        _check_plain(name, m)
        shape = shapes.get(name)
        positions = math.prod(shape[2:]) if shape is not None else 1
        c = m.num_features
        g = next((d for d in range(min(groups, c), 0, -1) if c % d == 0 and (c // d) * positions >= 2), None)
        if g is None:
            raise InputError(
                f"{name}: a GroupNorm over {c} channel(s) x {positions} position(s) has one value per group, which normalizes to 0 and erases the input",
                "keep this layer a BatchNorm (convert another model part), or pass --input-shape if its input has more positions",
            )
        new = nn.GroupNorm(g, m.num_features, eps=m.eps, affine=True)
        with torch.no_grad():
            if getattr(m, "weight", None) is not None:
                new.weight.copy_(m.weight)
                new.bias.copy_(m.bias)
        new.train(m.training)
        note = (
            f"{g} group{'s' * (g != 1)}, {(c // g) * positions} values each"
            + (f" per sample{'' if shape is not None else ' (one position assumed: pass --input-shape to measure)'}")
            + ("" if g == groups else f"; the largest divisor of {c} not above {groups} with at least 2 values per group")
        )
        report.converted.append({"name": name, "from": type(m).__name__, "to": "GroupNorm", "note": note})
        return new

    model, _ = _replace(model, make)
    report.notes.append("GroupNorm normalizes each sample over channel groups: the model computes a different function and needs fine-tuning")
    return model, report


def convert(model: nn.Module, to: str, *, inputs: tuple | None = None, groups: int = 32) -> tuple[nn.Module, ConvertReport]:
    """Convert ``model``'s BN layers (see the module doc); with ``inputs``, the report holds how
    far the eval outputs moved (0 for every conversion but groupnorm), and each converted
    layer its ``output_change``: the relative change of that layer's own output on the input
    it saw in the original model."""
    if to not in TARGETS:
        raise InputError(f"--to {to!r} is not a conversion", f"choose one of: {', '.join(TARGETS)}")
    if to == "syncbn":
        result, report = to_syncbn(model)
    elif to == "batchnorm":
        result, report = to_batchnorm(model, inputs)
    elif to == "frozen":
        result, report = to_frozen(model)
    else:
        result, report = to_groupnorm(model, groups, inputs)
    if not report.converted:
        raise InputError(f"no BatchNorm layer to convert to {to}", "check the model (bnctl inspect lists its BatchNorm layers) and --to")
    if inputs is not None:
        from ..core import verify

        before, after = copy.deepcopy(model).eval(), copy.deepcopy(result).eval()
        seen = _layer_calls(before, [c["name"] for c in report.converted], inputs)
        report.max_abs_error, report.max_rel_error = verify.compare(verify.run(before, inputs), verify.run(after, inputs))[:2]
        modules = dict(after.named_modules())
        for entry in report.converted:
            if entry["name"] in seen and entry["name"] in modules:
                x, y = seen[entry["name"]]
                entry["output_change"] = verify.compare([y], verify.run(modules[entry["name"]], (x,)))[1]
    return result, report


def _layer_calls(model: nn.Module, names: list[str], inputs: tuple) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The input and output of each named module's first call when ``model`` runs on ``inputs``."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                seen[name] = (args[0].detach().clone(), output.detach().clone())

        return hook

    hooks = [modules[n].register_forward_hook(record(n)) for n in names if n in modules]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen
