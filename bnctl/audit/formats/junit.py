"""The audit as JUnit XML, for CI servers that show test reports."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from ...core.registry import CHECKS, SEVERITIES
from ..runner import AuditResult


def to_junit(result: AuditResult) -> str:
    """JUnit XML: one test suite per file; a test case per finding (a failure at or above
    fail-on, skipped-as-passed below it) and one passing case per clean file."""
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
        for n in fa.not_run:  # a check selected by name that could not run is never a silent pass
            if n["explicit"]:
                case = ET.SubElement(suite, "testcase", classname=fa.path, name=f"{', '.join(n['checks'])} ({n['group']})")
                ET.SubElement(case, "error", message=f"did not run: {n['reason']}", type="not-run")
                suite.set("errors", str(int(suite.get("errors", "0")) + 1))
                errors += 1
                cases += 1
        for n in fa.not_applicable:  # a check selected by name that does not apply: skipped, not failed
            if n["explicit"]:
                case = ET.SubElement(suite, "testcase", classname=fa.path, name=f"{', '.join(n['checks'])} ({n['group']})")
                ET.SubElement(case, "skipped", message=f"does not apply: {n['reason']}")
                suite.set("skipped", str(int(suite.get("skipped", "0")) + 1))
                cases += 1
        implicit = [n for n in fa.not_run if not n["explicit"]]
        if implicit:
            ET.SubElement(suite, "system-out").text = "\n".join(f"{n['group']} checks did not run: {n['reason']}" for n in implicit)
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
