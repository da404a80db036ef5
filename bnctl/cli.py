"""The ``bnctl`` command line: options -> library call -> render. No torch logic here.

Heavy modules (torch, pandas, the library) are imported inside the commands, so
``bnctl --help`` and ``bnctl inspect --help`` answer at once.
"""

from __future__ import annotations

import enum
import functools
import io
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import BnctlError, InputError
from .flags import FLAGS
from .targets import Target

app = typer.Typer(
    name="bnctl",
    help="Inspect, audit, recalibrate, fold, convert and export the BatchNorm layers of trained PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}

# --- options shared by the commands that read a model -----------------------------------

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
    typer.Option("--arch-arg", help="Keyword argument for the --arch factory, name=value (a Python literal). Repeatable.", rich_help_panel="Model"),
]
KeyOpt = Annotated[
    Optional[str],
    typer.Option("--key", help="Entry of a training checkpoint to read (state_dict, model, ema, ...). Default: the most likely one.", rich_help_panel="Model"),
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust", help="Allow loading pickled Python objects (whole modules). This runs code from the file.", rich_help_panel="Model"),
]


class InspectFormat(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"
    parquet = "parquet"
    markdown = "markdown"


def _fail(message: str, tip: str | None, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    if tip:
        typer.echo(f"tip: {tip}", err=True)
    raise typer.Exit(code)


def handles_errors(command):
    """Turn a :class:`BnctlError` into ``error:``/``tip:`` lines and its exit code.

    Any other exception is an internal error: one line and exit 2, the traceback only
    with ``--debug``.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except BnctlError as exc:
            if _state["debug"]:
                raise
            _fail(exc.message, exc.tip, exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", None, 130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence for the user
            if _state["debug"]:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc}", "rerun with --debug and report the traceback", 2)

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


def _parse_arch_args(items: list[str] | None) -> dict:
    from .arch import parse_arch_args

    return parse_arch_args(items or [])


def _model_source(arch: str | None, arch_arg: list[str] | None, key: str | None, trust: bool) -> dict:
    """The shared options that say how to open the model, as the library's keyword arguments."""
    return {"arch": arch, "arch_args": _parse_arch_args(arch_arg), "key": key, "trust": trust}


def _model_options(arch: str | None, arch_arg: list[str] | None, key: str | None, trust: bool, input_shape: list[str] | None, data: Path | None) -> dict:
    """:func:`_model_source` plus the check inputs (``--input-shape``, ``--data``)."""
    from .verify import parse_shape

    return {**_model_source(arch, arch_arg, key, trust), "input_shapes": [parse_shape(s) for s in input_shape or []], "data": data}


def _emit_text(text: str, output: Path | None) -> None:
    from . import _atomic

    if output is None:
        sys.stdout.write(text)
    else:
        _atomic.write_text(output, text)
        typer.echo(f"wrote {output}", err=True)


@app.command(
    epilog="Flags: " + "; ".join(f"[bold]{k}[/bold]: {v}" for k, v in FLAGS.items()),
)
@handles_errors
def inspect(
    path: PathArg,
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    fmt: Annotated[
        Optional[InspectFormat],
        typer.Option("--format", "-f", help="Output format. Default: table, or what --output's extension says.", show_default=False),
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the output to this file (atomically) instead of stdout.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw running_var and |gamma| per layer to this PNG (needs bnctl[plot]).")] = None,
) -> None:
    """Show each BatchNorm layer's statistics and affine parameters, and flag what is unhealthy."""
    from . import render
    from .inspection import inspect as run_inspect

    chosen = fmt.value if fmt else (render.format_from_suffix(output) if output else None) or "table"
    if chosen == "parquet" and output is None:
        raise InputError("--format parquet writes a binary file and needs --output", "add --output layers.parquet")
    result = run_inspect(path, arch=arch, arch_args=_parse_arch_args(arch_arg), key=key, trust=trust)
    for note in result.notes if chosen != "table" else ():
        typer.echo(f"note: {note}", err=True)
    if chosen == "table":
        from rich.console import Console

        if output is None:
            # piped output keeps whole lines; a terminal gets the table fitted to its width
            console = Console(width=None if sys.stdout.isatty() else 250)
            console.print(render.inspect_table(result, width=console.width))
        else:
            console = Console(record=True, file=io.StringIO(), width=200)
            console.print(render.inspect_table(result, width=console.width))
            _emit_text(console.export_text(), output)
    elif chosen == "json":
        _emit_text(render.to_json(result), output)
    elif chosen == "csv":
        _emit_text(render.to_csv(result), output)
    elif chosen == "markdown":
        _emit_text(render.to_markdown(result), output)
    else:
        render.write_parquet(result, output)
        typer.echo(f"wrote {output}", err=True)
    if plot is not None:
        render.plot(result, plot)
        typer.echo(f"wrote {plot}", err=True)


class FoldFormat(str, enum.Enum):
    table = "table"
    json = "json"


InputShapeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--input-shape", help="Shape of a random check input, e.g. 1,3,224,224. Repeat once per model input.", rich_help_panel="Check inputs"),
]
DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="Folder of images (RGB, [0,1]) or .npy/.pt tensors: up to 16 become the check inputs.", rich_help_panel="Check inputs"),
]


