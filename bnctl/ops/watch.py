"""``bnctl.watch``: catch BatchNorm bugs while a training loop runs (``bnctl trace`` runs a
script under it).

Every BatchNorm forward (``_BatchNorm`` subclasses, SyncBatchNorm, functional
``F.batch_norm`` calls) is watched through torch's global module hooks and a wrapper of
``F.batch_norm``; exports and saves of whole modules through wrappers of ``torch.onnx.export``,
``torch.jit.trace``/``script``, ``torch.export.export`` and ``torch.save``; optimizers through
torch's global step hook. The runtime checks (BN5xx, :mod:`bnctl.core.registry`):

- BN501: a train-mode BN under ``torch.no_grad()``/``inference_mode()`` that updates its running
  statistics: evaluation without ``model.eval()``;
- BN502: a train-mode BN whose affine parameters are frozen (``requires_grad=False``) or in
  no optimizer's param groups (where one is seen), while its statistics move;
- BN503: a train-mode forward on too few values per channel to estimate anything;
- BN504: non-finite values entering a running statistic, or a running variance driven negative;
- BN505: an export, trace or ``torch.save`` of a module with BN layers in train mode;
- BN506: under torch.distributed, plain BN on a small per-rank batch where SyncBatchNorm would
  normalize over the whole step's batch; BN507 (``bnctl trace`` under torchrun, judged by rank
  0 on every rank's statistics): running statistics that differ across ranks at the end.

Known re-estimation routines (``torch.optim.swa_utils.update_bn``, fvcore's
``update_bn_stats``, ``bnctl.recalibrate``) run BN in train mode under no_grad on purpose:
nothing is reported while they run. Cost per BN forward: a few Python checks, and for BN504
one small device computation whose result is read once, at the end (no host-device
synchronisation per step). Names are found once per layer, from the module whose ``forward``
holds it on the stack.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

#: fewer values per channel than this in a train-mode forward estimate nothing (BN503): one value has no variance, two normalize to +-1 whatever they are
MIN_VALUES = 3
#: under torch.distributed, a per-rank batch below this with plain BN is flagged (BN506)
SYNC_BELOW = 16
#: frames of these folders are not the user's code (the caller named in a finding is the first other)
_LIBRARY = (str(Path(__file__).resolve().parents[1]), "/torch/", "/site-packages/", "/lib/python3", "<frozen ", "<string>", "<eval_with_key>")


@dataclass
class Event:
    """One finding as it happened: check code, layer, message, the step (the layer's own
    forward count) and the caller's ``file:line``."""

    code: str
    layer: str | None
    message: str
    step: int | None = None
    where: str | None = None


@dataclass
class _Layer:
    module: Any
    name: str
    calls: int = 0
    train_updates: int = 0  # train-mode forwards with grad enabled that moved the statistics
    first_bad: Any = None  # device tensor: the first step whose statistics were not finite (-1: none)


