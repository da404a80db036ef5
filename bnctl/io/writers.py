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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import _atomic
from .._quiet import quiet
from ..errors import BnctlError, InputError, one_line
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
    """A model ready to be written: how to run it, and its file's bytes."""

    target: Target
    run: Callable[..., Any]
    data: Callable[[], bytes]


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes: written by Python afterwards, a full disk is a clean
    error instead of an abort inside torch's zip writer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def build(model: nn.Module, target: Target, inputs: tuple, dest: Path) -> Artifact:
    """Turn ``model`` into the artifact for ``target``; errors that name the failing step."""
    try:
        with quiet():
            return _BUILDERS[target](model, inputs, dest)
    except BnctlError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter failing is the user's model's story
        raise InputError(f"could not write the model as {target.value}: {type(exc).__name__}: {one_line(exc)}", "try another --to (pt2, torchscript, module, state-dict); rerun with --debug for details") from exc


def save(artifact: Artifact, dest: Path) -> None:
    """Write the artifact to ``dest`` atomically."""
    _atomic.write_bytes(dest, artifact.data())


def _free_batch(inputs: tuple, dim: Any = None) -> tuple:
    """Dynamic-shape spec giving each input's batch dim ``dim``; by default ``Dim.AUTO``,
    which leaves it free where the model allows it and specializes where it does not."""
    dim = torch.export.Dim.AUTO if dim is None else dim
    return tuple({0: dim} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in inputs)


def _pt2(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
    program = torch.export.export(model, inputs, dynamic_shapes=_free_batch(inputs))

    def data() -> bytes:
        buffer = io.BytesIO()  # a file object: torch.export.save wants a .pt2 name otherwise
        torch.export.save(program, buffer)
        return buffer.getvalue()

    return Artifact(Target.PT2, program.module(), data)


def _torchscript(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
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


def _module(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
    data = torch_bytes(model)
    reloaded = torch.load(io.BytesIO(data), weights_only=False)  # bytes we just wrote ourselves
    return Artifact(Target.MODULE, reloaded, lambda: data)


def _state_dict(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if dest.suffix.lower() == ".safetensors":
        from safetensors.torch import save

        return Artifact(Target.STATE_DICT, model, lambda: save(tensors))
    return Artifact(Target.STATE_DICT, model, lambda: torch_bytes(tensors))


def _onnx(model: nn.Module, inputs: tuple, dest: Path) -> Artifact:
    from ..core import onnx as onnx_run

    data, _ = onnx_bytes(model, inputs, batch="auto")
    proto = _load_onnx(data)
    names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]

    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        return onnx_run.run(proto, {n: a.detach().numpy() for n, a in zip(names, args)}, what=f"the ONNX graph for {dest.name}")

    return Artifact(Target.ONNX, run, lambda: data)


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


def onnx_bytes(model: nn.Module, inputs: tuple, opset: int | None = None, batch: str = "static") -> tuple[bytes, str]:
    """``model`` as ONNX bytes and the exporter that made them: torch.export-based first,
    TorchScript-based if that fails. An InputError naming the operator if both fail.

    ``batch``: "static" (the inputs' sizes), "dynamic" (dim 0 of every input is one symbol,
    an error where the model fixes it) or "auto" (dim 0 free where the model allows it).
    """
    names = [f"input_{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["input"]
    errors = []
    with quiet():
        try:
            import onnxscript  # noqa: F401

            dynamic = _free_batch(inputs, torch.export.Dim("batch")) if batch == "dynamic" else _free_batch(inputs) if batch == "auto" else None
            program = torch.onnx.export(model, inputs, dynamo=True, external_data=False, opset_version=opset, dynamic_shapes=dynamic, input_names=names, verbose=False)
            return program.model_proto.SerializeToString(), "torch.onnx (torch.export-based)"
        except ImportError:
            errors.append("onnxscript is not installed")
        except Exception as exc:  # noqa: BLE001 - try the other exporter
            errors.append(exc)
        buffer = io.BytesIO()
        try:
            axes = {n: {0: "batch"} for n in names} if batch != "static" else None
            torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=opset or 17, input_names=names, dynamic_axes=axes)
            return buffer.getvalue(), "torch.onnx (TorchScript-based fallback)"
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    named = [(e, _operator(e)) for e in errors if isinstance(e, BaseException)]
    exc, op = next(((e, o) for e, o in reversed(named) if o), (errors[-1] if errors else None, None))
    first = re.sub(r"\x1b\[[0-9;]*m", "", one_line(exc)) if exc is not None else "unknown error"
    raise InputError(
        f"the model does not export to ONNX{f' (operator {op})' if op else ''}: {first[:300]}",
        "replace or register that operator (torch.onnx custom symbolic / onnxscript), or export another part of the model",
    )


_BUILDERS: dict[Target, Callable[[nn.Module, tuple, Path], Artifact]] = {
    Target.PT2: _pt2,
    Target.TORCHSCRIPT: _torchscript,
    Target.MODULE: _module,
    Target.STATE_DICT: _state_dict,
    Target.ONNX: _onnx,
}
