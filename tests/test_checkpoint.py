"""Reading every supported format, choosing entries of training checkpoints, refusing bad input."""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile

import pytest
import torch

from bnctl.io import checkpoint
from bnctl.io.checkpoint import Format
from bnctl.errors import InputError, UnsafeCheckpointError
from conftest import BROKEN, CHECKPOINTS

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")

SAMPLE_FORMATS = {
    "sample.pt": Format.TORCH,
    "sample.safetensors": Format.SAFETENSORS,
    "sample.ckpt": Format.TORCH,
    "sample.torchscript.pt": Format.TORCHSCRIPT,
    "sample.pt2": Format.EXPORT,
    "sample.onnx": Format.ONNX,
    "sample.module.pt": Format.TORCH,
}


def bn_names(reference):
    return sorted(k.rpartition(".")[0] for k in reference if k.endswith("running_mean"))


@pytest.mark.parametrize("name,fmt", SAMPLE_FORMATS.items())
def test_format_is_detected_from_content(name, fmt, tmp_path):
    src = CHECKPOINTS / name
    assert checkpoint.detect_format(src) is fmt
    renamed = tmp_path / "model.bin"  # the extension says nothing
    renamed.write_bytes(src.read_bytes())
    assert checkpoint.detect_format(renamed) is fmt


@pytest.mark.parametrize("name", SAMPLE_FORMATS)
def test_every_sample_format_gives_the_reference_bn_tensors(name, reference):
    ckpt = checkpoint.load(CHECKPOINTS / name, trust=name == "sample.module.pt")
    found = {layer.name.removeprefix("model."): layer for layer in ckpt.layers()}
    assert sorted(found) == bn_names(reference)
    for bn, layer in found.items():
        for attr in BN_SUFFIXES:
            torch.testing.assert_close(torch.as_tensor(getattr(layer, attr)), reference[f"{bn}.{attr}"], rtol=0, atol=0)
        assert layer.num_features == reference[f"{bn}.running_mean"].numel()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_reading_bn_layers_does_not_read_the_big_tensors(tmp_path, fmt):
    from safetensors.torch import save_file

    big = {"features.0.weight": torch.ones(64 * 2**20 // 4 * 4)}  # 256 MB of conv weight
    bn = {f"features.1.{s}": torch.rand(64) for s in BN_SUFFIXES}
    path = tmp_path / "big.bin"
    if fmt == "torch":
        torch.save({**big, **bn}, path)
    else:
        save_file({**big, **bn}, path)
    del big
    before = _rss_bytes()
    ckpt = checkpoint.load(path)
    from bnctl.core import stats

    rows = stats.rows(ckpt.layers())
    grown = _rss_bytes() - before
    assert [r["name"] for r in rows] == ["features.1"]
    assert grown < 64 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB reading a 256 MiB file"


def test_safetensors_reads_only_requested_keys(monkeypatch):
    from bnctl.io.safetensors import SafetensorsTensors

    ckpt = checkpoint.load(CHECKPOINTS / "sample.safetensors")
    read = []
    original = SafetensorsTensors.__getitem__
    monkeypatch.setattr(SafetensorsTensors, "__getitem__", lambda self, k: read.append(k) or original(self, k))
    ckpt.layers()
    assert read and all(k.rpartition(".")[2] in (*BN_SUFFIXES, "num_batches_tracked") for k in read)
    assert not any("conv" in k for k in read)


def test_legacy_torch_format(tmp_path, reference):
    path = tmp_path / "legacy.pth"
    torch.save(reference, path, _use_new_zipfile_serialization=False)
    assert checkpoint.detect_format(path) is Format.TORCH_LEGACY
    ckpt = checkpoint.load(path)
    torch.testing.assert_close(ckpt.tensors["stem.1.running_var"], reference["stem.1.running_var"])


@pytest.mark.parametrize(
    "wrap,expected_key",
    [
        (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, "model"),
        (lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}, "epoch": 1}, "model_state_dict"),
        (lambda sd: {"ema": sd, "step": 10}, "ema"),
        (lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 0}, "state_dict"),
        (lambda sd: {"ema": {"module": sd}, "step": 10}, "ema.module"),
    ],
)
def test_training_checkpoint_entries(tmp_path, reference, wrap, expected_key):
    path = tmp_path / "train.pt"
    torch.save(wrap(reference), path)
    ckpt = checkpoint.load(path)
    assert ckpt.key == expected_key
    assert len(ckpt.layers()) == len(bn_names(reference))


