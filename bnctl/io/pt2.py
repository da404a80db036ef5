"""``torch.export`` archives (``.pt2``) read by bnctl itself: the program's JSON graph and its
weight files as raw tensors. Nothing is unpickled, loaded or run (``torch.export.load``, which
bnctl uses only with ``--trust``, deserializes the program and may load compiled code).

The archive is validated first (:mod:`bnctl.io.archive`); the weights are read from
``data/weights/<path_name>`` as their ``model_weights_config.json`` describes them (dtype,
sizes, strides, offset), CRC-32 checked, only when used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from ..errors import InputError
from .archive import Archive

#: torch._export.serde.schema.ScalarType -> numpy dtype (bfloat16 as its bits, widened on read)
SCALAR_TYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f2", 7: "<f4", 8: "<f8", 12: "?", 13: "<u2", 28: "<u2", 34: "<u4", 35: "<u8"}
_TIP = "the file is damaged or was written by another torch version; save it again with torch.export.save"


@dataclass
class ProgramView:
    """A ``.pt2`` program as read, never loaded: its graph (the JSON of ``models/<name>.json``)
    and its parameters and buffers by qualified name (numpy arrays, read when asked for)."""

    graph: dict
    signature: dict
    tensors: Mapping[str, np.ndarray]


class _Weights(Mapping):
    def __init__(self, archive: Archive, folder: str, config: dict):
        self._archive, self._folder, self._config = archive, folder, config

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._config[name]
        if entry.get("use_pickle"):
            raise KeyError(name)  # pickled weights are never read without --trust
        meta = entry.get("tensor_meta") or {}
        kind = SCALAR_TYPES.get(meta.get("dtype"))
        if kind is None:
            raise InputError(f"{self._archive.path}: weight {name} has a dtype bnctl does not read ({meta.get('dtype')})", "read it with --trust")
        try:
            sizes = [int(s["as_int"]) for s in meta.get("sizes", [])]
            strides = [int(s["as_int"]) for s in meta.get("strides", [])]
            offset = int(meta.get("storage_offset", {}).get("as_int", 0))
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{self._archive.path}: weight {name} has a damaged description", _TIP) from None
        raw = self._archive.read(f"{self._folder}/{entry['path_name']}")
        dtype = np.dtype(kind)
        data = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
        if sizes and min(sizes) > 0:
            last = offset + sum((s - 1) * st for s, st in zip(sizes, strides))
            if len(strides) != len(sizes) or min(strides, default=0) < 0 or offset < 0 or last >= data.size:
                raise InputError(f"{self._archive.path}: weight {name} points outside its bytes", _TIP)
            array = np.array(np.lib.stride_tricks.as_strided(data[offset:], shape=sizes, strides=[s * dtype.itemsize for s in strides]))
        elif sizes:
            array = np.empty(sizes, dtype)
        else:
            if offset >= data.size:
                raise InputError(f"{self._archive.path}: weight {name} points outside its bytes", _TIP)
            array = np.array(data[offset])
        if meta.get("dtype") == 13:  # bfloat16: widen exactly
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._config)

    def __len__(self) -> int:
        return len(self._config)


def read_program(path: Path) -> ProgramView:
    """The program of a ``.pt2`` archive, read without loading it (see the module doc)."""
    archive = Archive(path, "export")
    archive.check_export_objects()
    models = sorted(n[len(archive.prefix) :] for n in archive.members if n[len(archive.prefix) :].startswith("models/") and n.endswith(".json"))
    if not models:
        raise InputError(f"{path}: the archive holds no program (models/*.json)", _TIP)
    try:
        document = json.loads(archive.read(models[0]))
        module = document["graph_module"]
        graph, signature = module["graph"], module["signature"]
        weights_config = archive.read("data/weights/model_weights_config.json") if archive.has("data/weights/model_weights_config.json") else b'{"config": {}}'
        config = json.loads(weights_config)["config"]
        if not (isinstance(graph.get("nodes"), list) and isinstance(signature.get("input_specs"), list) and isinstance(config, dict)):
            raise TypeError("unexpected layout")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: its program is damaged ({type(exc).__name__}: {str(exc)[:100]})", _TIP) from None
    return ProgramView(graph, signature, _Weights(archive, "data/weights", config))
