"""bnctl's own reader of the pickles inside torch zip archives (``data.pkl``) and TorchScript
archives (``data.pkl``, ``constants.pkl``). It imports nothing and calls nothing from the file.

The unpickler knows the few globals torch writes for tensors and containers; a tensor
becomes a :class:`TensorRef` (storage key, dtype, offset, size, stride) whose bytes are read
later, only if asked, from the archive's ``data/<key>`` member (CRC checked). In TorchScript
archives, a ``__torch__.*`` class becomes an inert :class:`ScriptObject` that only keeps the
state the pickle gives it. Any other global is refused with :class:`Refused`, which names it.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any, NamedTuple

import numpy as np

#: torch storage class -> (numpy dtype, torch dtype name); bfloat16 is read as its bits
STORAGES = {
    "FloatStorage": ("<f4", "float32"),
    "DoubleStorage": ("<f8", "float64"),
    "HalfStorage": ("<f2", "float16"),
    "BFloat16Storage": ("<u2", "bfloat16"),
    "LongStorage": ("<i8", "int64"),
    "IntStorage": ("<i4", "int32"),
    "ShortStorage": ("<i2", "int16"),
    "CharStorage": ("i1", "int8"),
    "ByteStorage": ("u1", "uint8"),
    "BoolStorage": ("?", "bool"),
}


class Refused(Exception):
    """The pickle needs a global this reader does not build (``.name`` says which)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class StorageRef(NamedTuple):
    """A storage as the pickle names it (a named tuple: a file holds up to millions of them)."""

    key: str
    dtype: str  # numpy dtype
    torch_dtype: str
    numel: int


class TensorRef(NamedTuple):
    """A tensor as the pickle describes it; :class:`bnctl.io.torchzip.TensorReader` reads its bytes."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size


class ScriptObject:
    """An inert stand-in for an instance of a TorchScript class: its qualified name and the
    state the pickle set. It has no methods the pickle could reach."""

    qualname = ""

    def __init__(self, *args: Any) -> None:
        self.__dict__["_args"] = args
        self.__dict__["_state"] = {}

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state if isinstance(state, dict) else {"__state__": state}


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise Refused("a tensor without a storage")
    if type(offset) is not int or type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride):
        raise pickle.UnpicklingError("malformed tensor description")
    for d in (*size, *stride):
        if type(d) is not int or d < 0:
            raise pickle.UnpicklingError("malformed tensor description")
    return TensorRef(storage, offset, size, stride, requires_grad is True or bool(requires_grad))


def _parameter(data: Any, requires_grad: Any = True, *_: Any) -> Any:
    if isinstance(data, TensorRef):
        return TensorRef(data.storage, data.offset, data.size, data.stride, bool(requires_grad))
    return data


def _same(value: Any, *_: Any) -> Any:
    return value


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.jit._pickle", "build_intlist"): _same,
    ("torch.jit._pickle", "build_doublelist"): _same,
    ("torch.jit._pickle", "build_boollist"): _same,
    ("torch.jit._pickle", "build_tensorlist"): _same,
    ("torch.jit._pickle", "build_strlist"): _same,
    ("torch.jit._pickle", "restore_type_tag"): _same,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, script: bool):
        super().__init__(io.BytesIO(data))
        self.script = script
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in STORAGES:
            return name
        if self.script and module.startswith("__torch__"):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:60]}")
        _, kind, key, _location, numel = pid
        if kind not in STORAGES:
            raise Refused(f"torch.{kind}")
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError("malformed storage")
        dtype, torch_dtype = STORAGES[kind]
        return StorageRef(str(key), dtype, torch_dtype, numel)


def load(data: bytes, *, script: bool = False) -> Any:
    """Unpickle ``data`` into plain containers, :class:`TensorRef` and (with ``script``)
    :class:`ScriptObject`. Raises :class:`Refused` for any other global, and
    ``pickle.UnpicklingError`` (or ValueError, EOFError...) for a damaged pickle."""
    return _Unpickler(data, script).load()


def modules(data: bytes) -> set[str]:
    """The modules whose globals the pickle ``data`` names (GLOBAL and STACK_GLOBAL), read
    opcode by opcode without unpickling anything."""
    import pickletools

    found: set[str] = set()
    strings: list[str] = []  # the last strings pushed: STACK_GLOBAL takes module and name from them
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(str(arg).partition(" ")[0])
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(strings[-2])
        elif isinstance(arg, str) and "UNICODE" in op.name:
            strings = [*strings[-1:], arg]
    return found


def element_size(ref: StorageRef) -> int:
    return np.dtype(ref.dtype).itemsize
