"""Fold BatchNorm into neighbouring conv and linear layers.

- :mod:`.math`: the float64 arithmetic, weights in and weights out;
- :mod:`.fx`: pairing from the data flow of a traced graph (torch.fx or a ``.pt2``'s aten graph) and the rewrite;
- :mod:`.tree`: the module-tree path for models that cannot be traced;
- :mod:`.script`: TorchScript, folded on its graph by ``torch.jit.freeze``;
- :mod:`.onnx`: the same on ONNX graphs (deciding what folds needs no torch), and :mod:`.onnx_views`
  for a Gemm or MatMul seen through a Reshape or Transpose;
- :mod:`.pytorch`: :func:`fold`, the library function that chooses the path and verifies;
- :mod:`.report`: :class:`FoldReport`.

The names below are imported when first used, so that importing :mod:`.onnx` loads no torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_TOLERANCE", "FoldReport", "fold"]


def __getattr__(name: str) -> Any:
    if name == "fold":
        from .pytorch import fold

        return fold
    if name in ("FoldReport", "DEFAULT_TOLERANCE"):
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module 'bnctl.ops.fold' has no attribute {name!r}")
