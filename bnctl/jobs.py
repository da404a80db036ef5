"""What every command that reads a model and writes a file does first: keep the input safe,
open the model, and make the check inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt_mod
from . import verify
from .errors import InputError
from .inspection import open_model


def guard_output(path: Path, output: Path) -> None:
    """An InputError if ``output`` is the input file (inputs are never overwritten)."""
    if output.exists() and path.exists() and output.resolve() == path.resolve():
        raise InputError(f"refusing to overwrite the input {path}", "write the result to another file with -o")


def open_for(
    verb: str,
    path: Path,
    *,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    key: str | None = None,
    trust: bool = False,
) -> tuple[ckpt_mod.Checkpoint, Any]:
    """The checkpoint and the model it holds: the ``--arch`` module for a state_dict (an error
    saying ``verb`` needs it otherwise), the module (TorchScript or pickled), the program, or
    the ONNX graph."""
    checkpoint, module, _ = open_model(path, arch=arch, arch_args=arch_args, key=key, trust=trust)
    if checkpoint.content == "state_dict":
        if module is None:
            raise InputError(f"{path.name} holds a state_dict: {verb} needs the model it belongs to", "pass --arch pkg.module:factory (and --arch-arg name=value) to build it")
        return checkpoint, module
    if checkpoint.module is not None:
        return checkpoint, checkpoint.module
    return checkpoint, checkpoint.program if checkpoint.program is not None else checkpoint.onnx_model


def eager_only(verb: str, checkpoint: ckpt_mod.Checkpoint, model: Any, path: Path) -> nn.Module:
    """``model`` if it is an eager ``nn.Module`` whose modules can be swapped, else an InputError."""
    if isinstance(model, nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        return model
    raise InputError(f"{path.name} is a {checkpoint.describe()}: {verb} needs an eager PyTorch model", "use the training checkpoint (state_dict + --arch) or a pickled module (--trust)")


def check_inputs(shapes: Sequence[Sequence[int]], data: Path | None, seed: int = 0, count: int = 16) -> tuple | None:
    """Random inputs of ``shapes``, or a batch of up to ``count`` samples of ``data``, or None."""
    if shapes:
        return verify.random_inputs(shapes, seed)
    if data is not None:
        from .data import example_batch

        return (example_batch(data, count=count),)
    return None
