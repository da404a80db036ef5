"""What ``bnctl diff`` prints and draws: a table per comparison (a trend table for a sequence
of files), flat rows for CSV and Markdown, and the shift plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..ops.diff import DiffResult
from .inspect import num
from .text import markup, plain

#: the flat table's columns (CSV, Markdown, Parquet)
COLUMNS = (
    "from",
    "to",
    "name",
    "name_to",
    "matched_by",
    "channels",
    "mean_shift_max",
    "mean_shift_mean",
    "var_log_ratio_max",
    "var_log_ratio_mean",
    "weight_change_max",
    "bias_change_max",
    "num_batches_tracked_change",
    "top_channels",
    "changes",
    "findings",
)


def flat_rows(result: DiffResult) -> list[dict[str, Any]]:
    """One row per compared layer per step."""
    rows = []
    for step in result.steps:
        for layer in step.layers:
            row = {"from": step.a, "to": step.b, **layer.to_dict()}
            row["name_to"] = row.pop("name_b")
            row["top_channels"] = " ".join(map(str, layer.top_channels))
            row["changes"] = "; ".join(f"{k} {a} -> {b}" for k, (a, b) in layer.changes.items())
            row["findings"] = ";".join(layer.findings)
            rows.append({c: row.get(c) for c in COLUMNS})
    return rows


def to_csv(result: DiffResult) -> str:
    import pandas as pd

    return pd.DataFrame(flat_rows(result), columns=list(COLUMNS)).to_csv(index=False)


def to_markdown(result: DiffResult) -> str:
    import pandas as pd

    shown = [c for c in COLUMNS if c not in ("from", "to")] if len(result.steps) == 1 else list(COLUMNS)
    return pd.DataFrame(flat_rows(result), columns=list(COLUMNS))[shown].to_markdown(index=False) + "\n"


def summary_line(result: DiffResult) -> str:
    layers = sum(len(s.layers) for s in result.steps)
    moved = sum(1 for s in result.steps for l in s.layers if (l.mean_shift_max or 0) > 1e-6 or (l.var_log_ratio_max or 0) > 1e-6)
    text = f"{layers} BatchNorm layers compared in {len(result.steps)} step{'s' * (len(result.steps) != 1)}: {moved} moved"
    if result.max_shift is not None:
        text += f", largest mean shift {result.max_shift:.3g} old std"
    text += f"; {len(result.findings)} finding{'s' * (len(result.findings) != 1)}"
    if result.fail_above is not None:
        text += f"; {'within' if result.ok else 'beyond'} --fail-above {result.fail_above:g}"
    return text + "."


def table(result: DiffResult, *, max_rows: int = 1000):
    """A rich renderable: the comparison table (or the trend table), findings, notes, summary."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    if len(result.steps) == 1:
        step = result.steps[0]
        t = Table(box=None, header_style="bold", pad_edge=False, title=f"{plain(step.a)} -> {plain(step.b)}", title_justify="left")
        for title in ("layer", "C", "shift max", "shift mean", "log var max", "|Δγ| max", "|Δβ| max", "Δbatches", "findings"):
            t.add_column(title, justify="left" if title in ("layer", "findings") else "right", overflow="fold")
        for layer in step.layers[:max_rows]:
            name = markup(layer.name) + ("" if layer.name == layer.name_b else f" [dim]({markup(layer.name_b)})[/]")
            t.add_row(
                name,
                str(layer.channels),
                num(layer.mean_shift_max),
                num(layer.mean_shift_mean),
                num(layer.var_log_ratio_max),
                num(layer.weight_change_max),
                num(layer.bias_change_max),
                num(layer.num_batches_tracked_change),
                ", ".join(f"[red]{f}[/]" for f in layer.findings),
            )
        parts.append(t)
    else:
        names = list(dict.fromkeys(l.name for s in result.steps for l in s.layers))
        t = Table(box=None, header_style="bold", pad_edge=False, title="largest mean shift per step (old std)", title_justify="left")
        t.add_column("layer")
        for i, _ in enumerate(result.steps):
            t.add_column(f"{i + 1}->{i + 2}", justify="right")
        cells = [{l.name: l for l in s.layers} for s in result.steps]
        for name in names[:max_rows]:
            t.add_row(markup(name), *(num(c[name].mean_shift_max) if name in c else "-" for c in cells))
        parts.append(t)
        parts += [Text(f"{i + 1}: {plain(f)}", style="dim") for i, f in enumerate(result.files)]
    for step in result.steps:
        for label, names in (("only in", step.only_in_a), ("only in", step.only_in_b)):
            if names:
                where = step.a if names is step.only_in_a else step.b
                parts.append(Text(plain(f"{label} {where}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"), style="yellow"))
        parts += [Text(f"note: {plain(n)}", style="dim") for n in step.notes]
    for f in result.findings:
        parts.append(Text(plain(f"{f['layer']}: {f['kind']}: {f['message']}"), style="red"))
    parts.append(Text(summary_line(result), style="bold" if result.ok else "bold red"))
    return Group(*parts)


def plot(result: DiffResult, dest: Path) -> None:
    """Bars of each layer's largest mean shift (one series per step), layers with a finding in
    red, the --fail-above line dashed."""
    from .plot import pyplot, save

    plt = pyplot(dest)
    names = list(dict.fromkeys(l.name for s in result.steps for l in s.layers))
    flagged = {l.name for s in result.steps for l in s.layers if l.findings}
    width = 0.8 / max(len(result.steps), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * len(names) + 2), 5))
    for k, step in enumerate(result.steps):
        by_name = {l.name: l for l in step.layers}
        values = [by_name[n].mean_shift_max if n in by_name and by_name[n].mean_shift_max is not None else 0.0 for n in names]
        colors = ["tab:red" if n in flagged else f"C{k}" for n in names]
        ax.bar([i + k * width for i in range(len(names))], values, width=width, color=colors, label=f"{Path(step.a).name} -> {Path(step.b).name}")
    if result.fail_above is not None:
        ax.axhline(result.fail_above, color="gray", linestyle="--", linewidth=1, label=f"--fail-above {result.fail_above:g}")
    ax.set_ylabel("largest mean shift (old std)")
    ax.set_xticks([i + width * (len(result.steps) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    for label in ax.get_xticklabels():
        if label.get_text() in flagged:
            label.set_color("tab:red")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(summary_line(result) + "\nred = layer with a finding", fontsize=9)
    fig.tight_layout()
    save(fig, dest)
