"""bnctl: inspect, audit, recalibrate, fold, convert and export the BatchNorm layers of PyTorch models.

The library mirrors the CLI: ``bnctl.inspect(path_or_module)`` returns what ``bnctl inspect``
prints; ``bnctl.fold(model, example_inputs)`` returns the folded module and its report.
Imports are lazy so that ``bnctl --help`` answers without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "inspect": ("bnctl.ops.inspect", "inspect"),
    "InspectResult": ("bnctl.ops.inspect", "InspectResult"),
    "fold": ("bnctl.ops.fold", "fold"),
    "FoldReport": ("bnctl.ops.fold", "FoldReport"),
    "recalibrate": ("bnctl.ops.recalibrate", "recalibrate"),
    "RecalibrationReport": ("bnctl.ops.recalibrate", "RecalibrationReport"),
    "convert": ("bnctl.ops.convert", "convert"),
    "ConvertReport": ("bnctl.ops.convert", "ConvertReport"),
    "export": ("bnctl.ops.export", "export"),
    "ExportReport": ("bnctl.ops.export", "ExportReport"),
    "diff": ("bnctl.ops.diff", "diff"),
    "DiffResult": ("bnctl.ops.diff", "DiffResult"),
    "ModelSource": ("bnctl.io.source", "ModelSource"),
    "CheckInputs": ("bnctl.io.source", "CheckInputs"),
    "load_checkpoint": ("bnctl.io.checkpoint", "load"),
    "Checkpoint": ("bnctl.io.checkpoint", "Checkpoint"),
    "BNLayer": ("bnctl.core.layers", "BNLayer"),
    "find_layers": ("bnctl.io.kinds", "find_layers"),
    "BnctlError": ("bnctl.errors", "BnctlError"),
    "watch": ("bnctl.ops.watch", "watch"),
    "Watch": ("bnctl.ops.watch", "Watch"),
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .core.layers import BNLayer
    from .errors import BnctlError
    from .io.checkpoint import Checkpoint
    from .io.checkpoint import load as load_checkpoint
    from .io.kinds import find_layers
    from .io.source import CheckInputs, ModelSource
    from .ops.convert import ConvertReport, convert
    from .ops.diff import DiffResult, diff
    from .ops.export import ExportReport, export
    from .ops.fold import FoldReport, fold
    from .ops.inspect import InspectResult, inspect
    from .ops.recalibrate import RecalibrationReport, recalibrate


#: subpackages reachable as attributes after a plain ``import bnctl`` (``bnctl.audit.audit(...)``)
_SUBPACKAGES = ("audit",)


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"bnctl.{name}")
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'bnctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBPACKAGES])
