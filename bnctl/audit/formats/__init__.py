"""An :class:`~bnctl.audit.runner.AuditResult` as text, JSON, SARIF 2.1.0 or JUnit XML (one
module per format, each a ``to_<format>(result) -> str``), and the checks' documentation
as ``--list`` and ``--explain`` print it."""

from __future__ import annotations

from .json import to_json
from .junit import to_junit
from .sarif import to_sarif
from .docs import explain, list_checks
from .text import summary_line, to_text

RENDERERS = {"text": to_text, "json": to_json, "sarif": to_sarif, "junit": to_junit}
FORMATS = tuple(RENDERERS)

__all__ = ["FORMATS", "RENDERERS", "explain", "list_checks", "summary_line", "to_json", "to_junit", "to_sarif", "to_text"]