@dataclass
class Watch:
    """What :func:`watch` saw: the events, in order, and the layers it watched."""

    events: list[Event] = field(default_factory=list)
    layers: dict[int, _Layer] = field(default_factory=dict)
    optimizer_params: set[int] = field(default_factory=set)
    optimizers: int = 0
    synced: set[str] = field(default_factory=set)  # layers whose buffers DDP broadcasts from rank 0 (broadcast_buffers=True)
    _reported: set = field(default_factory=set)
    _names: dict[int, str] = field(default_factory=dict)
    _local: threading.local = field(default_factory=threading.local)
    _finished: bool = False

    # --- while the loop runs -----------------------------------------------------------

    def _event(self, code: str, layer: str | None, message: str, step: int | None = None, key: Any = None) -> None:
        key = (code, layer) if key is None else key
        if key in self._reported:
            return
        self._reported.add(key)
        self.events.append(Event(code, layer, message, step, caller()))

    def _layer(self, module: Any) -> _Layer:
        found = self.layers.get(id(module))
        if found is None:
            found = self.layers[id(module)] = _Layer(module, self._name_of(module))
        return found

    def _name_of(self, module: Any) -> str:
        """The module's name in the outermost module whose forward is on the stack."""
        if id(module) in self._names:
            return self._names[id(module)]
        import torch

        frame, root, synced = sys._getframe(1), None, False
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and owner is not module:
                root = owner
                # DDP that broadcasts rank 0's buffers before every forward: ranks differ by the last step only
                synced = synced or (type(owner).__name__ == "DistributedDataParallel" and bool(getattr(owner, "broadcast_buffers", False)))
            frame = frame.f_back
        if root is not None:
            for name, sub in root.named_modules():
                self._names.setdefault(id(sub), name)
        name = self._names.get(id(module), type(module).__name__)
        if synced:
            self.synced.add(name)
        return name

    def _reestimating(self) -> bool:
        return getattr(self._local, "reestimating", 0) > 0

    def before(self, module: Any, args: tuple) -> None:
        """A BN module is about to run (not watched while torch.jit traces or torch.compile
        compiles: the export is what BN505 judges, and a compiled graph runs unwatched)."""
        import torch

        if _inside_tracer():
            return
        if not module.training or not getattr(module, "track_running_stats", False) or getattr(module, "running_mean", None) is None:
            if module.training:
                self._layer(module).calls += 1
            return
        layer = self._layer(module)
        layer.calls += 1
        if self._reestimating():
            return
        x = args[0] if args else None
        grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        if not grad:
            self._event(
                "BN501",
                layer.name,
                f"train-mode forward under {'torch.inference_mode()' if torch.is_inference_mode_enabled() else 'torch.no_grad()'} updates the running statistics (first at step {layer.calls}): an evaluation without model.eval()",
                layer.calls,
            )
        else:
            layer.train_updates += 1
            weight = getattr(module, "weight", None)
            if weight is not None and not weight.requires_grad:
                self._event("BN502", layer.name, f"weight and bias have requires_grad=False, but the layer is in train mode: its statistics keep moving (step {layer.calls}); call .eval() on it after model.train()", layer.calls)
        if grad and isinstance(x, torch.Tensor) and x.dim() >= 2 and type(module).__name__ != "SyncBatchNorm":
            world = _world_size()
            if world > 1 and x.shape[0] < SYNC_BELOW:
                self._event(
                    "BN506",
                    layer.name,
                    f"a plain {type(module).__name__} under torch.distributed (world size {world}) normalizes each rank's batch of {x.shape[0]} alone: "
                    f"SyncBatchNorm would use the {x.shape[0] * world} samples of the step (torch.nn.SyncBatchNorm.convert_sync_batchnorm, or bnctl convert --to syncbn)",
                    layer.calls,
                )
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] > 0:
            values = x.numel() // x.shape[1]
            if values < MIN_VALUES:
                self._event(
                    "BN503",
                    layer.name,
                    f"a train-mode forward with {values} value{'s' * (values != 1)} per channel (input {tuple(x.shape)}, step {layer.calls}): too few to estimate statistics; drop the last incomplete batch (drop_last=True) or freeze the BN",
                    layer.calls,
                )

    def after(self, module: Any) -> None:
        """A BN module ran: fold whether its statistics are still finite into a device flag."""
        import torch

        if not module.training or getattr(module, "running_var", None) is None or self._reestimating() or _inside_tracer():
            return
        layer = self._layer(module)
        with torch.no_grad():
            bad = ~(torch.isfinite(module.running_mean).all() & torch.isfinite(module.running_var).all()) | (module.running_var < 0).any()
            step = torch.full((), layer.calls, dtype=torch.long, device=bad.device)  # a fill on the device: no host-to-device copy
            if layer.first_bad is None:
                layer.first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
            layer.first_bad = torch.where((layer.first_bad < 0) & bad, step, layer.first_bad)

    def functional(self, training: bool, running_mean: Any, inputs: Any) -> None:
        """An ``F.batch_norm`` call outside any BN module."""
        import torch

        if training and running_mean is not None and not self._reestimating() and not (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
            where = caller()
            self._event("BN501", f"F.batch_norm at {where}", "a functional batch_norm with training=True under no_grad updates its running statistics: an evaluation without eval mode", key=("BN501", where))

    def exported(self, what: str, module: Any) -> None:
        """``module`` is about to be exported, traced or saved whole."""
        import torch

        if not isinstance(module, torch.nn.Module):
            return
        training = [name for name, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        if training:
            shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
            where = caller()
            self._event("BN505", training[0], f"{what} of a model whose BN layers are in train mode ({shown}): the artifact normalizes with batch statistics; call model.eval() first", key=("BN505", what, where))

    def optimizer(self, optimizer: Any) -> None:
        if id(optimizer) not in self._reported:
            self._reported.add(id(optimizer))
            self.optimizers += 1
        for group in optimizer.param_groups:
            self.optimizer_params.update(id(p) for p in group["params"])

    # --- at the end ---------------------------------------------------------------------

    def report(self) -> str:
        """The events as text, one line each (``bnctl trace`` renders them in audit's formats,
        with severities): ``layer: CODE message [file:line]`` and a summary line."""
        self.finish()
        lines = [f"{e.layer or '(model)'}: {e.code} {e.message}" + (f" [{e.where}]" if e.where else "") for e in self.events]
        lines.append(f"{len(self.events)} finding{'s' * (len(self.events) != 1)} in {len(self.layers)} BatchNorm layers watched.")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """``{"events": [{"code", "layer", "message", "step", "where"}], "layers"}``."""
        self.finish()
        return {"events": [dict(e.__dict__) for e in self.events], "layers": len(self.layers)}

    def finish(self) -> None:
        """Read the device flags (one synchronisation) and judge what needs the whole run."""
        if self._finished:
            return
        self._finished = True
        for layer in self.layers.values():
            if layer.first_bad is not None:
                step = int(layer.first_bad)
                if step >= 0:
                    self._event(
                        "BN504", layer.name, f"non-finite values or a negative variance entered the running statistics at step {step}: everything after this layer is NaN in eval mode; look for an overflow (AMP) or a NaN input at that step", step
                    )
            weight = getattr(layer.module, "weight", None)
            if self.optimizers and layer.train_updates and weight is not None and weight.requires_grad and id(weight) not in self.optimizer_params:
                self._event("BN502", layer.name, f"weight and bias are in no optimizer's param groups, but the layer ran in train mode {layer.train_updates} times: its statistics keep moving while its parameters do not", None)


def _inside_tracer() -> bool:
    """Whether torch.jit is tracing or torch.compile compiling the current call."""
    import torch

    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(torch.jit.is_tracing() or (compiling is not None and compiling()))


def _world_size() -> int:
    """The torch.distributed world size, 1 where no process group is up."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def final_statistics(w: Watch) -> dict[str, Any]:
    """Each watched BN's running mean and variance as the run left them, as numpy arrays
    (``name.running_mean``, ``name.running_var``): what the ranks of a distributed run compare."""
    out = {}
    for layer in w.layers.values():
        for key in ("running_mean", "running_var"):
            value = getattr(layer.module, key, None)
            if value is not None:
                out[f"{layer.name}.{key}"] = value.detach().float().cpu().numpy()
    return out


def caller() -> str | None:
    """``file:line`` of the innermost frame of the user's code (not torch's, not bnctl's, not the standard library's)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in _LIBRARY):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


