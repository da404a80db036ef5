"""safetensors files read by bnctl itself: the header validated as a whole, each tensor read
from a memory map only when asked for.

What is checked (each with its own error): the header's length fits the file (and at most
:data:`MAX_HEADER` bytes), it is a JSON object, every entry has a known dtype, a shape of
non-negative integers and offsets inside the data whose length is the shape's size, no two
entries overlap, and ``__metadata__`` maps strings to strings.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

#: safetensors dtype -> (numpy dtype of the bytes, torch dtype to view them as, or None)
DTYPES = {
    "F64": ("<f8", None), "F32": ("<f4", None), "F16": ("<f2", None), "BF16": ("<u2", "bfloat16"),
    "I64": ("<i8", None), "I32": ("<i4", None), "I16": ("<i2", None), "I8": ("i1", None),
    "U8": ("u1", None), "U16": ("<u2", None), "U32": ("<u4", None), "U64": ("<u8", None), "BOOL": ("?", None),
    "F8_E4M3": ("u1", "float8_e4m3fn"), "F8_E5M2": ("u1", "float8_e5m2"),
}
#: the largest header bnctl reads (a file with 200,000 BN layers has one of about 70 MB)
MAX_HEADER = 512 << 20
_TIP = "the file is damaged or was not written by safetensors; download or save it again"


class SafetensorsTensors(Mapping):
    """A read-only mapping over a safetensors file that reads a tensor only when asked."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: too short for a safetensors file", _TIP)
            (length,) = struct.unpack("<Q", head)
            if length > size - 8 or length > MAX_HEADER:
                raise InputError(f"{path}: its safetensors header declares {length} bytes, more than the file holds", "the file is truncated; " + _TIP)
            raw = f.read(length)
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
        self._start = 8 + length
        self._entries = _checked(path, header, size - self._start)
        self._map: np.ndarray | None = None

    def __getitem__(self, key: str) -> Any:
        import torch

        dtype, view, shape, begin, end = self._entries[key]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        array = np.frombuffer(self._map[self._start + begin : self._start + end].tobytes(), dtype=dtype).reshape(shape)
        tensor = torch.from_numpy(array.copy() if not array.flags.writeable else array)
        return tensor.view(getattr(torch, view)) if view else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _checked(path: Path, header: dict, data_size: int) -> dict[str, tuple]:
    entries: dict[str, tuple] = {}
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InputError(f"{path}: safetensors entry {name!r} is not an object", _TIP)
        kind, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if kind not in DTYPES:
            raise InputError(f"{path}: safetensors entry {name!r} has unknown dtype {kind!r}", _TIP)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InputError(f"{path}: safetensors entry {name!r} has shape {shape!r}, not a list of sizes", _TIP)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise InputError(f"{path}: safetensors entry {name!r} has offsets {offsets!r} outside the file's {data_size} bytes of data", "the file is truncated or damaged; download or save it again")
        dtype = np.dtype(DTYPES[kind][0])
        expected = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if offsets[1] - offsets[0] != expected:
            raise InputError(f"{path}: safetensors entry {name!r} holds {offsets[1] - offsets[0]} bytes, but shape {shape} of {kind} needs {expected}", _TIP)
        entries[name] = (dtype, DTYPES[kind][1], tuple(shape), offsets[0], offsets[1])
        if offsets[1] > offsets[0]:
            spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise InputError(f"{path}: safetensors entries {first!r} and {second!r} overlap", _TIP)
    return entries
