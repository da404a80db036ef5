"""safetensors files read by bnctl itself: the header validated as a whole, each tensor read
from a memory map only when asked for.

What is checked (each with its own error): the header's length fits the file (and at most
:data:`MAX_HEADER` bytes, safetensors' own limit), it is a JSON object, every entry has a known dtype, a shape of
non-negative integers and offsets inside the data whose length is the shape's size, no two
entries overlap, and ``__metadata__`` maps strings to strings.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

#: safetensors dtype -> (numpy dtype of the bytes, torch dtype to view them as, or None)
DTYPES = {
    "F64": ("<f8", None),
    "F32": ("<f4", None),
    "F16": ("<f2", None),
    "BF16": ("<u2", "bfloat16"),
    "I64": ("<i8", None),
    "I32": ("<i4", None),
    "I16": ("<i2", None),
    "I8": ("i1", None),
    "U8": ("u1", None),
    "U16": ("<u2", None),
    "U32": ("<u4", None),
    "U64": ("<u8", None),
    "BOOL": ("?", None),
    "F8_E4M3": ("u1", "float8_e4m3fn"),
    "F8_E5M2": ("u1", "float8_e5m2"),
}
#: the largest header bnctl reads: safetensors' own reader refuses more (its MAX_HEADER_SIZE);
#: a file with 200,000 BN layers has one of about 70 MB
MAX_HEADER = 100_000_000
_TIP = "the file is damaged or was not written by safetensors; download or save it again"


class SafetensorsTensors(Mapping):
    """A read-only mapping over a safetensors file that reads a tensor only when asked."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = header_length(path, f.read(8), size)
            raw = f.read(length)
        self._start = 8 + length
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: its safetensors header is not JSON ({exc})", _TIP) from None
        if not isinstance(header, dict):
            raise InputError(f"{path}: its safetensors header is not a JSON object", _TIP)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InputError(f"{path}: its safetensors __metadata__ is not a map of strings", _TIP)
        self.metadata = metadata
        self._entries = _checked(path, header, size - self._start, self._start)
        self._bytes: Any = None  # the file as a numpy byte array over a copy-on-write map, once read

    def __getitem__(self, key: str) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 widened to float32, exactly; float8 through torch)."""
        dtype, view, shape, begin, end = self._entries[key]
        if view is None and self._bytes is not None and end > begin:  # the common case, kept short
            array = self._bytes[begin:end].view(dtype)
            return array if len(shape) == 1 else array.reshape(shape)
        array = self._raw(key)
        if view == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        if view is not None:
            return self.torch(key).float().numpy()
        return array

    def torch(self, key: str) -> Any:
        """The tensor as torch holds it, with the file's own dtype."""
        import torch

        _, view, _, _, _ = self._entries[key]
        tensor = torch.from_numpy(self._raw(key))
        return tensor.view(getattr(torch, view)) if view else tensor

    def _raw(self, key: str) -> np.ndarray:
        import mmap

        dtype, _, shape, begin, end = self._entries[key]
        if self._bytes is None:
            with open(self.path, "rb") as f:  # copy-on-write: arrays may be changed, the file never is
                self._bytes = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
        if end == begin:
            return np.empty(shape, dtype=dtype)
        return self._bytes[begin:end].view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def header_parses(path: Path, size: int) -> bool:
    """Whether the file's first 8 bytes declare a length (within :data:`MAX_HEADER` and the
    file) of bytes that parse as a JSON object: what tells a safetensors file from a pickle
    whose first bytes happen to look like one."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= min(size - 8, MAX_HEADER):
            return False
        raw = f.read(length)
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def header_length(path: Path, head: bytes, size: int) -> int:
    """The header length that ``head``, the file's first bytes, declares, checked as
    safetensors' reader checks it before reading the header: at most :data:`MAX_HEADER`
    bytes, then within the file's ``size``; an InputError otherwise."""
    if len(head) < 8:
        raise InputError(f"{path}: too short for a safetensors file", _TIP)
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER:
        raise InputError(
            f"{path}: its safetensors header declares {length} bytes, more than the {MAX_HEADER} that safetensors reads",
            "safetensors' own reader refuses it too; save the weights again (a state_dict split over several files if it is that large)",
        )
    if length == 0:
        raise InputError(f"{path}: its safetensors header is empty", _TIP)
    if length > size - 8:
        raise InputError(f"{path}: its safetensors header declares {length} bytes, more than the file holds", "the file is truncated; " + _TIP)
    return length


def _checked(path: Path, header: dict, data_size: int, start: int) -> dict[str, tuple]:
    """``name -> (dtype, view, shape, begin, end)`` for every entry, each checked, with
    offsets from the start of the file (the data starts at ``start``); one
    pass over the header (a file with 200,000 layers has 800,000 entries, most of them
    of a few dtype/shape pairs, each checked once)."""
    entries: dict[str, tuple] = {}
    kinds: dict[tuple, tuple] = {}  # (dtype name, shape) -> (dtype, view, count), checked
    begins, ends = [], []
    for name, entry in header.items():
        try:
            kind, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise InputError(f"{path}: safetensors entry {name!r} lacks dtype, shape or data_offsets [begin, end]", _TIP) from None
        key = (kind, tuple(shape)) if type(kind) is str and type(shape) is list else None
        try:
            found = kinds.get(key)
        except TypeError:  # a shape holding lists: _kind says what is wrong
            found = None
        if found is None:
            found = kinds[key] = _kind(path, name, kind, shape)
        dtype, view, count = found
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= data_size:
            raise InputError(f"{path}: safetensors entry {name!r} has offsets {[begin, end]!r} outside the file's {data_size} bytes of data", "the file is truncated or damaged; download or save it again")
        if end - begin != count * dtype.itemsize:
            raise InputError(f"{path}: safetensors entry {name!r} holds {end - begin} bytes, but shape {shape} of {kind} needs {count * dtype.itemsize}", _TIP)
        entries[name] = (dtype, view, key[1], start + begin, start + end)
        begins.append(begin)
        ends.append(end)
    _no_overlap(path, list(entries), np.array(begins, dtype=np.int64), np.array(ends, dtype=np.int64))
    return entries


def _kind(path: Path, name: str, kind: Any, shape: Any) -> tuple:
    """``(numpy dtype, view, element count)`` of a dtype name and shape, or the error."""
    if type(kind) is not str or kind not in DTYPES:
        raise InputError(f"{path}: safetensors entry {name!r} has unknown dtype {kind!r}", _TIP)
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{path}: safetensors entry {name!r} has shape {shape!r}, not a list of sizes", _TIP)
    numpy_name, view = DTYPES[kind]
    return np.dtype(numpy_name), view, math.prod(shape)


def _no_overlap(path: Path, names: list[str], begins: np.ndarray, ends: np.ndarray) -> None:
    """Raise if two entries that hold bytes share any (sorted by offset, in numpy)."""
    held = np.flatnonzero(ends > begins)
    order = held[np.argsort(begins[held], kind="stable")]
    clash = np.flatnonzero(begins[order[1:]] < ends[order[:-1]])
    if clash.size:
        first, second = names[order[clash[0]]], names[order[clash[0] + 1]]
        raise InputError(f"{path}: safetensors entries {first!r} and {second!r} overlap", _TIP)
