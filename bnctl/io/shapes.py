"""Input shapes, dtypes and names of the files bnctl writes (``.pt2`` programs, ONNX graphs).

- Which dims are dynamic: ``"auto"`` (the batch dim free where the model allows it, the
  default), ``"static"`` (the check inputs' sizes), or the dim indices the user named with
  ``--dynamic`` (``(0, 2, 3)``: batch, height and width), each one named symbol: ``batch``
  shared by every input, the others ``height``/``width`` on a 4-D input and ``dim<k>``
  elsewhere (prefixed by the input's name where several inputs have one).
- :func:`export_program`: ``torch.export`` with those dims. A requested dim of size 1 in
  the check inputs is exported from inputs of size 2 on it (torch specializes sizes 0 and 1);
  the range torch infers for a dim (a 3x3 convolution needs 3 or more) is taken from
  torch's own suggested fixes.
- :func:`describe_program` and :func:`describe_onnx`: each input's name, dtype and shape as
  written, a symbol's name where the dim is dynamic and its size where it is static.
- :func:`forward_names` and :func:`tidy_onnx`: names from ``forward``'s signature, outputs
  named ``output``/``output_<i>`` (or as given), one readable name per dynamic symbol.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import InputError, one_line


@dataclass(frozen=True)
class Layout:
    """How a written ``.pt2`` or ONNX file lays out its inputs and outputs: which input dims
    stay dynamic (``"auto"``, ``"static"`` or dim indices), and the names of an ONNX graph's
    inputs and outputs (None: from ``forward``'s signature, and ``output``/``output_<i>``)."""

    dims: str | tuple[int, ...] = "auto"
    input_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None


def parse_dims(text: str | None) -> str | tuple[int, ...]:
    """``--dynamic``: ``"0,2,3"`` -> ``(0, 2, 3)``; ``"none"`` -> ``"static"``; None -> ``"auto"``."""
    if text is None:
        return "auto"
    if text.strip().lower() in ("none", "static"):
        return "static"
    try:
        dims = tuple(sorted({int(p) for p in text.replace(" ", "").split(",") if p}))
    except ValueError:
        dims = ()
    if not dims or any(d < 0 for d in dims):
        raise InputError(f"--dynamic '{text}' is not a list of dim indices", "e.g. --dynamic 0 (batch) or --dynamic 0,2,3 (batch, height, width); --dynamic none for static shapes")
    return dims


def forward_names(model: Any, count: int) -> list[str]:
    """The names of the first ``count`` parameters of ``model.forward`` (``image``,
    ``tokens``), or ``input``/``input_<i>`` where the signature does not give them."""
    default = ["input"] if count == 1 else [f"input_{i}" for i in range(count)]
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return default
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = positional[:count]
    if len(names) < count or len(set(names)) < count or any(n in ("args", "kwargs") or n.startswith("_") for n in names):
        return default
    return names


def _symbol(name: str, k: int, rank: int, shared: bool) -> str:
    if k == 0:
        return "batch"
    label = {2: "height", 3: "width"}.get(k) if rank == 4 else None
    label = label or f"dim{k}"
    return f"{name}_{label}" if shared else label


def dynamic_spec(inputs: Sequence[Any], dims: str | tuple[int, ...], names: Sequence[str]) -> tuple[Any, tuple]:
    """``(dynamic_shapes for torch.export, the inputs to export from)`` for ``dims``."""
    import torch

    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0]
    if dims == "static" or not tensors:
        return None, tuple(inputs)
    if dims == "auto":
        return tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in inputs), tuple(inputs)
    several = sum(1 for t in tensors if any(0 < k < t.dim() for k in dims)) > 1
    symbols: dict[str, Any] = {}
    spec, grown = [], []
    for name, t in zip(names, inputs):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            spec.append(None)
            grown.append(t)
            continue
        chosen = {}
        for k in dims:
            if k < t.dim():
                symbol = _symbol(name, k, t.dim(), several)
                chosen[k] = symbols.setdefault(symbol, torch.export.Dim(symbol))
                if t.shape[k] == 1:  # torch specializes a size of 1: export from 2
                    t = torch.cat([t, t], dim=k)
        spec.append(chosen or None)
        grown.append(t)
    missing = [k for k in dims if not any(k < t.dim() for t in tensors)]
    if missing:
        raise InputError(f"--dynamic {','.join(map(str, dims))}: no input has dim {missing[0]}", "count dims from 0 (the batch) in the shapes given to --input-shape")
    return tuple(spec), tuple(grown)


def export_program(model: Any, inputs: Sequence[Any], dims: str | tuple[int, ...]) -> Any:
    """``torch.export.export`` of ``model`` with ``dims`` dynamic (see the module's docstring);
    an InputError naming the dim where the model fixes one that was asked for."""
    import torch

    names = forward_names(model, len(inputs))
    spec, examples = dynamic_spec(inputs, dims, names)
    if dims == "auto" and any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1 for t in examples):
        # a batch of 1 would be specialized: export from 2, and keep that only if the batch came out free
        grown = tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1 else t for t in examples)
        try:
            program = torch.export.export(model, grown, dynamic_shapes=spec)
            if all(isinstance(entry["shape"][0], str) for entry in describe_program(program, names) if entry["shape"]):
                return program
        except Exception:  # noqa: BLE001 - the model takes batch 1 only: export it as it is
            pass
    try:
        return torch.export.export(model, examples, dynamic_shapes=spec)
    except torch._dynamo.exc.UserError as exc:  # a range torch inferred: take its suggested fix
        if spec is None or "Suggested fixes" not in str(exc):
            raise _fixed_dim(exc, dims) from None
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

        try:
            refined = refine_dynamic_shapes_from_suggested_fixes(str(exc), spec)
            return torch.export.export(model, examples, dynamic_shapes=refined)
        except Exception as again:  # noqa: BLE001 - the dim is fixed by the model
            raise _fixed_dim(again, dims) from None


