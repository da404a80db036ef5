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
    if module:
        import importlib.util

        sys.path.insert(0, os.getcwd())
        try:
            found = importlib.util.find_spec(target) is not None
        except (ImportError, ValueError):
            found = False
        finally:
            sys.path.pop(0)
        if not found:
            raise InputError(f"-m {target}: no such module (from {os.getcwd()})", "run bnctl trace from the folder python -m would run it from, or pass the script's path instead")
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]
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


def _events(run: TraceRun, name: str) -> list[tuple]:
    return [(name, e.layer, e.code, e.message + (f" [{e.where}]" if e.where else "")) for e in run.watch.events]


def as_audit(run: TraceRun, config: Any, ranks: list[dict] | None = None) -> Any:
    """The run as an :class:`~bnctl.audit.runner.AuditResult`: one file (the script, or one
    per rank of a distributed run: ``train.py[rank 1]``), one finding per event with the step
    and the caller's file:line in its message, and BN507 where the ranks' statistics differ."""
    from ..audit.runner import AuditResult, FileAudit, Finding

    parts = [(run.target if ranks is None else f"{run.target}[rank 0]", _events(run, run.target if ranks is None else f"{run.target}[rank 0]"), len(run.watch.layers), run.exit_code)]
    for other in ranks or []:
        name = f"{run.target}[rank {other['rank']}]"
        parts.append((name, [(name, *event) for event in other["events"]], other["layers"], other["exit_code"]))
    files = []
    for name, events, layers, code in parts:
        findings = [Finding(*event) for event in events]
        fa = FileAudit(name, "training script", layers, findings=[f for f in findings if config.keeps(f)], groups=["runtime"])
        if code:
            fa.notes.append(f"the script exited with code {code}: what ran before is reported")
        files.append(fa)
    if ranks:
        disagree = [Finding(files[0].path, layer, "BN507", message) for layer, message in _disagreements(run, ranks)]
        files[0].findings += [f for f in disagree if config.keeps(f)]
    return AuditResult(files, config)


# --- under torchrun: every rank watches its own process, rank 0 reports for all -------------


def distributed_rank() -> tuple[int, int] | None:
    """``(rank, world size)`` where torchrun started this process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), world) if world > 1 else None


def _exchange_folder() -> Path:
    import tempfile

    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    return Path(tempfile.gettempdir()) / f"bnctl-trace-{run_id}-{os.environ.get('MASTER_ADDR', '')}-{os.environ.get('MASTER_PORT', '')}"


def share(run: TraceRun, rank: int) -> None:
    """A rank other than 0: write its events and final statistics for rank 0 (atomically)."""
    import json

    import numpy as np

    from ..ops.watch import final_statistics

    folder = _exchange_folder()
    folder.mkdir(exist_ok=True)
    stats = folder / f"rank{rank}.npz.tmp"
    with open(stats, "wb") as f:
        np.savez(f, **final_statistics(run.watch))
    stats.replace(folder / f"rank{rank}.npz")
    events = [[e.layer, e.code, e.message + (f" [{e.where}]" if e.where else "")] for e in run.watch.events]
    doc = folder / f"rank{rank}.json.tmp"
    doc.write_text(json.dumps({"rank": rank, "events": events, "layers": len(run.watch.layers), "exit_code": run.exit_code}))
    doc.replace(folder / f"rank{rank}.json")


def gather(world: int, timeout: float = 120.0) -> list[dict]:
    """Rank 0: every other rank's events and statistics, waiting up to ``timeout`` seconds
    for each; a rank that never reports is one entry saying so."""
    import json
    import time

    import numpy as np

    folder = _exchange_folder()
    out = []
    for rank in range(1, world):
        doc, stats = folder / f"rank{rank}.json", folder / f"rank{rank}.npz"
        deadline = time.monotonic() + timeout
        while not doc.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not doc.exists():
            out.append({"rank": rank, "events": [], "layers": 0, "exit_code": None, "stats": {}, "missing": True})
            continue
        entry = json.loads(doc.read_text())
        with np.load(stats) as data:
            entry["stats"] = {k: data[k] for k in data.files}
        out.append(entry)
        doc.unlink()
        stats.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass
    return out


def _disagreements(run: TraceRun, ranks: list[dict]) -> list[tuple[str, str]]:
    """BN507: the layers whose running statistics differ between rank 0 and another rank
    (mean in units of rank 0's std, variance relative, beyond 1e-4)."""
    import numpy as np

    from ..ops.watch import final_statistics

    mine = final_statistics(run.watch)
    found = []
    for key in sorted(k for k in mine if k.endswith(".running_mean")):
        layer = key[: -len(".running_mean")]
        if layer in run.watch.synced:  # DDP broadcasts rank 0's buffers before each forward: only the last step's update differs
            continue
        mean0, var0 = mine[key], mine.get(f"{layer}.running_var")
        worst = (0.0, None)
        for other in ranks:
            mean_r, var_r = other["stats"].get(key), other["stats"].get(f"{layer}.running_var")
            if mean_r is None or var_r is None or var0 is None or mean_r.shape != mean0.shape:
                continue
            scale = np.sqrt(np.abs(var0) + 1e-5)
            moved = max(float(np.abs(mean_r - mean0).max() / scale.min()), float((np.abs(var_r - var0) / (np.abs(var0) + 1e-5)).max()))
            if moved > worst[0]:
                worst = (moved, other["rank"])
        if worst[0] > 1e-4:
            found.append(
                (layer, f"running statistics differ between rank 0 and rank {worst[1]} at the end (by {worst[0]:.2g} of rank 0's std or variance): each rank kept its own (DDP broadcast_buffers=False?); the rank that saves decides the model")
            )
    missing = [str(o["rank"]) for o in ranks if o.get("missing")]
    if missing:
        found.append((None, f"rank{'s' * (len(missing) > 1)} {', '.join(missing)} never reported: their statistics could not be compared"))
    return found
