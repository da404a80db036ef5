"""int8 readiness of a weight, in numpy (no torch): how much symmetric int8 quantization loses
of it, per tensor and per output channel, and which channel sets a per-tensor range.

Folding multiplies each output channel's weights by the BN's ``gamma / sqrt(var + eps)``; a
channel with a tiny running variance gets weights far larger than its neighbours', and with
one scale for the whole tensor every other channel rounds to a few levels. The figures here
are computed from the weights as written:

- ``q(w) = clamp(round(w / s), -127, 127) * s`` with ``s = max|w| / 127`` over the tensor
  (per tensor) or over each output channel (per channel);
- SQNR = ``10 log10(sum w^2 / sum (w - q(w))^2)`` in dB (infinite where nothing is lost);
  with one channel's weights far above the rest, the whole-tensor figure is that channel's,
  so the median over channels under the per-tensor scale is reported too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: a per-tensor SQNR drop through a fold beyond this many dB is named in reports (one bit is ~6 dB)
DROP_DB = 6.0


def _quantize(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    safe = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / safe), -127, 127) * safe


def sqnr_db(weight: Any, axis: int | None = None) -> float:
    """The SQNR of symmetric int8 quantization of ``weight``: one scale for the tensor
    (``axis`` None) or one per index of ``axis`` (the output channels). Infinite for an
    all-zero weight or one quantized without loss."""
    w = np.asarray(weight, dtype=np.float64)
    if w.size == 0:
        return math.inf
    if axis is None:
        scale = np.abs(w).max() / 127.0
    else:
        moved = np.moveaxis(w, axis, 0)
        scale = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1) / 127.0
        scale = np.moveaxis(scale.reshape((-1,) + (1,) * (w.ndim - 1)), 0, axis)
    signal = float(np.sum(w * w))
    noise = float(np.sum((w - _quantize(w, np.asarray(scale, dtype=np.float64))) ** 2))
    if signal == 0.0 or noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def median_channel_sqnr_db(weight: Any, axis: int) -> float:
    """The median over output channels (along ``axis``) of each channel's SQNR under ONE
    per-tensor scale: what the whole-tensor figure hides when one channel's weights are far
    larger than the rest (its energy dominates the sum, while the others round to zero)."""
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0)
    if w.size == 0:
        return math.inf
    flat = w.reshape(w.shape[0], -1)
    noise = ((flat - _quantize(flat, np.asarray(np.abs(flat).max() / 127.0))) ** 2).sum(axis=1)
    signal = (flat * flat).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(noise > 0, 10.0 * np.log10(signal / np.where(noise > 0, noise, 1.0)), np.inf)
    per = per[signal > 0]
    return float(np.median(per)) if per.size else math.inf


def readiness(before: Any, after: Any, axis: int, running_var: Any = None) -> dict[str, Any]:
    """The ``int8`` block of a folded layer: per-tensor and per-channel SQNR of the folded
    weight ``after``, per-tensor SQNR of the weight ``before`` the fold, how much the fold
    grew the range (max|after| / max|before|), and the output channel (along ``axis``) whose
    largest |weight| sets the per-tensor range, with the BN's ``running_var`` there where
    it is given (a BN folded after its layer: its channels are the layer's outputs)."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    per_channel_max = np.abs(np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)).max(axis=1) if a.size else np.zeros(0)
    largest_before = float(np.abs(b).max()) if b.size else 0.0
    channel = int(np.argmax(per_channel_max)) if per_channel_max.size else None
    var = None if running_var is None else np.asarray(running_var, dtype=np.float64).reshape(-1)
    return {
        "per_tensor_sqnr_db": _finite(sqnr_db(a)),
        "per_channel_sqnr_db": _finite(sqnr_db(a, axis)),
        "before_per_tensor_sqnr_db": _finite(sqnr_db(b)),
        "median_channel_sqnr_db": _finite(median_channel_sqnr_db(a, axis)),
        "before_median_channel_sqnr_db": _finite(median_channel_sqnr_db(b, axis)),
        "range_growth": float(np.abs(a).max()) / largest_before if largest_before > 0 else None,
        "range_channel": channel,
        "range_channel_var": float(var[channel]) if var is not None and channel is not None and channel < var.size else None,
    }


def _finite(value: float) -> float | None:
    """None for an infinite SQNR (JSON has no infinity; nothing was lost)."""
    return None if math.isinf(value) else round(value, 2)


def drop_db(block: dict[str, Any]) -> float:
    """How many dB of per-tensor int8 precision the fold cost: the larger drop of the
    whole-tensor SQNR and of the median channel's (0 where nothing was lost either way)."""

    def drop(before: float | None, after: float | None) -> float:
        if after is None:
            return 0.0
        return math.inf if before is None else before - after

    return max(drop(block.get("before_per_tensor_sqnr_db"), block.get("per_tensor_sqnr_db")), drop(block.get("before_median_channel_sqnr_db"), block.get("median_channel_sqnr_db")))


def advice(bn: str, into: str, block: dict[str, Any]) -> str:
    """The line a report prints for a fold that costs int8 precision: the layer, the SQNR
    before and after, the channel responsible (and its running variance, where the BN's
    channels are the layer's outputs), and what to do."""
    channel = block.get("range_channel")
    variance = block.get("range_channel_var")
    var = f" (running_var {variance:.2g})" if variance is not None else ""
    return (
        f"int8 after folding {bn} into {into}: per-tensor SQNR {_db(block['before_per_tensor_sqnr_db'])} -> {_db(block['per_tensor_sqnr_db'])} "
        f"over the tensor, {_db(block['before_median_channel_sqnr_db'])} -> {_db(block['median_channel_sqnr_db'])} for the median channel "
        f"(per-channel quantization: {_db(block['per_channel_sqnr_db'])}); channel {channel}{var} sets the range, {block['range_growth']:.3g}x "
        "the unfolded weight's: quantize per channel, or fix that BN channel's near-zero variance"
    )


def _db(value: float | None) -> str:
    return "lossless" if value is None else f"{value:.1f} dB"
