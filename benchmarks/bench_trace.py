"""bnctl trace: the cost of watching a training loop, one run each, whole processes.

    python benchmarks/bench_trace.py [--steps 300] [--batch 16]

A ResNet-style model (bnctl.models:sample_net, 10 BN layers, 32x32 inputs) trained for
``--steps`` SGD steps on random batches, with an evaluation pass (model.eval(), no_grad)
every 50 steps: run as ``python train.py`` and as ``bnctl trace train.py``. The script
times its own loop (the figure that matters: start-up is the same interpreter either way)
and the whole process is timed too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = """
import sys, time, torch
from bnctl.models import sample_net
torch.manual_seed(0)
torch.set_num_threads(1)
steps, batch = int(sys.argv[1]), int(sys.argv[2])
model = sample_net()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
data = [torch.randn(batch, 3, 32, 32) for _ in range(8)]
labels = [torch.randint(0, 4, (batch,)) for _ in range(8)]
start = time.perf_counter()
for step in range(steps):
    model.train()
    loss = torch.nn.functional.cross_entropy(model(data[step % 8]), labels[step % 8])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 49:
        model.eval()
        with torch.no_grad():
            model(data[0])
print(f"loop {time.perf_counter() - start:.3f}")
"""


def run(argv: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    total = time.perf_counter() - start
    found = re.search(r"loop ([0-9.]+)", proc.stdout)
    if proc.returncode not in (0, 1) or found is None:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-1000:]}{proc.stderr[-2000:]}")
    return float(found.group(1)), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "train.py"
        script.write_text(SCRIPT)
        plain = run([sys.executable, str(script), str(args.steps), str(args.batch)])
        traced = run([sys.executable, "-c", "import sys; from bnctl.cli import main; sys.argv[0] = 'bnctl'; main()", "trace", str(script), str(args.steps), str(args.batch)])
    print(f"{args.steps} steps of batch {args.batch}, 1 thread, one run each\n")
    print(f"{'':24s} {'loop s':>8s} {'process s':>10s}")
    print(f"{'python train.py':24s} {plain[0]:8.2f} {plain[1]:10.2f}")
    print(f"{'bnctl trace train.py':24s} {traced[0]:8.2f} {traced[1]:10.2f}")
    print(f"\noverhead: loop {100 * (traced[0] / plain[0] - 1):+.1f}%, process {100 * (traced[1] / plain[1] - 1):+.1f}%")


if __name__ == "__main__":
    main()
