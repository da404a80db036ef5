"""Fold BatchNorm into neighbouring conv and linear layers.

- :mod:`.math`: the float64 arithmetic, weights in and weights out;
- :mod:`.fx`: pairing from the data flow of a traced graph (torch.fx or a ``.pt2``'s aten graph) and the rewrite;
- :mod:`.tree`: the module-tree path for models that cannot be traced, and TorchScript;
- :mod:`.onnx`: the same on ONNX graphs;
- :mod:`.pytorch`: :func:`fold`, the library function that chooses the path and verifies;
- :mod:`.report`: :class:`FoldReport`.
"""

from .pytorch import fold
from .report import DEFAULT_TOLERANCE, FoldReport

__all__ = ["DEFAULT_TOLERANCE", "FoldReport", "fold"]
