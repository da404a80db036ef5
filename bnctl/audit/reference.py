"""The reference of every audit check as Markdown, generated from :mod:`~bnctl.core.registry`.

``python -m bnctl.audit.reference > docs/checks.md`` regenerates ``docs/checks.md``, which is
committed; ``tests/test_docs.py`` fails when the file and the registry disagree. Imports
nothing but the registry (no torch), so it runs in a fraction of a second.
"""

from __future__ import annotations

import sys

from ..core.registry import CHECKS, FIXABLE, GROUPS, Check

#: what each group needs to run, by the first digit of its codes (registry.py's docstring)
GROUP_NOTES = {
    "statistics": "Codes BN1xx. They read only the BN tensors, of any checkpoint; no architecture needed.",
    "configuration": "Codes BN2xx. They need a module tree: TorchScript, a pickled module with `--trust`, or a state_dict with `--arch`.",
    "behaviour": "Codes BN3xx. They need a module and check inputs (`--input-shape` or `--data`), and run the model (TorchScript and `.pt2` files only with `--trust`).",
    "onnx": "Codes BN4xx. They read an ONNX graph.",
    "runtime": "Codes BN5xx. `bnctl trace` (and `bnctl.watch`) report them while a training script runs; `bnctl audit` does not.",
}

REGENERATE = "python -m bnctl.audit.reference > docs/checks.md"


def anchor(check: Check) -> str:
    """The GitHub anchor of ``check``'s section heading (``## BN101 non-finite-statistics``)."""
    return f"{check.code.lower()}-{check.name}"


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (pipes escaped)."""
    return text.replace("|", "\\|")


def _section(check: Check) -> list[str]:
    fix = f"Yes: {FIXABLE[check.code]}" if check.fixable else "No: the finding says what to do."
    return [
        f"## {check.code} {check.name}",
        "",
        f"Severity **{check.severity}**, group {check.group}. Select or ignore it as `{check.code}` or `{check.name}`.",
        "",
        f"**What it finds.** {check.summary}",
        "",
        f"**Why it matters.** {check.why}",
        "",
        f"**Example.** {check.example}",
        "",
        f"**What to do.** {check.fix}",
        "",
        f"**Repaired by `bnctl audit --fix`.** {fix}",
        "",
    ]


def checks_markdown() -> str:
    """docs/checks.md: a title, a contents table per group (code linked to its section, name,
    severity, whether ``--fix`` repairs it, summary), then one section per check in code order
    with what it finds, why it matters, an example, the fix and ``--fix``'s repair. Every check
    of :data:`~bnctl.core.registry.CHECKS` appears exactly once; the text ends with one newline."""
    groups = [*GROUPS, *sorted({c.group for c in CHECKS.values()} - set(GROUPS))]
    lines = [
        "# Audit checks",
        "",
        f"<!-- Generated from bnctl/core/registry.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        f"Every check of `bnctl audit` and `bnctl trace`, {len(CHECKS)} in all. Codes are stable: a code is never reused for another check.",
        "`--select` and `--ignore` (and `select`/`ignore` in `[tool.bnctl.audit]`) take codes, prefixes such as `BN1`, or names.",
        "`bnctl audit --list` lists the same checks, and `bnctl audit --explain CODE` prints the text of one section below; all three come from one registry.",
        "",
        "## Contents",
        "",
    ]
    for group in groups:
        checks = [c for c in CHECKS.values() if c.group == group]
        if not checks:
            continue
        lines += [f"### {group.capitalize()} checks", ""]
        if group in GROUP_NOTES:
            lines += [GROUP_NOTES[group], ""]
        lines += ["| code | name | severity | `--fix` | what it finds |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| [{c.code}](#{anchor(c)}) | {c.name} | {c.severity} | {'yes' if c.fixable else '-'} | {_cell(c.summary)} |" for c in checks]
        lines.append("")
    for check in sorted(CHECKS.values(), key=lambda c: c.code):
        lines += _section(check)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    """Write :func:`checks_markdown` to stdout as UTF-8, whatever the locale."""
    sys.stdout.buffer.write(checks_markdown().encode("utf-8"))


if __name__ == "__main__":
    main()