#: re-estimation routines that run BN in train mode under no_grad on purpose: (module, function)
REESTIMATION = (("torch.optim.swa_utils", "update_bn"), ("fvcore.nn.precise_bn", "update_bn_stats"), ("bnctl.ops.recalibrate", "recalibrate"))
#: calls that write or freeze a whole module: (module, attribute, what)
EXPORTS = (("torch.onnx", "export", "torch.onnx.export"), ("torch.jit", "trace", "torch.jit.trace"), ("torch.jit", "script", "torch.jit.script"), ("torch.export", "export", "torch.export.export"), ("torch", "save", "torch.save"))


@contextlib.contextmanager
def watch(model: Any = None) -> Iterator[Watch]:
    """Watch BatchNorm while the ``with`` block runs: every BN of the process (``model`` None,
    as ``bnctl trace`` does), or the BN modules of ``model``. Yields the :class:`Watch`; its
    events are complete when the block ends (:meth:`Watch.finish` reads the device flags).

        with bnctl.watch(model) as w:
            train(model)
        print(w.report())
    """
    import importlib

    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    w = Watch()
    handles, patched = [], []
    if model is None:

        def pre(module, args):
            if isinstance(module, _BatchNorm):
                w._local.depth = getattr(w._local, "depth", 0) + 1
                w.before(module, args)

        def post(module, args, output):
            if isinstance(module, _BatchNorm):
                w._local.depth -= 1
                w.after(module)

        handles += [torch.nn.modules.module.register_module_forward_pre_hook(pre), torch.nn.modules.module.register_module_forward_hook(post)]
    else:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                handles.append(m.register_forward_pre_hook(lambda module, args: w.before(module, args)))
                handles.append(m.register_forward_hook(lambda module, args, output: w.after(module)))
        w._names.update({id(m): n for n, m in model.named_modules()})
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handles.append(register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: w.optimizer(optimizer)))

    def patch(owner: Any, attr: str, wrapper: Any) -> None:
        original = getattr(owner, attr)
        patched.append((owner, attr, original))
        setattr(owner, attr, wrapper(original))

    def functional(original):
        def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, *args, **kwargs):
            if getattr(w._local, "depth", 0) == 0 and model is None:
                w.functional(training, running_mean, input)
            return original(input, running_mean, running_var, weight, bias, training, *args, **kwargs)

        return batch_norm

    def reestimation(original):
        def run(*args, **kwargs):
            w._local.reestimating = getattr(w._local, "reestimating", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                w._local.reestimating -= 1

        return run

    def export(what):
        def wrap(original):
            def run(obj, *args, **kwargs):
                w.exported(what, obj)
                return original(obj, *args, **kwargs)

            return run

        return wrap

    patch(torch.nn.functional, "batch_norm", functional)
    for module_name, attr in REESTIMATION:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(owner, attr):
            patch(owner, attr, reestimation)
    for module_name, attr, what in EXPORTS:
        owner = importlib.import_module(module_name)
        if hasattr(owner, attr):
            patch(owner, attr, export(what))
    try:
        yield w
    finally:
        for handle in handles:
            handle.remove()
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)
        w.finish()
