"""The checks' documentation as ``bnctl audit --list`` and ``--explain`` print it."""

from __future__ import annotations

from ...errors import InputError
from ...core.registry import CHECKS, lookup


def list_checks() -> str:
    """One line per check: code, severity, group, name and what it finds."""
    lines = [f"{'code':<6} {'severity':<8} {'group':<14} fix  name: what it finds"]
    lines += [f"{c.code:<6} {c.severity:<8} {c.group:<14} {'yes' if c.fixable else '-':<4} {c.name}: {c.summary}" for c in CHECKS.values()]
    return "\n".join(lines) + "\n"


def explain(code: str) -> str:
    """A check's full documentation; an InputError naming the known codes if there is none."""
    check = lookup(code)
    if check is None:
        raise InputError(f"no check '{code}'", f"known codes: {', '.join(CHECKS)} (bnctl audit --list)")
    fixable = "fixable with bnctl audit --fix" if check.fixable else "not fixable automatically"
    return f"{check.code} {check.name} ({check.severity}, {check.group}; {fixable})\n\n{check.help_text}\n"
