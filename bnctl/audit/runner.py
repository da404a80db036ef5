"""``bnctl.audit``: run the checks on files and folders, filter the findings, decide the exit code."""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .._bulk import bulk
from ..errors import BnctlError, InputError
from ..io.source import CheckInputs, ModelSource

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib
from ..core.registry import CHECKS, SEVERITIES, check_selectors, matches
from .checks import Raw


@dataclass
class Finding:
    """One finding: where (file, layer or None for the whole model), which check, what exactly."""

    file: str
    layer: str | None
    code: str
    message: str

    @property
    def severity(self) -> str:
        return CHECKS[self.code].severity

    @property
    def name(self) -> str:
        return CHECKS[self.code].name

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.code, "name": self.name, "severity": self.severity, "file": self.file, "layer": self.layer, "message": self.message}


@dataclass
class FileAudit:
    """The audit of one file: what it is, how many BN layers, its findings, or why it could not be read."""

    path: str
    description: str = ""
    layers: int = 0
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    groups: list[str] = field(default_factory=list)  # check groups that ran
    notes: list[str] = field(default_factory=list)
    unable: dict[str, str] = field(default_factory=dict)  # check group -> why it applies but could not run on this file
    inapplicable: dict[str, str] = field(default_factory=dict)  # check group -> why it does not apply to this file's format
    not_run: list[dict[str, Any]] = field(default_factory=list)  # selected checks that did not run (see AuditResult)
    not_applicable: list[dict[str, Any]] = field(default_factory=list)  # selected checks that do not apply to this file
    seconds: dict[str, float] = field(default_factory=dict)  # time per check group
    checkpoint: Any = field(default=None, repr=False)  # what was read (the entries of a training checkpoint)
    found: list[Any] = field(default_factory=list, repr=False)  # its BN layers

    def rename(self, name: str) -> None:
        """Call this audit (and its findings' file) ``name``: ``ckpt.pt[ema]`` for an entry."""
        self.path = name
        for f in self.findings:
            f.file = name


@dataclass
class AuditConfig:
    """Which checks count, from pyproject.toml ``[tool.bnctl.audit]`` and the command line."""

    select: list[str] = field(default_factory=lambda: ["ALL"])
    ignore: list[str] = field(default_factory=list)
    per_layer_ignores: dict[str, list[str]] = field(default_factory=dict)
    fail_on: str = "error"

    def selects(self, code: str) -> bool:
        """Whether check ``code`` is selected and not ignored."""
        return matches(code, self.select) and not matches(code, self.ignore)

    def names(self, code: str) -> bool:
        """Whether ``code`` was selected by name, code or prefix (not only by ``ALL``)."""
        return matches(code, [p for p in self.select if p.strip().upper() != "ALL"])

    def keeps(self, finding: Finding) -> bool:
        if not self.selects(finding.code):
            return False
        return not any(fnmatch.fnmatchcase(finding.layer or "", glob) and matches(finding.code, codes) for glob, codes in self.per_layer_ignores.items())


