"""The audit as SARIF 2.1.0, as GitHub code scanning reads it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ... import __version__
from ...core.registry import CHECKS
from ..runner import AuditResult

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_LEVELS = {"error": "error", "warning": "warning", "info": "note"}
HOME = "https://github.com/bnctl/bnctl"


def _uri(path: str) -> str:
    """A repository-relative URI where the file lies under the working directory (what code
    scanning matches against), else the path as given."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def to_sarif(result: AuditResult) -> str:
    """SARIF 2.1.0 with what GitHub code scanning requires: the tool's rules (id, name, help,
    default level) and results with ruleId, level, message and a physical location."""
    codes = sorted(CHECKS)
    index = {code: i for i, code in enumerate(codes)}
    rules = []
    for code in codes:
        c = CHECKS[code]
        rules.append(
            {
                "id": c.code,
                "name": "".join(w.capitalize() for w in c.name.split("-")),
                "shortDescription": {"text": c.summary},
                "fullDescription": {"text": c.why},
                "help": {"text": c.help_text, "markdown": f"**{c.summary}**\n\n{c.why}\n\nExample: `{c.example}`\n\nFix: {c.fix}"},
                "helpUri": f"{HOME}#{c.code.lower()}",
                "defaultConfiguration": {"level": SARIF_LEVELS[c.severity]},
                "properties": {"tags": ["batchnorm", c.group], "precision": "high"},
            }
        )
    results = []
    for f in result.findings:
        location = {"physicalLocation": {"artifactLocation": {"uri": _uri(f.file)}, "region": {"startLine": 1}}}
        if f.layer:
            location["logicalLocations"] = [{"fullyQualifiedName": f.layer, "kind": "member"}]
        fingerprint = hashlib.sha256(f"{_uri(f.file)}|{f.layer}|{f.code}".encode()).hexdigest()[:32]
        results.append(
            {
                "ruleId": f.code,
                "ruleIndex": index[f.code],
                "level": SARIF_LEVELS[f.severity],
                "message": {"text": f"{f.layer}: {f.message}" if f.layer else f.message},
                "locations": [location],
                "partialFingerprints": {"bnctlFinding/v1": fingerprint},
            }
        )
    notifications = [{"level": "error", "message": {"text": f"{fa.path}: {fa.error}"}} for fa in result.errors]
    notifications += [
        {
            "level": "error" if n["explicit"] else "note",
            "message": {"text": f"{n['file']}: {', '.join(n['checks'])} ({n['group']}) did not run: {n['reason']}"},
            "descriptor": {"id": n["checks"][0]},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": _uri(n["file"])}}}],
        }
        for n in result.not_run
    ]
    notifications += [
        {
            "level": "note",
            "message": {"text": f"{n['file']}: {', '.join(n['checks'])} ({n['group']}) does not apply: {n['reason']}"},
            "descriptor": {"id": n["checks"][0]},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": _uri(n["file"])}}}],
        }
        for n in result.not_applicable
        if n["explicit"]
    ]
    run = {
        "tool": {"driver": {"name": "bnctl", "version": __version__, "semanticVersion": __version__, "informationUri": HOME, "rules": rules}},
        "results": results,
        "invocations": [{"executionSuccessful": not result.errors and not any(n["explicit"] for n in result.not_run), "toolExecutionNotifications": notifications}],
    }
    if os.environ.get("GITHUB_WORKSPACE"):
        run["originalUriBaseIds"] = {"%SRCROOT%": {"uri": Path(os.environ["GITHUB_WORKSPACE"]).as_uri() + "/"}}
    return json.dumps({"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}, indent=2) + "\n"
