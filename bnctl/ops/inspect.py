"""``bnctl.inspect``: read a checkpoint and summarize its BatchNorm layers."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._bulk import bulk
from ..core import layers as layers_mod
from ..core import stats
from ..io.source import ModelSource


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

    def __repr__(self) -> str:
        return f"InspectResult({self.source!r}, {self.description}: {self.summary()})"

    def summary(self) -> str:
        """``10 BatchNorm layers, 2 flagged (nonfinite 1, never_updated 1)``."""
        counts = stats.flag_counts(self.rows)
        detail = f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else ""
        return f"{len(self.rows)} BatchNorm layer{'s' * (len(self.rows) != 1)}, {len(self.flagged)} flagged{detail}"

    @property
    def flagged(self) -> list[dict[str, Any]]:
        """Rows that carry at least one flag."""
        return [r for r in self.rows if r["flags"]]

    def table(self):
        """The rows as a pandas DataFrame (columns: :data:`bnctl.stats.COLUMNS`)."""
        return stats.table(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the inspect contract (ARCHITECTURE.md); floats as computed,
        NaN included (:func:`bnctl.render.json.dumps` writes them as null)."""
        return {
            "file": self.source,
            "format": self.description,
            "content": self.content,
            "key": self.key,
            "layers": [dict(row) for row in self.rows],
            "summary": {
                "layers": len(self.rows),
                "flagged": len(self.flagged),
                "flags": stats.flag_counts(self.rows),
            },
            "notes": self.notes,
            "metadata": dict(self.metadata),
        }


def inspect(target: str | Path | ModelSource | Any, **source: Any) -> InspectResult:
    """Find every BatchNorm layer of ``target`` and summarize it.

    ``target`` is a checkpoint path, a :class:`~bnctl.io.source.ModelSource`, or a module;
    ``source`` are the other fields of a ``ModelSource`` for a path (``arch``, ``arch_args``,
    ``key``, ``trust``). A checkpoint is read as
    :func:`bnctl.io.checkpoint.load` reads it (safe unless ``trust``); only the BN tensors
    are read. What the file does not record stays ``None``.
    """
    torch = sys.modules.get("torch")  # a module can only be given where torch is imported
    if torch is not None and isinstance(target, torch.nn.Module):
        from ..core.modules import from_module

        found = [layers_mod.usable(layer) for layer in from_module(target)]
        return InspectResult(type(target).__name__, "nn.Module", "module", found, stats.rows(found))
    if not isinstance(target, ModelSource):
        target = ModelSource(Path(target), **source)
    elif source:
        target = dataclasses.replace(target, **source)
    from ..io.kinds import StateDict

    with bulk():
        opened = target.open()
        found = opened.layers()
        rows = stats.rows(found)
    checkpoint, module, notes = opened.checkpoint, opened.built, opened.notes
    if isinstance(opened.kind, StateDict) and module is None and found:
        notes.append("a state_dict does not record kind, eps, momentum or train/eval mode: shown as unknown; pass --arch to read them from the model")
    if module is not None:
        notes.append("train/eval mode is unknown: a state_dict does not record it")
    if checkpoint.key is not None and len(checkpoint.candidates) > 1:
        others = [c for c in checkpoint.candidates if c != checkpoint.key.split(".")[0]]
        notes.append(f"read entry '{checkpoint.key}'; other entries with weights: {', '.join(others)} (choose with --key)")
    return InspectResult(
        source=str(target.path),
        description=checkpoint.describe(),
        content=checkpoint.content,
        layers=found,
        rows=rows,
        key=checkpoint.key,
        notes=notes,
        metadata=checkpoint.metadata,
    )