@app.command()
@handles_errors
def fold(
    path: PathArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the folded model (atomically; never the input).", show_default=False)],
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    input_shape: InputShapeOpt = None,
    data: DataOpt = None,
    to: Annotated[
        Optional[Target],
        typer.Option("--to", help="Output format. Default: the extension (.pt2 .onnx .safetensors .ts), else TorchScript for TorchScript input, ONNX for ONNX, pt2 otherwise.", show_default=False),
    ] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest output change allowed, relative to the largest |output|. Beyond it: exit 1, nothing written.")] = 1e-4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random check inputs.")] = 0,
    fmt: Annotated[FoldFormat, typer.Option("--format", "-f", help="Report format.")] = FoldFormat.table,
) -> None:
    """Fold BatchNorm into the conv/linear layers next to it, check the outputs did not change, write the model."""
    from . import render
    from .fold_file import fold_file

    report = fold_file(path, output, **_model_options(arch, arch_arg, key, trust, input_shape, data), to=to, tolerance=tolerance, seed=seed)
    if fmt == FoldFormat.json:
        sys.stdout.write(render.fold_json(report))
    else:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 160).print(render.fold_table(report))
    if not report.ok:
        _fail(
            f"the folded model's outputs moved by {report.max_rel_error:.3g} (relative), beyond --tolerance {tolerance:g}: nothing written",
            "look at the layers folded above; raise --tolerance only if that change is acceptable",
            1,
        )


class Device(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


@app.command()
@handles_errors
def recalibrate(
    path: PathArg,
    data: Annotated[Path, typer.Option("--data", help="Folder of samples: images (class subfolders fine), .npy, .npz or .pt files.", show_default=False, rich_help_panel="Data")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the recalibrated model, in the input's format (atomically; never the input).", show_default=False)],
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.", rich_help_panel="Data")] = 32,
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="Use at most this many samples (a seeded random subset).", rich_help_panel="Data")] = None,
    image_size: Annotated[Optional[str], typer.Option("--image-size", help="Resize images to H or H,W. Default: as they are (they must then share one size).", rich_help_panel="Data")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean subtracted from images in [0,1], e.g. 0.485,0.456,0.406.", rich_help_panel="Data")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Per-channel std images are divided by, e.g. 0.229,0.224,0.225.", rich_help_panel="Data")] = None,
    grayscale: Annotated[bool, typer.Option("--grayscale", help="Read images as one channel.", rich_help_panel="Data")] = False,
    transform: Annotated[Optional[str], typer.Option("--transform", help="pkg.mod:fn or file.py:fn taking a Pillow image, returning the model input; replaces the default preprocessing.", rich_help_panel="Data")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Processes decoding samples.", rich_help_panel="Data")] = 2,
    device: Annotated[Device, typer.Option("--device", help="Where the forward passes run.")] = Device.cpu,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample order and --max-samples subset.")] = 0,
    until_stable: Annotated[Optional[float], typer.Option("--until-stable", help="Stop once no layer's estimate moved more than this over 3 batches (one process only).")] = None,
    fmt: Annotated[FoldFormat, typer.Option("--format", "-f", help="Report format.")] = FoldFormat.table,
) -> None:
    """Re-estimate every BatchNorm's running statistics exactly on a data folder (torchrun for many processes)."""
    import os

    from . import render
    from .data import Preprocess
    from .recalibrate_file import parse_floats, parse_size, recalibrate_file, resolve_transform

    if device == Device.cuda:
        os.environ["BNCTL_DEVICE"] = "cuda"
    preprocess = Preprocess(size=parse_size(image_size), mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), grayscale=grayscale, transform=resolve_transform(transform))
    options = _model_source(arch, arch_arg, key, trust)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with render.sample_progress(enabled=rank0 and sys.stderr.isatty()) as progress:
        report = recalibrate_file(
            path, data, output, **options, batch_size=batch_size, max_samples=max_samples, preprocess=preprocess,
            workers=workers, device=device.value, seed=seed, until_stable=until_stable, on_batch=progress.advance, on_start=progress.start,
        )
    if not rank0:
        return
    if fmt == FoldFormat.json:
        sys.stdout.write(render.recalibration_json(report))
    else:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 160).print(render.recalibration_table(report))
    typer.echo(f"wrote {output}", err=True)