def test_key_chooses_between_model_and_ema(tmp_path, reference):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in reference.items()}
    path = tmp_path / "both.pt"
    torch.save({"model": reference, "ema": ema, "epoch": 5}, path)
    default = checkpoint.load(path)
    chosen = checkpoint.load(path, key="ema")
    assert default.key == "model" and set(default.candidates) == {"model", "ema"}
    torch.testing.assert_close(torch.as_tensor(chosen.tensors["stem.1.running_mean"]), reference["stem.1.running_mean"] + 1)
    with pytest.raises(InputError, match="not an entry"):
        checkpoint.load(path, key="nope")


def test_dict_without_weights_is_refused(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(InputError, match="no state_dict"):
        checkpoint.load(path)


# --- bad input ---------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        checkpoint.load(tmp_path / "missing.pt")


def test_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        checkpoint.load(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        checkpoint.load(tmp_path / "empty.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(InputError, match="not a checkpoint bnctl can read"):
        checkpoint.load(tmp_path / "notes.pt")


@pytest.mark.parametrize("name", ["sample.pt", "sample.torchscript.pt", "sample.pt2", "sample.safetensors", "sample.onnx"])
def test_truncated_files(tmp_path, name):
    data = (CHECKPOINTS / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        checkpoint.load(path).layers()


def test_corrupted_zip_member(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes((CHECKPOINTS / "sample.pt").read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    with open(path, "r+b") as f:  # garble the pickle's bytes inside the archive
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len + 2)
        f.write(b"\xff" * 16)
    with pytest.raises(InputError):
        checkpoint.load(path)


def test_zip_that_is_not_pytorch(tmp_path):
    path = tmp_path / "arrays.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"123")
    with pytest.raises(InputError, match="not a PyTorch file"):
        checkpoint.load(path)


def test_onnx_with_missing_external_data(tmp_path):
    import onnx

    model = onnx.load(CHECKPOINTS / "sample.onnx")
    onnx.save(model, tmp_path / "big.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="big.onnx.data", size_threshold=0)
    (tmp_path / "big.onnx.data").unlink()
    with pytest.raises(InputError, match="cannot read .* as an ONNX model"):
        checkpoint.load(tmp_path / "big.onnx")


def test_pickled_module_needs_trust():
    with pytest.raises(UnsafeCheckpointError, match=r"\(bnctl.models.SampleNet\).*--trust"):
        checkpoint.load(CHECKPOINTS / "sample.module.pt")
    assert checkpoint.load(CHECKPOINTS / "sample.module.pt", trust=True).module is not None


class _Payload:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_does_not_execute(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"x": torch.zeros(1)}, "hook": _Payload(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="--trust"):
        checkpoint.load(path)
    assert not marker.exists()
    # the payload is real: with --trust it runs (which is why --trust must be asked for)
    checkpoint.load(path, trust=True)
    assert marker.exists()


def test_trust_with_unimportable_class(tmp_path):
    path = tmp_path / "module.pt"
    data = (CHECKPOINTS / "sample.module.pt").read_bytes().replace(b"bnctl.models", b"gone.modelsx")
    path.write_bytes(data)
    with pytest.raises(InputError):
        checkpoint.load(path, trust=True)


def test_broken_samples_are_readable():
    for path in BROKEN.iterdir():
        assert checkpoint.load(path).layers(), path


def _evil_pt2(tmp_path, marker, where: str):
    """A copy of sample.pt2 with a code-running pickle in the example inputs or in a weight."""
    import io
    import json

    buffer = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buffer)
    path = tmp_path / "evil.pt2"
    with zipfile.ZipFile(CHECKPOINTS / "sample.pt2") as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if where == "sample_inputs" and info.filename.endswith("sample_inputs/model.pt"):
                data = buffer.getvalue()
            if where == "weight" and info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["stem.0.weight"]["use_pickle"] = True
                data = json.dumps(config).encode()
            if where == "weight" and info.filename.endswith("data/weights/weight_0"):
                data = buffer.getvalue()
            dst.writestr(info, data)
    return path


@pytest.mark.parametrize("where", ["sample_inputs", "weight"])
def test_malicious_export_archive_does_not_execute(tmp_path, where):
    marker = tmp_path / "pwned"
    path = _evil_pt2(tmp_path, marker, where)
    with pytest.raises(UnsafeCheckpointError, match="--trust"):
        checkpoint.load(path)
    assert not marker.exists()
    if where == "sample_inputs":  # the hole is real: torch.export.load itself runs it
        with contextlib.suppress(Exception):  # torch's own warning afterwards has a bad format string
            torch.export.load(path)
        assert marker.exists()


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_malicious_torchscript_archive_does_not_execute(tmp_path, member):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.torchscript.pt"
    with zipfile.ZipFile(CHECKPOINTS / "sample.torchscript.pt") as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/" + member):
                data = pickle.dumps(_Payload(marker), protocol=2)
            dst.writestr(info, data)
    assert checkpoint.detect_format(path) is Format.TORCHSCRIPT
    with pytest.raises(InputError):
        checkpoint.load(path)
    assert not marker.exists()


class _ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)


@pytest.mark.parametrize("how", ["trace", "trace-extra-files", "script", "lite"])
def test_torchscript_as_torch_writes_it_is_read_without_trust(tmp_path, cli, how):
    """torch.jit.trace + torch.jit.save stores the example inputs (traced_inputs.pkl and
    traced_inputs/N); _extra_files may name folders; the lite interpreter adds bytecode and
    debug maps. bnctl reads each without --trust and finds what torch.jit.load finds."""
    import json
    import warnings

    torch.manual_seed(0)
    model = _ConvBN().train()
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8))
    model.eval()
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.randn(2, 3, 8, 8))
        if how == "lite":
            module._save_for_lite_interpreter(str(path), _save_mobile_debug_info=True)
        else:
            torch.jit.save(module, str(path), _extra_files={"meta/run.json": "{}"} if how == "trace-extra-files" else {})
    names = zipfile.ZipFile(path).namelist()
    if how != "script":
        assert any(n.endswith("/traced_inputs.pkl") for n in names) and any("/traced_inputs/" in n for n in names)
    assert checkpoint.detect_format(path) is Format.TORCHSCRIPT
    result = cli("inspect", path, "--format", "json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["layers"]
    assert row["name"] == "bn" and row["kind"] == "BatchNorm2d" and row["num_batches_tracked"] == 3
    (layer,) = checkpoint.load(path).layers()
    for attr in BN_SUFFIXES:
        torch.testing.assert_close(torch.as_tensor(getattr(layer, attr)), getattr(model.bn, attr).detach(), rtol=0, atol=0)
    assert cli("inspect", path, "--trust", "--format", "json").stdout.replace("\n", "") == result.stdout.replace("\n", "")


# --- safetensors headers: each kind of damage its own error ----------------------------


def _safetensors_with(tmp_path, edit):
    """A file written by safetensors' own writer, its JSON header then changed by ``edit``."""
    import json
    import struct

    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({f"bn.{k}": np.arange(4, dtype=np.float32) + 1 for k in BN_SUFFIXES}, str(path))
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    header = edit(header)
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _entry(key):
    def edit(change):
        def apply(header):
            change(header[f"bn.{key}"])
            return header

        return apply

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (_entry("running_var")(lambda e: e.update(data_offsets=[0, 16])), "overlap"),
        (_entry("weight")(lambda e: e.update(dtype="F31")), "unknown dtype 'F31'"),
        (_entry("weight")(lambda e: e.update(dtype=["F32"])), "unknown dtype"),
        (_entry("bias")(lambda e: e.update(shape=[-4])), "not a list of sizes"),
        (_entry("bias")(lambda e: e.update(shape="4")), "not a list of sizes"),
        (_entry("bias")(lambda e: e.update(shape=[5])), "needs 20"),
        (_entry("running_mean")(lambda e: e.update(data_offsets=[0, 10**6])), "outside the file"),
        (_entry("running_mean")(lambda e: e.pop("data_offsets")), "lacks dtype, shape or data_offsets"),
        (_entry("bias")(lambda e: e.update(shape=[[4]])), "not a list of sizes"),
        (lambda h: [h], "not a checkpoint bnctl can read"),
        (lambda h: {**h, "__metadata__": {"a": 1}}, "__metadata__"),
        (lambda h: b"{not json", "not JSON"),
    ],
)
def test_safetensors_header_damage_is_one_clean_error(tmp_path, cli, edit, message):
    path = _safetensors_with(tmp_path, edit)
    result = cli("inspect", path)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert result.stderr.count("error:") == 1


