"""The TorchScript path of a fold: the module's graph, folded by ``torch.jit.freeze``.

A TorchScript module (scripted or traced) is a program: its BN calls are ``aten::batch_norm``
nodes whose eps and momentum may live in its code, not in attributes (a traced module has
none). ``torch.jit.freeze`` inlines the module and folds each ``aten::batch_norm`` that
directly follows a convolution or a linear layer into it, in seconds. What it folds and
what it leaves is read from the graphs, before and after:

- before: each ``aten::batch_norm`` of the inlined graph, named by the attribute path of
  its running mean (``stem.1``), and the layer whose output it reads;
- after: each ``aten::batch_norm`` that is left, matched to its module by the values of its
  statistics, with the reason from its input.

The caller verifies the frozen module against the original on the check inputs.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..._quiet import quiet
from ...errors import InputError, one_line

#: the graph ops that torch.jit.freeze folds a following BN into
_LAYER_OPS = {"aten::_convolution": "conv", "aten::conv1d": "conv", "aten::conv2d": "conv", "aten::conv3d": "conv", "aten::linear": "linear"}


def _nodes(block: Any) -> Iterator[Any]:
    """Every node of a graph or block, nested blocks (if/loop bodies) included."""
    stack = [iter(block.nodes())]  # nested blocks walked with a stack, not recursion
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
            continue
        yield node
        stack.extend(iter(inner.nodes()) for inner in reversed(list(node.blocks())))


def _attr_path(value: Any) -> str | None:
    """``stem.1`` for a value read as ``self.stem.1.running_mean`` (a prim::GetAttr chain)."""
    names, node = [], value.node()
    while node.kind() == "prim::GetAttr":
        names.append(node.s("name"))
        node = next(node.inputs()).node()
    if not names or node.kind() != "prim::Param":
        return None
    return ".".join(reversed(names[1:]))


def _producer(value: Any) -> tuple[str, str | None]:
    """(op kind, layer path) of the node that computes ``value``, looking through nothing."""
    node = value.node()
    kind = node.kind()
    layer = _attr_path(list(node.inputs())[1]) if kind in _LAYER_OPS and len(list(node.inputs())) > 1 else None
    return kind, layer


def _statistics(module: Any) -> dict[str, tuple]:
    """BN path -> its (running_mean, running_var) tensors, for every BN module of the tree."""
    from ...core.modules import is_batchnorm

    out = {}
    for name, sub in module.named_modules():
        if name and is_batchnorm(sub) and getattr(sub, "running_mean", None) is not None:
            out[name] = (sub.running_mean, sub.running_var)
    return out


def fold_script(model: torch.jit.ScriptModule) -> tuple[torch.jit.ScriptModule, list[dict], list[dict], int]:
    """Fold the BNs of a TorchScript module in eval mode with ``torch.jit.freeze`` (``model``
    is not changed).

    Returns the frozen module (in eval mode), the folded BNs, the BNs left with reasons, and
    the BN count. Only ``forward`` survives freezing: other methods and attributes are gone.
    """
    original = model
    calls = {}  # BN path -> (input op, layer path) in the unfrozen graph
    for node in _nodes(original.inlined_graph):
        if node.kind() == "aten::batch_norm":
            inputs = list(node.inputs())
            path = _attr_path(inputs[3]) or f"batch_norm {len(calls)}"
            calls[path] = _producer(inputs[0])
    try:
        with quiet():
            frozen = torch.jit.freeze(original)  # a new module: the original is left as it was
    except Exception as exc:  # noqa: BLE001 - a module freezing does not handle
        raise InputError(
            f"torch.jit.freeze cannot fold this TorchScript module: {one_line(exc, limit=200)}",
            "write a state_dict (--to state-dict), or fold the original checkpoint with --arch",
        ) from None
    stats = _statistics(original)
    left: dict[str, str] = {}
    for node in _nodes(frozen.graph):
        if node.kind() != "aten::batch_norm":
            continue
        inputs = list(node.inputs())
        mean = inputs[3].toIValue() if inputs[3].node().kind() == "prim::Constant" else None
        names = [p for p, (m, _) in stats.items() if isinstance(mean, torch.Tensor) and m.shape == mean.shape and torch.equal(m, mean)]
        name = " or ".join(names) if names else f"batch_norm {len(left)}"
        source = inputs[0].node().kind().replace("aten::", "").replace("prim::", "")
        before = calls.get(names[0]) if names else None
        if before is not None and before[0] in _LAYER_OPS:
            reason = f"torch.jit.freeze did not fold it into {before[1] or before[0]} (that layer's output is read elsewhere, or its weights are not constants)"
        else:
            reason = f"its input comes from {source if source != 'Param' else 'a model input'}, not a conv or linear layer (torch.jit.freeze folds only those)"
        left[name] = reason
    folded = []
    for path, (kind, layer) in calls.items():
        if any(path == n or path in n.split(" or ") for n in left):
            continue
        folded.append({"bn": path, "into": layer or kind.replace("aten::", ""), "side": "after", "note": None})
    skipped = [{"bn": name, "reason": reason} for name, reason in left.items()]
    return frozen, folded, skipped, len(calls)
