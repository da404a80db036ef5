"""What a new user types: string --arch-arg values, an output name bnctl cannot write, a
conversion with nothing to convert, --device cuda without CUDA, piped output, short reprs."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

import bnctl
from conftest import BROKEN, CHECKPOINTS, SAMPLES

ARCH = ("--arch", "bnctl.models:sample_net")


def test_an_output_name_with_an_unknown_extension_is_an_error(cli, tmp_path):
    for name in ("layers.xlsx", "layers.tsv"):
        result = cli("inspect", CHECKPOINTS / "sample.pt", "-o", tmp_path / name)
        assert result.exit_code == 2 and "does not know what to write" in result.stderr and ".csv" in result.stderr
        assert not (tmp_path / name).exists()
    assert cli("inspect", CHECKPOINTS / "sample.pt", "-o", tmp_path / "layers.tsv", "--format", "csv").exit_code == 0


def test_converting_a_model_without_batchnorm_says_so(cli, tmp_path):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path / "plain.pt")
    result = cli("convert", tmp_path / "plain.pt", "--trust", "--to", "frozen", "-o", tmp_path / "out.pt")
    assert result.exit_code == 2 and "no BatchNorm layer to convert" in result.stderr and not (tmp_path / "out.pt").exists()


def test_device_cuda_without_cuda_is_a_clean_error(cli, tmp_path):
    if torch.cuda.is_available():  # pragma: no cover - a GPU machine
        return
    result = cli("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", SAMPLES / "data", "--device", "cuda", "-o", tmp_path / "r.pt")
    assert result.exit_code == 2 and "has no CUDA" in result.stderr and "internal error" not in result.stderr


def test_piped_reports_are_never_hard_wrapped(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bnctl", "export", str(CHECKPOINTS / "sample.pt"), *ARCH, "--input-shape", "1,3,32,32", "--dynamic-batch", "-o", str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("Exported with"))
    assert len(summary) > 160 and summary.rstrip().endswith("(tolerance 0.0001, the default for float32 outputs)."), summary  # one line, however long


def test_library_results_have_a_short_repr_and_a_summary():
    result = bnctl.inspect(CHECKPOINTS / "sample.pt")
    assert len(repr(result)) < 200 and "10 BatchNorm layers" in repr(result)
    assert result.summary() == "10 BatchNorm layers, 0 flagged"
    assert {"inspect", "fold", "recalibrate", "convert", "export", "diff", "ModelSource"} <= set(dir(bnctl))


def _state(prefix: str) -> dict:
    return {prefix + k: v for k, v in torch.load(CHECKPOINTS / "sample.pt", weights_only=True).items()}


def test_a_common_key_prefix_is_found_and_said(cli, tmp_path):
    import json

    torch.save({"state_dict": _state("net.")}, tmp_path / "lightning.ckpt")  # a LightningModule holding self.net
    result = cli("inspect", tmp_path / "lightning.ckpt", *ARCH, "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert "stripped 'net.'" in " ".join(json.loads(result.stdout)["notes"])
    torch.save(_state("module.model."), tmp_path / "nested.pt")  # DDP around a wrapper
    assert cli("inspect", tmp_path / "nested.pt", *ARCH).exit_code == 0


def test_strip_and_add_prefix_options(cli, tmp_path):
    state = {k.removeprefix("stem."): v for k, v in _state("").items() if k.startswith("stem.")}  # keys without the 'stem.' part
    torch.save({f"x.{k}": v for k, v in state.items()}, tmp_path / "stem.pt")
    from bnctl.io.arch import fit_keys

    mapping, note = fit_keys(state.keys(), [f"stem.{k}" for k in state])
    assert note == "keys: added 'stem.' to fit the model" and set(mapping.values()) == {f"stem.{k}" for k in state}
    mapping, note = fit_keys([f"x.{k}" for k in state], [f"stem.{k}" for k in state], strip="x.", add="stem.")
    assert set(mapping.values()) == {f"stem.{k}" for k in state} and "stripped 'x.'" in note and "added 'stem.'" in note
    result = cli("inspect", tmp_path / "stem.pt", *ARCH)
    assert result.exit_code == 2 and "--strip-prefix" in result.stderr  # the rest of the model is missing: a clear error


def test_recalibrate_takes_a_dataloader_of_inputs_and_labels_as_update_bn_does():
    from torch.utils.data import DataLoader, TensorDataset

    from bnctl.models import sample_net

    torch.manual_seed(0)
    x, labels = torch.rand(24, 3, 32, 32), torch.randint(0, 4, (24,))
    a, b, c = sample_net(), sample_net(), sample_net()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    bnctl.recalibrate(a, DataLoader(TensorDataset(x, labels), batch_size=8))  # (x, y) batches
    bnctl.recalibrate(b, [x[i : i + 8] for i in range(0, 24, 8)])
    bnctl.recalibrate(c, [{"image": x[i : i + 8]} for i in range(0, 24, 8)], input_fn=lambda batch: batch["image"])
    for name in ("stem.1.running_mean", "stem.1.running_var", "head.2.running_var"):
        torch.testing.assert_close(a.state_dict()[name], b.state_dict()[name], rtol=0, atol=0)
        torch.testing.assert_close(c.state_dict()[name], b.state_dict()[name], rtol=0, atol=0)


def test_a_module_converted_from_a_file_arch_loads_back_where_the_file_is_importable(tmp_path):
    (tmp_path / "nets.py").write_text("from torch import nn\n\ndef factory(width=4):\n    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU())\n")
    code = "import torch, nets\ntorch.save(nets.factory().state_dict(), 'w.pt')\n"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    # like the console script: the working folder is not on sys.path
    bnctl_cli = [sys.executable, "-c", "import os, sys\nsys.path = [p for p in sys.path if p not in ('', '.', os.getcwd())]\nfrom bnctl.cli import main\nsys.argv[0] = 'bnctl'\nmain()"]
    convert = subprocess.run([*bnctl_cli, "convert", "w.pt", "--arch", "nets.py:factory", "--to", "syncbn", "-o", "s.pt"], cwd=tmp_path, capture_output=True, text=True)
    assert convert.returncode == 0, convert.stderr
    back = subprocess.run([*bnctl_cli, "convert", "s.pt", "--trust", "--to", "batchnorm", "--input-shape", "1,3,8,8", "-o", "b.pt"], cwd=tmp_path, capture_output=True, text=True)
    assert back.returncode == 0, back.stderr
    loaded = subprocess.run([sys.executable, "-c", "import torch; m = torch.load('b.pt', weights_only=False); print(type(m[1]).__name__)"], cwd=tmp_path, capture_output=True, text=True)
    assert loaded.stdout.strip() == "BatchNorm2d", loaded.stderr


def test_syncbn_back_to_batchnorm_needs_no_input_shape_where_the_data_flow_tells(cli, tmp_path):
    from bnctl.ops.convert import convert

    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8))
    sync, _ = convert(model, "syncbn")
    torch.save(sync, tmp_path / "sync.pt")
    result = cli("convert", tmp_path / "sync.pt", "--trust", "--to", "batchnorm", "-o", tmp_path / "plain.pt")
    assert result.exit_code == 0, result.stderr
    back = torch.load(tmp_path / "plain.pt", weights_only=False)
    assert [type(back[i]).__name__ for i in (1, 5)] == ["BatchNorm3d", "BatchNorm1d"]
    assert "fed by the 3-D convolution 0" in result.stdout


def test_images_of_several_sizes_are_resized_with_image_size_or_named(cli, tmp_path):
    import json

    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(32, 32), (32, 32), (48, 40), (48, 40), (48, 40)]):
        pixels = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    for args in (("audit", CHECKPOINTS / "sample.pt", *ARCH, "--data", folder), ("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", folder, "-o", tmp_path / "r.pt")):
        result = cli(*args)
        assert result.exit_code == 2 and "2 sizes (H x W: 48x40 (3), 32x32 (2))" in result.stderr and "--image-size 48,40" in result.stderr, result.stderr
    resized = cli("audit", CHECKPOINTS / "sample.pt", *ARCH, "--data", folder, "--image-size", "32", "-f", "json")
    assert resized.exit_code in (0, 1) and "behaviour" in json.loads(resized.stdout)["files"][0]["checks"]


def test_until_stable_that_never_stabilises_says_so_and_names_the_layer(cli, tmp_path):
    import json

    result = cli("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", SAMPLES / "data_shifted", "--until-stable", "1e-12", "--workers", "0", "-o", tmp_path / "r.pt", "-f", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert not doc["stopped_early"] and doc["samples"] == 160
    note = next(n for n in doc["notes"] if n.startswith("never stable"))
    assert any(layer["name"] in note for layer in doc["layers"]) and "still moved" in note


def test_long_commands_show_their_stage_on_a_terminal_and_nothing_when_piped(tmp_path):
    import shutil

    bnctl_bin = str(__import__("pathlib").Path(sys.executable).with_name("bnctl"))
    args = [bnctl_bin, "fold", str(CHECKPOINTS / "sample.pt"), *ARCH, "--input-shape", "2,3,32,32"]
    piped = subprocess.run([*args, "-o", str(tmp_path / "a.pt2")], capture_output=True, text=True)
    assert piped.returncode == 0 and "tracing, pairing and folding" not in piped.stdout + piped.stderr
    if shutil.which("script") is None:  # pragma: no cover - util-linux's script gives the command a terminal
        return
    command = " ".join([*args, "-o", str(tmp_path / "b.pt2")])
    tty = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True)
    assert tty.returncode == 0 and "tracing, pairing and folding" in tty.stdout


def test_a_narrow_terminal_says_which_columns_it_hides():
    import io

    from rich.console import Console

    from bnctl.render.inspect import inspect_table

    result = bnctl.inspect(CHECKPOINTS / "sample.pt")
    console = Console(width=90, record=True, file=io.StringIO())
    console.print(inspect_table(result, width=90))
    assert "narrow terminal: eps, momentum, batches, |mean| max, |β| max not shown" in console.export_text()


def test_forward_says_how_a_batch_is_fed(cli, tmp_path):
    import json

    folder = tmp_path / "pairs"
    folder.mkdir()
    x = torch.rand(6, 3, 32, 32)
    for i in range(6):
        torch.save({"image": x[i], "label": torch.tensor(i % 4)}, folder / f"{i}.pt")
    (tmp_path / "feed.py").write_text("def image(batch):\n    return batch['image']\n")
    without = cli("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", folder, "--workers", "0", "-o", tmp_path / "a.pt")
    assert without.exit_code == 2 and "rejects samples" in without.stderr  # forward(image=..., label=...) does not fit
    result = cli("recalibrate", CHECKPOINTS / "sample.pt", *ARCH, "--data", folder, "--workers", "0", "--forward", f"{tmp_path / 'feed.py'}:image", "-o", tmp_path / "b.pt", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["samples"] == 6


def test_the_audit_library_is_reachable_after_a_plain_import_bnctl():
    """``import bnctl`` then ``bnctl.audit.audit(...)`` works (the subpackage is loaded on first
    use), and finds what the CLI finds in the same file."""
    code = f"import bnctl\nresult = bnctl.audit.audit([{str(BROKEN / 'nan_stats.pt')!r}])\nprint(sorted({{f.code for f in result.findings}}))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "BN101" in proc.stdout
