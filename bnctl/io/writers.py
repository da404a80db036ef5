"""Write a model in the format the user asked for, atomically, after checking that what will
be written computes what it should.

Each writer first builds the artifact (an exported program, a TorchScript module, ONNX
bytes, ...) and a runner for *that artifact*, so the proof covers the file and not only the
in-memory model it came from.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import _atomic
from .._quiet import quiet
from ..errors import BnctlError, InputError, one_line
from .shapes import Layout
from .targets import Target


_SUFFIXES = {".pt2": Target.PT2, ".onnx": Target.ONNX, ".safetensors": Target.STATE_DICT, ".ts": Target.TORCHSCRIPT}


def target_from_suffix(path: Path) -> Target | None:
    """The format an output name asks for (``.pt2``, ``.onnx``, ``.safetensors``, ``.ts``,
    ``.torchscript.pt``), or None when the name does not say."""
    if path.name.lower().endswith(".torchscript.pt"):
        return Target.TORCHSCRIPT
    return _SUFFIXES.get(path.suffix.lower())


@dataclass
class Artifact:
    """A model ready to be written: how to run it, its file's bytes, and its inputs as the
    file records them (``[{"name", "dtype", "shape"}]``, :mod:`bnctl.io.shapes`; empty
    for formats that record no shapes)."""

    target: Target
    run: Callable[..., Any]
    data: Callable[[], bytes]
    inputs: list = field(default_factory=list)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes: written by Python afterwards, a full disk is a clean
    error instead of an abort inside torch's zip writer. Where the pickle names classes of
    a file-path ``--arch`` (or of a module beside it), the archive also records their files
    (member :data:`~bnctl.io.arch.SOURCES`), so that ``--trust`` loads it back from any
    working folder; torch's own readers ignore the member."""
    import json
    import zipfile

    from . import arch, pickles

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        pickled = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        found = arch.sources(pickles.modules(archive.read(pickled)))
    if found:
        with zipfile.ZipFile(buffer, "a") as archive:
            archive.writestr(pickled.rpartition("/")[0] + "/" + arch.SOURCES, json.dumps({"modules": found}, indent=1))
    return buffer.getvalue()


def build(model: nn.Module, target: Target, inputs: tuple, dest: Path, layout: Layout = Layout()) -> Artifact:
    """Turn ``model`` into the artifact for ``target``; errors that name the failing step.
    ``layout``: the dynamic dims of a ``.pt2`` or ONNX file, and an ONNX graph's names."""
    try:
        with quiet():
            return _BUILDERS[target](model, inputs, dest, layout)
    except BnctlError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter failing is the user's model's story
        raise InputError(f"could not write the model as {target.value}: {type(exc).__name__}: {one_line(exc)}", "try another --to (pt2, torchscript, module, state-dict); rerun with --debug for details") from exc


def save(artifact: Artifact, dest: Path) -> None:
    """Write the artifact to ``dest`` atomically."""
    _atomic.write_bytes(dest, artifact.data())


def _pt2(model: nn.Module, inputs: tuple, dest: Path, layout: Layout) -> Artifact:
    from .shapes import describe_program, export_program, forward_names

    program = export_program(model, inputs, layout.dims)

    def data() -> bytes:
        buffer = io.BytesIO()  # a file object: torch.export.save wants a .pt2 name otherwise
        torch.export.save(program, buffer)
        return buffer.getvalue()

    return Artifact(Target.PT2, program.module(), data, describe_program(program, forward_names(model, len(inputs))))


def _torchscript(model: nn.Module, inputs: tuple, dest: Path, layout: Layout) -> Artifact:
    if isinstance(model, torch.jit.ScriptModule):
        scripted = model
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            scripted = torch.jit.trace(model, inputs, check_trace=False)

    def data() -> bytes:
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        return buffer.getvalue()

    return Artifact(Target.TORCHSCRIPT, scripted, data)


def _module(model: nn.Module, inputs: tuple, dest: Path, layout: Layout) -> Artifact:
    data = torch_bytes(model)
    reloaded = torch.load(io.BytesIO(data), weights_only=False)  # bytes we just wrote ourselves
    return Artifact(Target.MODULE, reloaded, lambda: data)


def _state_dict(model: nn.Module, inputs: tuple, dest: Path, layout: Layout) -> Artifact:
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if dest.suffix.lower() == ".safetensors":
        from safetensors.torch import save

        return Artifact(Target.STATE_DICT, model, lambda: save(tensors))
    return Artifact(Target.STATE_DICT, model, lambda: torch_bytes(tensors))


def _onnx(model: nn.Module, inputs: tuple, dest: Path, layout: Layout) -> Artifact:
    from ..core import onnx as onnx_run
    from .shapes import describe_onnx

    data, _ = onnx_bytes(model, inputs, layout=layout)
    proto = _load_onnx(data)
    names = [i.name for i in onnx_run.graph_inputs(proto)]

    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        return onnx_run.run(proto, {n: a.detach().numpy() for n, a in zip(names, args)}, what=f"the ONNX graph for {dest.name}")

    return Artifact(Target.ONNX, run, lambda: data, describe_onnx(proto))


