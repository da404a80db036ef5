"""Read every supported checkpoint format into a :class:`Checkpoint`.

The format is found from the file's content (zip member names, magic bytes), never from
its extension. Loading is safe by default: the only loaders that can run code from the
file (an unrestricted unpickler) are used with ``trust=True`` alone. Reading is cheap:
torch zip archives are memory-mapped and safetensors files are opened lazily, so only
the tensors a caller touches are read from disk.
"""

from __future__ import annotations

import enum
import os
import pickle
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


from .._quiet import quiet
from ..errors import BnctlError, InputError, UnsafeCheckpointError, one_line
from .arch import importing_recorded
from .archive import Archive, open_zip, regular_file
from .kinds import EagerModule, Kind, OnnxGraph, Program, Script, StateDict
from .safetensors import header_length, header_parses


class Format(str, enum.Enum):
    """A file format bnctl reads, as found from the file's content."""

    TORCH = "torch"  # torch.save zip archive: a state_dict, a checkpoint dict or a pickled module
    TORCH_LEGACY = "torch-legacy"  # torch.save before 1.6 (_use_new_zipfile_serialization=False)
    PICKLE = "pickle"  # a plain Python pickle
    SAFETENSORS = "safetensors"
    TORCHSCRIPT = "torchscript"
    EXPORT = "torch-export"  # torch.export.save program (.pt2)
    ONNX = "onnx"


# pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2), without the trailing STOP
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"

#: Entries of a training checkpoint that hold the model's weights, most likely first.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_ema",
    "ema",
    "state_dict_ema",
    "ema_state_dict",
)

SUPPORTED = "torch state_dict or training checkpoint (.pt .pth .bin .ckpt), safetensors, TorchScript, torch.export (.pt2), ONNX"


@dataclass
class Checkpoint:
    """What a file held, as read: its format and ``kind``, the one model kind it holds
    (:mod:`bnctl.io.kinds`: a state_dict, a pickled module, TorchScript, a ``torch.export``
    program or an ONNX graph), which answers what commands ask of it.

    ``key`` names the entry of a training checkpoint that a state_dict came from, and
    ``candidates`` the entries that could have been chosen with ``--key``.
    """

    path: Path
    format: Format
    kind: Kind
    key: str | None = None
    candidates: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    root: Any = None  # the whole object a torch/pickle file held (the training checkpoint dict)
    reader: Any = None  # reads the tensors of ``root`` that bnctl's own unpickler left unread

    def layers(self, built: Any = None) -> list[Any]:
        """The BN layers (:meth:`bnctl.io.kinds.Kind.layers`)."""
        return self.kind.layers(built)

    # read-only views of ``kind``, for code that wants one thing: None where the file holds another
    tensors = property(lambda self: self.kind.tensors if isinstance(self.kind, StateDict) else None, doc="the state_dict, or None")
    module = property(lambda self: self.kind.module if isinstance(self.kind, (EagerModule, Script)) else None, doc="a pickled module, or TorchScript loaded with --trust")
    script = property(lambda self: self.kind.view if isinstance(self.kind, Script) else None, doc="a TorchScript archive read without loading it")
    program = property(lambda self: self.kind.program if isinstance(self.kind, Program) else None, doc="a torch.export program (loaded, or read as JSON)")
    onnx_model = property(lambda self: self.kind.proto if isinstance(self.kind, OnnxGraph) else None, doc="an ONNX ModelProto")

    def whole(self) -> Any:
        """The whole object the file held, every tensor read (for writing it back)."""
        return self.reader.materialize(self.root) if self.reader is not None else self.root

    def siblings(self) -> list[str]:
        """The other entries of a training checkpoint that hold a state_dict with this
        entry's keys (``module.`` and an AveragedModel's ``n_averaged`` aside): the EMA or SWA
        copies of the model, in the file's order."""
        if self.key is None or self.tensors is None or not isinstance(self.root, Mapping):
            return []
        mine = _layout(self.tensors.keys())
        out = []
        for name in self.candidates:
            value = _lookup(self.root, name) if name != self.key else None
            if isinstance(value, Mapping) and _is_state_dict(value) and _layout(value.keys()) == mine:
                out.append(name)
        return out

    @property
    def content(self) -> str:
        """What the file holds: 'state_dict', 'module', 'program' or 'onnx'."""
        return self.kind.content

    def describe(self) -> str:
        """A short human description, e.g. ``torch checkpoint, entry 'state_dict'``."""
        text = {
            Format.TORCH: "torch",
            Format.TORCH_LEGACY: "torch (legacy format)",
            Format.PICKLE: "pickle",
            Format.SAFETENSORS: "safetensors",
            Format.TORCHSCRIPT: "TorchScript",
            Format.EXPORT: "torch.export program",
            Format.ONNX: "ONNX",
        }[self.format]
        if self.format in (Format.TORCH, Format.TORCH_LEGACY, Format.PICKLE):
            text += " pickled module" if self.content == "module" else " state_dict"
        if self.key is not None:
            text += f", entry '{self.key}'"
        return text


