"""``bnctl.recalibrate``: re-estimate every BatchNorm's running statistics exactly.

How: the whole model stays in eval mode (Dropout off); each BN normalizes with the
statistics of the batch it sees, as in training, and records that batch's per-channel
count, mean and sum of squared deviations. Batches merge with Chan's parallel formula in
float64, so the result is the population mean and unbiased variance over every sample and
position, whatever the batch sizes (a last batch of one sample included) and whatever the
module's momentum. Nothing but the BN running statistics changes.

Under torch.distributed, each rank passes its own batches and the per-layer
``(count, mean, M2)`` triples are gathered and merged in rank order on every rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.modules import batchnorms
from ..core.verify import eval_mode, shapes_text
from ..errors import InputError, one_line


class NoBatchesError(InputError):
    """The iterable of batches was empty."""


class _Stop(Exception):
    """Raised after the last BN of a forward pass: what follows it is not needed."""


@dataclass
class _Moments:
    """Per-channel count, mean and sum of squared deviations (float64), mergeable."""

    n: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    batches: int = 0

    def add(self, n: float, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean.clone(), m2.clone()
        else:
            total = self.n + n
            delta = mean - self.mean
            self.mean += delta * (n / total)
            self.m2 += m2 + delta * delta * (self.n * n / total)
            self.n = total
        self.batches += 1

    @property
    def var(self) -> torch.Tensor:
        """The unbiased variance (the biased one for a single value)."""
        return self.m2 / max(self.n - 1.0, 1.0)


@dataclass
class LayerChange:
    """How one BN's statistics moved."""

    name: str
    reached: bool
    count: int  # values per channel seen (samples x positions)
    mean_shift: float | None  # mean over channels of |new - old mean| / sqrt(old var + eps)
    var_ratio: float | None  # geometric mean over channels of (new var + eps) / (old var + eps)


@dataclass
class RecalibrationReport:
    """What was seen and how each BN's statistics moved."""

    samples: int = 0
    batches: int = 0
    seconds: float = 0.0
    layers: list[LayerChange] = field(default_factory=list)
    stopped_early: bool = False  # --until-stable ended it
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def unreached(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.reached]

    def to_dict(self) -> dict[str, Any]:
        """The recalibrate contract (ARCHITECTURE.md): ``{"samples", "layers": [{"name", "mean_shift", "var_ratio"}]}`` and more."""
        return {
            "samples": self.samples,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "samples_per_second": round(self.samples / self.seconds, 1) if self.seconds > 0 else None,
            "world_size": self.world_size,
            "stopped_early": self.stopped_early,
            "layers": [{"name": c.name, "reached": c.reached, "count": c.count, "mean_shift": c.mean_shift, "var_ratio": c.var_ratio} for c in self.layers],
            "unreached": self.unreached,
            "notes": self.notes,
        }


def as_call(batch: Any, positional: int | None = None) -> tuple[tuple, dict]:
    """How a batch becomes the model's arguments: a tensor -> ``model(t)``, a tuple or list ->
    ``model(*batch)``, a dict -> ``model(**batch)``. A tuple longer than the ``positional``
    arguments ``forward`` takes is cut to them: a DataLoader's ``(x, y)`` feeds ``x``, as
    ``torch.optim.swa_utils.update_bn`` does."""
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        args = tuple(batch)
        return (args[:positional] if positional is not None and len(args) > positional else args), {}
    return (batch,), {}