def load_config(start: Path | None = None, path: Path | None = None) -> AuditConfig:
    """``[tool.bnctl.audit]`` of ``path``, or of the nearest pyproject.toml from ``start`` up."""
    if path is None:
        here = (start or Path.cwd()).resolve()
        path = next((p / "pyproject.toml" for p in (here, *here.parents) if (p / "pyproject.toml").is_file()), None)
        if path is None:
            return AuditConfig()
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("tool", {}).get("bnctl", {}).get("audit", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read audit settings from {path}: {exc}", "fix the TOML, or pass --config another file") from exc
    config = AuditConfig()
    unknown = set(table) - {"select", "ignore", "per-layer-ignores", "fail-on"}
    if unknown:
        raise InputError(f"{path}: unknown [tool.bnctl.audit] keys: {', '.join(sorted(unknown))}", "known keys: select, ignore, per-layer-ignores, fail-on")
    config.select = check_selectors(list(table.get("select", config.select)), f"{path}: select")
    config.ignore = check_selectors(list(table.get("ignore", [])), f"{path}: ignore")
    config.per_layer_ignores = {str(k): check_selectors(list(v), f"{path}: per-layer-ignores") for k, v in table.get("per-layer-ignores", {}).items()}
    config.fail_on = check_fail_on(table.get("fail-on", "error"))
    return config


def check_fail_on(value: str) -> str:
    if value not in SEVERITIES:
        raise InputError(f"fail-on '{value}' is not a severity", "use error, warning or info")
    return value


@dataclass
class AuditResult:
    """Every file's audit, the findings kept by the configuration, and the exit code."""

    files: list[FileAudit]
    config: AuditConfig
    skipped: dict[str, int] = field(default_factory=dict)  # files in the folders not audited, by reason

    @property
    def findings(self) -> list[Finding]:
        return [f for fa in self.files for f in fa.findings]

    @property
    def errors(self) -> list[FileAudit]:
        return [fa for fa in self.files if fa.error is not None]

    @property
    def layers(self) -> int:
        return sum(fa.layers for fa in self.files)

    def summary(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    @property
    def not_run(self) -> list[dict[str, Any]]:
        """Selected checks that could not run, per file and group, and why; ``explicit`` where
        the selection named them (not only ``ALL``)."""
        return [{"file": fa.path, **n} for fa in self.files for n in fa.not_run]

    @property
    def not_applicable(self) -> list[dict[str, Any]]:
        """Selected checks that do not apply to a file's format (a module-tree check on an
        ONNX graph), per file and group, and why: a clean result, never a failure."""
        return [{"file": fa.path, **n} for fa in self.files for n in fa.not_applicable]

    def exit_code(self, exit_zero: bool = False) -> int:
        """2 when a file could not be read or a check selected by name could not run (a gate
        is never green by accident), 1 for a finding at or above fail-on, else 0."""
        if self.errors or any(n["explicit"] for n in self.not_run):
            return 2
        threshold = SEVERITIES.index(self.config.fail_on)
        failing = any(SEVERITIES.index(f.severity) <= threshold for f in self.findings)
        return 1 if failing and not exit_zero else 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of audit contract (ARCHITECTURE.md), with files and errors added."""
        return {
            "findings": [f.to_dict() for f in self.findings],
            "summary": self.summary(),
            "files": [
                {"file": fa.path, "format": fa.description, "layers": fa.layers, "checks": fa.groups, "seconds": fa.seconds, "notes": fa.notes, "error": fa.error, "not_run": fa.not_run, "not_applicable": fa.not_applicable} for fa in self.files
            ],
            "not_run": self.not_run,
            "not_applicable": self.not_applicable,
            "skipped": self.skipped,
            "fail_on": self.config.fail_on,
        }


def expand(paths: Sequence[str | Path], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Path]:
    """Files to audit (:func:`bnctl.audit.discover.discover`)."""
    from .discover import discover

    return discover(paths, include, exclude).files


def audit(
    paths: Sequence[str | Path],
    *,
    model: ModelSource = ModelSource(),
    inputs: CheckInputs = CheckInputs(),
    config: AuditConfig | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    stage: Any = None,
) -> AuditResult:
    """Audit every checkpoint in ``paths`` (files or folders), each opened with ``model``'s options.

    Statistics checks need no architecture; configuration checks need a module (TorchScript,
    a pickled module with ``trust``, a ``.pt2``, or ``arch``); behaviour checks also need
    check ``inputs`` (shapes or a data folder). A file that cannot be read is reported in its
    :class:`FileAudit` and the others are still audited.
    """
    from .discover import discover

    config = config or AuditConfig()
    found = discover(paths, include, exclude)
    files = found.files
    if not files:
        skipped = "; ".join(f"{n} {why}" for why, n in found.skipped.items()) or "the folders are empty"
        raise InputError(f"no checkpoint files in {', '.join(map(str, paths))} ({skipped})", "name the files, or check --include/--exclude and .gitignore")
    examples = _behaviour_inputs(inputs)
    data = dataclasses.replace(inputs, count=64).make() if inputs.data is not None else None  # BN110 on data
    results = []
    for number, path in enumerate(files, 1):
        if stage is not None:
            stage(f"auditing {path} ({number} of {len(files)})")
        for fa in _audit_entries(model.at(path), examples, data):
            fa.findings = [f for f in fa.findings if config.keeps(f)]
            fa.not_run = _selected(fa.unable, config)
            fa.not_applicable = _selected(fa.inapplicable, config)
            results.append(fa)
    return AuditResult(results, config, found.skipped)


def _audit_entries(source: ModelSource, examples: tuple | None, data: tuple | None = None) -> list[FileAudit]:
    """The audit of a file, and, for a training checkpoint read without ``--key``, of every
    other entry holding the same model (an EMA or SWA copy: the one that ships), each named
    ``file[entry]``; an averaged entry whose statistics are another entry's while its weights
    differ gets BN110."""
    try:
        first = _audit_file(source, examples, data)
    except BnctlError as exc:
        return [FileAudit(str(source.path), error=exc.message)]
    checkpoint = first.checkpoint
    siblings = checkpoint.siblings() if checkpoint is not None and source.key is None else []
    if not siblings:
        return [first]
    first.rename(f"{source.path}[{checkpoint.key}]")
    audits = [first]
    for entry in siblings:
        try:
            other = _audit_file(dataclasses.replace(source, key=entry), examples, data)
        except BnctlError as exc:
            other = FileAudit(str(source.path), error=exc.message)
        other.rename(f"{source.path}[{entry}]")
        audits.append(other)
    names = [checkpoint.key, *siblings]
    for fa, name in zip(audits, names):
        if _averaged_name(name):
            copied = next((other for other, n in zip(audits, names) if n != name and _same_statistics(fa.found, other.found)), None)
            if copied is not None:
                entry = names[audits.index(copied)]
                fa.findings.append(
                    Finding(
                        fa.path,
                        None,
                        "BN110",
                        f"the BN statistics of entry '{name}' are the same as entry '{entry}''s while its BN weights differ: copied, not averaged or re-estimated; "
                        f"run bnctl recalibrate {source.path} --key {name} --data DIR, or torch.optim.swa_utils.update_bn",
                    )
                )
    return audits


def _averaged_name(name: str | None) -> bool:
    """An entry name that says its weights were averaged (ema, model_ema, swa, averaged_model)."""
    import re

    return bool(name) and re.search(r"(^|[._])(ema|swa|averaged?)([._]|$)", str(name), re.IGNORECASE) is not None


def _same_statistics(mine: list[Any], other: list[Any]) -> bool:
    """Every BN of ``mine`` has bitwise the running statistics of the same-named BN of
    ``other``, while some BN weight or bias differs."""
    import numpy as np

    theirs = {layer.name.removeprefix("module."): layer for layer in other}
    pairs = [(layer, theirs.get(layer.name.removeprefix("module."))) for layer in mine if layer.running_mean is not None]
    if not pairs or any(b is None or b.running_mean is None for _, b in pairs):
        return False
    same = all(np.array_equal(a.running_mean, b.running_mean) and np.array_equal(a.running_var, b.running_var) for a, b in pairs)
    moved = any(not np.array_equal(a.weight, b.weight) or not np.array_equal(a.bias, b.bias) for a, b in pairs if a.weight is not None and b.weight is not None)
    return same and moved


def _stale_average(checkpoint: Any, found: list[Any]) -> list[tuple[str | None, str, str]]:
    """BN110 where the file or entry says its weights were averaged (AveragedModel's
    ``n_averaged`` above 1, or an ema/swa entry) but every BN's statistics are at their
    initial values (mean 0, var 1)."""
    import numpy as np

    tensors = checkpoint.tensors if checkpoint is not None else None
    count_key = next((k for k in (tensors.keys() if tensors is not None else ()) if str(k).rpartition(".")[2] == "n_averaged"), None)
    count = None
    if count_key is not None:
        try:
            count = int(np.asarray(tensors[count_key]).reshape(-1)[0])
        except (TypeError, ValueError, IndexError):
            count = None
    averaged = (count is not None and count > 1) or _averaged_name(getattr(checkpoint, "key", None))
    stats = [layer for layer in found if layer.running_mean is not None and layer.running_var is not None and layer.num_features]
    if not averaged or not stats or not all(bool((np.asarray(l.running_mean) == 0).all() and (np.asarray(l.running_var) == 1).all()) for l in stats):
        return []
    why = f"n_averaged={count}" if count is not None and count > 1 else f"entry '{checkpoint.key}'"
    key = f" --key {checkpoint.key}" if getattr(checkpoint, "key", None) else ""
    return [
        Raw(None, "BN110", f"weights averaged ({why}) but every BN's running statistics are at their initial values (mean 0, var 1): never re-estimated; run bnctl recalibrate {checkpoint.path}{key} --data DIR, or torch.optim.swa_utils.update_bn")
    ]


def _behaviour_inputs(inputs: CheckInputs) -> tuple | None:
    """Check inputs with a batch of 2 to 4 (batch dependence needs more than one sample)."""
    shapes = [(max(2, min(4, s[0])), *s[1:]) if i == 0 else s for i, s in enumerate(inputs.shapes)]
    examples = dataclasses.replace(inputs, shapes=shapes, count=4).make()
    if examples is not None and examples[0].shape[0] < 2:
        raise InputError(f"--data {inputs.data}: behaviour checks need at least 2 samples", "add samples, or use --input-shape")
    return examples


def _selected(groups: dict[str, str], config: AuditConfig) -> list[dict[str, Any]]:
    """The selected checks of each of ``groups`` (group -> why it did not run), and why;
    ``explicit`` where the selection named them."""
    out = []
    for group, reason in groups.items():
        codes = [c for c, check in CHECKS.items() if check.group == group and config.selects(c)]
        if codes:
            out.append({"group": group, "checks": codes, "reason": reason, "explicit": any(config.names(c) for c in codes)})
    return out


def _audit_file(source: ModelSource, inputs: tuple | None, data: tuple | None = None) -> FileAudit:
    from ..core import stats
    from ..io.kinds import OnnxGraph
    from . import checks

    path = source.path
    clock = time.perf_counter()

    def done(group: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        fa.groups.append(group)
        fa.seconds[group] = round(now - clock, 4)
        clock = now

    with bulk():
        opened = source.open()
        checkpoint, kind = opened.checkpoint, opened.kind
        found = opened.layers()
        onnx = isinstance(kind, OnnxGraph)
        fa = FileAudit(str(path), checkpoint.describe(), len(found), checkpoint=checkpoint, found=found)
        raw = checks.from_rows(stats.rows(found), onnx) + _stale_average(checkpoint, found)
    done("statistics")
    tree = opened.module
    if tree is not None:
        from . import model_checks

        if opened.built is None:  # a saved module records its mode; one built by --arch does not
            raw += model_checks.frozen_in_train_mode(tree)
        raw += model_checks.conv_bias_before_bn(tree)
        raw += model_checks.int8_fold_range(tree)
        done("configuration")
    else:
        (fa.unable if kind.tree_missing else fa.inapplicable)["configuration"] = kind.no_tree
    why_not = "needs check inputs: pass --input-shape or --data" if inputs is None else opened.why_not_run()
    runnable = None
    if why_not is None:
        runnable = opened.built if opened.built is not None else kind.as_module(opened.trusted)
        if kind.fixed_shapes and not _accepts(runnable, inputs):
            why_not = "the program's input shapes are fixed and differ from the check inputs"
    if onnx:
        raw += checks.onnx_unfolded(kind.proto)
        done("onnx")
    if why_not is None:
        from ..core import verify
        from . import model_checks

        import copy

        verify.reference_outputs(copy.deepcopy(runnable), inputs)  # an InputError naming the shape if the model rejects it (a copy: a forward in train mode would move its statistics)
        raw += model_checks.behaviour(runnable, inputs)
        import torch

        if data is not None and not isinstance(runnable, torch.jit.ScriptModule):
            raw += model_checks.data_drift(runnable, data)
        if any(CHECKS[code].measurable for _, code, _ in raw):
            error = model_checks.float16_error(runnable, inputs)
            measured = f"measured on the check inputs: the model in float16 differs from float32 by {error:.2g} (relative)" if error is not None else "the model does not run in float16 here: not measured"
            raw = [Raw(layer, code, CHECKS[code].message(message, measured)) for layer, code, message in raw]
        done("behaviour")
    else:
        (fa.inapplicable if kind.never_runs else fa.unable)["behaviour"] = why_not
    fa.inapplicable["runtime"] = "runtime checks watch a training script as it runs: bnctl trace train.py"
    fa.findings = [Finding(str(path), layer, code, message) for layer, code, message in raw]
    return fa


def _accepts(program_module: Any, inputs: tuple) -> bool:
    from ..core import verify

    try:
        verify.run(program_module, inputs)
        return True
    except Exception:  # noqa: BLE001 - a guard on the exported shapes
        return False
