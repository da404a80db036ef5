"""Rich tables of the reports of the commands that write a model: fold, recalibrate, convert, export."""

from __future__ import annotations

from typing import Any

from .inspect import num
from .text import markup, plain


def fold_summary(report: Any) -> str:
    """``Folded 10 of 10 BatchNorm layers (fx trace); ... max rel error 6.9e-08 (tolerance 1e-04)``."""
    path = {"fx": "torch.fx trace", "torch.export": "torch.export graph", "module-tree": "module tree, each pair verified", "onnx": "ONNX graph", "torchscript": "TorchScript graph, torch.jit.freeze"}.get(report.path, report.path)
    text = f"Folded {len(report.folded)} of {report.bn_before} BatchNorm layers ({path}); {report.bn_after} left."
    if report.max_abs_error is not None:
        text += f"\nOutputs on {report.inputs}: {report.errors_text()} (tolerance {report.tolerance:g}, {report.tolerance_source})."
        text += f"\nBound: {report.bound_text()}."
    if report.input_dims:
        text += f"\n{inputs_line(report.input_dims)}"
    return text


def inputs_line(described: list[dict[str, Any]]) -> str:
    """``Inputs as written: image (batch, 3, 32, 32) float32 - dims 1, 2, 3 static ...``."""
    static = [f"{d['name']} {', '.join(str(k) for k, v in enumerate(d['shape']) if not isinstance(v, str))}" for d in described if any(not isinstance(v, str) for v in d["shape"])]
    text = "Inputs as written: " + "; ".join(f"{d['name']} ({', '.join(map(str, d['shape']))}) {d['dtype']}" for d in described)
    if static:
        text += f"; static dims: {'; '.join(static)} (--dynamic frees them)"
    return plain(text)


def fold_table(report: Any):
    """A rich renderable: one row per BN (folded, or kept and why), notes, the summary line."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for title in ("BatchNorm", "", "folded into / why not"):
        table.add_column(title, overflow="fold")
    for entry in report.folded:
        side = {"after": " (the layer before)", "before": " (the layer after)", "merged": " (the BN after it)"}.get(entry["side"], "")
        where = f"{markup(entry['into'])}{side}"
        if entry.get("note"):
            where += f" [dim]- {markup(entry['note'])}[/]"
        table.add_row(markup(entry["bn"]), "[green]folded[/]", where)
    for entry in report.skipped:
        table.add_row(markup(entry["bn"]), "[yellow]kept[/]", markup(entry["reason"]))
    parts: list[Any] = [table] if report.folded or report.skipped else []
    parts += [Text(f"note: {plain(n)}", style="dim") for n in report.notes]
    parts += [Text(plain(line), style="yellow") for line in int8_lines(report.folded)]
    if report.int8_check is not None:
        parts.append(Text(plain(int8_check_text(report.int8_check))))
    parts.append(Text(fold_summary(report), style="bold" if report.ok else "bold red"))
    return Group(*parts)


def int8_check_text(block: dict[str, Any]) -> str:
    from ..ops.int8_check import int8_check_text as text

    return text(block)


def int8_lines(folded: list[dict[str, Any]]) -> list[str]:
    """One line per folded layer whose per-tensor int8 SQNR drops by more than
    :data:`bnctl.core.int8.DROP_DB` through the fold, with the channel responsible."""
    from ..core import int8

    return [int8.advice(e["bn"], e["into"], e["int8"]) for e in folded if e.get("int8") and int8.drop_db(e["int8"]) > int8.DROP_DB]


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
            table.add_row(markup(layer.name), "[yellow]not reached[/]", "-", "-")
            continue
        table.add_row(markup(layer.name), str(layer.count), num(layer.mean_shift), num(layer.var_ratio))
    rate = f", {report.samples / report.seconds:.0f} samples/s" if report.seconds > 0 else ""
    summary = f"Recalibrated {sum(l.reached for l in report.layers)} of {len(report.layers)} BatchNorm layers on {report.samples} samples ({report.batches} batches{rate}"
    summary += f", {report.world_size} processes)." if report.world_size > 1 else ")."
    if report.stopped_early:
        summary += f" Stopped early: estimates stable after {report.samples} samples."
    parts: list[Any] = [table, *[Text(f"note: {plain(n)}", style="dim") for n in report.notes]]
    if report.unreached:
        parts.append(Text(f"note: {len(report.unreached)} layers were not reached by the data and keep their statistics", style="yellow"))
    parts.append(Text(summary, style="bold"))
    return Group(*parts)


def convert_table(report: Any):
    """One row per converted layer (from -> to, note), notes, and the output change."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    measured = any("output_change" in c for c in report.converted)
    for title in ("layer", "from", "to", *(("output change",) if measured else ()), "note"):
        table.add_column(title, justify="right" if title == "output change" else "left")
    for c in report.converted:
        change = (f"{c['output_change']:.2g}" if c.get("output_change") is not None else "-",) if measured else ()
        table.add_row(markup(c["name"]), markup(c["from"]), markup(c["to"]), *change, markup(c["note"] or ""))
    parts: list[Any] = [table, *[Text(f"note: {plain(n)}", style="yellow") for n in report.notes]]
    if measured:
        parts.append(Text("output change: max |new - old| / max |old| of each layer's own output, on the input it saw in the original on the check inputs", style="dim"))
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
    ops = sorted(set(report.nodes_before) | set(report.nodes_after), key=lambda o: (-(report.nodes_before.get(o, 0) + report.nodes_after.get(o, 0)), o))  # ties by name: the same table every run
    for op in ops:
        table.add_row(op, str(report.nodes_before.get(op, 0)), str(report.nodes_after.get(op, 0)))
    table.add_row("[bold]nodes[/]", str(sum(report.nodes_before.values())), str(sum(report.nodes_after.values())))
    table.add_row("[bold]file size[/]", _size(report.bytes_before), _size(report.bytes_after))
    parts: list[Any] = [Text("steps: " + "; ".join(report.steps)), table]
    parts += [Text(plain(f"{f['check']} {f['layer'] or ''}: {f['message']}"), style="yellow") for f in report.findings]
    summary = f"Exported with {report.exporter}, opset {report.opset}. ONNX Runtime vs PyTorch on {', '.join(report.checked_shapes)}: {report.errors_text()} (tolerance {report.tolerance:g}, {report.tolerance_source})."
    summary += f"\nBound: {report.bound_text()}."
    if report.inputs:
        summary += f"\n{inputs_line(report.inputs)}; outputs: {', '.join(report.outputs)}"
    if report.int8_check is not None:
        parts.append(Text(plain(int8_check_text(report.int8_check))))
    parts.append(Text(summary, style="bold" if report.ok else "bold red"))
    return Group(*parts)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
