"""The arithmetic of folding BatchNorm into a neighbouring conv or linear layer.

Weights in, weights out: no modules, no graphs. Every function computes in float64 and
returns tensors of the input weight's dtype.

A BatchNorm in eval mode is a per-channel affine map ``y = scale * x + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``
(``gamma = 1``, ``beta = 0`` without affine parameters).

Weight layouts (``g`` = groups):

- Conv{1,2,3}d: ``(out, in / g, *k)``; output channel ``o`` belongs to group ``o // (out / g)``.
- ConvTranspose{1,2,3}d: ``(in, out / g, *k)``; output channel ``o = group * (out / g) + j``.
- Linear: ``(out, in)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ...core.graph import Kind


def bn_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BN as ``(scale, shift)``, float64, one value per channel."""
    import torch

    mean = running_mean.detach().to(torch.float64)
    var = running_var.detach().to(torch.float64)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.detach().to(torch.float64)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.detach().to(torch.float64)
    return scale, shift


def out_channels(weight: torch.Tensor, kind: Kind, groups: int = 1) -> int:
    """How many output channels a layer with this weight produces."""
    return weight.shape[1] * groups if kind == "conv_transpose" else weight.shape[0]


def in_channels(weight: torch.Tensor, kind: Kind, groups: int = 1) -> int:
    """How many input channels a layer with this weight reads."""
    return weight.shape[0] if kind == "conv_transpose" else weight.shape[1] * groups


def fold_after(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    kind: Kind,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``bn(layer(x))`` as one layer: the BN (``scale``, ``shift``) follows the layer.

    ``bias`` may be ``None``; the returned bias always exists. Exact for any stride,
    padding, dilation and groups, since the BN acts on the layer's output channels.
    """
    import torch

    w = weight.detach()
    if kind == "conv_transpose":
        cin, cout_g = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, cin // groups, cout_g, *w.shape[2:])
        new_w = _product(grouped, scale.reshape(groups, 1, cout_g, *([1] * (w.dim() - 2)))).reshape(w.shape)
    else:
        new_w = _product(w, scale.reshape(-1, *([1] * (w.dim() - 1))))
    b = torch.zeros_like(scale) if bias is None else bias.detach().to(torch.float64)
    new_b = b * scale + shift
    return new_w, new_b.to(weight.dtype if bias is None else bias.dtype)


def _product(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``w * factor`` computed in float64 and rounded once to ``w``'s dtype.

    Done in slices along dim 0 that stay in cache: a whole float64 copy of a large
    weight costs several times the float32 arithmetic in memory traffic.
    """
    import torch

    out = torch.empty_like(w)
    row = max(1, w[0].numel()) if w.shape[0] else 1
    step = max(1, (1 << 16) // row)
    per_row = factor.shape[0] != 1
    for i in range(0, w.shape[0], step):
        f = factor[i : i + step] if per_row else factor
        out[i : i + step].copy_(w[i : i + step] * f)  # float32 * float64 promotes to float64
    return out


def fold_before(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    kind: Kind,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``layer(bn(x))`` as one layer: the BN (``scale``, ``shift``) precedes the layer.

    Exact for Linear, and for a conv whose padding adds no constant values (no padding,
    or a zero ``shift``); the caller checks that. ConvTranspose is not supported: its
    border outputs see fewer taps, so a constant input shift is not a per-channel bias.
    """
    import torch

    if kind == "conv_transpose":
        raise ValueError("a BN before a ConvTranspose cannot be folded exactly")
    w = weight.detach()
    cout, cin_g = w.shape[0], w.shape[1]
    spatial = [1] * (w.dim() - 2)
    grouped = w.reshape(groups, cout // groups, cin_g, *w.shape[2:])
    s = scale.reshape(groups, 1, cin_g, *spatial)
    t = shift.reshape(groups, 1, cin_g, *spatial)
    new_w = _product(grouped, s).reshape(w.shape)
    added = (grouped.to(torch.float64) * t).sum(dim=tuple(range(2, grouped.dim()))).reshape(cout)
    b = torch.zeros(cout, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    new_b = b + added
    return new_w, new_b.to(weight.dtype if bias is None else bias.dtype)


def identity_bn(num_features: int, eps: float, shift: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors that make a BN in eval mode the map ``x -> x + shift`` (``shift`` 0 when None).

    Used where the BN module must stay (a state_dict for the user's unchanged class):
    weight 1, mean 0, var ``1 - eps`` so that ``var + eps`` is 1, bias ``shift``.
    """
    import torch

    var = torch.full((num_features,), 1.0 - eps, dtype=torch.float64)
    bias = torch.zeros(num_features, dtype=torch.float64) if shift is None else shift.to(torch.float64)
    return {
        "weight": torch.ones(num_features, dtype=dtype),
        "bias": bias.to(dtype),
        "running_mean": torch.zeros(num_features, dtype=dtype),
        "running_var": var.to(dtype),
    }


def unrepresentable(weight: torch.Tensor, bias: torch.Tensor, dtype: Any) -> str | None:
    """Why the folded ``weight`` and ``bias`` (exact, float64) cannot be stored in ``dtype``
    (a torch or numpy dtype), or None: a value beyond the dtype's range (it would become
    inf), or an output channel whose weights fall below its normal range (subnormal or zero:
    the channel loses more than 8 units in the last place of its largest weight)."""
    import numpy as np
    import torch

    if not isinstance(dtype, torch.dtype):
        dtype = torch.from_numpy(np.zeros(0, dtype)).dtype
    if not dtype.is_floating_point or dtype == torch.float64:
        return None
    info = torch.finfo(dtype)
    for what, exact in (("weights", weight), ("bias", bias)):
        top = float(exact.abs().max()) if exact.numel() else 0.0
        if top > info.max:
            return f"its folded {what} reach {top:.3g}, beyond {str(dtype).replace('torch.', '')}'s largest value {info.max:g} (they would be inf)"
    rows = weight.reshape(weight.shape[0], -1)
    rounded = rows.to(dtype).to(torch.float64)
    top = rows.abs().amax(1)
    lost = ((rounded - rows).abs().amax(1) > 8 * info.eps * top) & (top > 0)
    if bool(lost.any()):
        worst = float(top[lost].min())
        return f"its folded weights fall to {worst:.3g} in {int(lost.sum())} channel(s), below {str(dtype).replace('torch.', '')}'s normal range ({info.tiny:.3g}): they would lose their precision"
    return None
