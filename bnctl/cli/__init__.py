"""The ``bnctl`` command line: options -> library call -> render. No torch logic here.

:mod:`.app` holds the Typer app and the error map, :mod:`.options` the shared options;
each command is a module of its own, registered on the app when imported below (in the
order ``bnctl --help`` lists them).
"""

from __future__ import annotations

from .app import app

# importing a command module registers its command, in this order
from . import inspect, fold, recalibrate, convert, export, audit, diff, trace  # noqa: E402,F401,I001


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
