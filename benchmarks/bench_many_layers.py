"""inspect and audit on a file with very many BatchNorm layers: the whole command, timed.

    python benchmarks/bench_many_layers.py [--layers 200000] [--channels 2]

Writes, with safetensors' own writer, a state_dict of ``--layers`` BatchNorm layers (weight,
bias, running_mean, running_var of ``--channels`` values each; 200,000 layers make an
800,000-entry, 70 MB JSON header) and times, each in a fresh process with a warm page cache:
what a user would otherwise run (``safetensors.numpy.load_file``, ``torch.load`` of the
same tensors saved by torch, ``import torch``) and bnctl's whole commands (process start
included). Ratios are to ``safetensors.numpy.load_file``, from this one run; the machine is
noisy, so nothing here is asserted. ``--torch-zip`` also saves the layers with ``torch.save``
(a million zip members; about a minute to write) and times ``torch.load`` against bnctl.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build(folder: Path, n_layers: int, channels: int) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    state = {}
    for i in range(n_layers):
        state[f"blocks.{i}.bn.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        state[f"blocks.{i}.bn.bias"] = rng.normal(0, 0.1, channels).astype(np.float32)
        state[f"blocks.{i}.bn.running_mean"] = rng.normal(0, 0.1, channels).astype(np.float32)
        state[f"blocks.{i}.bn.running_var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    path = folder / "many.safetensors"
    save_file(state, str(path))
    return path


def timed(cmd: list[str]) -> float:
    """Wall seconds of one child process (which must succeed; audit may exit 1 on findings)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=200_000)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--torch-zip", action="store_true", help="also time a torch.save file of the same layers")
    args = parser.parse_args()
    bnctl = str(Path(sys.executable).with_name("bnctl"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build(Path(tmp), args.layers, args.channels)
        print(f"wrote {path.stat().st_size / 1e6:.0f} MB with {args.layers} BN layers in {time.perf_counter() - t0:.1f} s (safetensors.numpy.save_file)\n")
        path.read_bytes()  # warm the page cache
        py = sys.executable
        runs = {
            "import torch": [py, "-c", "import torch"],
            "safetensors.numpy.load_file": [py, "-c", f"from safetensors.numpy import load_file; load_file({str(path)!r})"],
            "bnctl inspect (table)": [bnctl, "inspect", str(path)],
            "bnctl inspect -f csv": [bnctl, "inspect", str(path), "-f", "csv", "-o", str(Path(tmp) / "layers.csv")],
            "bnctl audit": [bnctl, "audit", str(path), "--format", "json"],
        }
        if args.torch_zip:
            pt = Path(tmp) / "many.pt"
            subprocess.run(
                [
                    py,
                    "-c",
                    f"import torch; from safetensors.torch import load_file; sd = load_file({str(path)!r}); "
                    f"sd.update({{k.rpartition('.')[0] + '.num_batches_tracked': torch.tensor(10) for k in list(sd) if k.endswith('.weight')}}); "
                    f"torch.save(sd, {str(pt)!r})",
                ],
                check=True,
            )
            runs["torch.load (torch zip)"] = [py, "-c", f"import torch; torch.load({str(pt)!r}, weights_only=True)"]
            runs["bnctl inspect (torch zip)"] = [bnctl, "inspect", str(pt)]
        results = {label: timed(cmd) for label, cmd in runs.items()}
    base = results["safetensors.numpy.load_file"]
    print(f"{'command':32s} {'wall s':>8s} {'x load_file':>12s}")
    for label, seconds in results.items():
        print(f"{label:32s} {seconds:8.2f} {seconds / base:12.2f}")
    print("\nwall s: the whole process, start and imports included; one run, warm page cache.")


if __name__ == "__main__":
    main()
