"""The fast path as a user feels it: whole-process time and peak RSS of `bnctl inspect` and
`bnctl audit` (no --arch, no check inputs: neither imports torch nor pandas) against
`python -c "import torch"` and a process that only does a full `torch.load`, one run each.

    python benchmarks/bench_fastpath.py [--size-gb 1.5] [--folder 50]

Cases: the small sample checkpoint, a ``--size-gb`` state_dict with 100 conv + BN layers
(bench_inspect's builder), and a folder of ``--folder`` copies of the sample for audit.
Peak RSS comes from GNU time (``/usr/bin/time -f %M``, the child's own high-water mark).
Every file is read once before (warm page cache).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_inspect  # noqa: E402

SAMPLE = HERE.parent / "samples/checkpoints/sample.pt"


def run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one whole process."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *argv], capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr[-500:]}")
    seconds, kb = proc.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--folder", type=int, default=50)
    args = parser.parse_args()
    python = sys.executable
    bnctl = str(Path(python).with_name("bnctl"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big, _ = bench_inspect.build(tmp, args.size_gb, 100)
        folder = tmp / "folder"
        folder.mkdir()
        for i in range(args.folder):
            shutil.copy(SAMPLE, folder / f"model_{i}.pt")
        for path in (big, SAMPLE):
            bench_inspect.warm(path)
        rows = [
            ("python -c 'import torch'", [python, "-c", "import torch"]),
            ("torch.load, small file", [python, "-c", f"import torch; torch.load({str(SAMPLE)!r}, weights_only=True)"]),
            ("bnctl inspect, small file", [bnctl, "inspect", str(SAMPLE), "-f", "json"]),
            ("bnctl audit, small file", [bnctl, "audit", str(SAMPLE)]),
            (f"torch.load, {args.size_gb:g} GB file", [python, "-c", f"import torch; torch.load({str(big)!r}, weights_only=True)"]),
            (f"bnctl inspect, {args.size_gb:g} GB file", [bnctl, "inspect", str(big), "-f", "json"]),
            (f"bnctl audit, {args.size_gb:g} GB file", [bnctl, "audit", str(big)]),
            (f"bnctl audit, folder of {args.folder}", [bnctl, "audit", str(folder)]),
        ]
        results = [(label, *run(argv)) for label, argv in rows]
    floor = results[0][1]
    print("| process | seconds | x `import torch` | peak RSS MB |")
    print("|---|---|---|---|")
    for label, seconds, rss in results:
        print(f"| {label} | {seconds:.2f} | {seconds / floor:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
