"""Seeded damage to every sample format (truncations, bit flips, zeroed ranges, flipped bytes
inside zip members with their CRC kept, dropped and duplicated members): every case is a clean
result or one error, never a traceback, an internal error or a wrong value. The same cases as
``python benchmarks/fuzz_readers.py --cases 2000``, fewer of them."""

from __future__ import annotations

import sys
import warnings

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import fuzz_readers  # noqa: E402

CASES = 400


@pytest.fixture(scope="module")
def reference():
    from typer.testing import CliRunner

    from bnctl.cli import app

    runner = CliRunner()

    def cli(*argv):
        return runner.invoke(app, list(argv))

    return cli, fuzz_readers.references(cli)


@pytest.mark.parametrize("block", range(4))
def test_damaged_samples_are_clean_errors_or_right_answers(reference, tmp_path, block):
    cli, ref = reference
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns while the mutator writes duplicate members
        for seed in range(block * CASES // 4, (block + 1) * CASES // 4):
            outcome, detail = fuzz_readers.run_case(cli, seed, tmp_path, ref)
            if detail:
                failures.append(detail)
    assert not failures, "\n".join(failures[:10])
