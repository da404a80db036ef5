"""``bnctl convert``'s job: read the model, convert its BatchNorm layers, write the result."""

from __future__ import annotations

from pathlib import Path

from .. import _atomic
from ..core import verify
from ..io.source import CheckInputs, ModelSource
from ..io.writers import torch_bytes
from ..ops.convert import ConvertReport, convert


def convert_file(
    source: ModelSource,
    output: str | Path,
    to: str,
    *,
    inputs: CheckInputs = CheckInputs(),
    groups: int = 32,
    save_as: str = "module",
) -> ConvertReport:
    """Read ``source`` (a state_dict with ``arch``, or a pickled module), convert, write ``output``
    as a pickled module or as the converted architecture's state_dict."""
    output = Path(output)
    _atomic.refuse_overwrite(source.path, output)
    model = source.open().eager("converting")
    examples = inputs.make()
    if examples is not None:
        verify.reference_outputs(model.eval(), examples)  # an InputError naming the shape if the model rejects it
    converted, report = convert(model, to, inputs=examples, groups=groups)
    _atomic.write_bytes(output, torch_bytes(converted if save_as == "module" else converted.state_dict()))
    return report
