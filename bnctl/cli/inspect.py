"""``bnctl inspect``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.registry import FLAGS
from ..errors import InputError
from ..io.source import ModelSource
from ..render import INSPECT_FORMATS
from ..render.text import plain
from .app import command, console, emit_text
from .options import MODEL, PathArg, choices

InspectFormat = choices("InspectFormat", INSPECT_FORMATS)


@command(epilog="Flags: " + "; ".join(f"[bold]{k}[/bold]: {v}" for k, v in FLAGS.items()))
def inspect(
    path: PathArg,
    source: ModelSource = MODEL,
    fmt: Annotated[
        Optional[InspectFormat],
        typer.Option("--format", "-f", help="Output format. Default: table, or what --output's extension says.", show_default=False),
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the output to this file (atomically) instead of stdout.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw running_var and |gamma| per layer to this PNG (needs matplotlib: pip install 'bnctl\\[plot]').")] = None,
) -> None:
    """Show each BatchNorm layer's statistics and affine parameters, and flag what is unhealthy."""
    from ..ops.inspect import inspect as run_inspect
    from ..render import inspect as render

    from .._atomic import refuse_overwrite

    refuse_overwrite(path, output)
    refuse_overwrite(path, plot)
    chosen = fmt.value if fmt else (render.format_from_suffix(output) if output else "table")
    if chosen == "parquet" and output is None:
        raise InputError("--format parquet writes a binary file and needs --output", "add --output layers.parquet")
    result = run_inspect(source.at(path))
    for note in result.notes if chosen != "table" else ():
        typer.echo(f"note: {plain(note)}", err=True)
    if chosen == "table":
        if output is None:
            # piped output keeps whole lines; a terminal gets the table fitted to its width
            out = console(piped_width=250)
            out.print(render.inspect_table(result, width=out.width))
        else:
            from rich.console import Console

            recorder = Console(record=True, file=io.StringIO(), width=200)
            recorder.print(render.inspect_table(result, width=recorder.width))
            emit_text(recorder.export_text(), output)
    elif chosen == "json":
        emit_text(render.to_json(result), output)
    elif chosen == "csv":
        emit_text(render.to_csv(result), output)
    elif chosen == "markdown":
        emit_text(render.to_markdown(result), output)
    else:
        render.write_parquet(result, output)
        typer.echo(f"wrote {output}", err=True)
    if plot is not None:
        from ..render.plot import plot as draw

        draw(result, plot)
        typer.echo(f"wrote {plot}", err=True)
