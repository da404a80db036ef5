"""Per-layer summaries and health flags of BatchNorm layers, as rows and a pandas DataFrame.

All arithmetic is float64, in numpy (per-layer torch calls cost several times as much, which
a file with 200,000 layers feels). A summary of a tensor that contains NaN is NaN (never a value
that hides it); a summary of a tensor the file does not hold is NaN too, and the row's
``flags`` say which is which.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

from .registry import FLAGS, UNMEASURED
from .layers import BNLayer

#: |weight| below this marks a dead channel.
DEAD_WEIGHT = 1e-6
#: eps assumed only for the var_below_eps comparison when the file does not record eps.
DEFAULT_EPS = 1e-5
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14

#: Column order of the table. The first ones are the JSON contract (ARCHITECTURE.md).
COLUMNS = (
    "name",
    "kind",
    "num_features",
    "eps",
    "momentum",
    "averaging",
    "training",
    "num_batches_tracked",
    "mean_absmax",
    "var_min",
    "var_max",
    "weight_absmin",
    "mean_min",
    "mean_max",
    "var_median",
    "weight_absmax",
    "bias_absmax",
    "scale_max",
    "dead_channels",
    "flags",
    "details",
)


class Row(TypedDict):
    """One layer's row (:data:`COLUMNS`, the columns of ``inspect``'s JSON and CSV): its
    identity, float64 summaries (None where the file does not hold the tensor, NaN where it
    holds NaN), and its flags (:data:`bnctl.core.registry.FLAGS`) with one detail each."""

    name: str
    kind: str | None
    num_features: int
    eps: float | None
    momentum: float | None
    averaging: str | None
    training: bool | None
    num_batches_tracked: int | None
    mean_absmax: float | None
    var_min: float | None
    var_max: float | None
    weight_absmin: float | None
    mean_min: float | None
    mean_max: float | None
    var_median: float | None
    weight_absmax: float | None
    bias_absmax: float | None
    scale_max: float | None
    dead_channels: int
    flags: list[str]
    details: list[str]


assert tuple(Row.__annotations__) == COLUMNS


def as_float64(t: Any) -> np.ndarray | None:
    """A tensor or array as a flat float64 numpy array (None stays None)."""
    if t is None:
        return None
    if hasattr(t, "detach"):  # a torch tensor: usable() let only real dtypes through
        import torch

        return t.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    return np.asarray(t, dtype=np.float64).reshape(-1)


def _reduce(t: np.ndarray | None, fn) -> float | None:
    """``fn(t)`` as a float; ``None`` when the file does not hold ``t``; NaN if ``t`` holds NaN."""
    if t is None or t.size == 0:
        return None
    return float(fn(t))


def _median(t: np.ndarray) -> float:
    """The lower median (torch.median's), NaN if ``t`` holds NaN."""
    if np.isnan(t).any():
        return float("nan")
    return float(np.partition(t, (t.size - 1) // 2)[(t.size - 1) // 2])


def summarize(layer: BNLayer) -> Row:
    """One row: the layer's identity, summaries of its tensors, its flags and their details."""
    mean, var = as_float64(layer.running_mean), as_float64(layer.running_var)
    weight, bias = as_float64(layer.weight), as_float64(layer.bias)
    eps = eps_of(layer)
    with np.errstate(all="ignore"):  # NaN and negative variances give NaN, which the flags report
        return _summarize(layer, mean, var, weight, bias, eps)


def _identity(layer: BNLayer) -> dict[str, Any]:
    """The columns of a row that say which layer it is and how it is configured."""
    return {
        "name": layer.name,
        "kind": layer.kind,
        "num_features": layer.num_features,
        "eps": layer.eps,
        "momentum": layer.momentum,
        "averaging": layer.averaging,
        "training": layer.training,
        "num_batches_tracked": layer.num_batches_tracked,
    }


def _summarize(layer: BNLayer, mean, var, weight, bias, eps: float) -> Row:
    scale = None
    if var is not None:
        scale = (np.abs(weight) if weight is not None else np.ones_like(var)) / np.sqrt(var + eps)
    dead = int((np.abs(weight) < DEAD_WEIGHT).sum()) if weight is not None else 0
    row: Any = {
        **_identity(layer),
        "mean_absmax": _reduce(mean, lambda t: np.abs(t).max()),
        "var_min": _reduce(var, np.min),
        "var_max": _reduce(var, np.max),
        "weight_absmin": _reduce(weight, lambda t: np.abs(t).min()),
        "mean_min": _reduce(mean, np.min),
        "mean_max": _reduce(mean, np.max),
        "var_median": _reduce(var, _median),  # NaN in, NaN out
        "weight_absmax": _reduce(weight, lambda t: np.abs(t).max()),
        "bias_absmax": _reduce(bias, lambda t: np.abs(t).max()),
        "scale_max": _reduce(scale, np.max),
        "dead_channels": dead,
    }
    found = _flags(layer, mean, var, weight, bias, scale, dead)
    row["flags"] = [flag for flag, _ in found]
    row["details"] = [detail for _, detail in found]
    return row


def _flags(layer: BNLayer, mean, var, weight, bias, scale, dead: int) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if not layer.materialized:
        return [("unmaterialized", "lazy BatchNorm never called: no statistics yet")]
    if layer.problems:
        found.append(("bad_tensor", "; ".join(layer.problems)))
    c = layer.num_features
    bad = [f"{n}: {int((~np.isfinite(t)).sum())} of {t.size}" for n, t in (("running_mean", mean), ("running_var", var), ("weight", weight), ("bias", bias)) if t is not None and not bool(np.isfinite(t).all())]
    if bad:
        found.append(("nonfinite", "non-finite values in " + ", ".join(bad)))
    if var is None or mean is None:
        if layer.track_running_stats is False:
            found.append(("no_running_stats", "track_running_stats=False: eval uses batch statistics"))
    else:
        negative = int((var < 0).sum())
        if negative:
            found.append(("negative_var", f"{negative} of {c} channels have running_var < 0 (min {float(var.min()):.3g})"))
        low = int(((var >= 0) & (var < eps_of(layer))).sum())
        if low:
            basis = f"eps {layer.eps:g}" if layer.eps is not None else f"{DEFAULT_EPS:g} (the file does not record eps; PyTorch's default)"
            found.append(("var_below_eps", f"{low} of {c} channels have running_var < {basis}"))
        frozen = "frozen" in str(layer.kind or "").lower()  # FrozenBatchNorm: identity statistics by design (detectron2's Caffe2 conversions)
        if c and not frozen and bool((mean == 0).all()) and bool((var == 1).all()):
            counter = f" although num_batches_tracked={layer.num_batches_tracked}" if layer.num_batches_tracked else ""
            found.append(("never_updated", f"running_mean all 0 and running_var all 1{counter}"))
    if layer.eps is None and var is not None and mean is not None:
        sensitive = {e: figures for e, figures in eps_sensitivity(var).items() if figures[0] > EPS_SENSITIVE}
        if sensitive:
            changes = ", ".join(f"up to {_percent(change)} with eps {e:g} ({channels} of {c} channels beyond {EPS_SENSITIVE:.0%})" for e, (change, channels) in sensitive.items())
            found.append(("eps_sensitive", f"outputs would change by {changes} against eps {DEFAULT_EPS:g}, PyTorch's default (the file does not record eps)"))
    if dead:
        found.append(("dead_channels", f"{dead} of {c} channels have |weight| < {DEAD_WEIGHT:g}"))
    overflow, precision = _fp16_risk(layer, mean, var, weight, bias, scale)
    if overflow:
        found.append(("fp16_risk", overflow))
    if precision:
        found.append(("fp16_precision", precision))
    if layer.averaging == "ema" and layer.momentum == 0:
        found.append(("momentum_zero", "momentum=0: running statistics never change"))
    if layer.training:
        found.append(("train_mode", "saved in train mode"))
    return found


#: the relative output change between two eps values beyond which a layer whose file does not record eps is flagged
EPS_SENSITIVE = 0.01
#: the eps values layers are commonly trained with: PyTorch's default, TensorFlow's, and none
COMMON_EPS = (1e-3, 1e-5, 0.0)


def eps_sensitivity(var: Any, eps: float = DEFAULT_EPS, alternatives: tuple[float, ...] = COMMON_EPS) -> dict[float, tuple[float, int]]:
    """How much a BN's output changes if it was trained with another eps than ``eps``: for
    each ``e`` of ``alternatives``, the largest ``|sqrt((v + eps) / (v + e)) - 1|`` over its
    channels' variances ``v`` (inf where ``v + e`` is 0) and how many channels move beyond
    :data:`EPS_SENSITIVE`. Empty without usable channels."""
    v = np.clip(np.asarray(var, dtype=np.float64).reshape(-1), 0.0, None)
    if v.size == 0 or not np.isfinite(v).all():
        return {}
    out = {}
    for other in alternatives:
        if other == eps:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            change = np.where(v + other > 0, np.abs(np.sqrt((v + eps) / (v + other)) - 1.0), np.inf)
        out[other] = (float(change.max()), int((change > EPS_SENSITIVE).sum()))
    return out


def _percent(change: float) -> str:
    return "inf" if not np.isfinite(change) else f"{change:.3g}x" if change >= 10 else f"{change:.1%}"


def eps_of(layer: BNLayer) -> float:
    """The layer's eps, or PyTorch's default where the file does not record it."""
    return layer.eps if layer.eps is not None else DEFAULT_EPS


def _fp16_risk(layer: BNLayer, mean, var, weight, bias, scale) -> tuple[str | None, str | None]:
    """(overflow, precision): values beyond float16's range (inf when run in half precision),
    and var + eps in float16's subnormal range (a potential loss of precision)."""
    if var is None or mean is None:
        return None, None
    reasons = []
    finite = lambda t: t[np.isfinite(t)]  # noqa: E731 - non-finite values have their own flag
    for label, t in (("|running_mean|", np.abs(mean)), ("running_var", var), ("folded scale", scale)):
        t = finite(t)
        if t.size and float(t.max()) > FP16_MAX:
            reasons.append(f"{label} reaches {float(t.max()):.3g} > {FP16_MAX:g}")
    if bias is not None:
        shift = finite(bias - mean * scale)
        if shift.size and float(np.abs(shift).max()) > FP16_MAX:
            reasons.append(f"folded shift reaches {float(np.abs(shift).max()):.3g} > {FP16_MAX:g}")
    denom = finite(var + eps_of(layer))
    tiny = int(((denom >= 0) & (denom < FP16_MIN_NORMAL)).sum())
    precision = f"{tiny} channels have var+eps < {FP16_MIN_NORMAL:.2g}, float16-subnormal: potential precision loss in half precision{UNMEASURED}" if tiny else None
    return "; ".join(reasons) or None, precision


def rows(layers: list[BNLayer]) -> list[Row]:
    """One :func:`summarize` row per layer, in order.

    Layers with the same channel count are summarized together, as rows of one array (a
    file with 200,000 layers costs seconds, not minutes); any layer that might carry a flag
    is summarized on its own by :func:`summarize`, so rows and details are the same either way.
    """
    out: list[Row | None] = [None] * len(layers)
    groups: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        complete = all(t is not None for t in (layer.running_mean, layer.running_var, layer.weight, layer.bias))
        if complete and layer.materialized and not layer.problems and layer.num_features > 0:
            groups.setdefault(layer.num_features, []).append(i)
        else:
            out[i] = summarize(layer)
    for index in groups.values():
        if len(index) < 16:
            for i in index:
                out[i] = summarize(layers[i])
            continue
        for i, row in zip(index, _rows_together([layers[i] for i in index])):
            out[i] = row if row is not None else summarize(layers[i])
    return out  # type: ignore[return-value]


def _stacked(tensors: list[Any]) -> np.ndarray:
    """Same-length tensors as one float64 matrix, a row each (numpy arrays stacked as they
    are and widened once: exact, as every dtype read widens to float64 exactly)."""
    if all(type(t) is np.ndarray for t in tensors):
        return np.stack(tensors).astype(np.float64, copy=False)
    return np.stack([as_float64(t) for t in tensors])


def _rows_together(group: list[BNLayer]) -> list[Row | None]:
    """Rows of layers with the same channel count and every tensor present; None for a layer
    that might carry a flag (the caller summarizes it alone, with its details)."""
    mean, var, weight, bias = (_stacked([getattr(l, name) for l in group]) for name in ("running_mean", "running_var", "weight", "bias"))
    eps = np.array([eps_of(l) for l in group])[:, None]
    c = mean.shape[1]
    with np.errstate(all="ignore"):
        scale = np.abs(weight) / np.sqrt(var + eps)
        finite = np.isfinite(mean).all(1) & np.isfinite(var).all(1) & np.isfinite(weight).all(1) & np.isfinite(bias).all(1)
        shift = np.abs(bias - mean * scale).max(1)
        suspicious = (
            ~finite
            | (var < eps).any(1)
            | ((mean == 0).all(1) & (var == 1).all(1))
            | (np.abs(weight) < DEAD_WEIGHT).any(1)
            | (np.abs(mean).max(1) > FP16_MAX)
            | (var.max(1) > FP16_MAX)
            | (scale.max(1) > FP16_MAX)
            | (shift > FP16_MAX)
            | (var + eps < FP16_MIN_NORMAL).any(1)
        )
        columns = {
            "mean_absmax": np.abs(mean).max(1),
            "var_min": var.min(1),
            "var_max": var.max(1),
            "weight_absmin": np.abs(weight).min(1),
            "mean_min": mean.min(1),
            "mean_max": mean.max(1),
            "var_median": np.partition(var, (c - 1) // 2, axis=1)[:, (c - 1) // 2],
            "weight_absmax": np.abs(weight).max(1),
            "bias_absmax": np.abs(bias).max(1),
            "scale_max": scale.max(1),
        }
    values = {k: v.tolist() for k, v in columns.items()}
    result: list[Row | None] = []
    for k, layer in enumerate(group):
        if suspicious[k] or layer.training or (layer.averaging == "ema" and layer.momentum == 0):
            result.append(None)
            continue
        row: Any = _identity(layer)
        row.update({name: column[k] for name, column in values.items()})
        row.update(dead_channels=0, flags=[], details=[])
        result.append(row)
    return result


def table(row_list: list[Row]):
    """Rows as a pandas DataFrame with the columns of :data:`COLUMNS`."""
    import pandas as pd

    return pd.DataFrame(row_list, columns=list(COLUMNS))


def flag_counts(row_list: list[Row]) -> dict[str, int]:
    """How many layers carry each flag, in :data:`FLAGS` order, flags that occur only."""
    counts = {flag: sum(flag in r["flags"] for r in row_list) for flag in FLAGS}
    return {flag: n for flag, n in counts.items() if n}
