"""Turn results into what people and scripts read: rich tables, JSON, CSV, Parquet, Markdown, PNG.

Functions here return text or write files; printing is the CLI's job.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from . import _atomic
from .errors import InputError, MissingExtraError
from .inspection import InspectResult
from .stats import flag_counts

TABULAR = ("csv", "parquet", "markdown")
_SEVERE = {"nonfinite", "negative_var", "never_updated", "train_mode", "no_running_stats"}


def format_from_suffix(path: Path) -> str | None:
    """The output format an ``--output`` file name implies, if any."""
    return {".json": "json", ".csv": "csv", ".parquet": "parquet", ".md": "markdown", ".txt": "table"}.get(path.suffix.lower())


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}"
    return str(value)


def _unknown(value: Any, fmt=str) -> str:
    return "[dim]?[/dim]" if value is None else fmt(value)


def summary_line(result: InspectResult) -> str:
    """``27 BatchNorm layers, 2 flagged (nonfinite 1, never_updated 1) in x.pt [torch state_dict]``."""
    n = len(result.rows)
    if n == 0:
        return f"no BatchNorm layers found in {result.source} [{result.description}]"
    counts = flag_counts(result.rows)
    flagged = len(result.flagged)
    detail = f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else ""
    noun = "layer" if n == 1 else "layers"
    return f"{n} BatchNorm {noun}, {flagged} flagged{detail} in {result.source} [{result.description}]"


#: table columns: (title, value of a row, shown on a narrow terminal too)
_COLUMNS = (
    ("layer", lambda r: r["name"] or "(root)", True),
    ("kind", lambda r: _unknown(r["kind"]), True),
    ("C", lambda r: str(r["num_features"]), True),
    ("eps", lambda r: _unknown(r["eps"], "{:g}".format), False),
    ("momentum", lambda r: "cumulative" if r["averaging"] == "cumulative" else _unknown(r["momentum"], "{:g}".format), False),
    ("batches", lambda r: _unknown(r["num_batches_tracked"]), False),
    ("|mean| max", lambda r: _num(r["mean_absmax"]), False),
    ("var min", lambda r: _num(r["var_min"]), True),
    ("var max", lambda r: _num(r["var_max"]), True),
    ("|γ| min", lambda r: _num(r["weight_absmin"]), True),
    ("|β| max", lambda r: _num(r["bias_absmax"]), False),
    ("flags", lambda r: ", ".join(f"[{'red' if f in _SEVERE else 'yellow'}]{f}[/]" for f in r["flags"]), True),
)
#: below this terminal width the table keeps only the columns marked for narrow terminals
WIDE = 130


def inspect_table(result: InspectResult, *, width: int = WIDE, max_details: int = 20):
    """A rich renderable: the layer table, the flag details, the notes and the summary line."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    columns = [c for c in _COLUMNS if width >= WIDE or c[2]]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for title, _, _ in columns:
        table.add_column(title, justify="left" if title in ("layer", "kind", "flags") else "right",
                         no_wrap=title != "flags", overflow="fold")
    for row in result.rows:
        table.add_row(*(value(row) for _, value, _ in columns))
    parts: list[Any] = [table] if result.rows else []
    details = [(row["name"], d) for row in result.rows for d in row["details"]]
    if details:
        parts.append(Text(""))
        for name, detail in details[:max_details]:
            parts.append(Text.assemble(("  " + (name or "(root)"), "bold"), ": ", detail))
        if len(details) > max_details:
            parts.append(Text(f"  ... {len(details) - max_details} more (--format json lists all)", style="dim"))
    for note in result.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    parts.append(Text(""))
    parts.append(Text(summary_line(result), style="bold"))
    return Group(*parts)


def to_json(result: InspectResult) -> str:
    """The JSON contract of ``bnctl inspect --format json`` (strict JSON: no NaN)."""
    return json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"


def _flat_table(result: InspectResult):
    df = result.table()
    df["flags"] = df["flags"].map(";".join)
    df["details"] = df["details"].map("; ".join)
    return df


def to_csv(result: InspectResult) -> str:
    """One CSV row per layer; list columns joined with ';'; unknown values empty."""
    return _flat_table(result).to_csv(index=False)


def to_markdown(result: InspectResult) -> str:
    """A GitHub-flavoured Markdown table of the main columns, then the summary line."""
    df = _flat_table(result)[
        ["name", "kind", "num_features", "eps", "momentum", "num_batches_tracked",
         "mean_absmax", "var_min", "var_max", "weight_absmin", "flags"]
    ]
    df = df.astype(object).where(df.notna(), "?")
    return df.to_markdown(index=False, floatfmt=".3g") + f"\n\n{summary_line(result)}\n"


