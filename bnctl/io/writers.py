"""A model as it will be written: an :class:`Artifact` (how to run it, its bytes, its inputs
as the file records them), built in the format the user asked for (:func:`build`, ``--to``)
or in the input's own (:func:`like_input`); :func:`save`, the one function that writes one,
atomically.

A builder makes the artifact itself (an exported program, a TorchScript module, ONNX bytes,
a pickled module loaded back) and a runner for *that artifact*, so that the check a job runs
before saving (:func:`bnctl.jobs.artifact.deliver`) covers the file, not only the in-memory
model it came from.
"""

from __future__ import annotations

import io
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


def build(model: nn.Module, target: Target, inputs: tuple, dest: Path, layout: Layout = Layout(), tip: str = "try another --to (pt2, torchscript, module, state-dict); rerun with --debug for details") -> Artifact:
    """Turn ``model`` into the artifact for ``target``; errors that name the failing step
    (``tip``: what the command's user can do instead). ``layout``: the dynamic dims of a
    ``.pt2`` or ONNX file, and an ONNX graph's names."""
    try:
        with quiet():
            return _BUILDERS[target](model, inputs, dest, layout)
    except BnctlError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter failing is the user's model's story
        raise InputError(f"could not write the model as {target.value}: {type(exc).__name__}: {one_line(exc)}", tip) from exc


def save(artifact: Artifact, dest: Path) -> None:
    """Write the artifact to ``dest`` atomically."""
    _atomic.write_bytes(dest, artifact.data())


def _pt2(model: nn.Module, inputs: tuple, dest: Path, layout: Layout) -> Artifact:
    from .shapes import describe_program, export_program, forward_names

    program = export_program(model, inputs, layout.dims)
    return program_artifact(program, describe_program(program, forward_names(model, len(inputs))))


def program_artifact(program: Any, inputs: list | None = None) -> Artifact:
    """A ``torch.export`` program as it will be written (``torch.export.save``), run as its ``module()``."""

    def data() -> bytes:
        buffer = io.BytesIO()  # a file object: torch.export.save wants a .pt2 name otherwise
        torch.export.save(program, buffer)
        return buffer.getvalue()

    return Artifact(Target.PT2, program.module(), data, inputs or [])


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
    loaded: list[nn.Module] = []

    def run(*args: Any) -> Any:  # the file's bytes loaded back, on the first run only (none: no cost)
        if not loaded:
            loaded.append(torch.load(io.BytesIO(data), weights_only=False))  # bytes we just wrote ourselves
        return loaded[0](*args)

    return Artifact(Target.MODULE, run, lambda: data)


def state_dict_artifact(model: nn.Module, dest: Path) -> Artifact:
    """``model.state_dict()`` as it is (``_metadata`` kept): safetensors for a
    ``.safetensors`` name, else a torch file. It runs as ``model``."""
    state = model.state_dict()
    if dest.suffix.lower() == ".safetensors":
        from safetensors.torch import save

        return Artifact(Target.STATE_DICT, model, lambda: save({k: v.detach().contiguous() for k, v in state.items()}))
    return Artifact(Target.STATE_DICT, model, lambda: torch_bytes(state))


def _state_dict(model: nn.Module, inputs: tuple, dest: Path, layout: Layout) -> Artifact:
    return state_dict_artifact(model, dest)


def _onnx(model: nn.Module, inputs: tuple, dest: Path, layout: Layout) -> Artifact:
    from .exporter import onnx_bytes

    data, _ = onnx_bytes(model, inputs, layout=layout)
    return onnx_artifact(_load_onnx(data), dest, data)


def onnx_artifact(proto: Any, dest: Path, data: bytes | None = None) -> Artifact:
    """An ONNX graph as it will be written (``data``, its serialized bytes, when already
    made), run in ONNX Runtime's child process."""
    from ..core import onnx as onnx_run
    from .shapes import describe_onnx

    names = [i.name for i in onnx_run.graph_inputs(proto)]

    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        return onnx_run.run(proto, {n: a.detach().numpy() for n, a in zip(names, args)}, what=f"the ONNX graph for {dest.name}")

    return Artifact(Target.ONNX, run, (lambda: data) if data is not None else proto.SerializeToString, describe_onnx(proto))


def _load_onnx(data: bytes) -> Any:
    import onnx

    return onnx.load_from_string(data)


def like_input(checkpoint: Any, model: Any, dest: Path, *, strip: str | None = None, add: str | None = None) -> Artifact:
    """``model`` (changed by a command from what ``checkpoint`` held) as it will be written to
    ``dest`` in the input's own kind (:mod:`bnctl.io.kinds`): a state_dict into the file's own
    layout (the whole training checkpoint with its other entries, or the safetensors file with
    its metadata), a pickled module pickled again, TorchScript as TorchScript, a program as a
    ``.pt2``, an ONNX graph as ONNX. ``strip``/``add``: the key prefixes ``--arch`` fitted the
    state_dict with. A pickled module runs loaded back from its bytes, an ONNX graph in ONNX
    Runtime, the others as the model in memory."""
    from .kinds import EagerModule, OnnxGraph, Program, Script

    kind = checkpoint.kind
    if isinstance(kind, OnnxGraph):
        return onnx_artifact(model, dest)
    if isinstance(kind, Program):
        return program_artifact(model)
    if isinstance(kind, Script):
        return _torchscript(model, (), dest, Layout())
    if isinstance(kind, EagerModule):
        return _module(model, (), dest, Layout())
    return _state_dict_like(checkpoint, model, strip, add)


def _state_dict_like(checkpoint: Any, model: nn.Module, strip: str | None, add: str | None) -> Artifact:
    """The state_dict of ``model`` under the file's own keys, in the file's own layout."""
    from .arch import fit_keys, torch_tensors
    from .checkpoint import Format

    state = model.state_dict()
    fitted, _ = fit_keys(checkpoint.tensors.keys(), state.keys(), strip=strip, add=add)
    names = {model_key: file_key for file_key, model_key in fitted.items()}  # model key -> file key
    updated = {names[k]: v.detach().cpu().contiguous() for k, v in state.items() if k in names}
    if checkpoint.format == Format.SAFETENSORS:

        def safetensors_bytes() -> bytes:
            from safetensors.torch import save

            tensors = torch_tensors(checkpoint.tensors)
            tensors.update(updated)
            header = {k: str(v) for k, v in checkpoint.metadata.items()} or None
            return save({k: v.contiguous() for k, v in tensors.items()}, metadata=header)

        return Artifact(Target.STATE_DICT, model, safetensors_bytes)

    def torch_file() -> bytes:
        whole = checkpoint.whole()  # every tensor of the file read: only when it is written
        entry = whole
        for part in (checkpoint.key or "").split("."):
            if part:
                entry = entry[part]
        for k, v in updated.items():
            entry[k] = v
        return torch_bytes(whole)

    return Artifact(Target.STATE_DICT, model, torch_file)


_BUILDERS: dict[Target, Callable[[nn.Module, tuple, Path], Artifact]] = {
    Target.PT2: _pt2,
    Target.TORCHSCRIPT: _torchscript,
    Target.MODULE: _module,
    Target.STATE_DICT: _state_dict,
    Target.ONNX: _onnx,
}
