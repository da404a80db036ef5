"""``bnctl inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.registry import FLAGS
from ..io.source import ModelSource
from ..render.emit import check, emit, formats
from ..render.text import plain
from .app import command
from .options import MODEL, PathArg, choices

InspectFormat = choices("InspectFormat", formats("InspectResult"))


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
    from .._atomic import refuse_overwrite
    from ..ops.inspect import inspect as run_inspect
    from ..render.inspect import format_from_suffix

    refuse_overwrite(path, output)
    refuse_overwrite(path, plot)
    chosen = fmt.value if fmt else (format_from_suffix(output) if output else "table")
    check("InspectResult", chosen, output)
    result = run_inspect(source.at(path))
    for note in result.notes if chosen != "table" else ():
        typer.echo(f"note: {plain(note)}", err=True)
    emit(result, chosen, output)
    if plot is not None:
        from ..render.plot import plot as draw

        draw(result, plot)
        typer.echo(f"wrote {plot}", err=True)
