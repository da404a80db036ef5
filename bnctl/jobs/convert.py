"""``bnctl convert``'s job: read the model, convert its BatchNorm layers, write the result."""

from __future__ import annotations

from pathlib import Path

from .. import _atomic
from ..core import verify
from ..io.source import CheckInputs, ModelSource
from ..io import writers
from ..io.targets import Target
from ..ops.convert import ConvertReport, convert
from .artifact import deliver


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
    as a pickled module or as the converted architecture's state_dict (a ``.safetensors``
    name writes safetensors). With check inputs, the file about to be written runs on them
    first and must compute what the converted model computes."""
    output = Path(output)
    _atomic.refuse_overwrite(source.path, output)
    model = source.open().eager("converting")
    examples = inputs.make()
    if examples is not None:
        verify.reference_outputs(model.eval(), examples)  # an InputError naming the shape if the model rejects it
    converted, report = convert(model, to, inputs=examples, groups=groups)
    target = Target.MODULE if save_as == "module" else Target.STATE_DICT
    artifact = writers.build(converted, target, examples or (), output)
    deliver(artifact, output, report, model=converted.eval(), examples=examples)
    return report
