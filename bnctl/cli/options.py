"""Options shared by the commands, as ``Annotated`` aliases, and the functions that turn
them into the library's options objects (:class:`~bnctl.io.source.ModelSource`,
:class:`~bnctl.io.source.CheckInputs`). Choices come from the library's own tuples."""

from __future__ import annotations

import enum
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import typer

from ..errors import InputError
from ..render.emit import formats


def choices(name: str, values: Sequence[str]) -> type[enum.Enum]:
    """A str Enum whose members are ``values`` (what Typer needs to offer a choice)."""
    return enum.Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


def format_option(kind: str, help: str = "Report format.") -> tuple[type[enum.Enum], Any]:
    """The ``--format``/``-f`` option of a command whose result is a ``kind``: the Enum of the
    formats :mod:`bnctl.render.emit` has for that kind, and the option as Typer takes it."""
    values = choices(f"{kind}Format", formats(kind))
    return values, Annotated[values, typer.Option("--format", "-f", help=help)]


# --- which model ------------------------------------------------------------------------

PathArg = Annotated[
    Path,
    typer.Argument(help="Checkpoint: state_dict/.ckpt (.pt .pth .bin), safetensors, TorchScript, .pt2, ONNX.", show_default=False),
]
ArchOpt = Annotated[
    Optional[str],
    typer.Option("--arch", help="Build the model to load a state_dict into: 'pkg.module:factory' or 'path/file.py:factory'.", rich_help_panel="Model"),
]
ArchArgOpt = Annotated[
    Optional[list[str]],
    typer.Option("--arch-arg", help="Keyword argument for the --arch factory, name=value: a Python literal (64, True, (1, 2)), else a string (variant=small). Repeatable.", rich_help_panel="Model"),
]
KeyOpt = Annotated[
    Optional[str],
    typer.Option("--key", help="Entry of a training checkpoint to read (state_dict, model, ema, ...). Default: the most likely one.", rich_help_panel="Model"),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust", metavar="", help="Load and run what the file holds as code: pickled modules, TorchScript (torch.jit.load), .pt2 programs. Without it bnctl reads their tensors only and runs nothing from the file.", rich_help_panel="Model"
    ),
]

# --- which check inputs -----------------------------------------------------------------

InputShapeOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--input-shape",
        help="Shape of a random check input, e.g. 1,3,224,224, with :int64 (or :int32, :bool, :float16, :bfloat16) for another dtype, e.g. 1,26:int64 (integers are 0 or 1). Repeat once per model input.",
        rich_help_panel="Check inputs",
    ),
]
DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="Folder of images (RGB, [0,1]) or .npy/.pt tensors: up to 16 become the check inputs.", rich_help_panel="Check inputs"),
]
DynamicOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dynamic",
        help="Input dims a .pt2 or ONNX file leaves dynamic, by index: 0 (the batch), 0,2,3 (batch, height, width), or none. Default: the batch where the model allows it. The report lists each input's dims as written.",
        show_default=False,
    ),
]


InputNamesOpt = Annotated[Optional[str], typer.Option("--input-names", help="Names of an ONNX graph's inputs, comma-separated. Default: the parameter names of forward.", show_default=False)]
OutputNamesOpt = Annotated[Optional[str], typer.Option("--output-names", help="Names of an ONNX graph's outputs, comma-separated. Default: output (output_0, output_1, ... for several).", show_default=False)]
Int8CheckOpt = Annotated[
    bool,
    typer.Option(
        "--int8-check",
        metavar="",
        help="Quantize the ONNX graph about to be written with ONNX Runtime's static quantizer (QDQ int8, calibrated on the check inputs), per tensor and per channel, and report each one's output SQNR against the float graph. Nothing more is written.",
    ),
]


def layout(dynamic: str | None, input_names: str | None, output_names: str | None, dynamic_batch: bool = False):
    """``--dynamic``, ``--input-names`` and ``--output-names`` as a :class:`~bnctl.io.shapes.Layout`."""
    from ..io.shapes import Layout, parse_dims

    dims = (0,) if dynamic_batch and dynamic is None else parse_dims(dynamic)
    names = [split_names(input_names, "--input-names"), split_names(output_names, "--output-names")]
    return Layout(dims, *(tuple(n) if n else None for n in names))


