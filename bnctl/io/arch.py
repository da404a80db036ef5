"""Build the user's module from ``--arch`` and load a state_dict into it strictly (torch is
imported only to build, so parsing ``--arch-arg`` costs nothing).

``--arch`` is ``pkg.module:factory`` (an importable module) or ``path/to/file.py:factory``;
the factory is a class or function returning an ``nn.Module``, called with the
``--arch-arg name=value`` pairs as keyword arguments (values parsed as Python literals).

A module bnctl pickles (``convert``, ``fold --to module``, ...) names the classes of a
file-path ``--arch`` by the file's module name (``nets``); the archive records the file
(:data:`SOURCES`, :func:`sources`), and loading it with ``--trust`` imports that file where
the module is not importable otherwise (:func:`import_source`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ArchError

if TYPE_CHECKING:  # pragma: no cover - torch is imported where a module is built
    import torch

#: Prefixes wrappers add to every key: DDP/DataParallel, Lightning, torch.compile.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def parse_arch_args(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``name=value`` strings. A value that is a Python literal (``64``, ``True``,
    ``(1, 2)``, ``'wide'``) is that value; any other text is a string (``variant=small``), as
    Python Fire and Hydra take it. Nothing is ever evaluated."""
    kwargs: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ArchError(f"--arch-arg {item!r} is not name=value", "write it as --arch-arg width=64")
        try:
            kwargs[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            kwargs[name] = text.strip()
    return kwargs


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Return the callable named by ``pkg.module:factory`` or ``path/file.py:factory``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ArchError(f"--arch {spec!r} is not module:factory", "write it as --arch mypkg.models:resnet18 or --arch path/net.py:Net")
    module = _import_file(target) if target.endswith(".py") or "/" in target else _import_module(target)
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            names = sorted(n for n in dir(module) if not n.startswith("_"))[:15]
            raise ArchError(f"--arch {spec!r}: {target} has no attribute {part!r}", f"names it defines: {', '.join(names)}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ArchError(f"--arch {spec!r}: {attr} is not callable", "point --arch at a class or a function that returns an nn.Module")
    return factory


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure while importing the user's code is bad input
        raise ArchError(
            f"--arch: cannot import {name}: {type(exc).__name__}: {exc}",
            "install the package or add its folder to PYTHONPATH; a file works too: --arch path/to/file.py:factory",
        ) from exc


def _import_file(target: str):
    path = Path(target)
    if not path.is_file():
        raise ArchError(f"--arch: {path} is not a file", "check the path before the ':'")
    # the file's own name, as `import nets` would give it: modules pickled from it (bnctl convert)
    # then load back wherever nets.py is importable; a private name only where that one is taken
    module_name = path.stem
    taken = sys.modules.get(module_name)
    if not module_name.isidentifier() or (taken is not None and Path(getattr(taken, "__file__", "") or "").resolve() != path.resolve()):
        module_name = f"_bnctl_arch_{abs(hash(str(path.resolve())))}"
    try:
        module = _exec_file(path, module_name)
    except Exception as exc:  # noqa: BLE001
        raise ArchError(f"--arch: running {path} failed: {type(exc).__name__}: {exc}", "fix the error in that file; run `python " + str(path) + "` to see it") from exc
    _FILES[module_name] = path.resolve()
    return module


#: module name -> the file it was imported from, for each --arch file imported in this process
_FILES: dict[str, Path] = {}


def _exec_file(path: Path, module_name: str):
    """The file at ``path`` run as module ``module_name``, which it stays in ``sys.modules``
    (so that classes defined there can be pickled and dataclasses resolve); its folder is on
    ``sys.path`` meanwhile (the file may import its neighbours). Its exception otherwise."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def sources(module_names: Iterable[str]) -> dict[str, str]:
    """``module name -> file`` for each of ``module_names`` that came from an ``--arch`` file,
    or from a module file beside one (imported by it): what a pickle of their classes needs
    recorded to load again where they are not importable (:data:`SOURCES`)."""
    folders = {path.parent for path in _FILES.values()}
    found = {}
    for name in module_names:
        if name in _FILES:
            found[name] = str(_FILES[name])
            continue
        file = getattr(sys.modules.get(name), "__file__", None)
        if file and "." not in name and Path(file).suffix == ".py" and Path(file).resolve().parent in folders:
            found[name] = str(Path(file).resolve())
    return found


#: the member of a torch archive bnctl writes that records :func:`sources` (JSON: {"modules": {name: file}})
SOURCES = "bnctl_sources.json"


def recorded_sources(archive: Any) -> dict[str, str]:
    """``module name -> file`` that a torch archive (:class:`~bnctl.io.archive.Archive`)
    written by bnctl records for the classes it pickles; empty for any other archive."""
    import json

    if not archive.has(SOURCES):
        return {}
    try:
        modules = json.loads(archive.read(SOURCES))["modules"]
        return {k: v for k, v in modules.items() if isinstance(k, str) and isinstance(v, str)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def importing_recorded(archive: Any, load: Callable[[], Any]) -> Any:
    """``load()``; where a module it unpickles is not importable but ``archive`` (a torch
    archive bnctl wrote) records its file, that file imported as the module, and again."""
    recorded = recorded_sources(archive)
    while True:
        try:
            return load()
        except ModuleNotFoundError as exc:
            if exc.name not in recorded:
                raise
            import_source(exc.name, recorded.pop(exc.name))


def import_source(module_name: str, file: str | Path) -> None:
    """Import ``file`` as ``module_name`` (a module a file written by bnctl records): where its
    classes are not importable otherwise. An ArchError if the file is gone or fails to run."""
    path = Path(file)
    if not path.is_file():
        raise ArchError(
            f"the classes of module {module_name} were read from {path} when bnctl wrote this file, and that file is gone",
            f"put {path.name} back at {path.parent}, or make module {module_name} importable (PYTHONPATH)",
        )
    try:
        _exec_file(path, module_name)
    except Exception as exc:  # noqa: BLE001 - the user's file failing is bad input
        raise ArchError(f"running {path} (module {module_name}, recorded in the file) failed: {type(exc).__name__}: {exc}", f"fix the error in that file; run `python {path}` to see it") from exc
    _FILES[module_name] = path.resolve()


def build(spec: str, args: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Call the factory named by ``spec`` with ``args`` and return the module it builds."""
    factory = resolve_factory(spec)
    try:
        module = factory(**dict(args or {}))
    except Exception as exc:  # noqa: BLE001 - the user's factory failing with these arguments
        given = ", ".join(f"{k}={v!r}" for k, v in (args or {}).items()) or "no arguments"
        raise ArchError(f"--arch {spec!r} failed with {given}: {type(exc).__name__}: {str(exc)[:200]}", "check the --arch-arg values (a value that is not a Python literal is passed as a string)") from exc
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ArchError(f"--arch {spec!r} returned a {type(module).__name__}, not an nn.Module", "point --arch at a class or a function that returns an nn.Module")
    return module


def fit_keys(keys: Iterable[str], expected: Iterable[str], *, strip: str | None = None, add: str | None = None) -> tuple[dict[str, str], str | None]:
    """How the file's ``keys`` map onto the module's ``expected`` keys: file key -> module key,
    and a note saying which prefix was stripped or added (None when the keys fit as they are).

    ``strip``/``add`` (``--strip-prefix``/``--add-prefix``) apply first. Then, if the keys do
    not fit, the first of these that makes them fit exactly is used: the wrapper prefixes
    ``module.``, ``model.``, ``_orig_mod.`` stripped (nested too), one common prefix of every
    key stripped (``net.`` of a Lightning module's ``self.net``), or one common prefix of the
    module's keys added. Otherwise the wrappers alone are stripped, and the caller reports
    what is missing and unexpected.
    """
    keys, expected = list(keys), set(expected)
    given = {k: (k[len(strip) :] if strip and k.startswith(strip) else k) for k in keys}
    given = {k: (add or "") + v for k, v in given.items()}
    told = [f"stripped '{strip}'"] if strip else []
    told += [f"added '{add}'"] if add else []
    note = lambda what: "keys: " + ", ".join(told + ([what] if what else [])) + " to fit the model" if told or what else None  # noqa: E731
    if set(given.values()) == expected or not given:
        return given, note(None)
    wrapped = dict(given)
    stripped = []
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(v.startswith(p) for v in wrapped.values()) and not all(e.startswith(p) for e in expected)), None)
        if prefix is None:
            break
        wrapped = {k: v[len(prefix) :] for k, v in wrapped.items()}
        stripped.append(prefix)
    if set(wrapped.values()) == expected:
        return wrapped, note(f"stripped '{''.join(stripped)}'")
    first = next(iter(given.values())).split(".")
    for n in range(1, min(4, len(first))):
        prefix = ".".join(first[:n]) + "."
        if all(v.startswith(prefix) for v in given.values()):
            candidate = {k: v[len(prefix) :] for k, v in given.items()}
            if set(candidate.values()) == expected:
                return candidate, note(f"stripped '{prefix}'")
    first = next(iter(expected)).split(".")
    for n in range(1, min(4, len(first))):
        prefix = ".".join(first[:n]) + "."
        if all(e.startswith(prefix) for e in expected):
            candidate = {k: prefix + v for k, v in given.items()}
            if set(candidate.values()) == expected:
                return candidate, note(f"added '{prefix}'")
    return wrapped, note(f"stripped '{''.join(stripped)}'" if stripped else None)


