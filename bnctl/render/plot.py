"""The PNG of ``bnctl inspect --plot``: each layer's running_var and |weight| spread."""

from __future__ import annotations

import io
from pathlib import Path

from .. import _atomic
from ..errors import InputError, MissingExtraError
from ..core.stats import as_float64, flag_counts
from ..ops.inspect import InspectResult


def pyplot(dest: Path):
    """matplotlib's pyplot (Agg) for a figure to be saved as ``dest``; errors name the extra and the suffixes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError("matplotlib", "plot", "--plot") from exc
    if dest.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise InputError(f"--plot {dest}: the file name must end in .png, .svg or .pdf", f"e.g. --plot {dest.with_suffix('.png')}")
    return plt


def save(fig, dest: Path) -> None:
    """Write ``fig`` to ``dest`` atomically, in the format its suffix names, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=dest.suffix.lower().lstrip("."), dpi=110)
    plt.close(fig)
    _atomic.write_bytes(dest, buf.getvalue())


def plot(result: InspectResult, dest: Path) -> None:
    """Draw each layer's running_var and |weight| spread (log scale), flagged layers in red.

    One column per layer, in model order: a bar from the smallest to the largest channel
    value with a dot at the median; red layers carry a flag; a cross at the bottom marks a
    layer whose values cannot sit on a log axis (non-finite, negative or zero).
    """
    import numpy as np

    plt = pyplot(dest)
    layers = result.layers
    n = max(len(layers), 1)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.28 * n + 2), 7), sharex=True)
    panels = (("running_var", "running_var per channel", "var"), ("weight", "|γ| (weight) per channel", "gamma"))
    for ax, (attr, label, _) in zip(axes, panels):
        for i, (layer, row) in enumerate(zip(layers, result.rows)):
            t = getattr(layer, attr)
            color = "tab:red" if row["flags"] else "tab:blue"
            v = as_float64(t)
            if v is None or v.size == 0:
                continue
            v = np.abs(v) if attr == "weight" else v
            ok = np.sort(v[np.isfinite(v) & (v > 0)])
            if ok.size < v.size:
                ax.plot([i], [0.02], marker="x", color="tab:red", transform=ax.get_xaxis_transform(), clip_on=False)
            if ok.size:
                ax.vlines(i, float(ok[0]), float(ok[-1]), color=color, linewidth=3, alpha=0.6)
                ax.plot([i], [float(ok[(ok.size - 1) // 2])], "o", color=color, markersize=3)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    eps = next((l.eps for l in layers if l.eps is not None), None)
    axes[0].axhline(eps if eps is not None else 1e-5, color="gray", linestyle="--", linewidth=1, label="eps" if eps else "1e-5 (eps unknown)")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].set_xticks(range(len(layers)))
    axes[1].set_xticklabels([l.name or "(root)" for l in layers], rotation=90, fontsize=7)
    for label, row in zip(axes[1].get_xticklabels(), result.rows):
        if row["flags"]:
            label.set_color("tab:red")
    counts = flag_counts(result.rows)
    subtitle = ", ".join(f"{k} {v}" for k, v in counts.items()) or "no flags"
    fig.suptitle(f"{Path(result.source).name}: {len(layers)} BatchNorm layers ({subtitle})\nred = flagged layer; x = non-finite, negative or zero values", fontsize=10)
    fig.tight_layout()
    save(fig, dest)
