"""``bnctl trace``: run a user's training script as ``python SCRIPT ARGS`` would (or ``python -m
MODULE ARGS``), in this process, under :func:`bnctl.ops.watch.watch`, and turn what it saw into
an audit result: the same findings, formats and exit codes as ``bnctl audit``."""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError


@dataclass
class TraceRun:
    """What a traced run gave: the watch (events and layers), and the script's exit code."""

    target: str
    watch: Any
    exit_code: int


def trace_script(target: str, args: list[str], *, module: bool = False) -> TraceRun:
    """Run ``target`` (a script path, or with ``module`` a module name) with ``args`` under
    the watch: ``sys.argv``, ``__main__`` and ``sys.path[0]`` as Python would set them. The
    script's exit code is kept (1 for an uncaught exception, whose traceback is printed as
    Python prints it); the watch is complete either way."""
    import runpy

    from ..ops.watch import watch

    if not module and not Path(target).is_file():
        raise InputError(f"{target}: no such script", "pass the training script as python would run it: bnctl trace train.py --its-args (or -m package.module)")
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target if not module else target, *args]
    sys.path.insert(0, os.getcwd() if module else str(Path(target).resolve().parent))
    code = 0
    try:
        with watch() as seen:
            try:
                if module:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
            except KeyboardInterrupt:
                code = 130
            except BaseException:  # noqa: BLE001 - the script's own failure: shown as Python shows it, the report still written
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return TraceRun(target, seen, code)


def as_audit(run: TraceRun, config: Any) -> Any:
    """The run as an :class:`~bnctl.audit.runner.AuditResult`: one file (the script), one
    finding per event, with the step and the caller's file:line in its message."""
    from ..audit.runner import AuditResult, FileAudit, Finding

    findings = []
    for event in run.watch.events:
        where = f" [{event.where}]" if event.where else ""
        findings.append(Finding(run.target, event.layer, event.code, event.message + where))
    fa = FileAudit(run.target, "training script", len(run.watch.layers), findings=[f for f in findings if config.keeps(f)], groups=["runtime"])
    if run.exit_code:
        fa.notes.append(f"the script exited with code {run.exit_code}: what ran before is reported")
    return AuditResult([fa], config)
