"""What ``bnctl inspect`` prints and writes: the rich table, its summary line, CSV, Markdown
and Parquet (its JSON is :func:`bnctl.render.json.to_json`). Functions return text (Parquet is
written atomically); :mod:`.emit` prints and writes them.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from .. import _atomic
from ..core.stats import flag_counts
from ..errors import MissingExtraError
from ..ops.inspect import InspectResult
from .text import markup, plain

TABULAR = ("csv", "parquet", "markdown")
SEVERE = {"nonfinite", "negative_var", "never_updated", "train_mode", "no_running_stats"}


#: output file suffixes and the format each implies
SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".md": "markdown", ".txt": "table"}


def format_from_suffix(path: Path) -> str:
    """The output format an ``--output`` file name implies; an InputError naming the known
    suffixes for any other (``-o x.xlsx`` is never a text table under that name)."""
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        from ..errors import InputError

        raise InputError(f"--output {path}: bnctl does not know what to write for '{path.suffix or 'no extension'}'", f"use one of {', '.join(SUFFIXES)}, or say the format with --format")
    return fmt


def num(value: Any) -> str:
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
    ("layer", lambda r: markup(r["name"]) or "(root)", True),
    ("kind", lambda r: _unknown(r["kind"], markup), True),
    ("C", lambda r: str(r["num_features"]), True),
    ("eps", lambda r: _unknown(r["eps"], "{:g}".format), False),
    ("momentum", lambda r: "cumulative" if r["averaging"] == "cumulative" else _unknown(r["momentum"], "{:g}".format), False),
    ("batches", lambda r: _unknown(r["num_batches_tracked"]), False),
    ("|mean| max", lambda r: num(r["mean_absmax"]), False),
    ("var min", lambda r: num(r["var_min"]), True),
    ("var max", lambda r: num(r["var_max"]), True),
    ("|γ| min", lambda r: num(r["weight_absmin"]), True),
    ("|β| max", lambda r: num(r["bias_absmax"]), False),
    ("flags", lambda r: ", ".join(f"[{'red' if f in SEVERE else 'yellow'}]{f}[/]" for f in r["flags"]), True),
)
#: below this terminal width the table keeps only the columns marked for narrow terminals
WIDE = 130


#: the most rows the table prints: past this a terminal table is no use (csv and json list all)
MAX_TABLE_ROWS = 1000


def _shown_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All rows, or for a very large model the flagged ones, then the first others, in model order."""
    if len(rows) <= MAX_TABLE_ROWS:
        return rows
    flagged = [i for i, r in enumerate(rows) if r["flags"]][:MAX_TABLE_ROWS]
    others = [i for i, r in enumerate(rows) if not r["flags"]][: MAX_TABLE_ROWS - len(flagged)]
    return [rows[i] for i in sorted(flagged + others)]


def inspect_table(result: InspectResult, *, width: int = WIDE, max_details: int = 20):
    """A rich renderable: the layer table, the flag details, the notes and the summary line."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    columns = [c for c in _COLUMNS if width >= WIDE or c[2]]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for title, _, _ in columns:
        table.add_column(title, justify="left" if title in ("layer", "kind", "flags") else "right", no_wrap=title != "flags", overflow="fold")
    shown = _shown_rows(result.rows)
    for row in shown:
        table.add_row(*(value(row) for _, value, _ in columns))
    parts: list[Any] = [table] if result.rows else []
    if len(shown) < len(result.rows):
        parts.append(Text(f"... the table shows {len(shown)} of {len(result.rows)} layers (every flagged one first); --format csv or json lists all", style="dim"))
    hidden = [title for title, _, narrow in _COLUMNS if not narrow and width < WIDE]
    if hidden and result.rows:
        parts.append(Text(f"narrow terminal: {', '.join(hidden)} not shown (a wider terminal, or --format csv, shows them)", style="dim"))
    details = [(row["name"], d) for row in result.rows for d in row["details"]]
    if details:
        parts.append(Text(""))
        for name, detail in details[:max_details]:
            parts.append(Text.assemble(("  " + (plain(name) or "(root)"), "bold"), ": ", plain(detail)))
        if len(details) > max_details:
            parts.append(Text(f"  ... {len(details) - max_details} more (--format json lists all)", style="dim"))
    for note in result.notes:
        parts.append(Text(f"note: {plain(note)}", style="dim"))
    parts.append(Text(""))
    parts.append(Text(plain(summary_line(result)), style="bold"))
    return Group(*parts)


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
    df = _flat_table(result)[["name", "kind", "num_features", "eps", "momentum", "num_batches_tracked", "mean_absmax", "var_min", "var_max", "weight_absmin", "flags"]]
    df = df.astype(object).where(df.notna(), "?")
    return df.to_markdown(index=False, floatfmt=".3g") + f"\n\n{summary_line(result)}\n"


def write_parquet(result: InspectResult, dest: Path) -> None:
    """Write the full table (list columns kept as lists) to ``dest`` atomically."""
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("pyarrow", "parquet", "--format parquet") from exc
    buffer = io.BytesIO()
    result.table().to_parquet(buffer, index=False)
    _atomic.write_bytes(dest, buffer.getvalue())
