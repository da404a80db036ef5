"""The configuration and behaviour checks of :mod:`bnctl.core.registry`: they read a module
tree (configuration) or run the model on check inputs (behaviour). Each function returns
findings as :class:`~bnctl.audit.checks.Raw` ``(layer or None, code, message)``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core import graph as g
from ..core import verify
from ..core.modules import is_batchnorm, is_frozen, training_batchnorms
from ..errors import one_line
from .checks import Raw


def frozen_in_train_mode(module: nn.Module) -> list[Raw]:
    """BN206: parameters frozen by requires_grad while the layer trains (mode as saved)."""
    found: list[Raw] = []
    for name, m in module.named_modules():
        if is_batchnorm(m) and not is_frozen(m) and m.training and getattr(m, "weight", None) is not None and not m.weight.requires_grad:
            found.append(Raw(name, "BN206", "weight and bias have requires_grad=False but the layer is in train mode: its statistics still move"))
    return found


def conv_bias_before_bn(module: nn.Module) -> list[Raw]:
    """BN208: a conv/linear with a bias feeding a BN alone, from the traced data flow
    (the module tree's order where tracing fails)."""
    return [Raw(bn, "BN208", f"{layer} has a bias, which this BN's mean subtraction cancels") for bn, layer in conv_bias_pairs(module)]


def int8_fold_range(module: nn.Module) -> list[Raw]:
    """BN210: the BNs whose fold (as ``bnctl fold`` pairs them, from the traced data flow)
    would cost the folded weight more than 6 dB of per-tensor int8 SQNR. The module is read,
    not changed; an untraceable one gives none."""
    from ..ops.fold import fx as gf
    from ..ops.fold.pytorch import trace_for_fold
    from .checks import int8_findings

    try:
        graph = trace_for_fold(module)
    except Exception:  # noqa: BLE001 - untraceable (TorchScript, control flow): no pairs to judge
        return []
    with verify.eval_mode(module):
        folded, _, _ = gf.fold_graph(graph, gf.Attrs(module))
    return int8_findings(folded, "BN210")


#: BN110 on data: the median layer's mean moved by more than this many of its stored stds
#: (averaged over channels), or its variance by more than this factor (geometric mean)
DRIFT_SHIFT, DRIFT_RATIO = 0.5, 2.0


def data_drift(module: nn.Module, batch: tuple) -> list[Raw]:
    """BN110 from data: the statistics these weights produce on ``batch`` (computed as
    ``bnctl recalibrate`` does, on a copy) against the stored ones, the figure ``bnctl diff
    --data`` gives; flagged where the median layer is far off (:data:`DRIFT_SHIFT`,
    :data:`DRIFT_RATIO`): statistics never re-estimated after the weights were averaged, or
    copied from another model."""
    import math
    import statistics

    from ..core.modules import from_module
    from ..ops.diff import compare
    from ..ops.recalibrate import recalibrate

    stored = from_module(module, mode_known=False)
    estimated = copy.deepcopy(module)
    report = recalibrate(estimated, [batch])
    reached = {c.name for c in report.layers if c.reached}
    step = compare([l for l in stored if l.name in reached], [l for l in from_module(estimated, mode_known=False) if l.name in reached])
    shifts = [l.mean_shift_mean for l in step.layers if l.mean_shift_mean is not None]
    ratios = [abs(l.var_log_ratio_mean) for l in step.layers if l.var_log_ratio_mean is not None]
    if not shifts or not ratios:
        return []
    shift, ratio = statistics.median(shifts), math.exp(statistics.median(ratios))
    if shift <= DRIFT_SHIFT and ratio <= DRIFT_RATIO:
        return []
    return [
        Raw(
            None,
            "BN110",
            f"on {report.samples} samples of --data, the statistics these weights produce are far from the stored ones (median layer: mean {shift:.2g} "
            f"stored std away, variance {ratio:.2g}x off): never re-estimated after the weights changed (averaging, copying)? "
            "run bnctl recalibrate with --data (--key for an entry), or torch.optim.swa_utils.update_bn; bnctl diff --data shows each layer",
        )
    ]


def conv_bias_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(bn, layer)`` names: a conv/linear with a bias whose output only that BN reads."""
    try:
        graph = g.trace_graph(module)
    except Exception:  # noqa: BLE001 - untraceable (TorchScript, control flow): use the module order
        return _bias_pairs_by_order(module)
    pairs = []
    for node in graph.nodes:
        bn = g.bn_call(module, node)
        layer = g.layer_call(bn.input) if bn is not None else None
        if layer is None or layer.bias_node is None or len(bn.input.users) != 1:
            continue
        bias = g.get_attr(module, layer.bias_node.target) if getattr(layer.bias_node, "op", None) == "get_attr" else None
        if isinstance(bias, torch.Tensor) and not bool(bias.detach().any()):
            continue  # an all-zero bias changes nothing
        pairs.append((bn.name, layer.name))
    return pairs


def _bias_pairs_by_order(module: nn.Module) -> list[tuple[str, str]]:
    leaves = [(n, m) for n, m in module.named_modules() if n and (not list(m.children()) or is_batchnorm(m))]
    pairs = []
    for (prev_name, prev), (name, m) in zip(leaves, leaves[1:]):
        kind = getattr(prev, "original_name", type(prev).__name__)
        bias = getattr(prev, "bias", None)
        if is_batchnorm(m) and kind.startswith(("Conv", "Linear")) and bias is not None and bool(torch.as_tensor(bias).detach().any()):
            pairs.append((name, prev_name))
    return pairs


# --- behaviour ------------------------------------------------------------------------------


def _responsible(model: nn.Module, bn_name: str) -> str:
    """The module whose train() override keeps ``bn_name`` training, if one does."""
    parts = bn_name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:i])
        owner = model.get_submodule(path) if path else model
        if type(owner).train is not nn.Module.train and not type(owner).__module__.startswith("torch."):
            return f"{type(owner).__name__}.train() ({path or 'the root module'}) keeps it training"
    return "its mode was set after model.eval()"


def behaviour(model: Any, inputs: tuple) -> list[Raw]:
    """BN301-BN304 on a copy of ``model`` in eval mode, with check inputs (batch >= 2)."""
    found: list[Raw] = []
    model = copy.deepcopy(model)
    model.eval()
    if not isinstance(model, torch.jit.ScriptModule):
        for name in training_batchnorms(model):
            found.append(Raw(name, "BN304", f"in train mode after model.eval(): {_responsible(model, name)}"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    first = verify.run(model, inputs)
    second = verify.run(model, inputs)
    changed = [k for k, v in model.state_dict().items() if k in before and not _same(before[k], v)]
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        found.append(Raw(None, "BN303", f"an eval forward pass changed {len(changed)} buffers ({shown})"))
    rel = verify.compare(first, second).max_rel
    if rel > 1e-6:
        found.append(Raw(None, "BN301", f"two eval forward passes on the same input differ (max rel. error {rel:.2g})"))
    found += _batch_dependence(model, inputs, first)
    return found


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (a NaN statistic that stays NaN did not change)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    return torch.equal(a, b)


def _fixed_batch(exc: BaseException) -> bool:
    """Whether ``exc`` is a torch.export program's shape guard refusing another batch size."""
    text = str(exc)
    return "Guard failed" in text or ("Expected input at" in text and "to be equal to" in text)


def _batch_dependence(model: Any, inputs: tuple, batched: list[torch.Tensor]) -> list[Raw]:
    n = inputs[0].shape[0]
    worst = 0.0
    for i in range(n):
        single = tuple(t[i : i + 1] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t for t in inputs)
        try:
            alone = verify.run(model, single)
        except Exception as exc:  # noqa: BLE001 - e.g. BatchNorm1d training on one sample
            if _fixed_batch(exc):  # a program exported with a static batch refuses any other: nothing to compare
                return []
            return [Raw(None, "BN302", f"a single sample fails in eval mode where a batch of {n} runs: {one_line(exc, last=True, limit=200)}")]
        rows = [t[i : i + 1] for t in batched if t.dim() and t.shape[0] == n]
        rel = verify.compare(rows, [t for t in alone if t.dim() and t.shape[0] == 1]).max_rel
        worst = max(worst, rel)
    if worst > 1e-4:
        return [Raw(None, "BN302", f"a sample's output changes with the rest of its batch of {n} (max rel. error {worst:.2g})")]
    return []


def float16_error(model: Any, inputs: tuple) -> float | None:
    """The largest relative difference of the model's outputs in float16 against float32, on
    the check inputs (eval mode, a copy); None where the model does not run in float16 here."""
    reference = verify.reference_outputs(copy.deepcopy(model).eval(), inputs)
    try:
        half = copy.deepcopy(model).eval().half()
        got = verify.run(half, tuple(t.half() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs))
    except Exception:  # noqa: BLE001 - an op without a float16 kernel on this device
        return None
    return verify.compare(reference, [t.float() for t in got])[1]
