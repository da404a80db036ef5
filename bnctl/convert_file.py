"""Convert the BatchNorm layers of a checkpoint file and write the converted model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import _atomic
from .convert import ConvertReport, convert
from .jobs import check_inputs, eager_only, guard_output, open_for


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
    path, output = Path(path), Path(output)
    guard_output(path, output)
    checkpoint, model = open_for("converting", path, arch=arch, arch_args=arch_args, key=key, trust=trust)
    model = eager_only("converting", checkpoint, model, path)
    inputs = check_inputs(input_shapes, data)
    if inputs is not None:
        from .folding import reference_outputs

        reference_outputs(model.eval(), inputs)  # an InputError naming the shape if the model rejects it
    converted, report = convert(model, to, inputs=inputs, groups=groups)
    with _atomic.atomic_path(output) as tmp:
        torch.save(converted if save_as == "module" else converted.state_dict(), tmp)
    return report
