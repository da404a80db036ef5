"""The audit as text: one line per finding, then a ruff-style summary line; and what
``--fix`` repaired."""

from __future__ import annotations

from typing import Any

from ...render.text import plain
from ..runner import AuditResult


def summary_line(result: AuditResult) -> str:
    """``Found 3 findings (2 errors, 1 warning) in 20 BatchNorm layers of 2 files.``"""
    counts = result.summary()
    n = len(result.findings)
    parts = [f"{counts['error']} error{'s' * (counts['error'] != 1)}", f"{counts['warning']} warning{'s' * (counts['warning'] != 1)}"]
    if counts["info"]:
        parts.append(f"{counts['info']} info")
    files = len(result.files)
    text = f"Found {n} finding{'s' * (n != 1)} ({', '.join(parts)}) in {result.layers} BatchNorm layers of {files} file{'s' * (files != 1)}."
    if result.errors:
        text += f" {len(result.errors)} file{'s' * (len(result.errors) != 1)} could not be read."
    explicit = [n for n in result.not_run if n["explicit"]]
    if explicit:
        text += f" {sum(len(n['checks']) for n in explicit)} selected checks could not run."
    return text


def not_run_line(notice: dict) -> str:
    """``x.pt: not run: BN301, BN302 (behaviour): needs check inputs: ...``"""
    kind = "error" if notice["explicit"] else "notice"
    return plain(f"{notice['file']}: {kind}: {', '.join(notice['checks'])} ({notice['group']}) did not run: {notice['reason']}")


def not_applicable_line(notice: dict) -> str:
    """``x.onnx: note: BN203 (configuration) does not apply: an ONNX graph has no module tree``"""
    return plain(f"{notice['file']}: note: {', '.join(notice['checks'])} ({notice['group']}) does not apply: {notice['reason']}")


#: a check that fires on more layers of one file than this is one line (``--verbose`` lists each)
GROUP_ABOVE = 3


def to_text(result: AuditResult, *, verbose: bool = False, quiet: bool = False) -> str:
    """One line per finding (file, layer, code, message), or per check and file where it fires
    on many layers; unreadable files, notes, checks that could not run, the summary line.
    ``quiet`` keeps the findings and errors only."""
    lines = []
    groups: dict[tuple[str, str], list] = {}
    for f in result.findings:
        groups.setdefault((f.file, f.code), []).append(f)
    for (file, code), found in groups.items():
        if verbose or len(found) <= GROUP_ABOVE:
            for f in found:
                where = f"{f.file}:{f.layer}" if f.layer else f.file
                lines.append(plain(f"{where}: {f.code} [{f.severity}] {f.message}"))
            continue
        names = [f.layer or "(model)" for f in found]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(plain(f"{file}: {code} [{found[0].severity}] {found[0].message} ({len(found)} layers: {shown}; --verbose lists each)"))
    for fa in result.errors:
        lines.append(plain(f"{fa.path}: error: {fa.error}"))
    lines += [not_run_line(n) for n in result.not_run if n["explicit"]]
    lines += [not_applicable_line(n) for n in result.not_applicable if n["explicit"]]
    if quiet:
        return "\n".join(lines) + "\n" if lines else ""
    for fa in result.files:
        lines += [plain(f"{fa.path}: note: {n}") for n in fa.notes]
    if result.skipped:
        lines.append("skipped in the folders: " + "; ".join(f"{n} {why}" for why, n in result.skipped.items()))
    lines.append(summary_line(result))
    return "\n".join(lines) + "\n"


def counts(result: AuditResult) -> str:
    """Counts per check, most frequent first (ruff's ``--statistics``), then the summary line."""
    from ...core.registry import CHECKS

    counts: dict[str, int] = {}
    for f in result.findings:
        counts[f.code] = counts.get(f.code, 0) + 1
    lines = [f"{n:>6}  {code}  [{CHECKS[code].severity}] {CHECKS[code].name}" for code, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return "\n".join([*lines, summary_line(result)]) + "\n"


def text(result: AuditResult, *, verbose: bool = False, quiet: bool = False, statistics: bool = False) -> str:
    """What ``--format text`` writes: the counts per check with ``statistics``
    (:func:`counts`), else the findings (:func:`to_text`)."""
    return counts(result) if statistics else to_text(result, verbose=verbose, quiet=quiet)


def fix_text(report: Any, *, diff: bool = False) -> str:
    """A ``--fix`` report (:class:`bnctl.jobs.fix.FixReport`): one line per repair (``would
    fix`` with ``diff``) and per finding left unrepaired and why, or why nothing was; then the
    largest change of the eval-mode outputs."""
    lines = [plain(f"{'would fix' if diff else 'fixed'}: {code} {layer}: {change}") for code, layer, change in report.repairs.fixed]
    lines += [plain(f"not fixed: {code} {layer}: {why}") for code, layer, why in report.repairs.unfixed]
    remaining = sorted({f.code for f in report.before.findings} - {c for c, _, _ in report.repairs.fixed})
    if not report.repairs.fixed:
        lines.append("nothing to fix" + (f" (findings of {', '.join(remaining)} are not fixable here)" if remaining else ""))
    if report.max_abs_error is not None:
        lines.append(f"eval-mode outputs, repaired against original on the check inputs: max abs error {report.max_abs_error:.2g}")
    return "\n".join(lines) + "\n"
