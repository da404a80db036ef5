"""Output formats of the commands that write a model (torch-free, so the CLI can name them)."""

from __future__ import annotations

import enum


class Target(str, enum.Enum):
    """An output format of a command that writes a model."""

    PT2 = "pt2"
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    STATE_DICT = "state-dict"
    MODULE = "module"