class ConvertTo(str, enum.Enum):
    syncbn = "syncbn"
    batchnorm = "batchnorm"
    groupnorm = "groupnorm"
    frozen = "frozen"


class SaveAs(str, enum.Enum):
    module = "module"
    state_dict = "state-dict"


@app.command()
@handles_errors
def convert(
    path: PathArg,
    to: Annotated[ConvertTo, typer.Option("--to", help="syncbn: BN -> SyncBatchNorm; batchnorm: SyncBN/frozen -> BatchNorm1d/2d/3d; frozen: BN -> FrozenBatchNorm; groupnorm: BN -> GroupNorm (changes the function).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the converted model (atomically; never the input).", show_default=False)],
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    input_shape: InputShapeOpt = None,
    data: DataOpt = None,
    groups: Annotated[int, typer.Option("--groups", help="GroupNorm groups: the largest divisor of each layer's channels not above this.")] = 32,
    save_as: Annotated[SaveAs, typer.Option("--as", help="module: the whole module pickled (bnctl and your classes importable to load it); state-dict: the weights of the converted architecture.")] = SaveAs.module,
    fmt: Annotated[FoldFormat, typer.Option("--format", "-f", help="Report format.")] = FoldFormat.table,
) -> None:
    """Convert BatchNorm layers: to SyncBatchNorm and back, to and from FrozenBatchNorm, to GroupNorm."""
    from . import render
    from .convert_file import convert_file

    report = convert_file(path, output, to.value, **_model_options(arch, arch_arg, key, trust, input_shape, data), groups=groups, save_as=save_as.value)
    if fmt == FoldFormat.json:
        sys.stdout.write(render.to_json_text(report.to_dict()))
    else:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 160).print(render.convert_table(report))
    typer.echo(f"wrote {output}", err=True)


@app.command()
@handles_errors
def export(
    path: PathArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The ONNX file to write (atomically; only if ONNX Runtime matches PyTorch).", show_default=False)],
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    input_shape: InputShapeOpt = None,
    data: DataOpt = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset. Default: the exporter's.")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make the batch dimension dynamic (checked at two batch sizes).")] = False,
    no_fold: Annotated[bool, typer.Option("--no-fold", help="Keep the BatchNorm nodes.")] = False,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest ONNX Runtime vs PyTorch difference, relative to the largest |output|. Beyond it: exit 1, nothing written.")] = 1e-4,
    fmt: Annotated[FoldFormat, typer.Option("--format", "-f", help="Report format.")] = FoldFormat.table,
) -> None:
    """Export to ONNX ready for inference: eval, SyncBN reverted, BN folded, checked in ONNX Runtime."""
    from . import render
    from .export import export_file

    report = export_file(path, output, **_model_options(arch, arch_arg, key, trust, input_shape, data), opset=opset, dynamic_batch=dynamic_batch, fold=not no_fold, tolerance=tolerance)
    if fmt == FoldFormat.json:
        sys.stdout.write(render.to_json_text(report.to_dict()))
    else:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 160).print(render.export_table(report))
    if not report.ok:
        _fail(f"ONNX Runtime differs from PyTorch by {report.max_rel_error:.3g} (relative), beyond --tolerance {tolerance:g}: nothing written", "check the operators listed above, or raise --tolerance if that difference is acceptable", 1)


