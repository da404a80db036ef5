"""inspect on a large checkpoint: bnctl against a full torch.load, time and peak memory.

    python benchmarks/bench_inspect.py [--size-gb 1.5] [--layers 100]

Builds, in a temporary folder, a ResNet-like state_dict of ``--size-gb`` with ``--layers``
conv + BatchNorm pairs, as a torch zip file and as safetensors. Each measurement runs in
a fresh Python process (so peak RSS is that reader's own) after the file was read once
(warm page cache), and the ratios come from this one run. "import torch" is the floor
every reader pays.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# label -> (setup, timed body); PATH, SAFE and LAYERS are filled in
READERS = {
    "torch.load (full, weights_only)": ("import torch", "sd = torch.load(PATH, weights_only=True)"),
    "torch.load(mmap=True), BN tensors only": (
        "import torch",
        "sd = torch.load(PATH, weights_only=True, mmap=True)\n[float(t.double().sum()) for k, t in sd.items() if '.bn.' in k]",
    ),
    "bnctl.inspect (torch zip)": ("import bnctl, bnctl.ops.inspect", "r = bnctl.inspect(PATH)\nassert len(r.rows) == LAYERS"),
    "bnctl.inspect (safetensors)": ("import bnctl, bnctl.ops.inspect", "r = bnctl.inspect(SAFE)\nassert len(r.rows) == LAYERS"),
}

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the parent, VmHWM is per address space
CHILD = """
import time
{setup}
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
floor = hwm()
t0 = time.perf_counter()
{body}
print(time.perf_counter() - t0, floor, hwm())
"""


def build(folder: Path, size_gb: float, n_layers: int) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    per_conv = int(size_gb * 1e9 / 4 / n_layers)
    channels = 256
    state = {}
    for i in range(n_layers):
        state[f"features.{i}.conv.weight"] = torch.full((channels, per_conv // channels), 0.01)
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.1), ("running_var", 0.9)):
            state[f"features.{i}.bn.{name}"] = torch.full((channels,), value)
        state[f"features.{i}.bn.num_batches_tracked"] = torch.tensor(1000)
    pt, safe = folder / "big.pt", folder / "big.safetensors"
    torch.save(state, pt)
    save_file(state, safe)
    return pt, safe


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def measure(setup: str, body: str) -> tuple[float, int, int]:
    """(seconds of ``body``, peak RSS after ``setup``, peak RSS at the end) in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", CHILD.format(setup=setup, body=body)], capture_output=True, text=True, check=True)
    elapsed, floor, peak = proc.stdout.split()[-3:]
    return float(elapsed), int(floor), int(peak)


def measure_cli(path: Path, n_layers: int) -> float:
    """Wall seconds of the whole ``bnctl inspect --format json`` command, process start included."""
    cmd = [str(Path(sys.executable).with_name("bnctl")), "inspect", str(path), "--format", "json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    assert len(json.loads(proc.stdout)["layers"]) == n_layers
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--layers", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pt, safe = build(Path(tmp), args.size_gb, args.layers)
        print(f"built {pt.stat().st_size / 1e9:.2f} GB torch file and {safe.stat().st_size / 1e9:.2f} GB safetensors with {args.layers} BN layers in {time.perf_counter() - t0:.1f} s; page cache warmed\n")
        warm(pt)
        warm(safe)
        results = {}
        for label, (setup, body) in READERS.items():
            code = body.replace("PATH", repr(str(pt))).replace("SAFE", repr(str(safe))).replace("LAYERS", str(args.layers))
            results[label] = measure(setup, code)
        cli_seconds = measure_cli(pt, args.layers)
    full_t, full_floor, full_peak = results["torch.load (full, weights_only)"]
    full_added = full_peak - full_floor
    print(f"{'reader':40s} {'read s':>8s} {'x full load':>11s} {'peak RSS MB':>12s} {'added by read MB':>17s} {'x full load':>11s}")
    for label, (t, floor, peak) in results.items():
        added = peak - floor
        print(f"{label:40s} {t:8.3f} {t / full_t:11.3f} {peak / 1e6:12.0f} {added / 1e6:17.1f} {added / full_added:11.4f}")
    print(f"\nwhole command `bnctl inspect big.pt --format json` (process start and imports included): {cli_seconds:.2f} s")
    print("read s: time of the read alone, imports excluded; added by read: peak RSS minus the RSS after imports. One run, warm page cache.")


if __name__ == "__main__":
    main()
