"""``bnctl audit``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..audit.formats import FORMATS
from ..core.registry import SEVERITIES
from ..audit.runner import AuditConfig
from ..errors import InputError
from ..io.source import CheckInputs, ModelSource
from ..render.emit import emit
from .app import command
from .options import CHECKS, MODEL, choices

AuditFormat = choices("AuditFormat", FORMATS)
Severity = choices("Severity", SEVERITIES)


def configured(settings: AuditConfig, select: list[str] | None, ignore: list[str] | None, fail_on: Severity | None = None) -> AuditConfig:
    """``settings`` with ``--select`` (replacing its selection), ``--ignore`` (added to its
    ignores) and ``--fail-on`` applied, for ``bnctl audit``, ``--fix`` and ``bnctl trace``;
    ``--select`` and ``--ignore`` may be repeated and comma-separated (``BN1,BN2``)."""
    from ..core.registry import check_selectors

    def codes(values: list[str]) -> list[str]:
        return [c.strip() for v in values for c in v.split(",") if c.strip()]

    if select:
        settings.select = check_selectors(codes(select), "--select")
    if ignore:
        settings.ignore = settings.ignore + check_selectors(codes(ignore), "--ignore")
    if fail_on is not None:
        settings.fail_on = fail_on.value
    return settings


def report(result: Any, fmt: str, output: Path | None, **options: Any) -> None:
    """Write an audit result (``bnctl audit``, ``bnctl trace``) in ``fmt``, and its summary
    line on stderr unless it went to the terminal as text (where it is the last line)."""
    from ..audit.formats import summary_line

    emit(result, fmt, output, **options)
    if output is not None or fmt != "text":
        typer.echo(summary_line(result), err=True)


@command()
def audit(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Checkpoints, or folders to search for them (by content; .gitignore honoured).", show_default=False)] = None,
    source: ModelSource = MODEL,
    inputs: CheckInputs = CHECKS,
    fmt: Annotated[AuditFormat, typer.Option("--format", "-f", help="Output format.")] = AuditFormat("text"),
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the report to this file (atomically) instead of stdout.")] = None,
    fail_on: Annotated[Optional[Severity], typer.Option("--fail-on", help="Exit 1 on findings of this severity or worse. Default: pyproject's fail-on, else error.", show_default=False)] = None,
    select: Annotated[Optional[list[str]], typer.Option("--select", help="Only these checks: codes, prefixes (BN1) or names, comma-separated. Repeatable.", rich_help_panel="Checks")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Skip these checks (codes, prefixes, names). Repeatable.", rich_help_panel="Checks")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", metavar="", help="Exit 0 even with findings (unreadable files still exit 2).")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="Read \\[tool.bnctl.audit] from this file. Default: the nearest pyproject.toml.", rich_help_panel="Checks")] = None,
    list_checks: Annotated[bool, typer.Option("--list", metavar="", help="List every check and exit.", rich_help_panel="Checks")] = False,
    explain: Annotated[Optional[str], typer.Option("--explain", help="Explain a check (code or name) and exit.", rich_help_panel="Checks", show_default=False)] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="In folders, audit only files matching this glob (a name or a path below the folder). Repeatable.", rich_help_panel="Files")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="In folders, skip files matching this glob. Repeatable.", rich_help_panel="Files")] = None,
    fix: Annotated[bool, typer.Option("--fix", metavar="", help="Repair what can be repaired (--list says which checks) and write the repaired model to --output; the input is never changed.", rich_help_panel="Fix")] = False,
    diff: Annotated[bool, typer.Option("--diff", metavar="", help="With --fix: show what would change, write nothing.", rich_help_panel="Fix")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Text: one line per finding (default: a check firing on more than 3 layers of a file is one line).")] = False,
    statistics: Annotated[bool, typer.Option("--statistics", metavar="", help="Text: how many findings each check has, instead of the findings.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="Text: the findings only, no notes and no summary line.")] = False,
) -> None:
    """Find train/eval-mode bugs and unhealthy BatchNorm state; exit 1 on findings (a CI gate).

    Exit codes: 0 nothing at or above --fail-on, 1 findings, 2 bad input or an unreadable file.
    """
    from ..audit import formats

    if list_checks:
        sys.stdout.write(formats.list_checks())
        return
    if explain:
        sys.stdout.write(formats.explain(explain))
        return
    if not paths:
        raise InputError("no checkpoint to audit", "pass files or folders, e.g. bnctl audit model.pt (or --list to see the checks)")
    if fix or diff:
        _fix(paths, source, inputs, output, diff, config, select, ignore, fail_on)
        return
    from .._atomic import refuse_overwrite
    from ..audit.runner import audit as run_audit
    from ..audit.runner import expand, load_config
    from ..render.progress import stages

    refuse_overwrite(expand(paths, include or [], exclude or []), output)
    settings = configured(load_config(path=config), select, ignore, fail_on)
    with stages(sys.stderr.isatty()) as stage:
        result = run_audit(paths, model=source, inputs=inputs, config=settings, include=include or [], exclude=exclude or [], stage=stage)
    report(result, fmt.value, output, verbose=verbose, quiet=quiet, statistics=statistics)
    raise typer.Exit(result.exit_code(exit_zero))


def _fix(paths, source, inputs, output, diff: bool, config, select, ignore, fail_on) -> None:
    """``--fix``: repair one file and write it to ``output`` (``diff``: say what would change)."""
    from ..audit.runner import load_config
    from ..jobs.fix import fix_file

    if len(paths) != 1 or paths[0].is_dir():
        raise InputError("--fix repairs one file at a time", "pass one checkpoint, e.g. bnctl audit model.onnx --fix -o fixed.onnx")
    if output is None and not diff:
        raise InputError("--fix writes the repaired model to --output", "add -o fixed.<ext>, or --diff to see the changes without writing")
    fixed = fix_file(source.at(paths[0]), None if diff else output, config=configured(load_config(path=config), select, ignore, fail_on), inputs=inputs)
    emit(fixed, "text", diff=diff)
    if diff:
        raise typer.Exit(1 if fixed.repairs.fixed else 0)
    if not fixed.written:
        raise typer.Exit(fixed.before.exit_code())
    typer.echo(f"wrote {output}; its audit:", err=True)
    emit(fixed.after, "text")
    raise typer.Exit(fixed.after.exit_code())
