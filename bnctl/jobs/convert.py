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
    as a pickled module (with check inputs, loaded back from its bytes and run on them first:
    it must compute what the converted model computes) or as the converted architecture's
    state_dict (safetensors for a ``.safetensors`` name)."""
    output = Path(output)
    _atomic.refuse_overwrite(source.path, output)
    model = source.open().eager("converting")
    examples = inputs.make()
    if examples is not None:
        verify.reference_outputs(model.eval(), examples)  # an InputError naming the shape if the model rejects it
    converted, report = convert(model, to, inputs=examples, groups=groups)
    if save_as == "module":
        artifact = writers.build(converted, Target.MODULE, examples or (), output, tip="try --as state-dict; rerun with --debug for details")
    else:
        artifact = writers.state_dict_artifact(converted, output)
    deliver(artifact, output, report, model=converted, examples=examples)
    return report
