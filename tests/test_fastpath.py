"""The fast path: `bnctl inspect` and `bnctl audit` (no --arch, no check inputs) on torch zip,
safetensors and ONNX files import neither torch nor pandas, and bnctl's own readers give
exactly what torch's readers give."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bnctl.core import layers, stats
from bnctl.io import checkpoint
from bnctl.render.json import dumps
from conftest import BROKEN, CHECKPOINTS

FAST = [CHECKPOINTS / "sample.pt", CHECKPOINTS / "sample.ckpt", CHECKPOINTS / "sample.safetensors", CHECKPOINTS / "sample.onnx", BROKEN / "nan_stats.pt"]


@pytest.mark.parametrize("command", ["inspect", "audit"])
@pytest.mark.parametrize("path", FAST, ids=[p.name for p in FAST])
def test_inspect_and_audit_import_neither_torch_nor_pandas(path, command):
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom bnctl.cli import app\n"
        f"r = CliRunner().invoke(app, [{command!r}, {str(path)!r}])\n"
        "assert r.exit_code in (0, 1), r.stdout + r.stderr\n"
        "print([m for m in ('torch', 'pandas') if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _rows_by_torch(path, key=None) -> str:
    """The rows from torch's own readers: torch.load or safetensors.torch.load_file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        obj = torch.load(path, weights_only=True)
        tensors = obj if key is None else obj[key]
    return dumps(stats.rows([layers.usable(l) for l in layers.from_state_dict(tensors)]))


def _rows_by_bnctl(path, key=None) -> str:
    ckpt = checkpoint.load(path, key=key)
    assert ckpt.reader is not None or path.suffix == ".safetensors"  # bnctl's own reader was used
    return dumps(stats.rows(ckpt.layers()))


def _edge_cases() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = {"bn.weight": torch.rand(6, generator=g), "bn.bias": torch.randn(6, generator=g), "bn.running_mean": torch.randn(6, generator=g), "bn.running_var": torch.rand(6, generator=g) + 0.1, "bn.num_batches_tracked": torch.tensor(12)}
    storage = torch.arange(40, dtype=torch.float32) / 7
    return {
        "float64": {k: v.double() if v.is_floating_point() else v for k, v in base.items()},
        "float16": {k: v.half() if v.is_floating_point() else v for k, v in base.items()},
        "bfloat16": {k: v.bfloat16() if v.is_floating_point() else v for k, v in base.items()},
        "nan_and_negative": {**base, "bn.running_var": torch.tensor([1.0, float("nan"), -2.0, float("inf"), 1e-9, 3.0])},
        "strided_views_of_one_storage": {**base, "bn.running_mean": storage[3:15:2], "bn.running_var": storage[20:26] + 1, "bn.weight": storage[::7][:6]},
        "int_statistics": {**base, "bn.running_var": torch.arange(1, 7)},
        "never_updated_with_counter": {**base, "bn.running_mean": torch.zeros(6), "bn.running_var": torch.ones(6)},
        "many_layers": {f"l{i}.{k.split('.')[1]}": v * (i + 1) for i in range(40) for k, v in base.items()},
    }


@pytest.mark.parametrize("name", ["sample.pt", "sample.ckpt", "sample.safetensors"])
def test_samples_read_the_same_by_bnctl_and_by_torch(name):
    path = CHECKPOINTS / name
    key = "state_dict" if name == "sample.ckpt" else None
    assert _rows_by_bnctl(path, key) == _rows_by_torch(path, key)


@pytest.mark.parametrize("case", list(_edge_cases()))
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_edge_cases_read_the_same_by_bnctl_and_by_torch(tmp_path, case, fmt):
    tensors = _edge_cases()[case]
    path = tmp_path / f"m.{fmt}"
    if fmt == "pt":
        torch.save(tensors, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    ours, theirs = _rows_by_bnctl(path), _rows_by_torch(path)
    assert ours == theirs
    assert json.loads(ours)  # something was read