def split_names(text: str | None, option: str) -> list[str] | None:
    """``"image,tokens"`` -> ``["image", "tokens"]`` (None stays None); an InputError for an
    empty or repeated name."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise InputError(f"{option} '{text}' needs distinct, non-empty names separated by commas", f"e.g. {option} image,tokens")
    return names


SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random check inputs.", rich_help_panel="Check inputs")]


def model_source(arch: str | None = None, arch_arg: list[str] | None = None, key: str | None = None, trust: bool = False, strip_prefix: str | None = None, add_prefix: str | None = None, eps: float | None = None):
    """The model options as a :class:`~bnctl.io.source.ModelSource` (its path set by the command)."""
    from ..io.arch import parse_arch_args
    from ..io.source import ModelSource

    if eps is not None and not 0 <= eps < 1:
        raise InputError(f"--eps {eps:g} is not a BatchNorm eps", "pass the eps the model was trained with, e.g. --eps 1e-3 (TensorFlow ports) or --eps 1e-5 (PyTorch)")
    return ModelSource(None, arch, parse_arch_args(arch_arg or []), key, trust, strip_prefix, add_prefix, eps)


def per_file(values: list[str] | None, count: int, option: str) -> list[str | None]:
    """An option given once (for every file) or once per file, as one value per file."""
    values = values or []
    if len(values) in (0, 1):
        return (values or [None]) * count
    if len(values) != count:
        raise InputError(f"{option} was given {len(values)} times for {count} files", f"give {option} once for every file, or once per file in order")
    return list(values)


def model_sources(arch: list[str] | None = None, arch_arg: list[str] | None = None, key: list[str] | None = None, trust: bool = False):
    """The model options of a command that reads several files, ``--arch`` and ``--key`` once
    for every file or once per file, as a function of the files that gives their
    :class:`~bnctl.io.source.ModelSource` (each as :func:`model_source` builds it)."""

    def sources(paths: list[Path]) -> list[Any]:
        archs, keys = per_file(arch, len(paths), "--arch"), per_file(key, len(paths), "--key")
        return [model_source(a, arch_arg, k, trust).at(p) for p, a, k in zip(paths, archs, keys)]

    return sources


def check_inputs(input_shape: list[str] | None = None, data: Path | None = None, seed: int = 0, preprocess: Any = None):
    """The check-input options as :class:`~bnctl.io.source.CheckInputs`."""
    from ..io.source import CheckInputs, parse_input

    parsed = [parse_input(s) for s in input_shape or []]
    return CheckInputs(tuple(shape for shape, _ in parsed), data, seed, preprocess=preprocess, dtypes=tuple(dtype for _, dtype in parsed))


def preprocess(image_size: str | None = None, mean: str | None = None, std: str | None = None, grayscale: bool = False, transform: str | None = None):
    """The image options as a :class:`~bnctl.io.data.Preprocess`."""
    from ..io.data import Preprocess

    return Preprocess(size=parse_size(image_size), mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), grayscale=grayscale, transform=resolve_transform(transform))


# --- option groups: several options in, one library object out --------------------------


@dataclass(frozen=True)
class OptionGroup:
    """Options several commands share, each ``(name, Annotated type, default)``, and the
    function that turns their values into one library object."""

    params: tuple[tuple[str, Any, Any], ...]
    build: Callable[..., Any]


StripPrefixOpt = Annotated[Optional[str], typer.Option("--strip-prefix", help="Remove this prefix from every key of the state_dict before loading it into --arch (found by itself where one common prefix fits).", rich_help_panel="Model")]
AddPrefixOpt = Annotated[Optional[str], typer.Option("--add-prefix", help="Put this prefix before every key of the state_dict before loading it into --arch.", rich_help_panel="Model")]
EpsOpt = Annotated[
    Optional[float], typer.Option("--eps", help="The eps the BN layers were trained with, where the file does not record it (a state_dict): used by the statistics and their checks instead of PyTorch's default 1e-5.", rich_help_panel="Model")
]
MODEL = OptionGroup((("arch", ArchOpt, None), ("arch_arg", ArchArgOpt, None), ("key", KeyOpt, None), ("trust", TrustOpt, False), ("strip_prefix", StripPrefixOpt, None), ("add_prefix", AddPrefixOpt, None), ("eps", EpsOpt, None)), model_source)
#: the model options of a command that reads several files (``bnctl diff``)
MODELS = OptionGroup(
    (
        ("arch", Annotated[Optional[list[str]], typer.Option("--arch", help="Build the model of a state_dict: 'pkg.module:factory' or 'file.py:factory'. Once for every file, or once per file.", rich_help_panel="Model")], None),
        ("arch_arg", ArchArgOpt, None),
        ("key", Annotated[Optional[list[str]], typer.Option("--key", help="Entry of a training checkpoint to read. Once for every file, or once per file.", rich_help_panel="Model")], None),
        ("trust", TrustOpt, False),
    ),
    model_sources,
)
IMAGES = OptionGroup(
    (
        ("image_size", Annotated[Optional[str], typer.Option("--image-size", help="Resize images to H or H,W. Default: as they are (they must then share one size).", rich_help_panel="Data")], None),
        ("mean", Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean subtracted from images in [0,1], e.g. 0.485,0.456,0.406.", rich_help_panel="Data")], None),
        ("std", Annotated[Optional[str], typer.Option("--std", help="Per-channel std images are divided by, e.g. 0.229,0.224,0.225.", rich_help_panel="Data")], None),
        ("grayscale", Annotated[bool, typer.Option("--grayscale", metavar="", help="Read images as one channel.", rich_help_panel="Data")], False),
        ("transform", Annotated[Optional[str], typer.Option("--transform", help="pkg.mod:fn or file.py:fn taking a Pillow image, returning the model input; replaces the default preprocessing.", rich_help_panel="Data")], None),
    ),
    preprocess,
)


def _check_inputs_with_images(input_shape=None, data=None, seed=0, **images: Any):
    return check_inputs(input_shape, data, seed, preprocess(**images) if data is not None else None)


#: --input-shape or --data, with the image options of recalibrate: one set of input options for every command
CHECKS = OptionGroup((("input_shape", InputShapeOpt, None), ("data", DataOpt, None), ("seed", SeedOpt, 0), *IMAGES.params), _check_inputs_with_images)


def _evaluated(annotation: Any, command: Callable) -> Any:
    """An annotation as an object (``from __future__ import annotations`` leaves strings)."""
    return eval(annotation, command.__globals__) if isinstance(annotation, str) else annotation  # noqa: S307 - our own source


def grouped(command: Callable) -> Callable:
    """Decorator: a parameter whose default is an :class:`OptionGroup` receives the object
    the group builds, and the group's options join the command's signature in its place
    (after the required parameters, so Typer offers them)."""
    signature = inspect.signature(command)
    groups = {p.name: p.default for p in signature.parameters.values() if isinstance(p.default, OptionGroup)}
    # the command's own annotations, evaluated; the groups' parameters are never evaluated
    # (their types may need torch, which the CLI does not import to build its options)
    own = [p.replace(annotation=_evaluated(p.annotation, command)) for p in signature.parameters.values() if p.name not in groups]
    added = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=t) for g in groups.values() for n, t, d in g.params]
    required = [p for p in own if p.default is inspect.Parameter.empty]
    optional = [p for p in own if p.default is not inspect.Parameter.empty]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        for name, group in groups.items():
            kwargs[name] = group.build(**{n: kwargs.pop(n) for n, _, _ in group.params})
        return command(**kwargs)

    wrapper.__signature__ = inspect.Signature(required + added + optional)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}  # type: ignore[attr-defined]
    return wrapper


# --- parsers of option text -------------------------------------------------------------


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """``"0.485,0.456,0.406"`` -> a tuple; an InputError otherwise."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{what} '{text}' is not a list of numbers", f"e.g. {what} 0.485,0.456,0.406") from None


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"224"`` -> (224, 224); ``"224,160"`` -> (224, 160)."""
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise InputError(f"--image-size '{text}' is not a size", "give H or H,W, e.g. --image-size 224")
    return (sizes[0], sizes[-1])


def resolve_transform(spec: str | None) -> Callable | None:
    """The ``--transform`` function, imported like an ``--arch`` factory."""
    if spec is None:
        return None
    from ..io.arch import resolve_factory

    return resolve_factory(spec)