def detect_format(path: str | Path) -> Format:
    """Return the format of the file at ``path`` from its content.

    Raises :class:`InputError` for a missing path, a directory, an empty file, a broken
    zip archive, or content that is none of the supported formats.
    """
    path = _check_path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    size = path.stat().st_size
    if not head:
        raise InputError(f"{path} is empty", "the file was probably not written completely; save it again")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_format(path)
    if head.startswith(_LEGACY_MAGIC):
        return Format.TORCH_LEGACY
    pickled = head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5
    if len(head) >= 9 and head[8:9] == b"{":
        # the stronger signature first: a safetensors header of 1152 bytes (0x480) starts the
        # file with 80 04, a pickle's protocol-4 opcode; a pickle declares no length that fits
        if not pickled or header_parses(path, size):
            header_length(path, head, size)  # within safetensors' limit and the file, or the error
            return Format.SAFETENSORS
    if pickled:
        return Format.PICKLE
    if head[0] == 0x08:  # protobuf field 1 (ModelProto.ir_version), varint
        return Format.ONNX
    raise InputError(f"{path} is not a checkpoint bnctl can read", f"bnctl reads: {SUPPORTED}")


def _check_path(path: str | Path) -> Path:
    return regular_file(path)


def _is_tensor(value: Any) -> bool:
    """A tensor, or one that bnctl's own unpickler has not read yet."""
    from .pickles import TensorRef

    torch = sys.modules.get("torch")  # no torch tensor exists unless torch was imported
    return isinstance(value, (TensorRef, np.ndarray)) or (torch is not None and isinstance(value, torch.Tensor))


def _torch():
    """torch, imported where a loader of torch's needs it (bnctl's own readers do not)."""
    import torch

    return torch


