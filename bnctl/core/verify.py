"""Check inputs and output comparison: the proof that an operation left a model's function alone."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, NamedTuple, Sequence

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


class Difference(NamedTuple):
    """How far two output lists are apart, and the figures of the allclose-style bound.

    An output ``b`` (the reference) and its candidate ``a`` agree within a tolerance ``t`` when
    every element has ``|a - b| <= atol + rtol * |b|`` with ``rtol = t`` and
    ``atol = t * scale``, where ``scale`` is the output's largest ``|b|``, but never below 1:
    an output of probabilities (a sigmoid map around 1e-5) is held to ``t`` absolutely, so the
    rounding of an exact fold does not read as a change of a few percent.
    """

    max_abs: float  # largest |a - b|
    max_rel: float  # largest |a - b| over the output's largest |b| (scale-free)
    ratio: float  # largest |a - b| / (scale + |b|): within tolerance t exactly when ratio <= t
    scale: float  # the scale of the output where the ratio is largest (atol = t * scale)
    floor: bool  # that scale is the floor of 1 (every |b| of that output is below 1)

    def within(self, tolerance: float) -> bool:
        """Whether every output is within ``|a - b| <= atol + rtol * |b|`` for ``tolerance``."""
        return self.ratio <= tolerance

    def merge(self, other: "Difference | None") -> "Difference":
        """The worse of two comparisons (largest errors; the bound figures of the worse ratio)."""
        if other is None:
            return self
        worse = self if self.ratio >= other.ratio else other
        return worse._replace(max_abs=max(self.max_abs, other.max_abs), max_rel=max(self.max_rel, other.max_rel))


#: an infinitely large difference (other structures, shapes or NaN positions)
APART = Difference(float("inf"), float("inf"), float("inf"), 1.0, True)


#: elements compared at a time: float64 copies of one chunk, not of a whole output
_CHUNK = 1 << 20


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> Difference:
    """The :class:`Difference` between two output lists, computed in float64, a chunk of
    elements at a time (a 1x16x2048x2048 output costs no float64 copy of itself).

    Different structures or shapes, or NaN in different places, are an infinite difference.
    """
    if len(reference) != len(candidate):
        return APART
    out: Difference | None = None
    for ref, got in zip(reference, candidate):
        if ref.shape != got.shape:
            return APART
        r, g = ref.detach().reshape(-1), got.detach().reshape(-1)
        if r.numel() == 0:
            continue
        largest = 0.0
        for start in range(0, r.numel(), _CHUNK):
            largest = max(largest, float(r[start : start + _CHUNK].to(torch.float64).abs().nan_to_num(0.0, posinf=0.0).max()))
        scale = max(largest, 1.0)
        worst = ratio = 0.0
        for start in range(0, r.numel(), _CHUNK):
            a, b = r[start : start + _CHUNK].to(torch.float64), g[start : start + _CHUNK].to(torch.float64)
            if not torch.equal(torch.isnan(a), torch.isnan(b)):
                return APART
            err = (a - b).abs().nan_to_num(0.0, posinf=float("inf"))
            if not torch.isfinite(err).all():
                return APART
            worst = max(worst, float(err.max()))
            ratio = max(ratio, float((err / (scale + a.abs().nan_to_num(0.0, posinf=0.0))).max()))
        one = Difference(worst, worst / largest if largest > 0 else worst, ratio, scale, largest < 1.0)
        out = one.merge(out)
    return out or Difference(0.0, 0.0, 0.0, 1.0, True)


def reference_outputs(model: Any, inputs: tuple) -> list[torch.Tensor]:
    """The model's outputs on ``inputs``; an InputError naming the shapes if it rejects them."""
    try:
        return run(model, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here means the inputs do not fit
        raise InputError(f"the model rejects inputs of shape {shapes_text(inputs)}: {one_line(exc)}", "pass the shape its forward expects with --input-shape (one per input)") from exc