def positional_arguments(model: Any) -> int | None:
    """How many positional arguments ``model.forward`` takes (None: any number, or unknown)."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


class _Recorder:
    """Replaces each BN's forward for the run: batch-statistics normalization plus moments."""

    def __init__(self, layers: dict[str, _BatchNorm]):
        self.layers = layers
        self.moments = {name: _Moments() for name in layers}
        self.calls_per_pass = 0  # BN calls of the first batch's forward pass
        self.calls = 0
        self.first_batch = True

    def __enter__(self) -> "_Recorder":
        for name, bn in self.layers.items():
            bn.forward = self._forward(name, bn)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        for bn in self.layers.values():
            del bn.forward

    def _forward(self, name: str, bn: _BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            # training's fused kernel: the output normalized with the batch's statistics, and
            # those statistics (accumulated in double inside; mean and 1/sqrt(var + eps) out)
            out, mean, invstd = torch.native_batch_norm(x, bn.weight, bn.bias, None, None, True, 0.0, bn.eps)
            n = x.numel() / max(x.shape[1], 1)
            var = (invstd.double().pow(-2) - bn.eps).clamp_min(0.0)
            self.moments[name].add(n, mean.double(), var * n)
            self.calls += 1
            if not self.first_batch and self.calls == self.calls_per_pass:
                raise _Stop  # every BN call of a pass has its statistics: skip the rest
            return out

        return forward

    def next_batch(self) -> None:
        if self.first_batch and self.calls:
            self.first_batch, self.calls_per_pass = False, self.calls
        self.calls = 0


def _merge_distributed(moments: dict[str, _Moments]) -> None:
    """Gather every rank's moments and merge them in rank order, on every rank."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for name in sorted(moments):
        m = moments[name]
        channels = m.mean.numel() if m.mean is not None else 0
        size = torch.tensor([channels], dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        c = max(int(s) for s in sizes)
        local = torch.zeros(2 + 2 * c, dtype=torch.float64)
        if channels:
            local[0], local[1] = m.n, m.batches
            local[2 : 2 + c], local[2 + c :] = m.mean, m.m2
        gathered = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        merged = _Moments()
        for part in gathered:
            if part[0] > 0:
                merged.add(float(part[0]), part[2 : 2 + c], part[2 + c :])
                merged.batches += int(part[1]) - 1
        moments[name] = merged


def _stable(previous: dict[str, tuple], moments: dict[str, _Moments], eps: dict[str, float], tolerance: float) -> tuple[bool, dict[str, tuple], tuple[str, float]]:
    """Whether no layer's estimate moved more than ``tolerance`` since the last batch
    (mean in units of std, variance relative), and the layer that moved most, by how much."""
    current, most = {}, ("", 0.0)
    for name, m in moments.items():
        if m.mean is None:
            continue
        mean, var = m.mean.clone(), m.var.clone()
        current[name] = (mean, var)
        if name in previous:
            old_mean, old_var = previous[name]
            std = torch.sqrt(old_var + eps[name])
            moved = max(float(((mean - old_mean).abs() / std).max()), float(((var - old_var).abs() / (old_var + eps[name])).max()))
        else:
            moved = math.inf
        if moved > most[1] or not most[0]:
            most = (name, moved)
    return most[1] <= tolerance, current, most


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    until_stable: float | None = None,
    stable_batches: int = 3,
    device: torch.device | str | None = None,
    on_batch: Callable[[int], None] | None = None,
    input_fn: Callable[[Any], Any] | None = None,
) -> RecalibrationReport:
    """Replace the running statistics of every BN of ``model`` (in place) with the exact
    population statistics of its inputs over ``batches``.

    ``batches`` is any iterable; each batch is passed as :func:`as_call` says (a DataLoader's
    ``(x, y)`` feeds ``x`` to a one-argument ``forward``), or, with ``input_fn``, as
    ``input_fn(batch)`` returns it (a tensor, a tuple of arguments or a dict of keyword arguments). BN layers no
    batch reaches keep their statistics and are listed in ``report.unreached``. Weights, other
    buffers and every module's mode are left as they were; ``num_batches_tracked`` becomes the
    number of batches that reached the layer. ``until_stable`` stops once no estimate moved
    more than that over ``stable_batches`` consecutive batches. ``on_batch(n_samples)`` is
    called after each batch (progress bars). Under torch.distributed every rank must call
    this with its own share of the batches; all ranks end with the same statistics.
    """
    layers = batchnorms(model, estimating=True)
    if not layers:
        raise InputError("the model has no BatchNorm layer with running statistics", "nothing to recalibrate")
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and until_stable is not None:
        raise InputError("--until-stable works on one process only", "run without torchrun, or drop --until-stable")
    old = {n: (bn.running_mean.detach().double().clone(), bn.running_var.detach().double().clone()) for n, bn in layers.items()}
    report = RecalibrationReport(world_size=dist.get_world_size() if distributed else 1)
    positional = positional_arguments(model)
    start = time.perf_counter()
    previous: dict[str, tuple] = {}
    calm = 0
    most = ("", math.inf)
    with eval_mode(model), _Recorder(layers) as recorder, torch.inference_mode():
        for batch in batches:
            args, kwargs = as_call(input_fn(batch) if input_fn is not None else batch, None if input_fn is not None else positional)
            if device is not None:
                args = tuple(a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in args)
                kwargs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            recorder.next_batch()
            try:
                model(*args, **kwargs)
            except _Stop:
                pass
            except Exception as exc:
                if report.batches == 0:
                    raise InputError(f"the model rejects samples of shape {shapes_text((*args, *kwargs.values()))}: {one_line(exc)}", "check --image-size, --grayscale and --transform against what the model expects") from exc
                raise
            size = _batch_size(args, kwargs)
            report.samples += size
            report.batches += 1
            if on_batch is not None:
                on_batch(size)
            if until_stable is not None:
                steady, previous, most = _stable(previous, recorder.moments, {n: bn.eps for n, bn in layers.items()}, until_stable)
                calm = calm + 1 if steady else 0
                if calm >= stable_batches:
                    report.stopped_early = True
                    break
        moments = recorder.moments
    if distributed:
        _merge_distributed(moments)
        counts = torch.tensor([report.samples, report.batches], dtype=torch.long)
        dist.all_reduce(counts)
        report.samples, report.batches = int(counts[0]), int(counts[1])
    if report.batches == 0:
        raise NoBatchesError("no batch to recalibrate on", "pass an iterable with at least one batch")
    if until_stable is not None and not report.stopped_early:
        name, moved = most
        report.notes.append(f"never stable within --until-stable {until_stable:g}: every sample was used; {name} still moved {moved:.3g} on the last batch")
    _write_statistics(layers, moments, old, report)
    report.seconds = time.perf_counter() - start
    return report


def _write_statistics(layers: dict[str, _BatchNorm], moments: dict[str, _Moments], old: dict, report: RecalibrationReport) -> None:
    for name, bn in layers.items():
        m = moments[name]
        if m.mean is None:
            report.layers.append(LayerChange(name, False, 0, None, None))
            continue
        new_mean, new_var = m.mean, m.var
        with torch.no_grad():
            bn.running_mean.copy_(new_mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(new_var.to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(m.batches)
        old_mean, old_var = old[name]
        std = torch.sqrt(old_var.clamp_min(0) + bn.eps)
        shift = float(((new_mean - old_mean).abs() / std).mean())
        ratio = float(torch.exp((torch.log(new_var + bn.eps) - torch.log(old_var.clamp_min(0) + bn.eps)).mean()))
        report.layers.append(LayerChange(name, True, int(m.n), shift if math.isfinite(shift) else None, ratio if math.isfinite(ratio) else None))