def _load_onnx(data: bytes) -> Any:
    import onnx

    return onnx.load_from_string(data)


# --- the ONNX exporter (bnctl export, and --to onnx) ----------------------------------------


def _operator(exc: BaseException) -> str | None:
    """The operator an exporter failed on, from its message (``aten::foo``, ``aten.foo.default``)."""
    text = str(exc)
    for pattern in (r"aten::[A-Za-z0-9_.]+", r"aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", r"torch\.ops\.[A-Za-z0-9_.]+", r"operator '?([A-Za-z0-9_:.]+)'?"):
        match = re.search(pattern, text)
        if match:
            return match.group(0)
    return None


class _Calls(nn.Module):
    """A module that calls ``model``: hides a GraphModule's ``graph`` from the TorchScript-based exporter."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> Any:
        return self.model(*args)


def onnx_bytes(
    model: nn.Module,
    inputs: tuple,
    opset: int | None = None,
    layout: Layout = Layout(dims="static"),
) -> tuple[bytes, str]:
    """``model`` as ONNX bytes and the exporter that made them: torch.export-based first,
    TorchScript-based if that fails or cannot write ``opset``. An InputError naming the
    operator if both fail.

    ``layout`` (:class:`bnctl.io.shapes.Layout`): which input dims are dynamic ("static",
    "auto" or dim indices) and the names; by default inputs are named from ``forward``'s
    signature, outputs ``output``/``output_<i>``, dynamic dims ``batch``, ``height``, ``width``.
    """
    import onnx

    from .shapes import dynamic_spec, forward_names, tidy_onnx

    dims = layout.dims
    names = list(layout.input_names) if layout.input_names else forward_names(model, len(inputs))
    if len(names) != len(inputs):
        raise InputError(f"--input-names gave {len(names)} name{'s' * (len(names) != 1)}, the model takes {len(inputs)} input{'s' * (len(inputs) != 1)}", "pass one name per --input-shape")
    errors: list[Any] = []
    result = None
    with quiet():
        try:
            import onnxscript  # noqa: F401

            spec, examples = dynamic_spec(inputs, dims, names)
            program = torch.onnx.export(model, examples, dynamo=True, external_data=False, opset_version=opset, dynamic_shapes=spec, input_names=names, verbose=False)
            result = (program.model_proto, "torch.onnx (torch.export-based)")
            written = next((o.version for o in result[0].opset_import if o.domain in ("", "ai.onnx")), None)
            if opset is not None and written != opset:
                errors.append(f"the torch.export-based exporter wrote opset {written}, not {opset}")
                result = None
        except ImportError:
            errors.append("onnxscript is not installed")
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - try the other exporter
            errors.append(exc)
        if result is None:
            buffer = io.BytesIO()
            try:
                if dims == "static":
                    axes = None
                else:
                    wanted = (0,) if dims == "auto" else dims
                    axes = {n: {k: f"dim{k}" if k else "batch" for k in wanted if k < t.dim()} for n, t in zip(names, inputs) if isinstance(t, torch.Tensor)}
                # wrapped: this exporter takes a GraphModule's fx graph for a TorchScript one
                wrapped = _Calls(model) if isinstance(model, torch.fx.GraphModule) else model
                torch.onnx.export(wrapped, inputs, buffer, dynamo=False, opset_version=opset or 17, input_names=names, dynamic_axes=axes)
                result = (onnx.load_from_string(buffer.getvalue()), "torch.onnx (TorchScript-based fallback)")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
    if result is not None:
        proto, exporter = result
        tidy_onnx(proto, layout.output_names)
        return proto.SerializeToString(), exporter
    named = [(e, _operator(e)) for e in errors if isinstance(e, BaseException)]
    exc, op = next(((e, o) for e, o in reversed(named) if o), (errors[-1] if errors else None, None))
    first = re.sub(r"\x1b\[[0-9;]*m", "", one_line(exc) if isinstance(exc, BaseException) else str(exc)) if exc is not None else "unknown error"
    raise InputError(
        f"the model does not export to ONNX{f' (operator {op})' if op else ''}{f' at opset {opset}' if opset else ''}: {first[:300]}",
        "try another --opset (the torch.export-based exporter writes 18 and later), or leave --opset out" if opset and not op else "replace or register that operator (torch.onnx custom symbolic / onnxscript), or export another part of the model",
    )


_BUILDERS: dict[Target, Callable[[nn.Module, tuple, Path], Artifact]] = {
    Target.PT2: _pt2,
    Target.TORCHSCRIPT: _torchscript,
    Target.MODULE: _module,
    Target.STATE_DICT: _state_dict,
    Target.ONNX: _onnx,
}