def torch_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Every entry of a state_dict as torch holds it: bnctl's readers give numpy arrays and
    keep the file's own dtype behind ``.torch(key)``."""
    import numpy as np
    import torch

    own = getattr(tensors, "torch", None)
    return {k: own(k) if own is not None else (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in tensors.items()}


def load_state_dict(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], spec: str = "the architecture", *, strip: str | None = None, add: str | None = None, notes: list[str] | None = None) -> torch.nn.Module:
    """Load ``tensors`` into ``module`` strictly, after fitting their key prefixes
    (:func:`fit_keys`; the prefix used is appended to ``notes``).

    Raises :class:`ArchError` naming the missing and unexpected keys, or the shape
    mismatches, when the state_dict does not fit.
    """
    expected = module.state_dict().keys()
    averaged = [k for k in tensors.keys() if k.rpartition(".")[2] == "n_averaged" and k not in expected]
    keys = [k for k in tensors.keys() if k not in averaged]
    names, note = fit_keys(keys, expected, strip=strip, add=add)
    if note and notes is not None:
        notes.append(note)
    if averaged and notes is not None:
        count = _scalar(tensors[averaged[0]])
        notes.append(f"an AveragedModel (torch.optim.swa_utils) state_dict: {averaged[0]}={count} set aside, its module's weights and buffers loaded")
    own = torch_tensors({k: tensors[k] for k in keys} if averaged and not hasattr(tensors, "torch") else tensors)
    state = {names[k]: own[k] for k in keys}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
        raise ArchError(
            f"the checkpoint does not fit {spec}: keys " + "; ".join(parts),
            "check --arch and --arch-arg, pick another entry of the checkpoint with --key, or fit the names with --strip-prefix/--add-prefix",
        )
    own = module.state_dict()
    mismatched = [f"{k} is {list(state[k].shape)} in the checkpoint, {list(own[k].shape)} in the model" for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ArchError(f"the checkpoint does not fit {spec}: {mismatched[0]}{more}", "check --arch-arg (widths, number of classes)")
    module.load_state_dict(state, strict=True)
    return module


def _scalar(value: Any) -> Any:
    """A one-element tensor or array as a Python number (the value itself otherwise)."""
    try:
        return value.item() if hasattr(value, "item") else value
    except (ValueError, RuntimeError):
        return value


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")
