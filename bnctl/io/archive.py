"""Zip archives (torch.save, TorchScript, torch.export) checked as a whole before anything
reads them, and members read with their CRC-32 checked.

What is checked, before any loader (bnctl's or torch's) sees the file:

- it is a regular file (a FIFO, a device or a directory is refused at once);
- the central directory parses; no two members share a name (Python's zipfile reads the
  last of them, torch's reader the first);
- every member lies inside the file, a stored member's size is its declared size, and the
  declared sizes of all members together stay within a bound proportional to the file's
  size (a zip bomb declares small sizes and inflates to gigabytes);
- per kind, every member's name is one the format writes (:data:`ALLOWED`): no shared
  libraries, no AOTInductor code, no opaque or custom objects, nothing unknown.
"""

from __future__ import annotations

import re
import stat
import struct
import zipfile
import zlib
from collections import Counter
from pathlib import Path

from ..errors import InputError, UnsafeCheckpointError

#: member names each archive kind may hold, after its top folder (``archive/...``)
ALLOWED = {
    # bnctl_sources.json: where the classes of a module bnctl pickled came from (io/arch.py)
    "torch": (r"data\.pkl", r"data/\d+", r"byteorder", r"version", r"\.format_version", r"\.storage_alignment", r"\.data/.*", r"bnctl_sources\.json"),
    # torch.jit.save (torch/csrc/jit/serialization/export_module.cpp): the module, its code and
    # constants, files passed as _extra_files (whose names may hold folders), the example
    # inputs of torch.jit.trace (torch >= 2.0), and what _save_for_lite_interpreter adds
    "torchscript": (
        r"data\.pkl",
        r"constants\.pkl",
        r"data/\d+",
        r"constants/\d+(\.storage)?",
        r"code/.*\.py",
        r"code/.*\.debug_pkl",
        r"byteorder",
        r"version",
        r"\.data/.*",
        r"extra/.+",
        r"traced_inputs\.pkl",
        r"traced_inputs/\d+",
        r"bytecode\.pkl",
        r"mobile_debug_handles\.pkl",
        r"mobile_debug_handles/\d+(\.storage)?",
        r"callstack_debug_map\.pkl",
        r"delegated_backends\.debug_pkl",
    ),
    "export": (
        r"archive_format",
        r"archive_version",
        r"version",
        r"byteorder",
        r"\.data/.*",
        r"models/[^/]+\.json",
        r"data/weights/[^/]+",
        r"data/constants/[^/]+",
        r"data/sample_inputs/[^/]+\.pt",
        r"extra/[^/]+",
    ),
}
#: how far the declared sizes of all members may exceed the file's size (compression ratio), plus a margin
MAX_RATIO, MARGIN = 50, 64 << 20
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def open_zip(path: Path) -> zipfile.ZipFile:
    """The zip archive at ``path`` with its central directory parsed; an InputError if it
    does not parse. The last one opened is kept while the file is unchanged (size, inode,
    change time), so telling the format and then reading the file parse a directory of a
    million members once."""
    try:
        info = path.stat()
        key = (str(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        cached = _OPENED.get(key)
        if cached is not None:
            return cached
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError, struct.error, EOFError) as exc:
        raise InputError(f"{path} is a corrupted or truncated zip archive ({exc})", "the file was cut off or damaged; download or save it again") from exc
    _OPENED.clear()
    _OPENED[key] = archive
    return archive


_OPENED: dict[tuple, zipfile.ZipFile] = {}


def regular_file(path: str | Path) -> Path:
    """``path`` if it is a regular file; an InputError for a missing path, a directory, a FIFO,
    a device or a socket (which would block or never end)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file", "check the path; `ls` the folder to see what is there") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})", "check the path and its permissions") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path} is a directory, not a checkpoint file", f"pass one file inside it, e.g. {path / 'model.pt'}")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path} is not a regular file (a pipe, device or socket)", "save the checkpoint to a file and pass that file")
    return path


class Archive:
    """A validated zip archive: :meth:`read` returns a member's bytes, CRC-32 checked.

    With ``trust`` the member names are not checked against :data:`ALLOWED` (the user
    accepted that loading may run code); the structure still is."""

    def __init__(self, path: Path, kind: str, *, trust: bool = False):
        self.path, self.kind, self.trust = path, kind, trust
        self.zip = open_zip(path)
        infos = self.zip.infolist()
        self._map = None
        self.members = {i.filename: i for i in infos}
        self._check(infos)
        tops = {n.partition("/")[0] for n in self.members}
        self.prefix = (tops.pop() + "/") if len(tops) == 1 else ""

    def _check(self, infos: list[zipfile.ZipInfo]) -> None:
        path = self.path
        twice = [n for n, c in Counter(i.filename for i in infos).items() if c > 1]
        if twice:
            raise InputError(f"{path}: the zip archive holds {len(twice)} members named twice ({twice[0]})", "the file is damaged or crafted; save it again from the original model")
        size = path.stat().st_size
        declared = 0
        for info in infos:
            if info.header_offset + info.compress_size > size or info.compress_size < 0:
                raise InputError(f"{path}: member {info.filename} lies beyond the end of the file", "the file is truncated; download or save it again")
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise InputError(f"{path}: member {info.filename} declares {info.file_size} bytes but stores {info.compress_size}", "the file is damaged; save it again")
            declared += info.file_size
        if declared > MAX_RATIO * size + MARGIN:
            raise InputError(f"{path}: its members declare {declared} bytes, {declared / max(size, 1):.0f} times the file's size (a zip bomb?)", "bnctl reads archives whose contents are at most 50 times their size; check where the file came from")
        patterns = [re.compile(p) for p in ALLOWED[self.kind]]
        for name in self.members:
            if self.trust:
                break
            inner = name.partition("/")[2] if "/" in name else name
            if ".." in name.split("/") or name.startswith("/"):
                raise InputError(f"{path}: member name {name!r} points outside the archive", "the file is crafted or damaged; do not use it")
            if not any(p.fullmatch(inner) for p in patterns):
                raise UnsafeCheckpointError(
                    f"{path}: member {name} is not part of a {self.kind} archive as torch writes it ({_why(inner)}); bnctl does not read it without --trust",
                    "only if you trust where it came from: add --trust (loading may then run code from the file)",
                )

    def name(self, inner: str) -> str:
        """The full member name of ``inner`` (a name below the archive's top folder)."""
        return self.prefix + inner

    def has(self, inner: str) -> bool:
        return self.name(inner) in self.members

    def read(self, inner: str) -> bytes:
        """The bytes of member ``inner``, CRC-32 checked; an InputError if it is missing or damaged."""
        name = self.name(inner)
        info = self.members.get(name)
        if info is None:
            raise InputError(f"{self.path}: member {name} is missing", "the file is incomplete or damaged; save it again")
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                data = self._stored(info)
            else:
                data = self.zip.read(info)  # zipfile stops at the declared size and checks the CRC
        except (zipfile.BadZipFile, OSError, zlib.error, EOFError, NotImplementedError, struct.error, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"{self.path}: member {name} is damaged ({exc})", "the file is corrupted; download or save it again") from exc
        return data

    def _stored(self, info: zipfile.ZipInfo) -> bytes:
        if self._map is None:  # one read-only map for every member (a file may hold a million)
            import mmap

            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = self._map
        start = info.header_offset
        header = view[start : start + _LOCAL_HEADER.size]
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile("bad local file header")
        fields = _LOCAL_HEADER.unpack(header)
        start += _LOCAL_HEADER.size + fields[-2] + fields[-1]
        data = view[start : start + info.file_size]
        if len(data) != info.file_size:
            raise zipfile.BadZipFile("member cut off")
        if zlib.crc32(data) != info.CRC:
            raise zipfile.BadZipFile("CRC-32 mismatch: its bytes changed after it was written")
        return data

    def verify(self) -> None:
        """Check the CRC-32 of every member (for loaders that read them all without checking)."""
        for name in self.members:
            if not name.endswith("/"):
                self.read(name[len(self.prefix) :])

    def check_export_objects(self) -> None:
        """Refuse a ``.pt2`` that ``torch.export.load`` would run code from: constants that are
        opaque or custom objects (unpickled, or rebuilt by torch's C++ unpickler), weights or
        constants stored as pickles, and pickled members (sample inputs) that hold more than
        tensors and containers (torch retries those with the unrestricted unpickler). The
        pickles are read by bnctl's restricted unpickler, which runs nothing."""
        import io
        import json

        from . import pickles

        for name in self.members:
            inner = name[len(self.prefix) :]
            if not inner.endswith("_config.json"):
                continue
            try:
                entries = json.loads(self.read(inner)).get("config", {})
                for key, entry in entries.items():
                    if str(key).startswith(("opaque_obj", "custom_obj")) or "opaque_obj" in str(entry.get("path_name", "")):
                        raise UnsafeCheckpointError(
                            f"{self.path}: constant {key} is a pickled Python or C++ object that torch.export.load would rebuild by running code; bnctl does that only with --trust",
                            "only if you trust where it came from: add --trust",
                        )
                    if entry.get("use_pickle"):
                        raise UnsafeCheckpointError(
                            f"{self.path}: {key} is stored as a pickle, which torch.export.load unpickles without restriction; bnctl reads it only with --trust",
                            "only if you trust where it came from: add --trust",
                        )
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
                raise InputError(f"{self.path}: its {inner} is damaged ({exc})", "save the program again with torch.export.save") from exc
        for name in sorted(n for n in self.members if n.endswith(".pt")):
            try:
                with zipfile.ZipFile(io.BytesIO(self.read(name[len(self.prefix) :]))) as inner:
                    pickled = next(n for n in inner.namelist() if n.endswith("data.pkl"))
                    pickles.load(inner.read(pickled))
            except pickles.Refused as exc:
                raise UnsafeCheckpointError(
                    f"{self.path}: its member {name} pickles Python objects ({exc.name}); torch.export.load would run code from the file, which bnctl does only with --trust",
                    "only if you trust where it came from: add --trust",
                ) from None
            except Exception as exc:  # noqa: BLE001 - a damaged or foreign pickle: torch would unpickle it unrestricted
                raise UnsafeCheckpointError(
                    f"{self.path}: its member {name} is not a tensor archive bnctl can check ({type(exc).__name__}); torch.export.load would unpickle it unrestricted, which bnctl does only with --trust",
                    "only if you trust where it came from: add --trust",
                ) from None

    def close(self) -> None:
        self.zip.close()


def _why(inner: str) -> str:
    if inner.endswith((".so", ".dll", ".dylib")) or "aotinductor" in inner:
        return "compiled code that loading would run"
    if "opaque_obj" in inner or "custom_obj" in inner:
        return "a pickled Python or C++ object"
    return "an unknown member"
