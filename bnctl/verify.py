"""Check inputs and output comparison: the proof that an operation left a model's function alone."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from .errors import InputError


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; an InputError otherwise."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"--input-shape '{text}' is not a shape", "give positive sizes separated by commas, e.g. --input-shape 1,3,224,224")
    return shape


def random_inputs(shapes: Sequence[Sequence[int]], seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """One standard-normal tensor per shape, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(tuple(s), generator=generator, dtype=dtype) for s in shapes)


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) output, in a stable order."""
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


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