class AuditFormat(str, enum.Enum):
    text = "text"
    json = "json"
    sarif = "sarif"
    junit = "junit"


class Severity(str, enum.Enum):
    error = "error"
    warning = "warning"
    info = "info"


def _codes(values: list[str] | None) -> list[str]:
    """``--select BN1,BN2 --select BN301`` -> ``["BN1", "BN2", "BN301"]``."""
    return [c.strip() for v in values or [] for c in v.split(",") if c.strip()]


def _list_checks() -> str:
    from .audit.registry import CHECKS

    lines = [f"{'code':<6} {'severity':<8} {'group':<14} name: what it finds"]
    lines += [f"{c.code:<6} {c.severity:<8} {c.group:<14} {c.name}: {c.summary}" for c in CHECKS.values()]
    return "\n".join(lines) + "\n"


def _explain(code: str) -> str:
    from .audit.registry import CHECKS, lookup

    check = lookup(code)
    if check is None:
        raise InputError(f"no check '{code}'", f"known codes: {', '.join(CHECKS)} (bnctl audit --list)")
    return f"{check.code} {check.name} ({check.severity}, {check.group})\n\n{check.help_text}\n"


@app.command()
@handles_errors
def audit(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Checkpoints, or folders to search for them.", show_default=False)] = None,
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    key: KeyOpt = None,
    trust: TrustOpt = False,
    input_shape: InputShapeOpt = None,
    data: DataOpt = None,
    fmt: Annotated[AuditFormat, typer.Option("--format", "-f", help="Output format.")] = AuditFormat.text,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the report to this file (atomically) instead of stdout.")] = None,
    fail_on: Annotated[Optional[Severity], typer.Option("--fail-on", help="Exit 1 on findings of this severity or worse. Default: pyproject's fail-on, else error.", show_default=False)] = None,
    select: Annotated[Optional[list[str]], typer.Option("--select", help="Only these checks: codes, prefixes (BN1) or names, comma-separated. Repeatable.", rich_help_panel="Checks")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Skip these checks (codes, prefixes, names). Repeatable.", rich_help_panel="Checks")] = None,
    exit_zero: Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even with findings (unreadable files still exit 2).")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="Read [tool.bnctl.audit] from this file. Default: the nearest pyproject.toml.", rich_help_panel="Checks")] = None,
    list_checks: Annotated[bool, typer.Option("--list", help="List every check and exit.", rich_help_panel="Checks")] = False,
    explain: Annotated[Optional[str], typer.Option("--explain", help="Explain a check (code or name) and exit.", rich_help_panel="Checks", show_default=False)] = None,
) -> None:
    """Find train/eval-mode bugs and unhealthy BatchNorm state; exit 1 on findings (a CI gate).

    Exit codes: 0 nothing at or above --fail-on, 1 findings, 2 bad input or an unreadable file.
    """
    if list_checks:
        sys.stdout.write(_list_checks())
        return
    if explain:
        sys.stdout.write(_explain(explain))
        return
    if not paths:
        raise InputError("no checkpoint to audit", "pass files or folders, e.g. bnctl audit model.pt (or --list to see the checks)")
    from .audit.formats import RENDERERS, summary_line
    from .audit.runner import audit as run_audit
    from .audit.runner import load_config

    settings = load_config(path=config)
    if select:
        settings.select = _codes(select)
    if ignore:
        settings.ignore = settings.ignore + _codes(ignore)
    if fail_on is not None:
        settings.fail_on = fail_on.value
    result = run_audit(paths, **_model_options(arch, arch_arg, key, trust, input_shape, data), config=settings)
    _emit_text(RENDERERS[fmt.value](result), output)
    if output is not None or fmt != AuditFormat.text:
        typer.echo(summary_line(result), err=True)
    raise typer.Exit(result.exit_code(exit_zero))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
