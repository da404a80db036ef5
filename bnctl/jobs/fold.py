"""Fold a checkpoint file into an output file: read, fold, build the output, check it, write.

Nothing is written unless the artifact about to be written computes the original model's
outputs within the tolerance; the input file is never overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import _atomic
from ..core import verify
from ..errors import InputError, one_line
from ..io import checkpoint as ckpt_mod
from ..io import writers
from ..io.shapes import Layout, describe_onnx, other_sizes, settle_batch
from ..io.source import CheckInputs, ModelSource
from ..io.targets import Target
from ..ops.fold import FoldReport, fold
from ..ops.fold.report import tolerance_for
from ..ops.int8_check import int8_check as quantize_and_compare


def default_target(checkpoint: ckpt_mod.Checkpoint, output: Path) -> Target:
    """What to write when ``--to`` is not given: the output's extension, else by input
    (TorchScript stays TorchScript, ONNX stays ONNX, anything else becomes a .pt2 program)."""
    if (by_suffix := writers.target_from_suffix(output)) is not None:
        return by_suffix
    if checkpoint.format == ckpt_mod.Format.TORCHSCRIPT:
        return Target.TORCHSCRIPT
    if checkpoint.format == ckpt_mod.Format.ONNX:
        return Target.ONNX
    return Target.PT2


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
    checkpoint, model = opened.checkpoint, opened.runnable("folding")
    target = to or default_target(checkpoint, output)
    if standalone is not None and target == Target.STATE_DICT:
        raise InputError("--standalone affine rewrites the model's graph; a state_dict keeps the class as it is", "write a program (.pt2, .onnx, .ts), or leave out --standalone")
    if int8_check and target != Target.ONNX:
        raise InputError(f"--int8-check quantizes an ONNX graph with ONNX Runtime; the output is a {target.value} file", "write to a .onnx file (--to onnx), or leave out --int8-check")
    if target != Target.ONNX and (layout.input_names or layout.output_names):
        raise InputError(f"--input-names and --output-names name the inputs and outputs of an ONNX graph, not of a {target.value} file", "write to a .onnx file (--to onnx), or leave the names out")
    examples = inputs.make()
    if checkpoint.format == ckpt_mod.Format.ONNX:
        if layout != Layout():
            raise InputError("--dynamic, --input-names and --output-names shape what bnctl exports; an ONNX graph keeps its own inputs and outputs", "leave them out, or fold the PyTorch checkpoint")
        if dtype is not None:
            raise InputError("--dtype casts a PyTorch module; an ONNX graph keeps its own dtypes (a float16 graph folds as float16)", "leave out --dtype, or fold the PyTorch checkpoint with --dtype")
        return _fold_onnx(checkpoint, output, target, examples, tolerance, inputs.seed, int8_check, standalone)
    if checkpoint.format == ckpt_mod.Format.TORCHSCRIPT and target not in (Target.TORCHSCRIPT, Target.STATE_DICT):
        raise InputError(f"a TorchScript model can be written as torchscript or state-dict, not {target.value}", "use --to torchscript, or fold the original checkpoint with --arch")
    if examples is None and checkpoint.program is None:
        raise InputError("folding needs example inputs to trace and check the model", "pass --input-shape 1,3,224,224 (once per model input) or --data DIR")
    if checkpoint.program is not None and examples is None:
        examples = tuple(checkpoint.program.example_inputs[0])
    if dtype is not None:
        model, examples = _cast(model, examples, dtype, checkpoint)
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
    report.record(verify.compare(report.reference, verify.run(artifact.run, examples)))
    other = other_sizes(examples, artifact.inputs)
    if other is not None:  # the dims the file leaves dynamic, checked at other sizes too
        with verify.eval_mode(model):
            expected = verify.reference_outputs(model, other)
        report.record(verify.compare(expected, verify.run(artifact.run, other)))
        report.inputs += f"; {verify.shapes_text(other, tuples=True)}"
    if report.ok and int8_check:
        import onnx

        from ..core.onnx import graph_inputs

        graph = onnx.load_from_string(artifact.data())
        report.int8_check = quantize_and_compare(graph, {i.name: t.detach().numpy() for i, t in zip(graph_inputs(graph), examples)})
    if report.ok:
        writers.save(artifact, output)
        report.written = True
    return report


def _cast(model, examples: tuple, dtype: str, checkpoint: ckpt_mod.Checkpoint) -> tuple:
    """A copy of ``model`` and the floating check inputs in ``dtype``."""
    import copy

    import torch

    if checkpoint.program is not None or checkpoint.format == ckpt_mod.Format.TORCHSCRIPT:
        raise InputError(f"--dtype casts a PyTorch module; {checkpoint.path.name} is a {checkpoint.describe()} program, whose dtypes were fixed when it was saved", "fold the original checkpoint (state_dict + --arch) with --dtype")
    target = getattr(torch, dtype)
    cast = tuple(t.to(target) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in examples)
    return copy.deepcopy(model).to(target), cast


def _fold_onnx(checkpoint: ckpt_mod.Checkpoint, output: Path, target: Target, inputs: tuple | None, tolerance: float | None, seed: int, int8_check: bool, standalone: str | None) -> FoldReport:
    import onnx

    from ..core import onnx as onnx_run
    from ..ops.fold import onnx as onnx_fold

    if target != Target.ONNX:
        raise InputError(f"an ONNX graph can only be written as ONNX, not {target.value}", "write to a .onnx file, or fold the PyTorch checkpoint instead")
    model = checkpoint.onnx_model
    notes: list[str] = []
    feeds = onnx_run.input_feeds(model, [tuple(t.shape) for t in inputs] if inputs else None, seed, notes)
    if inputs is not None:
        feeds = {n: t.numpy().astype(v.dtype) for (n, v), t in zip(feeds.items(), inputs)}
    try:
        onnx.checker.check_model(model)
        valid = True
    except UnicodeDecodeError as exc:  # a name or string field that is not UTF-8: bytes damaged
        raise InputError(f"the ONNX graph is broken: a string in it is not UTF-8 ({exc})", "the file is damaged or was edited by hand; export it again") from None
    except onnx.checker.ValidationError as exc:  # published IR-3 files often fail it, yet run
        valid = False
        notes.append(f"the input graph is not valid ONNX ({one_line(exc)}); folded all the same, and the folded graph checked in ONNX Runtime")
    new, folded, skipped, count = onnx_fold.fold_model(model, standalone=standalone)
    if valid:
        onnx.checker.check_model(new)  # a valid graph stays valid: anything else is bnctl's bug
    report = FoldReport(path="onnx", folded=folded, skipped=skipped, bn_before=count, bn_after=count - len(folded))
    report.inputs = verify.shapes_text(list(feeds.values()), tuples=True)
    report.notes += notes
    try:  # both in one ONNX Runtime child process: a crash there is an error here, not the end
        reference, got = onnx_run.run_all([(f"the input graph {checkpoint.path.name}", model), ("the folded graph", new)], feeds)
    except InputError as exc:
        if "cannot run the input graph" not in exc.message:
            raise
        raise InputError(f"{exc.message} (check inputs {report.inputs})", "pass --input-shape with the graph's input shape, or check the opset and IR version onnxruntime supports") from None
    report.tolerance, report.tolerance_source = tolerance_for(reference, tolerance)
    report.input_dims = describe_onnx(new)
    report.record(verify.compare(reference, got))
    report.output, report.format = str(output), target.value
    if report.ok and int8_check:
        report.int8_check = quantize_and_compare(new, feeds)
    if report.ok:
        _atomic.write_bytes(output, new.SerializeToString())
        report.written = True
    return report
