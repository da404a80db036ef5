"""Hostile and damaged files: nothing from a file runs without --trust, every damage is one
`error:` line (exit 2) or a clean result, never a traceback, a hang, or a wrong value; and no
write loses anything (the input is never overwritten, a failed write leaves nothing)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from typing import Tuple

import pytest
import torch
from torch import nn

from conftest import CHECKPOINTS, ROOT


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy_zip(src, dest, edit=None, extra=()):
    """``src`` rewritten to ``dest``: ``edit(name, data)`` may change a member's bytes; ``extra``
    are ``(name, data)`` members added at the end."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, edit(info.filename, data) if edit else data)
        for name, data in extra:
            zout.writestr(name, data)
    return dest


def _assert_clean_error(result, *words):
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "\nerror: " in "\n" + result.stderr and "Traceback" not in result.stderr and "internal error" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# --- code in the file never runs without --trust --------------------------------------------


class _SetstatePayload(nn.Module):
    """A scripted module whose __setstate__ (run by torch.jit.load) creates a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.path = marker

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1] or torch.from_file(self.path, True, 8).numel() < 0


class _Carrier(nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.hook = _SetstatePayload(marker)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.hook(self.conv(x)))


def test_torchscript_setstate_runs_only_with_trust(cli, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.torchscript.pt"
    torch.jit.save(torch.jit.script(_Carrier(str(marker)).eval()), str(path))
    assert not marker.exists()
    result = cli("inspect", path, "-f", "json")
    assert result.exit_code == 0 and [l["name"] for l in json.loads(result.stdout)["layers"]] == ["bn"]
    assert cli("audit", path).exit_code in (0, 1)
    _assert_clean_error(cli("fold", path, "--input-shape", "1,3,8,8", "-o", tmp_path / "f.ts"), "only with --trust")
    _assert_clean_error(cli("export", path, "--input-shape", "1,3,8,8", "-o", tmp_path / "f.onnx"), "only with --trust")
    assert not marker.exists() and not (tmp_path / "f.ts").exists()
    assert cli("inspect", path, "--trust").exit_code == 0  # the payload is real: torch.jit.load runs it
    assert marker.exists()


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_torchscript_pickle_with_a_foreign_global_is_refused(cli, tmp_path, member):
    marker = tmp_path / "pwned"
    path = _copy_zip(CHECKPOINTS / "sample.torchscript.pt", tmp_path / "evil.pt", lambda name, data: pickle.dumps(_Payload(marker), protocol=2) if name.endswith("/" + member) else data)
    _assert_clean_error(cli("inspect", path), "posix.system", "--trust")
    assert not marker.exists()


def test_pt2_with_a_shared_library_is_refused_before_torch_sees_it(cli, tmp_path):
    path = _copy_zip(CHECKPOINTS / "sample.pt2", tmp_path / "aoti.pt2", extra=[("sample/data/aotinductor/model/model.wrapper.so", b"\x7fELF" + bytes(64))])
    _assert_clean_error(cli("inspect", path), "compiled code", "--trust")
    audit = cli("audit", path)
    assert audit.exit_code == 2 and "compiled code" in audit.stdout


def test_pt2_with_an_opaque_object_constant_is_refused(cli, tmp_path):
    marker = tmp_path / "pwned"

    def edit(name, data):
        if name.endswith("model_constants_config.json"):
            return json.dumps({"config": {"opaque_obj_0": {"path_name": "opaque_obj_0", "use_pickle": False}}}).encode()
        return data

    path = _copy_zip(CHECKPOINTS / "sample.pt2", tmp_path / "opaque.pt2", edit, [("sample/data/constants/opaque_obj_0", pickle.dumps(_Payload(marker)))])
    _assert_clean_error(cli("inspect", path), "opaque_obj_0", "--trust")
    assert not marker.exists()


def test_duplicate_member_names_are_refused(cli, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker), protocol=2)
    path = tmp_path / "twice.pt"
    with zipfile.ZipFile(CHECKPOINTS / "sample.pt") as zin, zipfile.ZipFile(path, "w") as zout:
        for name in zin.namelist():
            if name.endswith("data.pkl"):
                zout.writestr(name, evil)  # torch's reader would take the first one
            zout.writestr(name, zin.read(name))
    _assert_clean_error(cli("inspect", path), "named twice")
    assert not marker.exists()


# --- damage: an error, never a wrong value -------------------------------------------------


def test_a_flipped_byte_in_a_bn_tensor_is_an_error_not_a_wrong_value(cli, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fuzz_readers import restore_crcs

    def flip(name, data):
        if name == "sample/data/1":  # stem.1.weight
            data = bytearray(data)
            data[5] ^= 0x10
            return bytes(data)
        return data

    path = restore_crcs(_copy_zip(CHECKPOINTS / "sample.pt", tmp_path / "flip.pt", flip).read_bytes(), CHECKPOINTS / "sample.pt")
    (tmp_path / "flip.pt").write_bytes(path)
    assert torch.load(tmp_path / "flip.pt", weights_only=True)["stem.1.weight"][1] != torch.load(CHECKPOINTS / "sample.pt", weights_only=True)["stem.1.weight"][1]
    _assert_clean_error(cli("inspect", tmp_path / "flip.pt"), "CRC-32")


def test_a_fifo_is_refused_at_once(cli, tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    start = time.perf_counter()
    _assert_clean_error(cli("inspect", fifo), "not a regular file")
    assert time.perf_counter() - start < 5


def test_a_zip_bomb_is_refused_before_it_inflates(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("bomb/data.pkl", pickle.dumps({"bn.running_mean": 0}, protocol=2))
        z.writestr("bomb/data/0", bytes(256 << 20))
    assert path.stat().st_size < 2 << 20
    code = (
        "import re, sys\nfrom typer.testing import CliRunner\nfrom bnctl.cli import app\n"
        f"r = CliRunner().invoke(app, ['inspect', {str(path)!r}])\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from this (large) test process
        "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "print(r.exit_code, peak)\nprint(r.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    exit_code, peak_mb = map(int, proc.stdout.split("\n")[0].split())
    assert exit_code == 2 and "zip bomb" in proc.stdout
    assert peak_mb < 1024, f"peak RSS {peak_mb} MB"


@pytest.mark.parametrize("name", ["weight", "counter", "meta"])
def test_an_unusable_tensor_is_reported_for_its_layer_and_the_rest_is_inspected(cli, tmp_path, name):
    good = {"a.weight": torch.ones(3), "a.bias": torch.zeros(3), "a.running_mean": torch.full((3,), 0.2), "a.running_var": torch.full((3,), 2.0)}
    bad = {"b.weight": torch.ones(4), "b.bias": torch.zeros(4), "b.running_mean": torch.full((4,), 0.1), "b.running_var": torch.ones(4) * 3}
    if name == "weight":
        bad["b.weight"] = torch.ones(5)
    elif name == "counter":
        bad["b.num_batches_tracked"] = torch.tensor(float("nan"))
    else:
        bad["b.running_var"] = torch.ones(4, device="meta")
    torch.save({**good, **bad}, tmp_path / "m.pt")
    result = cli("inspect", tmp_path / "m.pt", "-f", "json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    assert rows["b"]["flags"] == ["bad_tensor"] and rows["a"]["flags"] == []
    assert rows["a"]["var_min"] == pytest.approx(2.0)
    assert "BN107" in cli("audit", tmp_path / "m.pt").stdout


def test_names_with_escape_sequences_and_markup_are_escaped_for_people_and_exact_in_json(cli, tmp_path):
    name = "x\x1b[31mred[bold]b[/bold]"
    torch.save({f"{name}.running_mean": torch.ones(2), f"{name}.running_var": -torch.ones(2)}, tmp_path / "n.pt")
    for result in (cli("inspect", tmp_path / "n.pt"), cli("audit", tmp_path / "n.pt")):
        assert "\x1b" not in result.stdout and "\\x1b[31mred[bold]b[/bold]" in result.stdout
    assert json.loads(cli("inspect", tmp_path / "n.pt", "-f", "json").stdout)["layers"][0]["name"] == name


# --- writing: the input is never overwritten, a failed write leaves nothing ----------------------


@pytest.mark.parametrize("via", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("command", ["inspect", "audit"])
def test_no_command_writes_over_its_input(cli, tmp_path, via, command):
    src = tmp_path / "m.pt"
    src.write_bytes((CHECKPOINTS / "sample.pt").read_bytes())
    target = src
    if via == "symlink":
        target = tmp_path / "link.json"
        target.symlink_to(src)
    elif via == "hardlink":
        target = tmp_path / "hard.json"
        os.link(src, target)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    _assert_clean_error(cli(command, src, "--output", target), "refusing to overwrite")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


def test_a_destination_that_cannot_be_written_is_a_clean_error(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    _assert_clean_error(cli("inspect", CHECKPOINTS / "sample.pt", "-f", "json", "-o", tmp_path / "file" / "out.json"), "cannot write")


def test_a_full_disk_is_a_clean_error_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE makes writes past 64 kB fail as a full disk does (EFBIG); torch's own zip
    writer would abort the process there."""
    out = tmp_path / "folded.pt2"
    code = (
        "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "from bnctl.cli import main\nimport sys\n"
        f"sys.argv = ['bnctl', 'fold', {str(CHECKPOINTS / 'sample.pt')!r}, '--arch', 'bnctl.models:sample_net', '--input-shape', '1,3,32,32', '-o', {str(out)!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot write") and "no space left" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_umask_mode(cli, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli("inspect", CHECKPOINTS / "sample.pt", "-f", "json", "-o", tmp_path / "o.json").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o.json").stat().st_mode & 0o777 == 0o644


def test_torch_zip_read_by_bnctl_matches_torch_load(reference):
    from bnctl.io import checkpoint

    ckpt = checkpoint.load(CHECKPOINTS / "sample.pt")
    assert ckpt.reader is not None  # bnctl's own reader, not torch.load
    for key, value in reference.items():
        assert torch.equal(torch.as_tensor(ckpt.tensors[key]), value), key


def test_the_restricted_unpickler_refuses_any_other_global():
    from bnctl.io import pickles

    data = io.BytesIO()
    pickle.dump({"x": _Payload("/nonexistent")}, data, protocol=2)
    with pytest.raises(pickles.Refused):
        pickles.load(data.getvalue())
