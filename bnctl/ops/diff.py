"""``bnctl.diff``: how BatchNorm statistics moved between checkpoints, and how far a data
folder is from the statistics a checkpoint stored.

Per pair of layers (``a`` before, ``b`` after), channel by channel, in float64:

- mean shift: ``|mean_b - mean_a| / sqrt(var_a + eps)``, in units of the old standard
  deviation (the ``mean_shift`` of ``bnctl recalibrate`` is its mean over channels);
- variance log-ratio: ``log((var_b + eps) / (var_a + eps))`` (the exponential of its mean is
  recalibrate's ``var_ratio``);
- ``|Δγ|``, ``|Δβ|``, the change of ``num_batches_tracked``, and eps, momentum or mode changes.

Findings: statistics that moved while γ and β are identical although other layers' γ or β
changed (a layer meant to be frozen that kept training), statistics identical while γ or β
changed (never re-estimated after averaging, pruning or fine-tuning), a counter that went
down. Where no γ or β changed anywhere, the step is a re-estimation of the statistics alone
(recalibrate, update_bn) and only says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.layers import BNLayer
from ..core.stats import as_float64, eps_of
from ..errors import InputError
from ..io.source import CheckInputs, ModelSource

#: a statistic "moved" when some channel's mean shift or |log var ratio| is above this
MOVED = 1e-6
WRAPPERS = ("module.", "model.", "_orig_mod.")
FINDINGS = {
    "moved_while_frozen": "statistics moved while weight and bias are identical: a layer meant to be frozen kept updating (train mode during fine-tuning or evaluation)",
    "stale_statistics": "weight or bias changed while the statistics are identical: never re-estimated after averaging, pruning or fine-tuning",
    "counter_went_down": "num_batches_tracked went down: the later file is not a continuation of the earlier one",
}


@dataclass
class LayerDiff:
    """How one layer moved from ``a`` to ``b``."""

    name: str
    name_b: str
    matched_by: str  # "name", "prefix" or "order"
    channels: int
    mean_shift_max: float | None = None
    mean_shift_mean: float | None = None
    var_log_ratio_max: float | None = None  # largest |log ratio|
    var_log_ratio_mean: float | None = None
    weight_change_max: float | None = None
    bias_change_max: float | None = None
    num_batches_tracked_change: int | None = None
    top_channels: list[int] = field(default_factory=list)  # the channels whose mean moved most
    changes: dict[str, list] = field(default_factory=dict)  # eps, momentum, training: [a, b]
    findings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Step:
    """The comparison of two consecutive files (or of a file and what data gives)."""

    a: str
    b: str
    layers: list[LayerDiff] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.a, "to": self.b, "layers": [l.to_dict() for l in self.layers], "only_in_from": self.only_in_a, "only_in_to": self.only_in_b, "notes": self.notes}


@dataclass
class DiffResult:
    """Every step of a sequence of files (one step for two files), and the gate."""

    files: list[str]
    steps: list[Step]
    fail_above: float | None = None
    samples: int | None = None  # with --data: how many samples the statistics come from

    @property
    def max_shift(self) -> float | None:
        shifts = [l.mean_shift_max for s in self.steps for l in s.layers if l.mean_shift_max is not None]
        return max(shifts) if shifts else None

    @property
    def findings(self) -> list[dict[str, str]]:
        return [{"step": f"{s.a} -> {s.b}", "layer": l.name, "kind": k, "message": FINDINGS[k]} for s in self.steps for l in s.layers for k in l.findings]

    @property
    def ok(self) -> bool:
        """No layer moved more than ``fail_above`` (always True without it; a NaN shift fails)."""
        if self.fail_above is None:
            return True
        return all(l.mean_shift_max is not None and l.mean_shift_max <= self.fail_above for s in self.steps for l in s.layers if l.channels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "samples": self.samples,
            "steps": [s.to_dict() for s in self.steps],
            "findings": self.findings,
            "max_shift": self.max_shift,
            "fail_above": self.fail_above,
            "ok": self.ok,
        }

    def __repr__(self) -> str:
        return f"DiffResult({len(self.files)} files, {len(self.steps)} steps, max shift {self.max_shift}, {len(self.findings)} findings)"


def diff(*targets: str | Path | ModelSource, fail_above: float | None = None) -> DiffResult:
    """Compare the BN layers of two or more checkpoints (paths or :class:`ModelSource`, any
    format bnctl reads), each with the next."""
    if len(targets) < 2:
        raise ValueError("diff needs at least two checkpoints")
    from .inspect import inspect

    results = [inspect(t) for t in targets]
    steps = [compare(a.layers, b.layers, a.source, b.source) for a, b in zip(results, results[1:])]
    return DiffResult([r.source for r in results], steps, fail_above)


def compare(a: Sequence[BNLayer], b: Sequence[BNLayer], name_a: str = "a", name_b: str = "b") -> Step:
    """One step: the layers of ``a`` and ``b`` matched (:func:`match`) and compared."""
    step = Step(name_a, name_b)
    pairs, step.only_in_a, step.only_in_b, note = match(a, b)
    if note:
        step.notes.append(note)
    step.layers = [layer_diff(x, y, how) for x, y, how in pairs]
    trained = any((l.weight_change_max or 0) > 0 or (l.bias_change_max or 0) > 0 for l in step.layers)
    if not trained and any(l.findings for l in step.layers):
        # no γ or β changed anywhere: the statistics alone were re-estimated (recalibrate,
        # update_bn); a frozen layer cannot be told from that, and the counter restarts
        for layer in step.layers:
            layer.findings = [f for f in layer.findings if f not in ("moved_while_frozen", "counter_went_down")]
        step.notes.append("only statistics changed (γ and β are the same in every layer): a re-estimation such as bnctl recalibrate or update_bn")
    return step


def match(a: Sequence[BNLayer], b: Sequence[BNLayer]) -> tuple[list[tuple[BNLayer, BNLayer, str]], list[str], list[str], str | None]:
    """Pairs of layers: by name, then by name without wrapper prefixes (``module.``, ``model.``,
    ``_orig_mod.``), then what is left by order and channel count; and the names left over."""
    by_name = {l.name: l for l in b}
    pairs = [(x, by_name[x.name], "name") for x in a if x.name in by_name]
    left_a = [x for x in a if x.name not in by_name]
    used = {y.name for _, y, _ in pairs}
    left_b = [y for y in b if y.name not in used]
    stripped_b = {_strip(y.name): y for y in left_b}
    for x in list(left_a):
        y = stripped_b.get(_strip(x.name))
        if y is not None and y in left_b:
            pairs.append((x, y, "prefix"))
            left_a.remove(x)
            left_b.remove(y)
    note = None
    by_order = [(x, y) for x, y in zip(left_a, left_b) if x.num_features == y.num_features]
    if by_order and len(by_order) == len(left_a) == len(left_b):
        pairs += [(x, y, "order") for x, y in by_order]
        note = f"{len(by_order)} layers matched by order and channel count, their names differ"
        left_a, left_b = [], []
    order = {l.name: i for i, l in enumerate(a)}
    pairs.sort(key=lambda p: order[p[0].name])
    return pairs, [x.name for x in left_a], [y.name for y in left_b], note


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPERS:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def layer_diff(a: BNLayer, b: BNLayer, matched_by: str = "name") -> LayerDiff:
    """How layer ``a`` moved to ``b`` (see the module doc); None where a tensor is missing."""
    d = LayerDiff(a.name, b.name, matched_by, a.num_features)
    mean_a, var_a, mean_b, var_b = (as_float64(t) for t in (a.running_mean, a.running_var, b.running_mean, b.running_var))
    w_a, w_b, b_a, b_b = (as_float64(t) for t in (a.weight, b.weight, a.bias, b.bias))
    eps = eps_of(a)
    same_shape = lambda x, y: x is not None and y is not None and x.shape == y.shape  # noqa: E731
    moved = None
    with np.errstate(all="ignore"):
        if same_shape(mean_a, mean_b) and same_shape(var_a, var_b) and mean_a.size:
            shift = np.abs(mean_b - mean_a) / np.sqrt(np.clip(var_a, 0, None) + eps)
            log_ratio = np.log(var_b + eps) - np.log(np.clip(var_a, 0, None) + eps)
            d.mean_shift_max, d.mean_shift_mean = _finite(float(shift.max())), _finite(float(shift.mean()))
            d.var_log_ratio_max, d.var_log_ratio_mean = _finite(float(np.abs(log_ratio).max())), _finite(float(log_ratio.mean()))
            d.top_channels = [int(i) for i in np.argsort(-np.nan_to_num(shift, nan=np.inf))[:3]]
            moved = not (np.array_equal(mean_a, mean_b) and np.array_equal(var_a, var_b))
        if same_shape(w_a, w_b):
            d.weight_change_max = _finite(float(np.abs(w_b - w_a).max())) if w_a.size else 0.0
        if same_shape(b_a, b_b):
            d.bias_change_max = _finite(float(np.abs(b_b - b_a).max())) if b_a.size else 0.0
    if a.num_batches_tracked is not None and b.num_batches_tracked is not None:
        d.num_batches_tracked_change = b.num_batches_tracked - a.num_batches_tracked
        if d.num_batches_tracked_change < 0:
            d.findings.append("counter_went_down")
    for attr in ("eps", "momentum", "training"):
        va, vb = getattr(a, attr), getattr(b, attr)
        if va is not None and vb is not None and va != vb:
            d.changes[attr] = [va, vb]
    affine_same = d.weight_change_max == 0.0 and d.bias_change_max in (0.0, None)
    affine_moved = (d.weight_change_max or 0.0) > 0 or (d.bias_change_max or 0.0) > 0
    if moved and affine_same:
        d.findings.append("moved_while_frozen")
    if moved is False and affine_moved:
        d.findings.append("stale_statistics")
    return d


def drift(source: ModelSource, batches: Any, *, device: str | None = None) -> DiffResult:
    """The statistics ``source``'s model stores against the exact population statistics of
    ``batches`` (as :func:`bnctl.recalibrate` computes them, on a copy: nothing is changed
    or written)."""
    import copy

    from ..core.modules import from_module
    from .recalibrate import recalibrate

    opened = source.open()
    model = opened.eager("measuring data drift")
    stored = from_module(model, mode_known=False)
    estimated = copy.deepcopy(model)
    report = recalibrate(estimated, batches, device=device)
    reached = {c.name for c in report.layers if c.reached}
    now = [l for l in from_module(estimated, mode_known=False) if l.name in reached]
    step = compare([l for l in stored if l.name in reached], now, str(source.path), "data")
    step.notes = [f"the statistics of {report.samples} samples, computed as bnctl recalibrate does, against the stored ones; nothing was written"]
    step.notes += [f"{name}: not reached by the data" for name in report.unreached]
    for layer in step.layers:  # γ and β are the model's own on both sides: only the statistics tell
        layer.num_batches_tracked_change = None
        layer.findings = []
    return DiffResult([str(source.path), "data"], [step], samples=report.samples)


def drift_folder(source: ModelSource, inputs: CheckInputs, *, batch_size: int = 32, workers: int = 0) -> DiffResult:
    """:func:`drift` on every sample of ``inputs.data``, read with ``inputs.preprocess`` in the
    order ``inputs.seed`` draws, ``batch_size`` a batch: the batches ``bnctl recalibrate``
    with the same seed computes its statistics on."""
    from ..io.data import loader, ordered_samples

    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} is not positive", "use e.g. --batch-size 32")
    files = ordered_samples(Path(inputs.data), inputs.preprocess, inputs.seed)
    return drift(source, (batch for batch, _ in loader(files, inputs.preprocess, batch_size, workers) if batch is not None))
