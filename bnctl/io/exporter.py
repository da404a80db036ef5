"""The ONNX exporter bnctl uses (``bnctl export``, and ``--to onnx``): torch.onnx's
torch.export-based exporter first, the TorchScript-based one as a fallback, and one clean
error naming the operator when both fail."""

from __future__ import annotations

import io
import re
from typing import Any

import torch
from torch import nn

from .._quiet import quiet
from ..errors import InputError, one_line
from .shapes import Layout


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