def test_safetensors_whose_length_reads_as_a_pickle_opcode_is_safetensors(tmp_path, cli):
    """A header of 1152 bytes (0x480) starts the file with 80 04, pickle's protocol-4
    opcode: the file is still the safetensors file it is, read without --trust."""
    import struct

    from safetensors.torch import save_file

    path = tmp_path / "small.safetensors"
    state = {f"bn.{k}": torch.arange(4.0) + 1 for k in BN_SUFFIXES}
    state["bn.num_batches_tracked"] = torch.tensor(3)
    for pad in range(2048):  # metadata sized so that safetensors writes a header of 0x..0480 bytes
        save_file(state, str(path), metadata={"note": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x04":
            break
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert path.read_bytes()[:2] == b"\x80\x04" and length == 0x480
    assert checkpoint.detect_format(path) is Format.SAFETENSORS
    result = cli("inspect", path, "--format", "json")
    assert result.exit_code == 0, result.output
    import json

    (layer,) = json.loads(result.stdout)["layers"]
    assert layer["name"] == "bn" and layer["num_features"] == 4 and layer["num_batches_tracked"] == 3
    pickled = tmp_path / "real.pkl"  # a real protocol-4 pickle is still one
    pickled.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert checkpoint.detect_format(pickled) is Format.PICKLE


def _declaring(path, length, body=b'{"__metadata__": {}}'):
    import struct

    path.write_bytes(struct.pack("<Q", length) + body)
    return path


def test_safetensors_header_over_safetensors_limit_is_refused_before_it_is_read(tmp_path, cli):
    """safetensors' reader refuses headers over 100,000,000 bytes (its MAX_HEADER_SIZE) before
    reading them; bnctl agrees, with one clean error, on a file of a few bytes."""
    from safetensors import SafetensorError, safe_open

    from bnctl.io.safetensors import MAX_HEADER

    assert MAX_HEADER == 100_000_000
    path = _declaring(tmp_path / "huge.safetensors", MAX_HEADER + 1)
    with pytest.raises(SafetensorError, match="(?i)header ?too ?large"):
        safe_open(str(path), framework="numpy")
    result = cli("inspect", path)
    assert result.exit_code == 2, result.output
    assert "100000001" in result.stderr and "100000000" in result.stderr and "Traceback" not in result.output
    assert result.stderr.count("error:") == 1 and result.stderr.count("tip:") == 1
    cut = _declaring(tmp_path / "cut.safetensors", 4096)  # within the limit, beyond the file: truncated
    result = cli("inspect", cut)
    assert result.exit_code == 2 and "more than the file holds" in result.stderr and "truncated" in result.stderr


def test_safetensors_header_of_exactly_the_limit_is_read(tmp_path):
    """The largest header safetensors writes and reads (100,000,000 bytes) is read."""
    import struct

    import numpy as np
    from safetensors.numpy import load_file

    from bnctl.io.safetensors import MAX_HEADER, SafetensorsTensors

    text = b'{"bn.running_var":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path = tmp_path / "limit.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER) + text)
        for _ in range((MAX_HEADER - len(text)) // (1 << 20)):
            f.write(b" " * (1 << 20))
        f.write(b" " * ((MAX_HEADER - len(text)) % (1 << 20)))
        f.write(np.array([1, 2], dtype="<f4").tobytes())
    np.testing.assert_array_equal(load_file(str(path))["bn.running_var"], [1, 2])
    assert checkpoint.detect_format(path) is Format.SAFETENSORS
    np.testing.assert_array_equal(SafetensorsTensors(path)["bn.running_var"], [1, 2])


def test_safetensors_values_match_the_reference_reader(tmp_path):
    """bnctl's header parser and byte views give what safetensors itself loads, including
    entries stored out of key order and a scalar counter."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(3)
    state = {}
    for i, c in enumerate((3, 1, 7)):
        for k in BN_SUFFIXES:
            state[f"m.{i}.bn.{k}"] = rng.normal(size=c).astype(np.float16 if i == 1 else np.float32)
        state[f"m.{i}.bn.num_batches_tracked"] = np.array(5 + i, dtype=np.int64)
        state[f"m.{i}.conv.weight"] = rng.normal(size=(c, 2, 3, 3)).astype(np.float32)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    expected = load_file(str(path))
    from bnctl.io.safetensors import SafetensorsTensors

    ours = SafetensorsTensors(path)
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape
        np.testing.assert_array_equal(ours[key], value)


def test_bulk_restores_collection_and_freezes_what_was_read():
    import gc

    from bnctl._bulk import bulk

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with bulk():
        assert not gc.isenabled()
        kept = [[i] for i in range(1000)]
    assert gc.isenabled() and gc.get_freeze_count() >= frozen + 1000
    gc.unfreeze()
    with pytest.raises(RuntimeError):
        with bulk():
            raise RuntimeError("read failed")
    assert gc.isenabled()
    del kept
