"""Fold a checkpoint file into an output file: read, fold, build the output, check it, write.

Nothing is written unless the artifact about to be written computes the original model's
outputs within the tolerance; the input file is never overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .. import _atomic
from ..errors import InputError
from ..io import writers
from ..io.kinds import OnnxGraph, Script
from ..io.shapes import Layout, settle_batch
from ..io.source import CheckInputs, ModelSource, OpenedModel
from ..io.targets import Target
from ..ops.fold import FoldReport, fold
from ..ops.fold.onnx_checked import fold_graph
from ..ops.int8_check import int8_check as quantize_and_compare
from .artifact import deliver


def default_target(checkpoint: Any, output: Path) -> Target:
    """What to write when ``--to`` is not given: the output's extension, else the input's own
    kind (TorchScript stays TorchScript, ONNX stays ONNX, anything else becomes a .pt2 program)."""
    by_suffix = writers.target_from_suffix(output)
    return by_suffix if by_suffix is not None else checkpoint.kind.target


def fold_file(
    source: ModelSource,
    output: str | Path,
    *,
    inputs: CheckInputs = CheckInputs(),
    to: Target | None = None,
    tolerance: float | None = None,
    layout: Layout = Layout(),
    dtype: str | None = None,
    int8_check: bool = False,
    standalone: str | None = None,
    stage: Callable[[str], None] = lambda text: None,
) -> FoldReport:
    """Fold the model of ``source`` and write it to ``output`` if it checks out.

    ``report.written`` says whether the file was written; ``report.ok`` is False (and nothing
    written) when the outputs moved more than ``tolerance`` (by default, the one of the
    outputs' dtype: float32 1e-4, float16 1e-2, bfloat16 5e-2).

    ``layout`` (:class:`bnctl.io.shapes.Layout`): which input dims a ``.pt2`` or ONNX
    output leaves dynamic, and an ONNX output's names; ``report.input_dims`` lists the
    written file's inputs. ``dtype`` ("float16", "bfloat16", "float32") casts a PyTorch
    module and the check inputs first: the fold is of, and compared with, the cast model,
    and a BN whose folded weights do not fit that dtype is kept with the reason. With
    ``int8_check`` (ONNX outputs), the graph about to be written is quantized by ONNX Runtime
    and ``report.int8_check`` gives the output SQNR per tensor and per channel
    (:mod:`bnctl.ops.int8_check`); nothing more is written. With ``standalone="affine"``,
    every BN that folds into no layer becomes a per-channel multiply-add (ONNX Mul + Add,
    torch.mul/torch.add in programs), verified like every fold.
    """
    output = Path(output)
    _atomic.refuse_overwrite(source.path, output)
    stage(f"reading {source.path}")
    opened = source.open()
    checkpoint, kind, model = opened.checkpoint, opened.kind, opened.runnable("folding")
    target = to or default_target(checkpoint, output)
    if standalone is not None and target == Target.STATE_DICT:
        raise InputError("--standalone affine rewrites the model's graph; a state_dict keeps the class as it is", "write a program (.pt2, .onnx, .ts), or leave out --standalone")
    if int8_check and target != Target.ONNX:
        raise InputError(f"--int8-check quantizes an ONNX graph with ONNX Runtime; the output is a {target.value} file", "write to a .onnx file (--to onnx), or leave out --int8-check")
    if target != Target.ONNX and (layout.input_names or layout.output_names):
        raise InputError(f"--input-names and --output-names name the inputs and outputs of an ONNX graph, not of a {target.value} file", "write to a .onnx file (--to onnx), or leave the names out")
    examples = inputs.make()
    if isinstance(kind, OnnxGraph):
        return _fold_onnx(opened, output, target, examples, tolerance, inputs.seed, int8_check, standalone, layout, dtype)
    if isinstance(kind, Script) and target not in (Target.TORCHSCRIPT, Target.STATE_DICT):
        raise InputError(f"a TorchScript model can be written as torchscript or state-dict, not {target.value}", "use --to torchscript, or fold the original checkpoint with --arch")
    program = checkpoint.program
    if examples is None and program is None:
        raise InputError("folding needs example inputs to trace and check the model", "pass --input-shape 1,3,224,224 (once per model input) or --data DIR")
    if program is not None and examples is None:
        examples = tuple(program.example_inputs[0])
    if dtype is not None:
        model, examples = _cast(model, examples, dtype, opened)
    stage("tracing, pairing and folding")
    folded, report = fold(model, examples, tolerance=tolerance, keep_modules=target == Target.STATE_DICT, standalone=standalone)
    report.notes[:0] = opened.notes  # how the file was fitted to --arch (prefixes, AveragedModel)
    if dtype is not None:
        report.notes.append(f"the model and the check inputs were cast to {dtype} before folding: the outputs are compared with the {dtype} model")
    report.output, report.format = str(output), target.value
    if target == Target.STATE_DICT:
        report.notes.append("state-dict output keeps every BN module; use --to pt2 to drop them")
    if not report.ok:
        return report
    stage(f"building the {target.value} file and checking it")
    if target in (Target.PT2, Target.ONNX):
        layout = settle_batch(model, examples, layout, report.notes)
    artifact = writers.build(folded, target, examples, output, layout)
    report.input_dims = artifact.inputs
    if target in (Target.TORCHSCRIPT, Target.STATE_DICT, Target.MODULE):
        report.notes.append(f"a {target.value} file records no input shapes (a traced module may still fix sizes its code read)" if target == Target.TORCHSCRIPT else f"a {target.value} file records no input shapes")

    def quantize(artifact: writers.Artifact) -> None:
        import onnx

        from ..core.onnx import graph_inputs

        graph = onnx.load_from_string(artifact.data())
        report.int8_check = quantize_and_compare(graph, {i.name: t.detach().numpy() for i, t in zip(graph_inputs(graph), examples)})

    deliver(artifact, output, report, model=model, examples=examples, before_save=quantize if int8_check else None)
    return report


def _cast(model, examples: tuple, dtype: str, opened: OpenedModel) -> tuple:
    """A copy of ``model`` and the floating check inputs in ``dtype``."""
    import copy

    import torch

    checkpoint = opened.checkpoint
    if not (opened.built is not None or opened.kind.eager):
        raise InputError(f"--dtype casts a PyTorch module; {checkpoint.path.name} is a {checkpoint.describe()} program, whose dtypes were fixed when it was saved", "fold the original checkpoint (state_dict + --arch) with --dtype")
    target = getattr(torch, dtype)
    cast = tuple(t.to(target) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in examples)
    return copy.deepcopy(model).to(target), cast


def _fold_onnx(opened: OpenedModel, output: Path, target: Target, inputs: tuple | None, tolerance: float | None, seed: int, int8_check: bool, standalone: str | None, layout: Layout, dtype: str | None) -> FoldReport:
    """An ONNX graph: folded and checked in ONNX Runtime by the operation, written as ONNX."""
    if layout != Layout():
        raise InputError("--dynamic, --input-names and --output-names shape what bnctl exports; an ONNX graph keeps its own inputs and outputs", "leave them out, or fold the PyTorch checkpoint")
    if dtype is not None:
        raise InputError("--dtype casts a PyTorch module; an ONNX graph keeps its own dtypes (a float16 graph folds as float16)", "leave out --dtype, or fold the PyTorch checkpoint with --dtype")
    if target != Target.ONNX:
        raise InputError(f"an ONNX graph can only be written as ONNX, not {target.value}", "write to a .onnx file, or fold the PyTorch checkpoint instead")
    new, report = fold_graph(opened.kind.proto, inputs, tolerance=tolerance, seed=seed, standalone=standalone, name=f"the input graph {opened.checkpoint.path.name}")
    report.output, report.format = str(output), target.value
    artifact = writers.onnx_artifact(new, output)  # the graph the operation ran in ONNX Runtime
    report.input_dims = artifact.inputs

    def quantize(artifact: writers.Artifact) -> None:
        report.int8_check = quantize_and_compare(new, report.feeds)

    deliver(artifact, output, report, before_save=quantize if int8_check else None)
    return report
