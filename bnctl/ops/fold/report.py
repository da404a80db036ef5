"""What a fold did: :class:`FoldReport` (the JSON contract of ``bnctl fold --format json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_TOLERANCE = 1e-4


@dataclass
class FoldReport:
    """What was folded, what was not and why, and how far the outputs moved."""

    path: str
    folded: list[dict[str, Any]] = field(default_factory=list)  # {"bn", "into", "side", "note"}
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"bn", "reason"}
    bn_before: int = 0
    bn_after: int = 0
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    inputs: str = ""
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    format: str | None = None
    written: bool = False
    reference: list[torch.Tensor] = field(default_factory=list, repr=False)  # the original's outputs

    @property
    def ok(self) -> bool:
        """The outputs were compared and moved no more than the tolerance (relative)."""
        return self.max_rel_error is not None and self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the fold contract (ARCHITECTURE.md) (non-finite numbers stay as they are: the JSON writer makes them null)."""

        return {
            "path": self.path,
            "folded": self.folded,
            "skipped": self.skipped,
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "ok": self.ok,
            "inputs": self.inputs,
            "notes": self.notes,
            "output": self.output,
            "output_format": self.format,
            "written": self.written,
        }
