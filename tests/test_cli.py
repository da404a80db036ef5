"""The `bnctl inspect` command: every output format, golden JSON, files, errors, lazy imports."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import BROKEN, CHECKPOINTS, GOLDEN, ROOT

UPDATE = os.environ.get("BNCTL_UPDATE_GOLDEN") == "1"
CONTRACT = {"name", "kind", "num_features", "eps", "momentum", "num_batches_tracked", "mean_absmax", "var_min", "var_max", "weight_absmin", "flags"}


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize(
    "path,golden",
    [
        (CHECKPOINTS / "sample.pt", "inspect_sample_pt.json"),
        (CHECKPOINTS / "sample.pt2", "inspect_sample_pt2.json"),
        (BROKEN / "nan_stats.pt", "inspect_nan_stats.json"),
        (BROKEN / "no_running_stats.torchscript.pt", "inspect_no_running_stats.json"),
    ],
)
def test_json_golden(cli, monkeypatch, path, golden):
    monkeypatch.chdir(ROOT)
    result = cli("inspect", _relative(path), "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # strict JSON: NaN would not parse in other languages
    if UPDATE:
        (GOLDEN / golden).write_text(result.stdout)
    assert doc == json.loads((GOLDEN / golden).read_text())
    for layer in doc["layers"]:
        assert CONTRACT <= set(layer)


def test_json_nan_becomes_null_and_is_flagged(cli):
    doc = json.loads(cli("inspect", BROKEN / "nan_stats.pt", "-f", "json").stdout)
    (bad,) = [l for l in doc["layers"] if l["flags"]]
    assert bad["name"] == "layers.2.bn2" and bad["var_max"] is None and bad["flags"] == ["nonfinite"]
    assert doc["summary"] == {"layers": 10, "flagged": 1, "flags": {"nonfinite": 1}}


def test_state_dict_unknowns_are_null(cli):
    doc = json.loads(cli("inspect", CHECKPOINTS / "sample.pt", "-f", "json").stdout)
    assert all(l["eps"] is None and l["momentum"] is None and l["kind"] is None for l in doc["layers"])
    assert all(l["num_batches_tracked"] == 620 for l in doc["layers"])


def test_table(cli):
    result = cli("inspect", BROKEN / "never_updated.pt")
    assert result.exit_code == 0
    assert "layers.1.bn1" in result.stdout and "never_updated" in result.stdout
    assert "10 BatchNorm layers, 2 flagged (never_updated 2)" in result.stdout


def test_csv(cli):
    result = cli("inspect", CHECKPOINTS / "sample.torchscript.pt", "--format", "csv")
    df = pd.read_csv(io.StringIO(result.stdout))
    assert len(df) == 10 and CONTRACT <= set(df.columns)
    assert set(df["kind"]) == {"BatchNorm2d", "BatchNorm1d"}


def test_markdown(cli):
    out = cli("inspect", CHECKPOINTS / "sample.onnx", "--format", "markdown").stdout
    lines = out.splitlines()
    assert lines[0].startswith("| name") and set(lines[1]) <= set("|-: ")
    assert sum(l.startswith("| ") for l in lines) == 11
    assert "10 BatchNorm layers, 0 flagged" in out


def test_parquet_needs_output(cli, tmp_path):
    result = cli("inspect", CHECKPOINTS / "sample.pt", "--format", "parquet")
    assert result.exit_code == 2 and "needs --output" in result.stderr


def test_parquet_keeps_lists(cli, tmp_path):
    out = tmp_path / "layers.parquet"
    result = cli("inspect", BROKEN / "nan_stats.pt", "--output", out)  # format from the extension
    assert result.exit_code == 0, result.stderr
    df = pd.read_parquet(out)
    assert list(df.loc[df["name"] == "layers.2.bn2", "flags"].iloc[0]) == ["nonfinite"]


@pytest.mark.parametrize("suffix,check", [(".json", json.loads), (".csv", lambda t: pd.read_csv(io.StringIO(t))), (".md", str), (".txt", str)])
def test_output_file_by_extension(cli, tmp_path, suffix, check):
    out = tmp_path / f"report{suffix}"
    result = cli("inspect", CHECKPOINTS / "sample.pt", "-o", out)
    assert result.exit_code == 0 and result.stdout == ""
    assert check(out.read_text()) is not None and "stem.1" in out.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plot_writes_a_png(cli, tmp_path):
    png = tmp_path / "bn.png"
    result = cli("inspect", BROKEN / "nan_stats.pt", "--plot", png)
    assert result.exit_code == 0, result.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_rejects_unknown_image_type(cli, tmp_path):
    result = cli("inspect", CHECKPOINTS / "sample.pt", "--plot", tmp_path / "bn.jpeg")
    assert result.exit_code == 2 and result.stderr.startswith("error: --plot")


def test_no_bn_layers_says_so(cli, tmp_path):
    import torch

    path = tmp_path / "mlp.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    result = cli("inspect", path)
    assert result.exit_code == 0 and "no BatchNorm layers found" in result.stdout
    assert json.loads(cli("inspect", path, "-f", "json").stdout)["layers"] == []


def test_key_and_notes(cli):
    result = cli("inspect", CHECKPOINTS / "sample.ckpt", "-f", "json")
    doc = json.loads(result.stdout)
    assert doc["key"] == "state_dict" and doc["layers"][0]["name"] == "model.stem.1"
    assert doc["metadata"]["epoch"] == 9 and doc["metadata"]["global_step"] == 620
    safetensors = json.loads(cli("inspect", CHECKPOINTS / "sample.safetensors", "-f", "json").stdout)
    assert safetensors["metadata"] == {"arch": "bnctl.models:sample_net"}
    assert "note:" in result.stderr


def test_arch_arg_through_cli(cli):
    result = cli("inspect", CHECKPOINTS / "sample.safetensors", "--arch", "bnctl.models:sample_net", "--arch-arg", "widths=(16, 32, 48)", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert {l["kind"] for l in json.loads(result.stdout)["layers"]} == {"BatchNorm1d", "BatchNorm2d"}


# --- bad input: one error line, one tip line, exit 2, no traceback -------------------------


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "missing": (lambda t: t / "missing.pt", [], "no such file"),
    "directory": (lambda t: t, [], "is a directory"),
    "empty": (lambda t: _write(t, "empty.pt", b""), [], "is empty"),
    "not a checkpoint": (lambda t: _write(t, "x.pt", b"hello world, not weights"), [], "not a checkpoint"),
    "truncated zip": (lambda t: _write(t, "cut.pt", (CHECKPOINTS / "sample.pt").read_bytes()[:5000]), [], "corrupted or truncated zip"),
    "pickle needs classes": (lambda t: CHECKPOINTS / "sample.module.pt", [], "--trust"),
    "arch does not import": (lambda t: CHECKPOINTS / "sample.pt", ["--arch", "nowhere.nets:resnet"], "cannot import nowhere.nets"),
    "arch-arg does not parse": (lambda t: CHECKPOINTS / "sample.pt", ["--arch", "bnctl.models:sample_net", "--arch-arg", "1x=3"], "not name=value"),
    "arch-arg the factory rejects": (lambda t: CHECKPOINTS / "sample.pt", ["--arch", "bnctl.models:sample_net", "--arch-arg", "widths=(16,"], "failed with widths='(16,'"),
    "state_dict does not fit": (lambda t: CHECKPOINTS / "sample.pt", ["--arch", "bnctl.models:sample_net", "--arch-arg", "num_classes=10"], "does not fit"),
    "unknown key": (lambda t: CHECKPOINTS / "sample.ckpt", ["--key", "ema"], "not an entry"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(cli, tmp_path, case):
    make_path, args, expected = BAD_INPUTS[case]
    result = cli("inspect", make_path(tmp_path), *args)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("tip: "), result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bnctl", "--debug", "inspect", str(tmp_path / "missing.pt")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "InputError" in proc.stderr


@pytest.mark.parametrize("where", ["after the command", "after its arguments"])
def test_debug_after_the_command_shows_the_traceback(tmp_path, where):
    """The tip of an internal error says "rerun with --debug": the option works wherever it
    is written, as the root option does."""
    missing = str(tmp_path / "missing.pt")
    args = ["inspect", "--debug", missing] if where == "after the command" else ["inspect", missing, "--debug"]
    proc = subprocess.run([sys.executable, "-m", "bnctl", *args], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "InputError" in proc.stderr
    assert "No such option" not in proc.stderr
    plain = subprocess.run([sys.executable, "-m", "bnctl", "inspect", missing], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr


def test_every_command_takes_debug(cli):
    import typer

    from bnctl.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        assert any("--debug" in p.opts for p in command.params), name
    result = cli("inspect", CHECKPOINTS / "sample.pt", "--debug")
    assert result.exit_code == 0, result.output
    assert "BatchNorm layers" in result.stdout
    result = cli("fold", CHECKPOINTS / "sample.pt", "--debug", "-o", CHECKPOINTS / "sample.pt")  # the error itself, raised
    assert result.exit_code != 0 and result.exception is not None and not isinstance(result.exception, SystemExit)
    result = cli("fold", CHECKPOINTS / "sample.pt", "-o", CHECKPOINTS / "sample.pt")  # the same without --debug: error lines
    assert result.exit_code == 2 and result.stderr.startswith("error: ")


def test_unknown_format_is_a_usage_error(cli):
    result = cli("inspect", CHECKPOINTS / "sample.pt", "--format", "xml")
    assert result.exit_code == 2


# --- the command line itself --------------------------------------------------------------


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--help"], "inspect"),
        (["inspect", "--help"], "inspect"),
        (["fold", "--help"], "--tolerance"),
        (["audit", "--help"], "--fail-on"),
        (["audit", "--list"], "BN304"),
        (["convert", "--help"], "groupnorm"),
        (["export", "--help"], "--dynamic-batch"),
        (["recalibrate", "--help"], "--until-stable"),
    ],
)
def test_help_imports_neither_torch_nor_pandas(args, expected):
    code = f"import sys\nfrom bnctl.cli import app\ntry:\n    app({args!r})\nexcept SystemExit:\n    pass\nheavy = [m for m in ('torch', 'pandas', 'numpy') if m in sys.modules]\nassert not heavy, heavy\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout


def test_python_dash_m_and_console_script():
    proc = subprocess.run([sys.executable, "-m", "bnctl", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("bnctl ")
    script = Path(sys.executable).with_name("bnctl")
    proc = subprocess.run([str(script), "inspect", str(CHECKPOINTS / "sample.pt"), "-f", "json"], capture_output=True, text=True)
    assert proc.returncode == 0 and len(json.loads(proc.stdout)["layers"]) == 10


@pytest.mark.parametrize("width", [80, 100, 200])
def test_table_keeps_layer_and_flags_at_any_width(width):
    from rich.console import Console

    from bnctl.ops import inspect as inspection
    from bnctl.render import inspect as render

    result = inspection.inspect(BROKEN / "nan_stats.pt")
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(render.inspect_table(result, width=width))
    line = next(l for l in console.export_text().splitlines() if l.startswith("layers.2.bn2 "))
    assert "nonfinite" in line and len(line.rstrip()) <= width
