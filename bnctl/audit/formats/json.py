"""The audit as JSON (the contract in ARCHITECTURE.md)."""

from __future__ import annotations

from ...render.json import dumps
from ..runner import AuditResult


def to_json(result: AuditResult) -> str:
    return dumps(result.to_dict())