def write_parquet(result: InspectResult, dest: Path) -> None:
    """Write the full table (list columns kept as lists) to ``dest`` atomically."""
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("pyarrow", "parquet", "--format parquet") from exc
    df = result.table()
    with _atomic.atomic_path(dest) as tmp:
        df.to_parquet(tmp, index=False)


def plot(result: InspectResult, dest: Path) -> None:
    """Draw each layer's running_var and |weight| spread (log scale), flagged layers in red.

    One column per layer, in model order: a bar from the smallest to the largest channel
    value with a dot at the median; red layers carry a flag; a cross at the bottom marks a
    layer whose values cannot sit on a log axis (non-finite, negative or zero).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError("matplotlib", "plot", "--plot") from exc
    import torch

    if dest.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise InputError(f"--plot {dest}: the file name must end in .png, .svg or .pdf", f"e.g. --plot {dest.with_suffix('.png')}")
    layers = result.layers
    n = max(len(layers), 1)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.28 * n + 2), 7), sharex=True)
    panels = (("running_var", "running_var per channel", "var"), ("weight", "|γ| (weight) per channel", "gamma"))
    for ax, (attr, label, _) in zip(axes, panels):
        for i, (layer, row) in enumerate(zip(layers, result.rows)):
            t = getattr(layer, attr)
            color = "tab:red" if row["flags"] else "tab:blue"
            if t is None or t.numel() == 0:
                continue
            v = t.detach().double().abs() if attr == "weight" else t.detach().double()
            ok = v[torch.isfinite(v) & (v > 0)]
            if ok.numel() < v.numel():
                ax.plot([i], [0.02], marker="x", color="tab:red", transform=ax.get_xaxis_transform(), clip_on=False)
            if ok.numel():
                ax.vlines(i, float(ok.min()), float(ok.max()), color=color, linewidth=3, alpha=0.6)
                ax.plot([i], [float(ok.median())], "o", color=color, markersize=3)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    eps = next((l.eps for l in layers if l.eps is not None), None)
    axes[0].axhline(eps if eps is not None else 1e-5, color="gray", linestyle="--", linewidth=1, label="eps" if eps else "1e-5 (eps unknown)")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].set_xticks(range(len(layers)))
    axes[1].set_xticklabels([l.name or "(root)" for l in layers], rotation=90, fontsize=7)
    for label, row in zip(axes[1].get_xticklabels(), result.rows):
        if row["flags"]:
            label.set_color("tab:red")
    counts = flag_counts(result.rows)
    subtitle = ", ".join(f"{k} {v}" for k, v in counts.items()) or "no flags"
    fig.suptitle(f"{Path(result.source).name}: {len(layers)} BatchNorm layers ({subtitle})\nred = flagged layer; x = non-finite, negative or zero values", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=dest.suffix.lower().lstrip("."), dpi=110)
    plt.close(fig)
    _atomic.write_bytes(dest, buf.getvalue())



# --- fold -------------------------------------------------------------------------------


def fold_summary(report: Any) -> str:
    """``Folded 10 of 10 BatchNorm layers (fx trace); ... max rel error 6.9e-08 (tolerance 1e-04)``."""
    path = {"fx": "torch.fx trace", "torch.export": "torch.export graph", "module-tree": "module tree, each pair verified", "onnx": "ONNX graph"}.get(report.path, report.path)
    text = f"Folded {len(report.folded)} of {report.bn_before} BatchNorm layers ({path}); {report.bn_after} left."
    if report.max_abs_error is not None:
        text += f"\nOutputs on {report.inputs}: max abs error {report.max_abs_error:.2g}, max rel error {report.max_rel_error:.2g} (tolerance {report.tolerance:g})."
    if report.written:
        text += f"\nWrote {report.output} ({report.format})."
    return text


def fold_table(report: Any):
    """A rich renderable: one row per BN (folded, or kept and why), notes, the summary line."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for title in ("BatchNorm", "", "folded into / why not"):
        table.add_column(title, overflow="fold")
    for entry in report.folded:
        where = f"{entry['into']} ({'the layer before' if entry['side'] == 'after' else 'the layer after'})"
        if entry.get("note"):
            where += f" [dim]- {entry['note']}[/]"
        table.add_row(entry["bn"], "[green]folded[/]", where)
    for entry in report.skipped:
        table.add_row(entry["bn"], "[yellow]kept[/]", entry["reason"])
    parts: list[Any] = [table] if report.folded or report.skipped else []
    parts += [Text(f"note: {n}", style="dim") for n in report.notes]
    parts.append(Text(fold_summary(report), style="bold" if report.ok else "bold red"))
    return Group(*parts)


