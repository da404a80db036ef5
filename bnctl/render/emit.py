"""How every command prints or writes what it returns: a table, per result kind, of the
formats that kind is written in, and :func:`emit`, which renders a result in one of them and
writes it to stdout or, atomically, to a file.

A result kind is the class name of a result (``InspectResult``, ``FoldReport``, ...). The
kinds of ops/ are in :data:`KINDS` below, their renderers named ``"module:function"`` in
bnctl.render and imported when first used, so that ``bnctl --help``, which offers the
formats, loads neither numpy nor pandas. The stages above render/ register their own kinds
with :func:`register` (the audit's and ``--fix``'s, from :mod:`bnctl.audit.formats`).
To add a format: a renderer in the result kind's render module, one entry in its table.
"""

from __future__ import annotations

import importlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import _atomic
from ..errors import InputError

#: the width of a rich table written to a file (a terminal's own width is used on a terminal)
FILE_WIDTH = 200


@dataclass(frozen=True)
class Format:
    """One format of one result kind.

    ``render`` is a function, or ``"module:function"`` in bnctl.render; it is called as
    ``render(result, **options)`` with those of emit's options this format names in
    ``options`` (``width``: the console's width, given by emit). What it returns depends on
    ``output``: ``"text"`` a string, ``"rich"`` a rich renderable (printed on the console,
    or as plain text ``FILE_WIDTH`` columns wide to a file), ``"binary"``: nothing, it is
    called as ``render(result, path)`` and writes the file itself (so it needs one).
    ``piped_width`` is the console's width for a rich renderable when stdout is no terminal.
    """

    render: str | Callable[..., Any]
    output: str = "text"
    options: tuple[str, ...] = ()
    piped_width: int = 160

    def function(self) -> Callable[..., Any]:
        """The renderer, its module imported if it was named."""
        if callable(self.render):
            return self.render
        module, _, name = self.render.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)


JSON = Format("json:to_json")


def _report(table: str) -> dict[str, Format]:
    """The formats of a write command's report: its rich table, or its JSON document."""
    return {"table": Format(table, "rich"), "json": JSON}


#: result kind -> format name -> how it is written, in the order ``--help`` lists them
KINDS: dict[str, dict[str, Format]] = {
    "InspectResult": {
        "table": Format("inspect:inspect_table", "rich", options=("width",), piped_width=250),
        "json": JSON,
        "csv": Format("inspect:to_csv"),
        "parquet": Format("inspect:write_parquet", "binary"),
        "markdown": Format("inspect:to_markdown"),
    },
    "DiffResult": {"table": Format("diff:table", "rich"), "json": JSON, "csv": Format("diff:to_csv"), "markdown": Format("diff:to_markdown")},
    "FoldReport": _report("reports:fold_table"),
    "RecalibrationReport": _report("reports:recalibration_table"),
    "ConvertReport": _report("reports:convert_table"),
    "ExportReport": _report("reports:export_table"),
}


def register(kind: str, formats: dict[str, Format]) -> tuple[str, ...]:
    """Add a result kind from a stage above render/; returns its format names."""
    KINDS[kind] = formats
    return tuple(formats)


def formats(kind: str) -> tuple[str, ...]:
    """The names of the formats ``kind`` is written in (the choices of ``--format``)."""
    return tuple(KINDS[kind])


def _format(kind: str, name: str) -> Format:
    table = KINDS.get(kind)
    if table is None or name not in table:
        raise LookupError(f"no format '{name}' for a {kind} (formats: {', '.join(table or ()) or 'none registered'})")
    return table[name]


def check(kind: str, name: str, output: Path | None) -> None:
    """Raise the InputError :func:`emit` would raise for these arguments, before the work
    that makes the result: a binary format needs a file."""
    if _format(kind, name).output == "binary" and output is None:
        raise InputError(f"--format {name} writes a binary file and needs --output", f"add --output layers.{name}")


def console(piped_width: int = 160) -> Any:
    """A rich Console on stdout: the terminal's width, or ``piped_width`` when piped."""
    from rich.console import Console

    tty = sys.stdout.isatty()
    return Console(width=None if tty else piped_width, soft_wrap=not tty)  # piped: whole lines, never hard-wrapped


def emit(result: Any, name: str, output: Path | None = None, **options: Any) -> None:
    """Write ``result`` in format ``name`` of its kind: to stdout, or atomically to
    ``output`` followed by ``wrote OUTPUT`` on stderr. ``options`` go to the renderer where
    its format names them (``verbose`` for the audit's text, ...), and are ignored otherwise."""
    kind = type(result).__name__
    fmt = _format(kind, name)
    check(kind, name, output)
    render = fmt.function()

    def rendered(width: int) -> Any:
        given = {**options, "width": width}
        return render(result, **{k: v for k, v in given.items() if k in fmt.options})

    if fmt.output == "rich" and output is None:
        out = console(fmt.piped_width)
        out.print(rendered(out.width))
        return
    if fmt.output == "binary":
        render(result, output)
    else:
        text = _plain_text(rendered(FILE_WIDTH)) if fmt.output == "rich" else rendered(FILE_WIDTH)
        if output is None:
            sys.stdout.write(text)
            sys.stdout.flush()  # before any later line on stderr, as rich's console and typer.echo do
            return
        _atomic.write_text(output, text)
    sys.stderr.write(f"wrote {output}\n")


def _plain_text(renderable: Any) -> str:
    """A rich renderable as plain text, ``FILE_WIDTH`` columns wide."""
    from rich.console import Console

    recorder = Console(record=True, file=io.StringIO(), width=FILE_WIDTH)
    recorder.print(renderable)
    return recorder.export_text()
