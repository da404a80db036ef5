"""``bnctl.inspect``: read a checkpoint and summarize its BatchNorm layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from . import arch as arch_mod
from . import checkpoint as ckpt_mod
from . import layers as layers_mod
from . import stats


@dataclass
class InspectResult:
    """BN layers of one model, their summary rows, and notes on what could not be known."""

    source: str
    description: str
    content: str
    layers: list[layers_mod.BNLayer]
    rows: list[dict[str, Any]]
    key: str | None = None
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> list[dict[str, Any]]:
        """Rows that carry at least one flag."""
        return [r for r in self.rows if r["flags"]]

    def table(self):
        """The rows as a pandas DataFrame (columns: :data:`bnctl.stats.COLUMNS`)."""
        return stats.table(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of DESIGN.md's contract; NaN and Inf become null."""
        return {
            "file": self.source,
            "format": self.description,
            "content": self.content,
            "key": self.key,
            "layers": [{k: _json_value(v) for k, v in row.items()} for row in self.rows],
            "summary": {
                "layers": len(self.rows),
                "flagged": len(self.flagged),
                "flags": stats.flag_counts(self.rows),
            },
            "notes": self.notes,
            "metadata": {k: _json_value(v) for k, v in self.metadata.items()},
        }


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def open_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    key: str | None = None,
    trust: bool = False,
) -> tuple[ckpt_mod.Checkpoint, nn.Module | None, list[str]]:
    """Read ``path``; with ``arch``, build that module and load the state_dict into it strictly.

    Returns the checkpoint, the built module (``None`` without ``arch``) and notes for the user.
    """
    checkpoint = ckpt_mod.load(path, key=key, trust=trust)
    notes: list[str] = []
    module = None
    if arch is not None:
        if checkpoint.tensors is None:
            notes.append(f"--arch ignored: {checkpoint.path.name} holds a {checkpoint.content}, not a state_dict")
        else:
            module = arch_mod.load_state_dict(arch_mod.build(arch, arch_args), checkpoint.tensors, arch)
    return checkpoint, module, notes


def inspect(
    target: str | Path | nn.Module,
    *,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    key: str | None = None,
    trust: bool = False,
) -> InspectResult:
    """Find every BatchNorm layer of ``target`` (a checkpoint path or a module) and summarize it.

    A checkpoint is read as :func:`bnctl.checkpoint.load` reads it (safe unless ``trust``);
    only the BN tensors are read. What the file does not record stays ``None``.
    """
    if isinstance(target, nn.Module):
        found = layers_mod.from_module(target)
        return InspectResult(type(target).__name__, "nn.Module", "module", found, stats.rows(found))
    checkpoint, module, notes = open_model(target, arch=arch, arch_args=arch_args, key=key, trust=trust)
    found = layers_mod.find(checkpoint, module)
    if checkpoint.content == "state_dict" and module is None and found:
        notes.append("a state_dict does not record kind, eps, momentum or train/eval mode: shown as unknown; pass --arch to read them from the model")
    if module is not None:
        notes.append("train/eval mode is unknown: a state_dict does not record it")
    if checkpoint.key is not None and len(checkpoint.candidates) > 1:
        others = [c for c in checkpoint.candidates if c != checkpoint.key.split(".")[0]]
        notes.append(f"read entry '{checkpoint.key}'; other entries with weights: {', '.join(others)} (choose with --key)")
    return InspectResult(
        source=str(target),
        description=checkpoint.describe(),
        content=checkpoint.content,
        layers=found,
        rows=stats.rows(found),
        key=checkpoint.key,
        notes=notes,
        metadata=checkpoint.metadata,
    )
