"""What a file holds: one of a closed set of model kinds, each answering the questions commands ask.

A :class:`~bnctl.io.checkpoint.Checkpoint` holds exactly one of these:

- :class:`StateDict`: tensors by name (a state_dict, an entry of a training checkpoint, a safetensors file);
- :class:`EagerModule`: a pickled ``nn.Module`` (read with ``--trust``);
- :class:`Script`: a TorchScript archive, loaded with ``--trust`` or only read;
- :class:`Program`: a ``torch.export`` program (``.pt2``), loaded with ``--trust`` or read as JSON;
- :class:`OnnxGraph`: an ONNX ``ModelProto``.

The questions: which BN layers it has (:meth:`~Kind.layers`), which module tree its
configuration can be read from (:meth:`~Kind.tree`), what runs and why not
(:meth:`~Kind.runnable`, :meth:`~Kind.why_not_run`), whether its modules can be swapped
(``eager``), and how a command writes it again like itself (``target``). Commands ask these
instead of testing which field is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..core import layers as core_layers
from ..errors import InputError, UnsafeCheckpointError
from .targets import Target


@dataclass
class Kind:
    """One kind of model a file can hold (see the module's docstring)."""

    content: ClassVar[str]  # 'state_dict', 'module', 'program' or 'onnx'
    what: ClassVar[str]  # how errors name it: "a state_dict"
    target: ClassVar[Target]  # the format a command that writes a model writes it in by default (like itself)
    eager: ClassVar[bool] = False  # an nn.Module whose modules can be swapped (recalibrate, convert)
    no_tree: ClassVar[str] = ""  # why :meth:`tree` is None
    tree_missing: ClassVar[bool] = False  # True: a tree could be had (--arch); False: this kind has none
    never_runs: ClassVar[bool] = False  # never runs as a PyTorch model (an ONNX graph): checks that run one do not apply
    fixed_shapes: ClassVar[bool] = False  # may accept only the input shapes it was saved with (a torch.export program)

    def found(self, built: Any = None) -> list[core_layers.BNLayer]:
        """The BN layers as found, before :func:`~bnctl.core.layers.usable` sets tensors aside."""
        raise NotImplementedError

    def layers(self, built: Any = None) -> list[core_layers.BNLayer]:
        """The BN layers; with ``built`` (the module ``--arch`` built and loaded), those of
        that module, so kinds, eps and momentum are known (its mode is not). Tensors that
        cannot be used are left out, with the reason (:func:`~bnctl.core.layers.usable`)."""
        return [core_layers.usable(layer) for layer in self.found(built)]

    def tree(self) -> Any:
        """The module tree whose configuration (modes, conv biases) can be read, or None (``no_tree`` says why)."""
        return None

    def why_not_run(self, trusted: bool) -> str | None:
        """Why this kind cannot be run as it is (None: :meth:`runnable` gives the model)."""
        return None

    def runnable(self, trusted: bool) -> Any:
        """What runs: a module, a program, an ONNX graph (after :meth:`why_not_run` said None)."""
        raise NotImplementedError

    def as_module(self, trusted: bool) -> Any:
        """:meth:`runnable` as a module called on tensors (a program's ``module()``)."""
        return self.runnable(trusted)


@dataclass
class StateDict(Kind):
    """Tensors by name: runs only as the module ``--arch`` builds."""

    tensors: Mapping[str, Any]
    content: ClassVar[str] = "state_dict"
    what: ClassVar[str] = "a state_dict"
    target: ClassVar[Target] = Target.PT2
    no_tree: ClassVar[str] = "a state_dict records no module configuration: pass --arch to build the model"
    tree_missing: ClassVar[bool] = True

    def found(self, built: Any = None) -> list[core_layers.BNLayer]:
        if built is not None:
            from ..core import modules

            return modules.from_module(built, mode_known=False)
        return core_layers.from_state_dict(self.tensors)

    def why_not_run(self, trusted: bool) -> str | None:
        return "they need the model: pass --arch to build it from the state_dict"


@dataclass
class EagerModule(Kind):
    """A pickled ``nn.Module`` (read with ``--trust``): its modes are as saved."""

    module: Any
    content: ClassVar[str] = "module"
    what: ClassVar[str] = "a pickled module"
    target: ClassVar[Target] = Target.PT2
    eager: ClassVar[bool] = True

    def found(self, built: Any = None) -> list[core_layers.BNLayer]:
        from ..core import modules

        return modules.from_module(built if built is not None else self.module, mode_known=built is None)

    def tree(self) -> Any:
        return self.module

    def runnable(self, trusted: bool) -> Any:
        return self.module


@dataclass
class Script(Kind):
    """A TorchScript archive: ``module`` loaded by torch (``--trust``), else ``view``, its
    module tree read without running anything (:class:`~bnctl.io.torchzip.ScriptModuleView`)."""

    module: Any = None
    view: Any = None
    content: ClassVar[str] = "module"
    what: ClassVar[str] = "a TorchScript archive"
    target: ClassVar[Target] = Target.TORCHSCRIPT

    def found(self, built: Any = None) -> list[core_layers.BNLayer]:
        from ..core import modules

        return modules.from_module(built, mode_known=False) if built is not None else modules.from_module(self.tree())

    def tree(self) -> Any:
        return self.module if self.module is not None else self.view

    def why_not_run(self, trusted: bool) -> str | None:
        return None if self.module is not None else "they run the program in the file, which bnctl does only with --trust"

    def runnable(self, trusted: bool) -> Any:
        return self.module


@dataclass
class Program(Kind):
    """A ``torch.export`` program: loaded by torch (``--trust``), else read as JSON (``loaded`` False)."""

    program: Any
    content: ClassVar[str] = "program"
    what: ClassVar[str] = "a torch.export program"
    target: ClassVar[Target] = Target.PT2
    fixed_shapes: ClassVar[bool] = True
    no_tree: ClassVar[str] = "a .pt2 program has no module tree (the training flag of its batch-norm calls is checked by BN201)"

    @property
    def loaded(self) -> bool:
        """Whether torch loaded it (an ExportedProgram), not only bnctl's JSON reader."""
        return not isinstance(getattr(self.program, "graph", None), dict)

    def found(self, built: Any = None) -> list[core_layers.BNLayer]:
        if not self.loaded:
            return core_layers.from_program_json(self.program)
        from ..core import modules

        return modules.from_module(built, mode_known=False) if built is not None else modules.from_program(self.program)

    def why_not_run(self, trusted: bool) -> str | None:
        return None if trusted and self.loaded else "they run the program in the file, which bnctl does only with --trust"

    def runnable(self, trusted: bool) -> Any:
        return self.program

    def as_module(self, trusted: bool) -> Any:
        return self.program.module()


@dataclass
class OnnxGraph(Kind):
    """An ONNX graph: runs in ONNX Runtime, never as a PyTorch model."""

    proto: Any
    content: ClassVar[str] = "onnx"
    what: ClassVar[str] = "an ONNX graph"
    target: ClassVar[Target] = Target.ONNX
    never_runs: ClassVar[bool] = True
    no_tree: ClassVar[str] = "an ONNX graph has no module tree (its BN modes are checked by BN401)"

    def found(self, built: Any = None) -> list[core_layers.BNLayer]:
        return core_layers.from_onnx(self.proto)

    def why_not_run(self, trusted: bool) -> str | None:
        return "they run PyTorch models, not ONNX graphs"

    def runnable(self, trusted: bool) -> Any:
        return self.proto


def find_layers(checkpoint: Any, module: Any = None) -> list[core_layers.BNLayer]:
    """The BN layers of a :class:`~bnctl.io.checkpoint.Checkpoint` (``bnctl.find_layers``);
    with ``module`` (built from ``--arch`` and loaded with its state_dict), those of that module."""
    return checkpoint.layers(module)


def refuse_untrusted(kind: Kind, name: str, verb: str, trusted: bool) -> None:
    """An UnsafeCheckpointError where ``verb`` would load and run a program from the file without ``--trust``."""
    if isinstance(kind, Script) and kind.module is None or isinstance(kind, Program) and not trusted:
        raise UnsafeCheckpointError(
            f"{name} is {kind.what}, a program: {verb} loads and runs it, which bnctl does only with --trust",
            "only if you trust where it came from: add --trust (bnctl inspect and bnctl audit read it without running it)",
        )


def needs_arch(name: str, verb: str) -> InputError:
    """The error of a command that runs the model, given a state_dict without ``--arch``."""
    return InputError(f"{name} holds a state_dict: {verb} needs the model it belongs to", "pass --arch pkg.module:factory (and --arch-arg name=value) to build it")
