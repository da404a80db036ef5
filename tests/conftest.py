"""Shared fixtures: paths to samples/, a CLI runner, and the reference state_dict."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
CHECKPOINTS = SAMPLES / "checkpoints"
BROKEN = SAMPLES / "broken"
GOLDEN = Path(__file__).resolve().parent / "golden"

warnings.filterwarnings("ignore")


def module_from(folder: Path, filename: str, source: str, name: str):
    """``source`` written to ``folder / filename`` and imported as module ``name`` (not put in
    ``sys.modules``: bnctl's own ``--arch`` import of the same file stays independent)."""
    import importlib.util

    path = folder / filename
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    """The sample model's state_dict, read with plain torch.load (the independent reader)."""
    return torch.load(CHECKPOINTS / "sample.pt", weights_only=True)


@pytest.fixture
def cli():
    """Run ``bnctl ARGS...`` in-process; returns the click Result (exit_code, stdout, stderr)."""
    from bnctl.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return run
