"""bnctl: inspect, audit, recalibrate, fold, convert and export the BatchNorm layers of PyTorch models.

The library mirrors the CLI: ``bnctl.inspect(path_or_module)`` returns what ``bnctl inspect``
prints; ``bnctl.fold(model, example_inputs)`` returns the folded module and its report.
Imports are lazy so that ``bnctl --help`` answers without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "inspect": ("bnctl.inspection", "inspect"),
    "InspectResult": ("bnctl.inspection", "InspectResult"),
    "load_checkpoint": ("bnctl.checkpoint", "load"),
    "Checkpoint": ("bnctl.checkpoint", "Checkpoint"),
    "BNLayer": ("bnctl.layers", "BNLayer"),
    "find_layers": ("bnctl.layers", "find"),
    "BnctlError": ("bnctl.errors", "BnctlError"),
    "fold": ("bnctl.folding", "fold"),
    "recalibrate": ("bnctl.recalibration", "recalibrate"),
    "RecalibrationReport": ("bnctl.recalibration", "RecalibrationReport"),
    "FoldReport": ("bnctl.folding", "FoldReport"),
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import Checkpoint
    from .checkpoint import load as load_checkpoint
    from .errors import BnctlError
    from .folding import FoldReport, fold
    from .recalibration import RecalibrationReport, recalibrate
    from .inspection import InspectResult, inspect
    from .layers import BNLayer
    from .layers import find as find_layers


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'bnctl' has no attribute {name!r}")