def _fixed_dim(exc: BaseException, dims: Any) -> InputError:
    return InputError(
        f"the model does not allow dims {dims if isinstance(dims, str) else ','.join(map(str, dims))} to vary: {one_line(exc, limit=300)}",
        "leave out --dynamic (the batch is then free where the model allows it), or name fewer dims",
    )


def describe_program(program: Any, names: Sequence[str]) -> list[dict[str, Any]]:
    """``[{"name", "dtype", "shape"}]`` of a program's user inputs: ints where static, the
    symbol's range (``"batch"`` or ``"s0>=2"``) where dynamic."""
    import torch

    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = set(program.graph_signature.user_inputs)
    out = []
    symbols: dict[str, str] = {}
    for node, name in zip([n for n in placeholders if n.name in user], names):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        shape: list[Any] = []
        for k, d in enumerate(value.shape):
            if isinstance(d, int):
                shape.append(d)
            else:
                key = str(d)  # torch's symbol (s40): one readable name for each
                if key not in symbols:
                    readable = _symbol(name, k, value.dim(), False)
                    symbols[key] = readable if readable not in symbols.values() else f"{name}_{readable}"
                shape.append(symbols[key])
        out.append({"name": name, "dtype": str(value.dtype).replace("torch.", ""), "shape": shape})
    return out


def describe_onnx(model: Any) -> list[dict[str, Any]]:
    """``[{"name", "dtype", "shape"}]`` of an ONNX graph's inputs (initializers left out):
    ints where static, the symbol's name where dynamic."""
    from onnx import helper

    initializers = {i.name for i in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        dtype = str(helper.tensor_dtype_to_np_dtype(tensor.elem_type)) if tensor.elem_type else "?"
        out.append({"name": value.name, "dtype": dtype, "shape": shape})
    return out


def tidy_onnx(model: Any, output_names: Sequence[str] | None = None) -> None:
    """Name the graph's outputs (``output``/``output_<i>``, or ``output_names``) and give each
    dynamic symbol a readable name (``batch``, ``height``, ``width``, ``dim<k>``), in place."""
    graph = model.graph
    outputs = list(graph.output)
    if output_names is not None and len(output_names) != len(outputs):
        n = len(outputs)
        raise InputError(f"--output-names gave {len(output_names)} names, the model has {n} output{'s' * (n != 1)}", f"pass {n} name{'s' * (n != 1)}, e.g. --output-names {','.join(f'out{i}' for i in range(n))}")
    wanted = list(output_names) if output_names else (["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    renames = {}
    for value, new in zip(outputs, wanted):
        if value.name == new:
            continue
        if new in taken and new not in {o.name for o in outputs}:
            raise InputError(f"output name '{new}' is already the name of a value in the graph", "choose other --output-names")
        renames[value.name] = new
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n in renames:
                node.input[i] = renames[n]
        for i, n in enumerate(node.output):
            if n in renames:
                node.output[i] = renames[n]
    for value in graph.output:
        value.name = renames.get(value.name, value.name)
    _rename_symbols(model)


def _rename_symbols(model: Any) -> None:
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers and v.type.HasField("tensor_type")]
    several = sum(1 for v in inputs if any(k > 0 and d.dim_param for k, d in enumerate(v.type.tensor_type.shape.dim))) > 1
    names: dict[str, str] = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            if d.dim_param and d.dim_param not in names:
                new = _symbol(value.name, k, len(dims), several)
                names[d.dim_param] = new if new not in names.values() else f"{new}_{len(names)}"
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            for d in value.type.tensor_type.shape.dim:
                if d.dim_param in names:
                    d.dim_param = names[d.dim_param]


def settle_batch(model: Any, inputs: tuple, layout: Layout, notes: list[str]) -> Layout:
    """``layout``, or a static one where it leaves the batch free by default (``"auto"``) but
    the model rejects another batch size (a ``view(-1, 36)`` that needs an even batch): then
    the written file keeps the check inputs' batch, as said in ``notes``."""
    import dataclasses

    import torch

    from ..core import verify

    if layout.dims != "auto" or not isinstance(model, torch.nn.Module) or not any(isinstance(t, torch.Tensor) and t.dim() > 0 for t in inputs):
        return layout  # a loaded .pt2 program keeps the dims it was exported with
    grown = tuple(torch.cat([t] * 3 if t.shape[0] == 1 else [t, t[:1]]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in inputs)
    try:
        with verify.eval_mode(model):
            verify.reference_outputs(model, grown)
    except InputError as exc:
        batch = next(t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0)
        reason = exc.message.partition(": ")[2] or exc.message
        notes.append(f"the model rejects a batch of {grown[0].shape[0] if isinstance(grown[0], torch.Tensor) else 'another size'} ({reason[:200]}): the written file keeps the batch of the check inputs ({batch}) static")
        return dataclasses.replace(layout, dims="static")
    return layout


def other_sizes(inputs: tuple, described: list[dict[str, Any]]) -> tuple | None:
    """The check inputs with every dim the graph leaves dynamic at another size (the batch
    one larger, or 3 from 1; height and width doubled), or None where every dim is static."""
    if not any(isinstance(d, str) for entry in described for d in entry["shape"]):
        return None
    import torch

    out = []
    for t, entry in zip(inputs, described):
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        for k, d in enumerate(entry["shape"][: t.dim()]):
            if isinstance(d, str):
                size = t.shape[k]
                target = (size + 1 if size > 1 else 3) if k == 0 else 2 * size
                t = torch.cat([t] * (target // size + 1), dim=k).narrow(k, 0, target)
        out.append(t)
    return tuple(out)
