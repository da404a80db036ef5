"""Torch zip archives read by bnctl itself: ``torch.save`` files (state_dicts, training
checkpoints) and TorchScript archives, without ``torch.load`` or ``torch.jit.load``, so that
nothing in the file runs.

The archive is validated first (:mod:`bnctl.io.archive`), ``data.pkl`` is read with the
restricted unpickler of :mod:`bnctl.io.pickles`, and a tensor's bytes are read from its
``data/<key>`` member only when the tensor is used, CRC-32 checked. A TorchScript archive
becomes a tree of :class:`ScriptModuleView`: the module tree, each module's attributes
(``training``, tensors) and the constants its code declares (``eps : Final[float] = 1e-05``),
enough for inspect and the statistics and configuration checks, with no code run.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UnsafeCheckpointError
from . import pickles
from .archive import Archive
from .pickles import ScriptObject, TensorRef


class TensorReader:
    """Reads the tensors of one archive: each storage member once, checked against the pickle."""

    def __init__(self, archive: Archive):
        self.archive = archive
        self.big_endian = archive.has("byteorder") and archive.read("byteorder").strip() == b"big"
        self._storages: dict[str, np.ndarray] = {}

    def array(self, ref: TensorRef, what: str = "a tensor") -> np.ndarray:
        """``ref`` as a numpy array (a copy; bfloat16 widened to float32, exactly); an
        InputError naming ``what`` where the file's bytes do not hold it."""
        array = self._view(ref, what)
        if ref.storage.torch_dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def tensor(self, ref: TensorRef, what: str = "a tensor") -> Any:
        """``ref`` as a torch tensor with its own dtype and ``requires_grad``."""
        import torch

        result = torch.from_numpy(self._view(ref, what))
        if ref.storage.torch_dtype == "bfloat16":
            result = result.view(torch.bfloat16)
        if ref.requires_grad and result.is_floating_point():
            result.requires_grad_(True)
        return result

    def _view(self, ref: TensorRef, what: str) -> np.ndarray:
        storage = ref.storage
        data = self._storages.get(storage.key)
        dtype = np.dtype(storage.dtype).newbyteorder(">" if self.big_endian else "<") if np.dtype(storage.dtype).itemsize > 1 else np.dtype(storage.dtype)
        if data is None:
            raw = self.archive.read(f"data/{storage.key}")
            if len(raw) != storage.numel * dtype.itemsize:
                raise InputError(f"{self.archive.path}: the bytes of {what} ({len(raw)}) do not match its declared size ({storage.numel} x {dtype.itemsize})", "the file is damaged; save it again")
            data = self._storages[storage.key] = np.frombuffer(raw, dtype)
        count = math.prod(ref.size)
        if count == 0:
            array = np.empty(ref.size, dtype)
        elif ref.offset == 0 and count == storage.numel and ref.stride == _contiguous(ref.size):
            array = data.reshape(ref.size)  # the whole storage, in order: the common case
        else:
            last = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride))
            if ref.offset < 0 or last >= storage.numel:
                raise InputError(f"{self.archive.path}: {what} points outside its storage", "the file is damaged; save it again")
            array = np.lib.stride_tricks.as_strided(data[ref.offset :], shape=ref.size, strides=tuple(st * dtype.itemsize for st in ref.stride))
        return np.array(array, dtype=dtype.newbyteorder("="))

    def materialize(self, value: Any) -> Any:
        """``value`` with every TensorRef, at any depth of dicts, lists and tuples, read."""
        if isinstance(value, TensorRef):
            return self.tensor(value)
        if isinstance(value, dict):
            result = type(value)((k, self.materialize(v)) for k, v in value.items())
            if hasattr(value, "__dict__"):
                result.__dict__.update(value.__dict__)  # a state_dict's _metadata
            return result
        if isinstance(value, (list, tuple)):
            return type(value)(self.materialize(v) for v in value)
        return value


def _contiguous(size: tuple) -> tuple:
    """The strides of a C-contiguous tensor of ``size``, in elements."""
    strides, step = [], 1
    for s in reversed(size):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


class LazyTensors(Mapping):
    """A state_dict whose tensors are read from the archive when first asked for, as numpy
    arrays (:meth:`torch` gives a torch tensor with the file's own dtype)."""

    def __init__(self, entries: Mapping[str, Any], reader: TensorReader):
        self._entries, self._reader = entries, reader

    def __getitem__(self, key: str) -> Any:
        value = self._entries[key]
        return self._reader.array(value, key) if isinstance(value, TensorRef) else value

    def torch(self, key: str) -> Any:
        value = self._entries[key]
        return self._reader.tensor(value, key) if isinstance(value, TensorRef) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def read_pickle(path: Path, *, trust: bool = False) -> tuple[Any, TensorReader]:
    """The object a ``torch.save`` archive holds, tensors as :class:`TensorRef`, and the reader
    of their bytes. Raises :class:`~bnctl.io.pickles.Refused` for a global the restricted
    unpickler does not build."""
    archive = Archive(path, "torch", trust=trust)
    return _unpickle(archive, "data.pkl", script=False), TensorReader(archive)


def read_script(path: Path) -> ScriptModuleView:
    """A TorchScript archive's module tree, read without running anything. Its pickles may
    only hold tensors, containers and TorchScript objects (constants.pkl is checked too)."""
    archive = Archive(path, "torchscript")
    try:
        root = _unpickle(archive, "data.pkl", script=True)
        if archive.has("constants.pkl"):
            _unpickle(archive, "constants.pkl", script=True)
    except pickles.Refused as exc:
        raise UnsafeCheckpointError(
            f"{path}: its pickles reference {exc.name}, which is no part of a TorchScript module; torch.jit.load would run it",
            "do not load this file; if you trust where it came from anyway: add --trust",
        ) from None
    if not isinstance(root, ScriptObject):
        raise InputError(f"{path}: its data.pkl does not hold a TorchScript module", "the file is damaged; save it again with torch.jit.save")
    return ScriptModuleView(root, _classes(archive), TensorReader(archive))


