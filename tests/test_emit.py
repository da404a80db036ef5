"""bnctl.render.emit: every result kind in every format it lists, to stdout and to a file, each
read back (JSON, CSV, Parquet, SARIF, JUnit) or compared with its renderer; and the commands'
``--format`` choices are the table's."""

from __future__ import annotations

import importlib
import io
import json
import xml.etree.ElementTree as ET

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from bnctl.errors import InputError
from bnctl.io.source import CheckInputs, ModelSource
from bnctl.render.emit import FILE_WIDTH, KINDS, emit, formats
from bnctl.render.json import clean, dumps
from conftest import BROKEN, CHECKPOINTS, SAMPLES

import bnctl.audit.formats  # noqa: F401 - registers the audit's kinds

ARCH = "bnctl.models:sample_net"

#: every result kind a command prints: where its class lives
RESULT_CLASSES = {
    "InspectResult": "bnctl.ops.inspect",
    "DiffResult": "bnctl.ops.diff",
    "FoldReport": "bnctl.ops.fold",
    "RecalibrationReport": "bnctl.ops.recalibrate",
    "ConvertReport": "bnctl.ops.convert",
    "ExportReport": "bnctl.ops.export",
    "AuditResult": "bnctl.audit.runner",
    "FixReport": "bnctl.jobs.fix",
}

