"""Check inputs and output comparison: the proof that an operation left a model's function alone."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import InputError, one_line


#: the dtypes a check input may have (``--input-shape 1,26:int64``)
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


def random_inputs(shapes: Sequence[Sequence[int]], seed: int = 0, dtypes: Sequence[str] = ()) -> tuple[torch.Tensor, ...]:
    """One tensor per shape, the same for the same seed: standard normal for a floating
    dtype, 0 or 1 for an integer or bool one (valid indices of any embedding or gather).
    ``dtypes`` names one of :data:`INPUT_DTYPES` per shape (float32 where missing)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index, shape in enumerate(shapes):
        dtype = getattr(torch, dtypes[index] if index < len(dtypes) and dtypes[index] else "float32")
        if dtype.is_floating_point:
            out.append(torch.randn(tuple(shape), generator=generator).to(dtype))
        else:
            out.append(torch.randint(0, 2, tuple(shape), generator=generator).to(dtype))
    return tuple(out)


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) output, in a stable order."""
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def shapes_text(values: Sequence[Any], *, tuples: bool = False) -> str:
    """The shapes of the arrays and tensors among ``values``, for messages: ``"2x3x32x32, 2x10"``,
    or with ``tuples`` ``"(2, 3, 32, 32), (2, 10)"``."""
    shapes = [tuple(v.shape) for v in values if hasattr(v, "shape")]
    return ", ".join(str(s) if tuples else "x".join(map(str, s)) for s in shapes)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, then every module's mode as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def run(fn: Callable, inputs: tuple) -> list[torch.Tensor]:
    """Call ``fn(*inputs)`` without autograd and return its output tensors, detached."""
    with torch.no_grad():
        return [t.detach() for t in tensors_of(fn(*inputs))]


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """``(max_abs_error, max_rel_error)`` between two output lists, computed in float64.

    The relative error of an output is its max absolute error over its largest |reference|
    value (scale-free, and defined where single elements are near zero); the max over outputs
    is returned. Different structures or shapes are an infinite error.
    """
    if len(reference) != len(candidate):
        return float("inf"), float("inf")
    max_abs = max_rel = 0.0
    for ref, got in zip(reference, candidate):
        if ref.shape != got.shape:
            return float("inf"), float("inf")
        r, g = ref.to(torch.float64), got.to(torch.float64)
        if r.numel() == 0:
            continue
        err = (r - g).abs()
        worst = float(err.max()) if torch.isfinite(err).all() else float("inf")
        if not torch.equal(torch.isnan(r), torch.isnan(g)):
            worst = float("inf")
        elif torch.isnan(err).any():
            worst = float(err.nan_to_num(0.0).max())
        scale = float(r.abs().nan_to_num(0.0).max())
        max_abs = max(max_abs, worst)
        max_rel = max(max_rel, worst / scale if scale > 0 else worst)
    return max_abs, max_rel


def reference_outputs(model: Any, inputs: tuple) -> list[torch.Tensor]:
    """The model's outputs on ``inputs``; an InputError naming the shapes if it rejects them."""
    try:
        return run(model, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here means the inputs do not fit
        raise InputError(f"the model rejects inputs of shape {shapes_text(inputs)}: {one_line(exc)}", "pass the shape its forward expects with --input-shape (one per input)") from exc
