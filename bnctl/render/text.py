"""Names from files, made safe to print: a layer or tensor name may hold terminal escape
sequences or rich markup. Human-readable output shows them escaped; JSON keeps them exact."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def plain(text: object) -> str:
    """``text`` with control characters written as ``\\xNN`` (nothing reaches the terminal raw)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def markup(text: object) -> str:
    """:func:`plain`, and rich markup escaped, for strings that go into a rich table."""
    from rich.markup import escape

    return escape(plain(text))
