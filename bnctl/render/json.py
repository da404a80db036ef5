"""The one JSON writer: strict JSON (NaN and Inf become null), two-space indent, a final newline."""

from __future__ import annotations

import json
import math
from typing import Any


def clean(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def dumps(document: Any) -> str:
    """``document`` as JSON text that any JSON parser reads."""
    return json.dumps(clean(document), indent=2, allow_nan=False) + "\n"


def to_json(result: Any) -> str:
    """A result's JSON document (its ``to_dict()``): the contracts in ARCHITECTURE.md."""
    return dumps(result.to_dict())
