"""``--int8-check``: how far an ONNX graph's outputs move when ONNX Runtime quantizes it.

The graph about to be written is quantized in memory with ONNX Runtime's static quantizer
(QDQ, symmetric int8 weights and activations, calibrated on the check inputs), per tensor and
per channel; both run in ONNX Runtime beside the float graph, and each gets the SQNR of its
outputs against the float graph's: ``10 log10(sum y^2 / sum (y - y_int8)^2)`` over every
output element. Nothing is written: the figures tell whether a fold left the model ready for
int8 deployment, and whether it needs per-channel quantization.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core import onnx as onnx_run
from ..core.verify import shapes_text

QUANTIZER = "onnxruntime.quantization.quantize_static (QDQ, symmetric int8 weights and activations)"


def output_sqnr_db(reference: list[Any], quantized: list[Any]) -> float | None:
    """The SQNR of ``quantized`` outputs against ``reference`` over every element, in dB
    (None where they agree exactly, as JSON has no infinity)."""
    signal = sum(float((np.asarray(r, dtype=np.float64) ** 2).sum()) for r in reference)
    noise = sum(float(((np.asarray(r, dtype=np.float64) - np.asarray(q, dtype=np.float64)) ** 2).sum()) for r, q in zip(reference, quantized))
    if noise == 0.0:
        return None
    return round(10.0 * math.log10(signal / noise), 2) if signal > 0 else -math.inf


def int8_check(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """The ``int8_check`` block of a fold or export report for the ONNX ModelProto ``model``
    on ``feeds`` (its check inputs, also the calibration data)."""
    per_tensor, per_channel = onnx_run.quantized(model, feeds)
    reference, tensor_out, channel_out = onnx_run.run_all([("the float graph", model), ("the per-tensor int8 graph", per_tensor), ("the per-channel int8 graph", per_channel)], feeds)
    return {
        "per_tensor_output_sqnr_db": output_sqnr_db(reference, tensor_out),
        "per_channel_output_sqnr_db": output_sqnr_db(reference, channel_out),
        "calibration": f"the check inputs, {shapes_text(list(feeds.values()), tuples=True)}",
        "quantizer": QUANTIZER,
    }


def int8_check_text(block: dict[str, Any]) -> str:
    """``int8 check, ONNX Runtime's static quantizer (...) calibrated on ...: output SQNR per tensor 31.2 dB, per channel 38.9 dB``."""

    def db(value: float | None) -> str:
        return "exact" if value is None else f"{value:.1f} dB"

    return f"int8 check, ONNX Runtime's static quantizer (QDQ, symmetric int8) calibrated on {block['calibration']}: output SQNR per tensor {db(block['per_tensor_output_sqnr_db'])}, per channel {db(block['per_channel_output_sqnr_db'])}"