#: command -> the result kind whose formats its --format offers
COMMANDS = {
    "inspect": "InspectResult",
    "diff": "DiffResult",
    "fold": "FoldReport",
    "recalibrate": "RecalibrationReport",
    "convert": "ConvertReport",
    "export": "ExportReport",
    "audit": "AuditResult",
    "trace": "AuditResult",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One result of every kind, made as the commands make them."""
    from bnctl.audit.runner import audit
    from bnctl.jobs.convert import convert_file
    from bnctl.jobs.export import export_file
    from bnctl.jobs.fix import FixReport
    from bnctl.jobs.fold import fold_file
    from bnctl.jobs.recalibrate import recalibrate_file
    from bnctl.ops.diff import diff
    from bnctl.ops.inspect import inspect

    out = tmp_path_factory.mktemp("emit")
    model = ModelSource(CHECKPOINTS / "sample.pt", ARCH)
    audited = audit([BROKEN])
    return {
        "InspectResult": inspect(BROKEN / "nan_stats.pt"),
        "DiffResult": diff(CHECKPOINTS / "sample.pt", BROKEN / "nan_stats.pt"),
        "FoldReport": fold_file(ModelSource(CHECKPOINTS / "sample.onnx"), out / "f.onnx"),
        "RecalibrationReport": recalibrate_file(model, out / "r.pt", inputs=CheckInputs(data=SAMPLES / "data"), batch_size=64),
        "ConvertReport": convert_file(model, out / "c.pt", "frozen"),
        "ExportReport": export_file(model, out / "e.onnx", inputs=CheckInputs(shapes=((1, 3, 32, 32),))),
        "AuditResult": audited,
        "FixReport": FixReport(before=audited),
    }


def _emitted(capsys, result, fmt, output=None, **options) -> tuple[str, str]:
    capsys.readouterr()
    emit(result, fmt, output, **options)
    captured = capsys.readouterr()
    return captured.out, captured.err


PAIRS = [(kind, fmt) for kind in RESULT_CLASSES for fmt in KINDS[kind]]


def test_the_table_has_every_result_class_by_its_name_and_every_renderer_exists():
    assert set(KINDS) == set(RESULT_CLASSES)
    for kind, module in RESULT_CLASSES.items():
        assert getattr(importlib.import_module(module), kind).__name__ == kind
        for fmt in KINDS[kind].values():
            assert callable(fmt.function())


@pytest.mark.parametrize("command,kind", COMMANDS.items())
def test_each_command_offers_the_formats_of_its_result_kind(command, kind):
    from bnctl.cli import app

    runner = CliRunner()
    assert f"<{'|'.join(formats(kind))}>" in runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"}).stdout
    assert runner.invoke(app, [command, "x.pt", "-f", "nosuchformat"]).exit_code == 2


@pytest.mark.parametrize("kind,fmt", PAIRS)
def test_a_file_gets_what_stdout_gets_and_the_wrote_line(results, capsys, tmp_path, kind, fmt):
    result, path = results[kind], tmp_path / f"out.{fmt}"
    out, err = _emitted(capsys, result, fmt, path)
    assert (out, err) == ("", f"wrote {path}\n") and path.stat().st_size > 0
    if KINDS[kind][fmt].output == "text":
        assert _emitted(capsys, result, fmt)[0] == path.read_text()


@pytest.mark.parametrize("kind", [k for k in RESULT_CLASSES if "json" in KINDS[k]])
def test_json_reads_back_as_the_result_document(results, capsys, kind):
    out, err = _emitted(capsys, results[kind], "json")
    assert err == "" and json.loads(out) == json.loads(json.dumps(clean(results[kind].to_dict())))
    assert out == dumps(results[kind].to_dict())


@pytest.mark.parametrize("kind", [k for k in RESULT_CLASSES if KINDS[k].get("table") is not None])
def test_a_rich_table_is_its_renderer_printed(results, capsys, tmp_path, kind):
    fmt = KINDS[kind]["table"]

    def printed(width: int, soft_wrap: bool) -> str:
        recorder = Console(record=True, file=io.StringIO(), width=width, soft_wrap=soft_wrap)
        recorder.print(fmt.function()(results[kind], **({"width": width} if "width" in fmt.options else {})))
        return recorder.export_text()

    emit(results[kind], "table", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == printed(FILE_WIDTH, False)
    assert _emitted(capsys, results[kind], "table")[0] == printed(fmt.piped_width, True)  # piped: whole lines


def test_inspect_csv_markdown_and_parquet(results, capsys, tmp_path):
    from bnctl.render.inspect import summary_line

    result = results["InspectResult"]
    names = [r["name"] for r in result.rows]
    assert pd.read_csv(io.StringIO(_emitted(capsys, result, "csv")[0]))["name"].tolist() == names
    markdown = _emitted(capsys, result, "markdown")[0]
    assert markdown.endswith(f"\n\n{summary_line(result)}\n") and all(f"| {n} " in markdown for n in names)
    emit(result, "parquet", tmp_path / "l.parquet")
    table = pd.read_parquet(tmp_path / "l.parquet")
    assert table["name"].tolist() == names and list(table.loc[names.index("layers.2.bn2"), "flags"]) == result.rows[names.index("layers.2.bn2")]["flags"]
    with pytest.raises(InputError, match="--format parquet writes a binary file and needs --output"):
        emit(result, "parquet")


def test_diff_csv_and_markdown(results, capsys):
    result = results["DiffResult"]
    layers = [l.name for s in result.steps for l in s.layers]
    assert pd.read_csv(io.StringIO(_emitted(capsys, result, "csv")[0]))["name"].tolist() == layers
    rows = [line for line in _emitted(capsys, result, "markdown")[0].splitlines() if line.startswith("|")]
    assert len(rows) == len(layers) + 2  # header, rule, one per layer


def test_audit_text_options_reach_the_text_and_no_other_format(results, capsys):
    from bnctl.audit.formats.text import counts, to_text

    result = results["AuditResult"]
    assert _emitted(capsys, result, "text")[0] == to_text(result)
    assert _emitted(capsys, result, "text", verbose=True)[0] == to_text(result, verbose=True) != to_text(result)
    assert _emitted(capsys, result, "text", quiet=True)[0] == to_text(result, quiet=True)
    assert _emitted(capsys, result, "text", statistics=True)[0] == counts(result)
    assert _emitted(capsys, result, "json", verbose=True)[0] == _emitted(capsys, result, "json")[0]


def test_audit_sarif_and_junit_read_back(results, capsys):
    result = results["AuditResult"]
    sarif = json.loads(_emitted(capsys, result, "sarif")[0])
    assert sarif["version"] == "2.1.0" and len(sarif["runs"][0]["results"]) == len(result.findings)
    junit = ET.fromstring(_emitted(capsys, result, "junit")[0].split("\n", 1)[1])
    assert junit.tag == "testsuites" and len(junit.findall("testsuite")) == len(result.files)
    assert int(junit.get("failures")) == sum(1 for f in result.findings if f.severity == "error")


def test_fix_report_text(results, capsys):
    from bnctl.audit.fixes import Repairs
    from bnctl.jobs.fix import FixReport

    before = results["AuditResult"]
    assert _emitted(capsys, results["FixReport"], "text")[0].startswith("nothing to fix (findings of BN101, BN104, BN201, BN203 are not fixable here)\n")
    report = FixReport(before=before, repairs=Repairs(fixed=[("BN201", "stem.1", "train mode -> eval mode")], unfixed=[("BN101", "layers.2.bn2", "not real")]), max_abs_error=0.0)
    lines = ["would fix: BN201 stem.1: train mode -> eval mode", "not fixed: BN101 layers.2.bn2: not real", "eval-mode outputs, repaired against original on the check inputs: max abs error 0"]
    assert _emitted(capsys, report, "text", diff=True)[0] == "\n".join(lines) + "\n"
    assert _emitted(capsys, report, "text")[0].startswith("fixed: BN201 stem.1")


def test_an_unknown_kind_or_format_is_a_clear_error(results):
    with pytest.raises(LookupError, match="no format 'xml' for a InspectResult"):
        emit(results["InspectResult"], "xml")
    with pytest.raises(LookupError, match="for a dict"):
        emit({}, "json")