def fold_json(report: Any) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


# --- recalibrate --------------------------------------------------------------------------


class _Progress:
    """A rich progress bar over samples with samples/s, or nothing when disabled."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.task = enabled, None, None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("recalibrating"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} samples/s"), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start(self, total: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task("samples", total=total, rate="-")

    def advance(self, n: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, n)
            task = self.bar.tasks[0]
            speed = task.speed
            self.bar.update(self.task, rate=f"{speed:.0f}" if speed else "-")


def sample_progress(enabled: bool) -> _Progress:
    """Context manager for the recalibration progress bar (``start(total)``, ``advance(n)``)."""
    return _Progress(enabled)


def recalibration_table(report: Any):
    """One row per BN: values seen per channel, mean shift, variance ratio; then the summary."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for title in ("BatchNorm", "values/channel", "mean shift (std)", "var ratio"):
        table.add_column(title, justify="left" if title == "BatchNorm" else "right")
    for layer in report.layers:
        if not layer.reached:
            table.add_row(layer.name, "[yellow]not reached[/]", "-", "-")
            continue
        table.add_row(layer.name, str(layer.count), _num(layer.mean_shift), _num(layer.var_ratio))
    rate = f", {report.samples / report.seconds:.0f} samples/s" if report.seconds > 0 else ""
    summary = f"Recalibrated {sum(l.reached for l in report.layers)} of {len(report.layers)} BatchNorm layers on {report.samples} samples ({report.batches} batches{rate}"
    summary += f", {report.world_size} processes)." if report.world_size > 1 else ")."
    if report.stopped_early:
        summary += f" Stopped early: estimates stable after {report.samples} samples."
    parts: list[Any] = [table, *[Text(f"note: {n}", style="dim") for n in report.notes]]
    if report.unreached:
        parts.append(Text(f"note: {len(report.unreached)} layers were not reached by the data and keep their statistics", style="yellow"))
    parts.append(Text(summary, style="bold"))
    return Group(*parts)


def recalibration_json(report: Any) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


# --- convert and export -------------------------------------------------------------------


def to_json_text(document: dict) -> str:
    """A report dict as JSON text (non-finite numbers become null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(document), indent=2) + "\n"


def convert_table(report: Any):
    """One row per converted layer (from -> to, note), notes, and the output change."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for title in ("layer", "from", "to", "note"):
        table.add_column(title)
    for c in report.converted:
        table.add_row(c["name"], c["from"], c["to"], c["note"] or "")
    parts: list[Any] = [table, *[Text(f"note: {n}", style="yellow") for n in report.notes]]
    summary = f"Converted {len(report.converted)} layers to {report.target}."
    if report.max_abs_error is not None:
        summary += f" Eval outputs on the check inputs moved by max abs {report.max_abs_error:.2g} (rel {report.max_rel_error:.2g})."
    parts.append(Text(summary, style="bold"))
    return Group(*parts)


def export_table(report: Any):
    """Steps taken, ONNX op counts and file size before/after folding, parity, findings."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for title in ("ONNX op", "exported as is", "bnctl export"):
        table.add_column(title, justify="left" if title == "ONNX op" else "right")
    ops = sorted(set(report.nodes_before) | set(report.nodes_after), key=lambda o: -(report.nodes_before.get(o, 0) + report.nodes_after.get(o, 0)))
    for op in ops:
        table.add_row(op, str(report.nodes_before.get(op, 0)), str(report.nodes_after.get(op, 0)))
    table.add_row("[bold]nodes[/]", str(sum(report.nodes_before.values())), str(sum(report.nodes_after.values())))
    table.add_row("[bold]file size[/]", _size(report.bytes_before), _size(report.bytes_after))
    parts: list[Any] = [Text("steps: " + "; ".join(report.steps)), table]
    parts += [Text(f"{f['check']} {f['layer'] or ''}: {f['message']}", style="yellow") for f in report.findings]
    summary = f"Exported with {report.exporter}, opset {report.opset}. ONNX Runtime vs PyTorch on {', '.join(report.checked_shapes)}: max abs error {report.max_abs_error:.2g}, max rel error {report.max_rel_error:.2g} (tolerance {report.tolerance:g})."
    if report.written:
        summary += f"\nWrote {report.output}."
    parts.append(Text(summary, style="bold" if report.ok else "bold red"))
    return Group(*parts)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