def _is_module(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _zip_format(path: Path) -> Format:
    names = open_zip(path).namelist()
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return Format.TORCHSCRIPT
    if any(n.endswith("/archive_format") for n in names) or any("/models/" in n and n.endswith(".json") for n in names):
        return Format.EXPORT
    if any(n.endswith("data.pkl") for n in names):
        return Format.TORCH
    raise InputError(f"{path} is a zip archive but not a PyTorch file", f"bnctl reads: {SUPPORTED}")


def load(path: str | Path, *, key: str | None = None, trust: bool = False) -> Checkpoint:
    """Read the checkpoint at ``path``.

    ``key`` picks the entry of a training checkpoint dict (``state_dict``, ``model``,
    ``ema``, ...; a dotted path reaches nested dicts); without it the most likely entry
    is chosen (:data:`STATE_DICT_KEYS`). ``trust=True`` allows loaders that execute code
    from the file (pickled modules); without it such a file raises
    :class:`UnsafeCheckpointError` before anything in it runs.
    """
    path = _check_path(path)
    fmt = detect_format(path)
    if fmt is Format.SAFETENSORS:
        return _load_safetensors(path, key)
    if fmt is Format.TORCHSCRIPT:
        if not trust:
            from .torchzip import read_script

            return Checkpoint(path, fmt, Script(view=read_script(path)))
        Archive(path, "torchscript", trust=True).verify()
        return Checkpoint(path, fmt, Script(module=_guarded(path, "TorchScript", lambda: _torch().jit.load(str(path), map_location="cpu"))))
    if fmt is Format.EXPORT:
        if not trust:
            from .pt2 import read_program

            return Checkpoint(path, fmt, Program(read_program(path)))
        Archive(path, "export", trust=True).verify()  # torch's reader checks no CRC
        return Checkpoint(path, fmt, Program(_guarded(path, "torch.export", lambda: _torch().export.load(str(path)))))
    if fmt is Format.ONNX:
        return Checkpoint(path, fmt, OnnxGraph(_load_onnx(path)))
    if fmt is Format.TORCH and not trust:
        from . import pickles
        from .torchzip import LazyTensors, read_pickle

        try:
            obj, reader = read_pickle(path)
        except pickles.Refused:
            pass  # a global bnctl's reader does not build: torch's weights-only unpickler decides
        else:
            checkpoint = _interpret(path, fmt, obj, key)
            checkpoint.reader = reader
            if checkpoint.tensors is not None:
                checkpoint.kind = StateDict(LazyTensors(checkpoint.tensors, reader))
            return checkpoint
    if fmt is Format.TORCH:
        Archive(path, "torch", trust=trust)
    obj = _unpickle(path, fmt, trust)
    return _interpret(path, fmt, obj, key)


def _guarded(path: Path, what: str, loader):
    """``loader()`` with torch's warnings and log records kept from the user (``--debug``
    shows the traceback); any failure is one InputError."""
    try:
        with quiet():
            return loader()
    except Exception as exc:  # noqa: BLE001 - every loader failure is bad input here
        raise InputError(
            f"cannot read {path} as a {what} archive: {one_line(exc)}",
            "the file may be damaged or written by a newer PyTorch; save it again",
        ) from exc


def _load_safetensors(path: Path, key: str | None) -> Checkpoint:
    from .safetensors import SafetensorsTensors

    tensors = SafetensorsTensors(path)
    if key is not None:
        raise InputError(f"--key {key!r} does not apply to {path}: a safetensors file is one flat state_dict", "drop --key")
    return Checkpoint(path, Format.SAFETENSORS, StateDict(tensors), metadata=dict(tensors.metadata))


def _load_onnx(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise InputError(
            f"cannot read {path} as an ONNX model: {one_line(exc)}",
            f"the file is damaged or not a model; bnctl reads: {SUPPORTED}",
        ) from exc


def _unpickle(path: Path, fmt: Format, trust: bool) -> Any:
    if fmt is Format.PICKLE and not trust:
        raise UnsafeCheckpointError(
            f"{path} is a plain Python pickle; loading it would run code from the file, which bnctl does only with --trust",
            "only if you trust where it came from: add --trust (or save a state_dict with torch.save)",
        )
    try:
        with quiet():
            if trust:  # classes pickled from a model file import as `python -m` would find them: from the working folder
                sys.path.insert(0, os.getcwd())
            try:
                if fmt is Format.PICKLE:
                    with open(path, "rb") as f:
                        return pickle.load(f)  # trust=True: the user accepted running its code
                load = lambda: _torch().load(path, map_location="cpu", weights_only=not trust, mmap=fmt is Format.TORCH)  # noqa: E731
                return importing_recorded(Archive(path, "torch", trust=True), load) if trust else load()
            finally:
                if trust:
                    sys.path.remove(os.getcwd())
    except BnctlError:
        raise  # a module the file records, gone or failing
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            match = re.search(r"GLOBAL ([\w.]+)", text)
            needs = f" ({match.group(1)})" if match else ""
            raise UnsafeCheckpointError(
                f"{path} pickles Python objects{needs}; loading it would run code from the file, which bnctl does only with --trust",
                "only if you trust where it came from: add --trust (or save model.state_dict() instead)",
            ) from exc
        raise _unreadable(path, exc) from exc
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise InputError(
            f"{path} pickles a class that cannot be imported here: {one_line(exc)}",
            "make the module that defines it importable (PYTHONPATH), or save a state_dict and pass --arch",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - RuntimeError, EOFError, zip errors: all unreadable input
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: BaseException) -> InputError:
    return InputError(
        f"cannot read {path} as a torch checkpoint: {one_line(exc)}",
        "the file is truncated or damaged; download or save it again",
    )


def _interpret(path: Path, fmt: Format, obj: Any, key: str | None) -> Checkpoint:
    """Turn an unpickled object into a Checkpoint: a module, or a state_dict chosen by ``key``."""
    if _is_module(obj):
        if key is not None:
            raise InputError(f"--key {key!r} does not apply: {path} holds a whole module", "drop --key")
        return Checkpoint(path, fmt, EagerModule(obj))
    if not isinstance(obj, Mapping):
        raise InputError(
            f"{path} holds a {type(obj).__name__}, not a state_dict or a training checkpoint",
            "save model.state_dict() or a dict with a 'state_dict' entry",
        )
    if _is_state_dict(obj):
        if key is not None:
            raise InputError(f"--key {key!r} does not apply: {path} is a plain state_dict", "drop --key")
        return Checkpoint(path, fmt, StateDict(obj), root=obj)
    candidates = tuple(_candidate_entries(obj))
    metadata = {k: v for k, v in obj.items() if isinstance(v, (int, float, str, bool))}
    chosen = key if key is not None else _preferred(candidates)
    if chosen is None:
        listing = ", ".join(map(str, list(obj)[:12])) or "none"
        raise InputError(
            f"{path} holds a dict with no state_dict in it (entries: {listing})",
            "pass --key NAME with the entry that holds the weights",
        )
    value = _lookup(obj, chosen)
    if value is None:
        raise InputError(
            f"--key {chosen!r} is not an entry of {path}",
            f"choose one of: {', '.join(candidates) or ', '.join(map(str, obj))}",
        )
    if _is_module(value):
        return Checkpoint(path, fmt, EagerModule(value), key=chosen, candidates=candidates, metadata=metadata, root=obj)
    if isinstance(value, Mapping) and not _is_state_dict(value):
        nested = _preferred(tuple(_candidate_entries(value)))
        if nested is not None:
            chosen, value = f"{chosen}.{nested}", value[nested]
    if not (isinstance(value, Mapping) and _is_state_dict(value)):
        raise InputError(
            f"entry '{chosen}' of {path} is a {type(value).__name__}, not a state_dict",
            f"choose one of: {', '.join(candidates) or 'none found'}",
        )
    return Checkpoint(path, fmt, StateDict(value), key=chosen, candidates=candidates, metadata=metadata, root=obj)


def _layout(keys: Any) -> set[str]:
    return {str(k).removeprefix("module.") for k in keys if str(k).rpartition(".")[2] != "n_averaged"}


def _is_state_dict(obj: Mapping) -> bool:
    """A state_dict maps names to tensors (``*_extra_state`` entries may be anything)."""
    if not obj:
        return False
    tensors = 0
    for k, v in obj.items():
        if _is_tensor(v):
            tensors += 1
        elif not (isinstance(k, str) and k.endswith("_extra_state")):
            return False
    return tensors > 0


def _candidate_entries(obj: Mapping) -> Iterator[str]:
    for k, v in obj.items():
        if _is_module(v) or (isinstance(v, Mapping) and (_is_state_dict(v) or any(isinstance(inner, Mapping) and _is_state_dict(inner) for inner in v.values()))):
            yield str(k)


def _preferred(candidates: tuple[str, ...]) -> str | None:
    for name in STATE_DICT_KEYS:
        if name in candidates:
            return name
    return candidates[0] if candidates else None


def _lookup(obj: Mapping, key: str) -> Any:
    if key in obj:
        return obj[key]
    value: Any = obj
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value
