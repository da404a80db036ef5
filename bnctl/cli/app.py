"""The Typer app, its root options (``--debug``, ``--version``), and the one error map:
``error:``/``tip:`` lines on stderr. Results are printed by :func:`bnctl.render.emit.emit`.

Commands live one per module (:mod:`bnctl.cli.inspect`, ...) and import torch, pandas and
the library inside their bodies, so ``bnctl --help`` answers at once.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any

import typer

from .. import __version__
from ..errors import BnctlError

app = typer.Typer(
    name="bnctl",
    help="Inspect, audit, recalibrate, fold, convert and export the BatchNorm layers of trained PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}


def fail(message: str, tip: str | None, code: int) -> None:
    """Print ``error: message`` (and ``tip: tip``) on stderr and exit with ``code``."""
    from ..render.text import plain

    typer.echo(f"error: {plain(message)}", err=True)
    if tip:
        typer.echo(f"tip: {plain(tip)}", err=True)
    raise typer.Exit(code)


def handles_errors(command):
    """Turn a :class:`BnctlError` into ``error:``/``tip:`` lines and its exit code.

    Any other exception is an internal error: one line and exit 2, the traceback only
    with ``--debug``.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except BnctlError as exc:
            if _state["debug"]:
                raise
            fail(exc.message, exc.tip, exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", None, 130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence for the user
            if _state["debug"]:
                raise
            fail(f"internal error: {type(exc).__name__}: {exc}", "rerun with --debug and report the traceback", 2)

    return wrapper


def command(**settings: Any):
    """Register a command on the app: its option groups expanded (:func:`.options.grouped`),
    its errors mapped (:func:`handles_errors`), and ``--debug`` accepted after it as before it
    (:func:`takes_debug`). ``settings`` go to ``app.command``."""
    from .options import grouped

    def register(function):
        return app.command(**settings)(takes_debug(handles_errors(grouped(function))))

    return register


_DEBUG_HELP = "Show tracebacks of errors."


def takes_debug(command):
    """``command`` with a ``--debug`` option of its own (``bnctl inspect x.pt --debug``), the
    same as the root one (``bnctl --debug inspect x.pt``): set before anything in the
    command runs, so the errors of its options show their traceback too."""
    signature = inspect.signature(command)
    option = inspect.Parameter(
        "debug_",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option("--debug", metavar="", help=_DEBUG_HELP, show_default=False)],
    )

    @functools.wraps(command)
    def wrapper(*args, debug_: bool = False, **kwargs):
        _state["debug"] = _state["debug"] or debug_
        return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), option])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}  # type: ignore[attr-defined]
    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", metavar="", help=_DEBUG_HELP)] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug
