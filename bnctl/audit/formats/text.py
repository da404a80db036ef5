"""The audit as text: one line per finding, then a ruff-style summary line."""

from __future__ import annotations

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


def to_text(result: AuditResult) -> str:
    """One line per finding (file, layer, code, message), unreadable files, notes, the summary."""
    lines = []
    for f in result.findings:
        where = f"{f.file}:{f.layer}" if f.layer else f.file
        lines.append(plain(f"{where}: {f.code} [{f.severity}] {f.message}"))
    for fa in result.errors:
        lines.append(plain(f"{fa.path}: error: {fa.error}"))
    for fa in result.files:
        lines += [plain(f"{fa.path}: note: {n}") for n in fa.notes]
    lines += [not_run_line(n) for n in result.not_run if n["explicit"]]
    lines.append(summary_line(result))
    return "\n".join(lines) + "\n"
