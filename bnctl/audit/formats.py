"""An :class:`~bnctl.audit.runner.AuditResult` as text, JSON, SARIF 2.1.0 or JUnit XML."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from xml.etree import ElementTree as ET

from .. import __version__
from .registry import CHECKS
from .runner import AuditResult

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_LEVELS = {"error": "error", "warning": "warning", "info": "note"}
HOME = "https://github.com/bnctl/bnctl"


def summary_line(result: AuditResult) -> str:
    """``Found 3 findings (2 errors, 1 warning) in 20 BatchNorm layers of 2 files.``"""
    counts = result.summary()
    n = len(result.findings)
    parts = [f"{counts['error']} error{'s' * (counts['error'] != 1)}", f"{counts['warning']} warning{'s' * (counts['warning'] != 1)}"]
    if counts["info"]:
        parts.append(f"{counts['info']} info")
    files = len(result.files)
    text = f"Found {n} finding{'s' * (n != 1)} ({', '.join(parts)}) in {result.layers} BatchNorm layers of {files} file{'s' * (files != 1)}."
    if result.errors:
        text += f" {len(result.errors)} file{'s' * (len(result.errors) != 1)} could not be read."
    return text


def to_text(result: AuditResult) -> str:
    """One line per finding (file, layer, code, message), unreadable files, notes, the summary."""
    lines = []
    for f in result.findings:
        where = f"{f.file}:{f.layer}" if f.layer else f.file
        lines.append(f"{where}: {f.code} [{f.severity}] {f.message}")
    for fa in result.errors:
        lines.append(f"{fa.path}: error: {fa.error}")
    for fa in result.files:
        lines += [f"{fa.path}: note: {n}" for n in fa.notes]
    lines.append(summary_line(result))
    return "\n".join(lines) + "\n"


def to_json(result: AuditResult) -> str:
    return json.dumps(result.to_dict(), indent=2) + "\n"


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
        rules.append({
            "id": c.code,
            "name": "".join(w.capitalize() for w in c.name.split("-")),
            "shortDescription": {"text": c.summary},
            "fullDescription": {"text": c.why},
            "help": {"text": c.help_text, "markdown": f"**{c.summary}**\n\n{c.why}\n\nExample: `{c.example}`\n\nFix: {c.fix}"},
            "helpUri": f"{HOME}#{c.code.lower()}",
            "defaultConfiguration": {"level": SARIF_LEVELS[c.severity]},
            "properties": {"tags": ["batchnorm", c.group], "precision": "high"},
        })
    results = []
    for f in result.findings:
        location = {"physicalLocation": {"artifactLocation": {"uri": _uri(f.file)}, "region": {"startLine": 1}}}
        if f.layer:
            location["logicalLocations"] = [{"fullyQualifiedName": f.layer, "kind": "member"}]
        fingerprint = hashlib.sha256(f"{_uri(f.file)}|{f.layer}|{f.code}".encode()).hexdigest()[:32]
        results.append({
            "ruleId": f.code,
            "ruleIndex": index[f.code],
            "level": SARIF_LEVELS[f.severity],
            "message": {"text": f"{f.layer}: {f.message}" if f.layer else f.message},
            "locations": [location],
            "partialFingerprints": {"bnctlFinding/v1": fingerprint},
        })
    notifications = [{"level": "error", "message": {"text": f"{fa.path}: {fa.error}"}} for fa in result.errors]
    run = {
        "tool": {"driver": {"name": "bnctl", "version": __version__, "semanticVersion": __version__, "informationUri": HOME, "rules": rules}},
        "results": results,
        "invocations": [{"executionSuccessful": not result.errors, "toolExecutionNotifications": notifications}],
    }
    if os.environ.get("GITHUB_WORKSPACE"):
        run["originalUriBaseIds"] = {"%SRCROOT%": {"uri": Path(os.environ["GITHUB_WORKSPACE"]).as_uri() + "/"}}
    return json.dumps({"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}, indent=2) + "\n"


def to_junit(result: AuditResult) -> str:
    """JUnit XML: one test suite per file; a test case per finding (a failure at or above
    fail-on, skipped-as-passed below it) and one passing case per clean file."""
    from .registry import SEVERITIES

    threshold = SEVERITIES.index(result.config.fail_on)
    root = ET.Element("testsuites", name="bnctl audit")
    total = failures = errors = 0
    for fa in result.files:
        suite = ET.SubElement(root, "testsuite", name=fa.path)
        cases = fails = 0
        if fa.error is not None:
            case = ET.SubElement(suite, "testcase", classname=fa.path, name="read")
            ET.SubElement(case, "error", message=fa.error, type="unreadable")
            suite.set("errors", "1")
            errors += 1
            cases += 1
        for f in fa.findings:
            case = ET.SubElement(suite, "testcase", classname=fa.path, name=f"{f.code} {f.name} {f.layer or ''}".strip())
            if SEVERITIES.index(f.severity) <= threshold:
                failure = ET.SubElement(case, "failure", message=f.message, type=f.severity)
                failure.text = CHECKS[f.code].help_text
                fails += 1
            else:
                ET.SubElement(case, "system-out").text = f"[{f.severity}] {f.message}"
            cases += 1
        if fa.error is None and not fails:
            ET.SubElement(suite, "testcase", classname=fa.path, name=f"audit ({fa.layers} BatchNorm layers)")
            cases += 1
        suite.set("tests", str(cases))
        suite.set("failures", str(fails))
        suite.set("errors", suite.get("errors", "0"))
        total, failures = total + cases, failures + fails
    if not result.files:
        ET.SubElement(ET.SubElement(root, "testsuite", name="bnctl audit", tests="1", failures="0", errors="0"), "testcase", name="audit")
        total = 1
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


RENDERERS = {"text": to_text, "json": to_json, "sarif": to_sarif, "junit": to_junit}
