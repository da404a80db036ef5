"""What a fold did: :class:`FoldReport` (the JSON contract of ``bnctl fold --format json``),
and what every fold path shares. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-free to import: the ONNX fold plan (the audit) shares make_standalone
    import torch

    from ...core.verify import Difference

DEFAULT_TOLERANCE = 1e-4
#: the default tolerance per output dtype (rtol, and atol per unit of the output's scale: :class:`Difference`)
#: dtype: a fold rounds each weight once more, to the dtype's precision (float16 keeps 11
#: bits, bfloat16 8), and a layer of many products adds those roundings up
TOLERANCES = {"float64": 1e-4, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def tolerance_for(outputs: list[Any], given: float | None = None) -> tuple[float, str]:
    """``(tolerance, where it comes from)``: ``given`` if the user gave one, else the default
    of the least precise floating dtype among ``outputs`` (numpy arrays or torch tensors)."""
    if given is not None:
        return given, "given with --tolerance"
    names = [str(o.dtype).replace("torch.", "") for o in outputs]
    floating = [n for n in names if n in TOLERANCES] or ["float32"]
    widest = max(floating, key=lambda n: TOLERANCES[n])
    return TOLERANCES[widest], f"the default for {widest} outputs"


def make_standalone(kept: list[tuple[Any, dict]], make: Any) -> tuple[list[dict], list[tuple[Any, dict]]]:
    """``--standalone``: ``make(item, reason)`` for each BN kept, ``(item, {"bn", "reason"})``;
    returns the entries it made (the BNs it rewrote) and the BNs still kept."""
    made, still = [], []
    for item, entry in kept:
        done = make(item, entry["reason"])
        if done is not None:
            made.append(done)
        else:
            still.append((item, entry))
    return made, still


@dataclass(kw_only=True)
class Checked:
    """How far a written model's outputs are from the original's, and the bound they are held to:
    ``|a - b| <= atol + rtol * |b|`` elementwise, ``rtol`` the tolerance and ``atol`` the
    tolerance times the output's scale (its largest |output|, at least 1)."""

    tolerance: float = DEFAULT_TOLERANCE
    tolerance_source: str = "the default for float32 outputs"
    difference: Difference | None = field(default=None, repr=False)

    def record(self, difference: Difference) -> None:
        """Take one more comparison into account (the worst of all is kept)."""
        self.difference = difference.merge(self.difference)

    @property
    def max_abs_error(self) -> float | None:
        return None if self.difference is None else self.difference.max_abs

    @property
    def max_rel_error(self) -> float | None:
        """Largest |a - b| over the output's largest |b|."""
        return None if self.difference is None else self.difference.max_rel

    @property
    def ok(self) -> bool:
        """The outputs were compared and every element is within the bound."""
        return self.difference is not None and self.difference.within(self.tolerance)

    def bound(self) -> dict[str, Any]:
        """The JSON fields of the comparison: both errors, the bound's atol and rtol, which of
        the two set atol (``absolute``: outputs below 1, the tolerance held absolutely;
        ``relative``: the tolerance times the largest |output|), and the share of the bound
        the worst element used (``bound_used`` <= 1 passes)."""
        d = self.difference
        return {
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "tolerance_source": self.tolerance_source,
            "atol": None if d is None else self.tolerance * d.scale,
            "rtol": self.tolerance,
            "bound_applied": None if d is None else ("absolute" if d.floor else "relative"),
            "bound_used": None if d is None else (d.ratio / self.tolerance if self.tolerance > 0 else (0.0 if d.ratio == 0 else float("inf"))),
            "ok": self.ok,
        }

    def check_run(self, run: Any, model: Any, inputs: tuple, file_inputs: list[dict[str, Any]], reference: list | None = None) -> list[tuple]:
        """Run ``run`` (what will be written) on ``inputs`` and, where ``file_inputs`` (the
        file's inputs as written) leave dims dynamic, on inputs where each has another size;
        record how far its outputs are from ``model``'s (``reference``: its outputs on
        ``inputs``, when already computed). Returns the input sets checked."""
        from ...core import verify
        from ...io.shapes import other_sizes

        checked = [inputs]
        other = other_sizes(inputs, file_inputs)
        if other is not None:
            checked.append(other)
        for check in checked:
            if check is inputs and reference is not None:
                expected = reference
            else:
                with verify.eval_mode(model):
                    expected = verify.reference_outputs(model, check)
            self.record(verify.compare(expected, verify.run(run, check)))
        self.ran_on(checked)
        return checked

    def ran_on(self, checked: list[tuple]) -> None:
        """Note the input sets :meth:`check_run` ran on (a report that lists them says so)."""

    def errors_text(self) -> str:
        """``max abs error 1.8e-07, max rel error 0.015``."""
        return "not compared" if self.difference is None else f"max abs error {self.max_abs_error:.2g}, max rel error {self.max_rel_error:.2g}"

    def bound_text(self) -> str:
        """``|a-b| <= 0.0001 + 0.0001*|b|, outputs below 1, held absolutely``."""
        b = self.bound()
        if self.difference is None:
            return f"|a-b| <= atol + {b['rtol']:g}*|b|"
        where = "outputs below 1, held absolutely" if b["bound_applied"] == "absolute" else "atol scaled to the largest |output|"
        return f"|a-b| <= {b['atol']:.2g} + {b['rtol']:g}*|b|, {where}"


@dataclass(kw_only=True)
class FoldReport(Checked):
    """What was folded, what was not and why, and how far the outputs moved."""

    path: str
    folded: list[dict[str, Any]] = field(default_factory=list)  # {"bn", "into", "side", "note"}
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"bn", "reason"}
    bn_before: int = 0
    bn_after: int = 0
    inputs: str = ""
    input_dims: list[dict[str, Any]] = field(default_factory=list)  # the written file's inputs: {"name", "dtype", "shape"}
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    format: str | None = None
    written: bool = False
    int8_check: dict[str, Any] | None = None  # --int8-check: ONNX Runtime's int8 quantization of the written graph (ops/int8_check.py)
    reference: list[torch.Tensor] = field(default_factory=list, repr=False)  # the original's outputs
    feeds: dict[str, Any] = field(default_factory=dict, repr=False)  # an ONNX graph's check inputs by name (numpy)

    def ran_on(self, checked: list[tuple]) -> None:
        from ...core import verify

        self.inputs += "".join(f"; {verify.shapes_text(other, tuples=True)}" for other in checked[1:])  # the first: the fold's own

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the fold contract (ARCHITECTURE.md) (non-finite numbers stay as they are: the JSON writer makes them null)."""

        return {
            "path": self.path,
            "folded": self.folded,
            "skipped": self.skipped,
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            **self.bound(),
            "inputs": self.inputs,
            "input_dims": self.input_dims,
            "notes": self.notes,
            "output": self.output,
            "output_format": self.format,
            "written": self.written,
            **({"int8_check": self.int8_check} if self.int8_check is not None else {}),
        }
