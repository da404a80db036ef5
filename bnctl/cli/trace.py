"""``bnctl trace``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError
from .app import command
from .audit import AuditFormat, Severity, configured, report


@command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def trace(
    target: Annotated[Optional[str], typer.Argument(help="The training script (or, with -m, the module) and its arguments, as python would take them.", show_default=False, metavar="SCRIPT")] = None,
    args: Annotated[Optional[list[str]], typer.Argument(help="The script's arguments.", show_default=False)] = None,
    module: Annotated[Optional[str], typer.Option("-m", help="Run a module as python -m does.", show_default=False)] = None,
    fmt: Annotated[AuditFormat, typer.Option("--format", "-f", help="Report format.")] = AuditFormat("text"),
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the report to this file (atomically) instead of stdout.")] = None,
    fail_on: Annotated[Optional[Severity], typer.Option("--fail-on", help="Exit 1 on findings of this severity or worse. Default: error.", show_default=False)] = None,
    select: Annotated[Optional[list[str]], typer.Option("--select", help="Only these checks (codes, prefixes, names). Repeatable.")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Skip these checks. Repeatable.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Text: one line per finding (default: a check firing on more than 3 layers is one line).")] = False,
) -> None:
    """Run a training script and catch BatchNorm bugs as they happen: evaluation without
    model.eval(), frozen BNs whose statistics move, tiny batches, NaN statistics, exports in
    train mode (BN5xx; bnctl audit --explain BN501).

    Options go before the script: bnctl trace -o report.json -f json train.py --epochs 3.
    Exit codes: the script's own when it fails (the report is still written), else 0 clean,
    1 findings at or above --fail-on, 2 bad usage.
    """
    from ..audit.runner import AuditConfig
    from ..jobs.trace import as_audit, distributed_rank, gather, share, trace_script

    if module is not None:
        name, script_args = module, ([target] if target is not None else []) + list(args or [])
    elif target is None:
        raise InputError("no script to trace", "pass the training script and its arguments: bnctl trace train.py --epochs 1 (or -m package.module)")
    else:
        name, script_args = target, list(args or [])
    config = configured(AuditConfig(), select, ignore, fail_on)
    run = trace_script(name, script_args, module=module is not None)
    ranked = distributed_rank()
    if ranked is not None and ranked[0] != 0:  # under torchrun: rank 0 reports for every rank
        share(run, ranked[0])
        raise typer.Exit(run.exit_code)
    result = as_audit(run, config, gather(ranked[1]) if ranked is not None else None)
    sys.stdout.flush()
    report(result, fmt.value, output, verbose=verbose)
    raise typer.Exit(run.exit_code or result.exit_code())
