"""An :class:`~bnctl.audit.runner.AuditResult` as text, JSON, SARIF 2.1.0 or JUnit XML (one
module per format, each a ``to_<format>(result) -> str``; the JSON is
:func:`bnctl.render.json.to_json`), the report of ``--fix``, and the checks' documentation as
``--list`` and ``--explain`` print it.

Importing this package registers the audit's formats and ``--fix``'s in the table of
:mod:`bnctl.render.emit` (render/ may not import audit/), so :func:`bnctl.render.emit.emit`
writes an audit result (``bnctl audit``, ``bnctl trace``) like any other.
"""

from __future__ import annotations

from ...render.emit import Format, register
from ...render.json import to_json
from .docs import explain, list_checks
from .junit import to_junit
from .sarif import to_sarif
from .text import fix_text, summary_line, text, to_text

#: the formats of ``bnctl audit`` and ``bnctl trace``
FORMATS = register("AuditResult", {"text": Format(text, options=("verbose", "quiet", "statistics")), "json": Format(to_json), "sarif": Format(to_sarif), "junit": Format(to_junit)})
register("FixReport", {"text": Format(fix_text, options=("diff",))})

__all__ = ["FORMATS", "explain", "fix_text", "list_checks", "summary_line", "text", "to_json", "to_junit", "to_sarif", "to_text"]
