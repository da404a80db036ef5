"""The two options objects every command takes: which model (:class:`ModelSource`) and
which check inputs (:class:`CheckInputs`).

``ModelSource.open()`` reads the file and returns an :class:`OpenedModel`: the checkpoint,
the module built by ``--arch`` (if any) and what can be run. Commands that need a runnable
model ask it with :meth:`OpenedModel.runnable` or :meth:`OpenedModel.eager`, which fail with
one clear error naming what the command needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError


@dataclass(frozen=True)
class ModelSource:
    """Which model: a file, and how to open it (``--arch``, ``--arch-arg``, ``--key``, ``--trust``,
    ``--strip-prefix``, ``--add-prefix``, ``--eps``).

    ``path`` may be left out where a command reads many files with the same options
    (``bnctl audit``): :meth:`at` gives the options for one file.
    """

    path: Path | None = None
    arch: str | None = None
    arch_args: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None
    trust: bool = False
    strip_prefix: str | None = None  # removed from every key of the file before it is fitted to the model
    add_prefix: str | None = None  # put before every key of the file
    eps: float | None = None  # the training eps of layers whose file does not record it (--eps)

    def at(self, path: str | Path) -> ModelSource:
        """The same options for another file."""
        return dataclasses.replace(self, path=Path(path))

    def open(self) -> OpenedModel:
        """Read the file; with ``arch``, build that module and load the state_dict into it strictly.

        Reading is safe unless ``trust`` (see :func:`bnctl.io.checkpoint.load`).
        """
        from . import arch as arch_mod
        from . import checkpoint as ckpt_mod

        if self.path is None:
            raise InputError("no checkpoint given", "pass the path of a checkpoint")
        checkpoint = ckpt_mod.load(self.path, key=self.key, trust=self.trust)
        notes: list[str] = []
        built = None
        if self.arch is not None:
            if checkpoint.tensors is None:
                notes.append(f"--arch ignored: {checkpoint.path.name} holds a {checkpoint.content}, not a state_dict")
            else:
                built = arch_mod.load_state_dict(arch_mod.build(self.arch, self.arch_args), checkpoint.tensors, self.arch, strip=self.strip_prefix, add=self.add_prefix, notes=notes)
        if self.eps is not None:
            notes.append(f"--eps {self.eps:g}: the eps of every BN layer whose file does not record one")
        return OpenedModel(checkpoint, built, notes, trusted=self.trust, eps=self.eps)


@dataclass
class OpenedModel:
    """A file as read: its checkpoint, the module ``--arch`` built for a state_dict (or None),
    and notes for the user."""

    checkpoint: Any  # bnctl.io.checkpoint.Checkpoint
    built: Any = None  # nn.Module built by --arch
    notes: list[str] = field(default_factory=list)
    trusted: bool = False  # --trust: programs from the file may be loaded and run
    eps: float | None = None  # --eps: for layers whose file does not record it

    @property
    def kind(self) -> Any:
        """The model kind the file holds (:mod:`bnctl.io.kinds`)."""
        return self.checkpoint.kind

    def layers(self) -> list[Any]:
        """The BN layers of what was read (of the module ``--arch`` built, if any), with
        ``--eps`` for those whose file does not record eps."""
        import dataclasses

        found = self.checkpoint.layers(self.built)
        if self.eps is None:
            return found
        return [dataclasses.replace(layer, eps=self.eps) if layer.eps is None else layer for layer in found]

    @property
    def module(self) -> Any:
        """The module tree to read the configuration of: built by ``--arch``, saved, or a
        TorchScript archive read without loading it; else None."""
        return self.built if self.built is not None else self.kind.tree()

    def why_not_run(self) -> str | None:
        """Why the model cannot be run as opened (None: :meth:`runnable` gives it)."""
        return None if self.built is not None else self.kind.why_not_run(self.trusted)

    def runnable(self, verb: str) -> Any:
        """The model to run (built by ``--arch``, a module, a program or an ONNX graph), or
        an error saying what ``verb`` needs: the model a state_dict belongs to, or
        ``--trust`` for a program (TorchScript, ``.pt2``) that it would load and run."""
        from .kinds import StateDict, needs_arch, refuse_untrusted

        if self.built is not None:
            return self.built
        name = self.checkpoint.path.name
        refuse_untrusted(self.kind, name, verb, self.trusted)
        if isinstance(self.kind, StateDict):
            raise needs_arch(name, verb)
        return self.kind.runnable(self.trusted)

    def eager(self, verb: str) -> Any:
        """The model as an eager ``nn.Module`` whose modules can be swapped, else an InputError."""
        model = self.runnable(verb)
        if self.built is not None or self.kind.eager:
            return model
        what = self.checkpoint.describe()
        raise InputError(f"{self.checkpoint.path.name} is {'an' if what[:1] in 'AEIOU' else 'a'} {what}: {verb} needs an eager PyTorch model", "use the training checkpoint (state_dict + --arch) or a pickled module (--trust)")


@dataclass(frozen=True)
class CheckInputs:
    """Which inputs an operation runs or is checked on: random tensors of ``shapes`` (one per
    model input, from ``seed``), else up to ``count`` samples of the ``data`` folder, read
    with ``preprocess``. ``bnctl recalibrate`` reads all of ``data`` the same way."""

    shapes: tuple[tuple[int, ...], ...] = ()
    data: Path | None = None
    seed: int = 0
    count: int = 16
    preprocess: Any = None  # bnctl.io.data.Preprocess: how images of ``data`` become tensors
    dtypes: tuple[str, ...] = ()  # one per shape (core.verify.INPUT_DTYPES); float32 where missing

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))

    @property
    def given(self) -> bool:
        return bool(self.shapes) or self.data is not None

    def make(self) -> tuple | None:
        """The input tensors, or None when neither shapes nor data were given."""
        if self.shapes:
            from ..core.verify import random_inputs

            return random_inputs(self.shapes, self.seed, self.dtypes)
        if self.data is not None:
            from .data import example_batch

            return (example_batch(self.data, count=self.count, preprocess=self.preprocess),)
        return None


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; an InputError otherwise."""
    return parse_input(text)[0]


def parse_input(text: str) -> tuple[tuple[int, ...], str]:
    """``"1,26:int64"`` -> ``((1, 26), "int64")``; the dtype is float32 when not given. An
    InputError for anything else."""
    from ..core.verify import INPUT_DTYPES

    sizes, _, dtype = text.partition(":")
    dtype = dtype.strip() or "float32"
    if dtype not in INPUT_DTYPES:
        raise InputError(f"--input-shape '{text}': unknown dtype '{dtype}'", f"use one of {', '.join(INPUT_DTYPES)}, e.g. --input-shape 1,26:int64")
    parts = [p for p in sizes.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"--input-shape '{text}' is not a shape", "give positive sizes separated by commas, e.g. --input-shape 1,3,224,224 (add :int64 for an integer input)")
    return shape, dtype
