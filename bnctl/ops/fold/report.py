"""What a fold did: :class:`FoldReport` (the JSON contract of ``bnctl fold --format json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_TOLERANCE = 1e-4
#: the default tolerance (largest output change, relative to the largest |output|) per output
#: dtype: a fold rounds each weight once more, to the dtype's precision (float16 keeps 11
#: bits, bfloat16 8), and a layer of many products adds those roundings up
TOLERANCES = {"float64": 1e-4, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def tolerance_for(outputs: list[Any], given: float | None = None) -> tuple[float, str]:
    """``(tolerance, where it comes from)``: ``given`` if the user gave one, else the default
    of the least precise floating dtype among ``outputs`` (numpy arrays or torch tensors)."""
    if given is not None:
        return given, "given with --tolerance"
    names = [str(o.dtype).replace("torch.", "") for o in outputs]
    floating = [n for n in names if n in TOLERANCES] or ["float32"]
    widest = max(floating, key=lambda n: TOLERANCES[n])
    return TOLERANCES[widest], f"the default for {widest} outputs"


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
    tolerance_source: str = "the default for float32 outputs"
    inputs: str = ""
    input_dims: list[dict[str, Any]] = field(default_factory=list)  # the written file's inputs: {"name", "dtype", "shape"}
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
            "tolerance_source": self.tolerance_source,
            "ok": self.ok,
            "inputs": self.inputs,
            "input_dims": self.input_dims,
            "notes": self.notes,
            "output": self.output,
            "output_format": self.format,
            "written": self.written,
        }
