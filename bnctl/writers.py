"""Write a model in the format the user asked for, atomically, after checking that what will
be written computes what it should.

Each writer first builds the artifact (an exported program, a TorchScript module, ONNX
bytes, ...) and a runner for *that artifact*, so the proof covers the file and not only the
in-memory model it came from.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import _atomic
from .errors import InputError, MissingExtraError
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
    """A model ready to be written: how to run it, and how to write it to a path."""

    target: Target
    run: Callable[..., Any]
    write: Callable[[Path], None]


def build(model: nn.Module, target: Target, inputs: tuple, dest: Path) -> Artifact:
    """Turn ``model`` into the artifact for ``target``; errors that name the failing step."""
    try:
        return _BUILDERS[target](model, inputs, dest)
    except MissingExtraError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter failing is the user's model's story
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"could not write the model as {target.value}: {type(exc).__name__}: {first[:300]}", "try another --to (pt2, torchscript, module, state-dict); rerun with --debug for details") from exc


def save(artifact: Artifact, dest: Path) -> None:
    """Write the artifact to ``dest`` atomically."""
    with _atomic.atomic_path(dest) as tmp:
        artifact.write(tmp)


def _free_batch(inputs: tuple) -> tuple:
    """Dynamic-shape spec leaving each input's batch dim free where the model allows it
    (``Dim.AUTO`` specializes where it does not, e.g. a batch of 1)."""
    return tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in inputs)


def _pt2(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
    program = torch.export.export(model, inputs, dynamic_shapes=_free_batch(inputs))

    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: torch.export.save wants a .pt2 name otherwise
            torch.export.save(program, f)

    return Artifact(Target.PT2, program.module(), write)


def _torchscript(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
    if isinstance(model, torch.jit.ScriptModule):
        scripted = model
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            scripted = torch.jit.trace(model, inputs, check_trace=False)
    return Artifact(Target.TORCHSCRIPT, scripted, lambda p: torch.jit.save(scripted, str(p)))


def _module(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    data = buffer.getvalue()
    reloaded = torch.load(io.BytesIO(data), weights_only=False)  # bytes we just wrote ourselves
    return Artifact(Target.MODULE, reloaded, lambda p: p.write_bytes(data))


def _state_dict(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if dest.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        def write(p: Path) -> None:
            save_file(tensors, str(p))
    else:

        def write(p: Path) -> None:
            torch.save(tensors, p)

    return Artifact(Target.STATE_DICT, model, write)


def _onnx(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as exc:
        raise MissingExtraError("onnxscript", "onnx", "writing ONNX") from exc
    from . import onnx_graph

    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "torchvision is not installed" and other chatter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, inputs, dynamo=True, external_data=False, verbose=False, dynamic_shapes=_free_batch(inputs))
    finally:
        logger.setLevel(level)
    proto = program.model_proto
    data = proto.SerializeToString()
    names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]

    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        return onnx_graph.run(proto, {n: a.detach().numpy() for n, a in zip(names, args)})

    return Artifact(Target.ONNX, run, lambda p: p.write_bytes(data))


_BUILDERS: dict[Target, Callable[[nn.Module, tuple, Path], Artifact]] = {
    Target.PT2: _pt2,
    Target.TORCHSCRIPT: _torchscript,
    Target.MODULE: _module,
    Target.STATE_DICT: _state_dict,
    Target.ONNX: _onnx,
}
