"""Which files a folder given to ``bnctl audit`` holds: found by content (a cheap sniff of the
first bytes), not by name, so ``*.pth.tar``, ``*.bin`` or a model without an extension are
audited; ``.gitignore`` files are honoured and ``--include``/``--exclude`` globs applied.
Files named explicitly are always audited."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

#: the first bytes of every format bnctl reads (zip, legacy torch / pickle, safetensors, ONNX)
_ZIP = (b"PK\x03\x04", b"PK\x05\x06")


def looks_like_checkpoint(path: Path) -> bool:
    """Whether the first bytes could start a file bnctl reads (the reader decides for sure)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if head.startswith(_ZIP) or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return True
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
        return True
    return len(head) > 1 and head[0] == 0x08 and 1 <= head[1] <= 20  # ONNX: field 1, ir_version


@dataclass
class Discovery:
    """The files to audit, and how many a folder held that were skipped, by reason."""

    files: list[Path] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def _ignore_patterns(folder: Path) -> list[str]:
    try:
        lines = (folder / ".gitignore").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#") and not line.startswith("!")]


def _ignored(relative: str, is_dir: bool, patterns: list[str]) -> bool:
    """A small subset of gitignore: ``name``, ``*.ext``, ``dir/``, ``/anchored``, ``a/b/*``."""
    name = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        directory_only = pattern.endswith("/")
        p = pattern.rstrip("/")
        if directory_only and not is_dir:
            continue
        if p.startswith("/") or "/" in p:
            if fnmatch.fnmatchcase(relative, p.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def discover(paths: Sequence[str | Path], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Discovery:
    """Files to audit: each file as given; each folder's files (recursive, sorted) that look
    like checkpoints, are not ignored by a ``.gitignore`` on the way, match an ``include``
    glob (when given) and no ``exclude`` glob (globs match the path below the folder)."""
    found = Discovery()
    for root in map(Path, paths):
        if not root.is_dir():
            found.files.append(root)
            continue
        rules_of: dict[Path, list[tuple[Path, str]]] = {}
        for folder, dirs, names in os.walk(root):
            here = Path(folder)
            rules = (rules_of.get(here.parent, []) if here != root else []) + [(here, p) for p in _ignore_patterns(here)]
            rules_of[here] = rules

            def ignored(child: Path, is_dir: bool) -> bool:
                return any(_ignored(child.relative_to(base).as_posix(), is_dir, [p]) for base, p in rules)

            kept = []
            for d in sorted(dirs):
                if d == ".git":
                    continue
                if ignored(here / d, True):
                    found.skip("ignored by .gitignore")
                    continue
                kept.append(d)
            dirs[:] = kept
            for name in sorted(names):
                path = here / name
                relative = path.relative_to(root).as_posix()
                if name == ".gitignore":
                    continue
                if ignored(path, False):
                    found.skip("ignored by .gitignore")
                elif include and not any(fnmatch.fnmatchcase(relative, g) or fnmatch.fnmatchcase(name, g) for g in include):
                    found.skip("not matched by --include")
                elif any(fnmatch.fnmatchcase(relative, g) or fnmatch.fnmatchcase(name, g) for g in exclude):
                    found.skip("excluded by --exclude")
                elif not path.is_file() or not looks_like_checkpoint(path):
                    found.skip("not a checkpoint")
                else:
                    found.files.append(path)
    return found
