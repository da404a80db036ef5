"""Convert the BatchNorm layers of a checkpoint file and write the converted model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import _atomic
from .convert import ConvertReport, convert
from .errors import InputError
from .inspection import open_model


def convert_file(
    path: str | Path,
    output: str | Path,
    to: str,
    *,
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
    key: str | None = None,
    trust: bool = False,
    input_shapes: Sequence[Sequence[int]] = (),
    data: Path | None = None,
    groups: int = 32,
    save_as: str = "module",
) -> ConvertReport:
    """Read ``path`` (a state_dict with ``arch``, or a pickled module), convert, write ``output``
    as a pickled module or as the converted architecture's state_dict."""
    from .fold_file import _check_inputs

    path, output = Path(path), Path(output)
    if output.exists() and path.exists() and output.resolve() == path.resolve():
        raise InputError(f"refusing to overwrite the input {path}", "write the converted model to another file with -o")
    checkpoint, module, _ = open_model(path, arch=arch, arch_args=arch_args, key=key, trust=trust)
    if checkpoint.content == "state_dict":
        if module is None:
            raise InputError(f"{path.name} holds a state_dict: converting needs the model it belongs to", "pass --arch pkg.module:factory (and --arch-arg name=value)")
        model = module
    elif checkpoint.content == "module" and not isinstance(checkpoint.module, torch.jit.ScriptModule):
        model = checkpoint.module
    else:
        raise InputError(f"{path.name} is a {checkpoint.describe()}: its modules cannot be replaced", "convert the training checkpoint (state_dict + --arch) or the pickled module")
    inputs = _check_inputs(checkpoint, input_shapes, data, 0)
    if inputs is not None:
        from .folding import reference_outputs

        reference_outputs(model.eval(), inputs)  # an InputError naming the shape if the model rejects it
    converted, report = convert(model, to, inputs=inputs, groups=groups)
    with _atomic.atomic_path(output) as tmp:
        torch.save(converted if save_as == "module" else converted.state_dict(), tmp)
    return report
