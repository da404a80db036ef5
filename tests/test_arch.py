"""--arch / --arch-arg: building the user's module and loading a state_dict into it strictly."""

from __future__ import annotations

import pytest
import torch

from bnctl.io import arch
from bnctl.io.source import ModelSource
from bnctl.ops import inspect as inspection
from bnctl.errors import ArchError
from conftest import CHECKPOINTS


def test_module_spec_with_literal_args():
    model = arch.build("bnctl.models:sample_net", arch.parse_arch_args(["widths=(8, 16)", "num_classes=3", "hidden=4"]))
    assert model.head[-1].out_features == 3
    assert [b.conv1.out_channels for b in model.layers] == [8, 16]


def test_file_spec(tmp_path):
    (tmp_path / "helper.py").write_text("WIDTH = 5\n")
    (tmp_path / "net.py").write_text("import torch.nn as nn\nfrom helper import WIDTH\ndef make(width=WIDTH):\n    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width))\n")
    model = arch.build(f"{tmp_path / 'net.py'}:make", {"width": 7})
    assert model[1].num_features == 7


@pytest.mark.parametrize(
    "items,match",
    [
        (["widths"], "not name=value"),
        (["1x=3"], "not name=value"),
    ],
)
def test_bad_arch_args(items, match):
    with pytest.raises(ArchError, match=match):
        arch.parse_arch_args(items)


def test_arch_arg_values_are_literals_not_code(tmp_path):
    marker = tmp_path / "ran"
    code = f"__import__('os').system('touch {marker}')"
    assert arch.parse_arch_args([f"x={code}"]) == {"x": code}  # a string, never run
    assert not marker.exists()


def test_arch_arg_values_that_are_not_literals_are_strings():
    parsed = arch.parse_arch_args(["variant=small", "n=3", "flag=True", "shape=(1, 2)", "quoted='x'", "w=(1,"])
    assert parsed == {"variant": "small", "n": 3, "flag": True, "shape": (1, 2), "quoted": "x", "w": "(1,"}


@pytest.mark.parametrize(
    "spec,match",
    [
        ("no_such_package.models:net", "cannot import no_such_package.models"),
        ("bnctl.models:nope", "has no attribute 'nope'"),
        ("bnctl.models", "not module:factory"),
        ("missing/file.py:net", "is not a file"),
        ("bnctl.models:__doc__", "not callable"),
    ],
)
def test_bad_arch_specs(spec, match):
    with pytest.raises(ArchError, match=match):
        arch.build(spec)


def test_arch_file_that_raises(tmp_path):
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ArchError, match="boom"):
        arch.build(f"{tmp_path / 'bad.py'}:net")


def test_factory_that_returns_something_else(tmp_path):
    (tmp_path / "f.py").write_text("def net():\n    return 3\n")
    with pytest.raises(ArchError, match="not an nn.Module"):
        arch.build(f"{tmp_path / 'f.py'}:net")


def test_mismatch_lists_missing_and_unexpected_keys(reference):
    tensors = dict(reference)
    tensors["extra.weight"] = torch.zeros(1)
    del tensors["stem.1.running_var"]
    with pytest.raises(ArchError) as info:
        arch.load_state_dict(arch.build("bnctl.models:sample_net"), tensors)
    assert "1 missing (stem.1.running_var)" in info.value.message
    assert "1 unexpected (extra.weight)" in info.value.message


def test_shape_mismatch_names_the_tensor(reference):
    with pytest.raises(ArchError, match=r"layers.2.conv1.weight is \[48, 32, 3, 3\] in the checkpoint, \[64, 32, 3, 3\]"):
        arch.load_state_dict(arch.build("bnctl.models:sample_net", {"widths": (16, 32, 64)}), reference)


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod.", "model.module."])
def test_wrapper_prefixes_are_stripped(reference, prefix):
    model = arch.load_state_dict(arch.build("bnctl.models:sample_net"), {prefix + k: v for k, v in reference.items()})
    torch.testing.assert_close(model.stem[1].running_var, reference["stem.1.running_var"])


def test_prefix_kept_when_the_module_really_has_it():
    net = torch.nn.Module()
    net.model = torch.nn.BatchNorm1d(3)
    state = {f"model.{k}": v for k, v in torch.nn.BatchNorm1d(3).state_dict().items()}
    arch.load_state_dict(net, state)  # would fail if "model." were stripped


def test_inspect_with_arch_knows_kind_eps_momentum_but_not_mode():
    result = inspection.inspect(ModelSource(CHECKPOINTS / "sample.ckpt", arch="bnctl.models:sample_net"))
    kinds = {r["name"]: r["kind"] for r in result.rows}
    assert kinds["head.2"] == "BatchNorm1d" and kinds["stem.1"] == "BatchNorm2d"
    assert all(r["eps"] == 1e-5 and r["momentum"] == 0.1 and r["training"] is None for r in result.rows)