def _unpickle(archive: Archive, member: str, script: bool) -> Any:
    data = archive.read(member)
    try:
        return pickles.load(data, script=script)
    except pickles.Refused:
        raise
    except RecursionError as exc:
        raise InputError(f"{archive.path}: its {member} nests too deeply to read", "the file is damaged or crafted; save it again") from exc
    except Exception as exc:  # noqa: BLE001 - every damaged pickle: UnpicklingError, EOFError, ValueError, TypeError...
        raise InputError(f"{archive.path}: its {member} is damaged ({type(exc).__name__}: {str(exc)[:200]})", "the file is corrupted; download or save it again") from exc


# --- TorchScript modules without running them -------------------------------------------

_CLASS = re.compile(r"^class (\w+)\(", re.M)
_FINAL = re.compile(r"^  (\w+) : Final\[[^\]]*\]* = (.+)$", re.M)
_LISTED = re.compile(r"^  __(parameters|buffers)__ = \[(.*)\]$", re.M)


class _ClassInfo:
    def __init__(self) -> None:
        self.constants: dict[str, Any] = {}
        self.parameters: list[str] = []
        self.buffers: list[str] = []


def _classes(archive: Archive) -> dict[str, _ClassInfo]:
    """Per qualified class name, the constants, parameter and buffer names its code declares."""
    classes: dict[str, _ClassInfo] = {}
    for name in archive.members:
        inner = name[len(archive.prefix) :]
        if not (inner.startswith("code/") and inner.endswith(".py")):
            continue
        module = inner[len("code/") : -len(".py")].replace("/", ".")
        text = archive.read(inner).decode("utf-8", errors="replace")
        starts = [(m.start(), m.group(1)) for m in _CLASS.finditer(text)]
        for (start, cls), (end, _) in zip(starts, [*starts[1:], (len(text), "")]):
            body = text[start:end]
            info = classes.setdefault(f"{module}.{cls}", _ClassInfo())
            for attr, value in _FINAL.findall(body):
                try:
                    info.constants[attr] = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    continue
            for kind, items in _LISTED.findall(body):
                names = [n.strip().strip('"') for n in items.split(",") if n.strip()]
                setattr(info, kind, names)
    return classes


class ScriptModuleView:
    """A TorchScript module as read from its archive, never run: the parts of the ``nn.Module``
    interface that BN discovery and the configuration checks read (``named_modules``,
    ``children``, ``named_parameters``/``named_buffers`` without recursion, attributes)."""

    def __init__(self, obj: ScriptObject, classes: dict[str, _ClassInfo], reader: TensorReader, path: str = ""):
        self._fill(obj, classes, reader, path)
        stack = [self]  # the submodules, built with a stack: a tree as deep as a model can be
        while stack:
            view = stack.pop()
            for key, value in view.__dict__["_state"].items():
                if isinstance(value, ScriptObject):
                    child = ScriptModuleView.__new__(ScriptModuleView)
                    child._fill(value, classes, reader, f"{view.__dict__['_path']}.{key}" if view.__dict__["_path"] else key)
                    view.__dict__["_children"][key] = child
                    stack.append(child)

    def _fill(self, obj: ScriptObject, classes: dict[str, _ClassInfo], reader: TensorReader, path: str) -> None:
        """This module's own state, constants, parameter and buffer names; no children yet."""
        qualname = type(obj).qualname
        self.__dict__.update(_qualname=qualname, _path=path, _reader=reader, _state=obj._state)
        info = classes.get(qualname, _ClassInfo())
        buffers = info.buffers
        if not info.parameters and not info.buffers:  # no code for the class: every tensor counts as a buffer
            buffers = [k for k, v in obj._state.items() if isinstance(v, TensorRef)]
        self.__dict__.update(_constants=info.constants, _parameters=info.parameters, _buffers=buffers)
        self.__dict__["original_name"] = qualname.rpartition(".")[2]
        self.__dict__["_children"] = {}

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__["_state"]
        if name in self.__dict__["_children"]:
            return self.__dict__["_children"][name]
        if name in state:
            value = state[name]
            if isinstance(value, TensorRef):
                where = f"{self.__dict__['_path']}.{name}" if self.__dict__["_path"] else name
                return self.__dict__["_reader"].tensor(value, where)
            return value
        if name in self.__dict__["_constants"]:
            return self.__dict__["_constants"][name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"<TorchScript {self.original_name} (read, not loaded)>"

    def children(self) -> Iterator[ScriptModuleView]:
        return iter(self._children.values())

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, ScriptModuleView]]:
        """Every module of the tree, parents before children, in ``nn.Module`` order (a stack,
        not recursion: a tree as deep as a model can be)."""
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            yield name, module
            stack.extend(reversed([(f"{name}.{key}" if name else key, child) for key, child in module._children.items()]))

    def modules(self) -> Iterator[ScriptModuleView]:
        return (m for _, m in self.named_modules())

    def _tensors(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        for name in names:
            if isinstance(self._state.get(name), TensorRef):
                yield name, getattr(self, name)

    def named_parameters(self, recurse: bool = False) -> Iterator[tuple[str, Any]]:
        return self._tensors(self._parameters)

    def named_buffers(self, recurse: bool = False) -> Iterator[tuple[str, Any]]:
        return self._tensors(self._buffers)
