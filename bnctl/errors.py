"""The errors a user can see. Each carries a one-line message, a tip, and an exit code.

The CLI prints them as ``error: <message>`` / ``tip: <tip>`` and exits with ``exit_code``;
library callers catch :class:`BnctlError` (or a subclass) like any exception.
"""

from __future__ import annotations


class BnctlError(Exception):
    """A problem the user can fix. ``exit_code`` 2 means bad input (ARCHITECTURE.md, Contracts)."""

    exit_code = 2

    def __init__(self, message: str, tip: str | None = None):
        super().__init__(message)
        self.message = message
        self.tip = tip


class InputError(BnctlError):
    """The file or option given cannot be used: missing, unreadable, unsupported, malformed."""


class UnsafeCheckpointError(InputError):
    """Loading the file would execute code from it, and the user did not pass ``--trust``."""


class ArchError(InputError):
    """``--arch`` / ``--arch-arg`` cannot be resolved, or the checkpoint does not fit it."""


class MissingExtraError(BnctlError):
    """An optional dependency is needed for what was asked (e.g. matplotlib for --plot)."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed",
            f"pip install 'bnctl[{extra}]'",
        )


def one_line(exc: BaseException, *, last: bool = False, limit: int = 300) -> str:
    """One line of ``exc``'s message for the user: the first non-empty one, or the last
    (TorchScript puts the cause last); the exception type's name when it has none."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1 if last else 0] if lines else type(exc).__name__)[:limit]
