"""Atomic file writing: the bytes go to a temporary file in the destination folder, which is
renamed into place; and the guard that keeps a command from writing over its input.

A failure (a read-only folder, a full disk) is one :class:`~bnctl.errors.InputError` naming
the folder and the cause, the temporary file removed and the destination untouched. Written
files get the mode the user's umask gives (as ``open()`` and ``torch.save`` do), not the
temporary file's 0600.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically (see the module doc)."""
    dest = Path(dest)
    folder = dest.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _write_error(dest, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(dest, exc) from None
        raise


def write_text(dest: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``dest`` atomically."""
    write_bytes(dest, text.encode("utf-8"))


def _write_error(dest: Path, exc: OSError) -> InputError:
    folder = dest.parent.resolve() if dest.parent.exists() else dest.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return InputError(f"cannot write {dest}: no space left on the device of {folder}", "free some space or write to another disk with -o/--output; nothing was written")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return InputError(f"cannot write {dest}: a part of {dest.parent} is a file, not a folder", "write to a folder with -o/--output")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InputError(f"cannot write {dest}: {folder} is not writable ({exc.strerror})", "write to a folder you can write to with -o/--output")
    return InputError(f"cannot write {dest}: {exc.strerror or exc}", "check the destination path; nothing was written")


def refuse_overwrite(sources: str | os.PathLike | list, output: str | os.PathLike | None) -> None:
    """An InputError if ``output`` is one of the files ``sources`` (the same file through a
    symlink or a hard link included): inputs are never overwritten."""
    if output is None:
        return
    output = Path(output)
    if not output.exists():
        return
    for source in sources if isinstance(sources, list) else [sources]:
        source = Path(source)
        try:
            same = source.exists() and os.path.samefile(source, output)
        except OSError:
            same = False
        if same:
            raise InputError(f"refusing to overwrite the input {source} with {output}", "write the result to another file with -o/--output")
