"""recalibrate: bnctl against torch.optim.swa_utils.update_bn and a bare forward pass, one run.

    python benchmarks/bench_recalibrate.py [--size 128] [--batch 32] [--batches 4]

ResNet-50 layout (benchmarks/zoo.py) on the same random batches, each method in a fresh
process (the allocator setting is process-wide), one warm-up batch first, then the timed
batches:

- bare forward: BN layers in train mode under ``torch.no_grad()`` (the floor update_bn sits on);
- ``update_bn``: PyTorch's, as users call it (whole model in train mode, autograd on);
- bnctl library: ``bnctl.recalibrate`` with nothing else changed, then with channels_last;
- bnctl CLI settings: channels_last and the allocator kept from returning memory to the
  kernel after every batch, as ``bnctl recalibrate`` runs it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {here!r})
{prelude}
import torch, zoo
torch.manual_seed(0)
model = zoo.trained_like(zoo.resnet50())
batches = [torch.randn({batch}, 3, {size}, {size}) for _ in range({batches} + 1)]
{setup}
run(batches[:1])
start = time.perf_counter()
run(batches[1:])
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""

METHODS = {
    "bare train-mode forward": (
        "",
        """
def run(bs):
    model.train()
    with torch.no_grad():
        for b in bs:
            model(b)
""",
    ),
    "update_bn": (
        "",
        """
from torch.optim.swa_utils import update_bn
def run(bs):
    update_bn(bs, model)
""",
    ),
    "bnctl.recalibrate (library)": (
        "",
        """
from bnctl import recalibrate
def run(bs):
    recalibrate(model, bs)
""",
    ),
    "bnctl.recalibrate + channels_last": (
        "",
        """
from bnctl import recalibrate
model = model.to(memory_format=torch.channels_last)
def run(bs):
    recalibrate(model, [b.contiguous(memory_format=torch.channels_last) for b in bs])
""",
    ),
    "bnctl recalibrate (CLI settings)": (
        "from bnctl.jobs.recalibrate import tune_allocator; tune_allocator()",
        """
from bnctl import recalibrate
model = model.to(memory_format=torch.channels_last)
def run(bs):
    recalibrate(model, [b.contiguous(memory_format=torch.channels_last) for b in bs])
""",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    results = {}
    for label, (prelude, setup) in METHODS.items():
        code = CHILD.format(here=str(HERE), prelude=prelude, setup=setup, batch=args.batch, size=args.size, batches=args.batches)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
        print(f"{label}: done", file=sys.stderr)
    samples = args.batch * args.batches
    base = results["update_bn"]
    print(f"ResNet-50 layout, {args.batches} batches of {args.batch} at {args.size}x{args.size}, one warm-up batch, each in a fresh process\n")
    print("| method | seconds | samples/s | x update_bn time | speed-up over update_bn |")
    print("|---|---|---|---|---|")
    for label, seconds in results.items():
        print(f"| {label} | {seconds:.2f} | {samples / seconds:.1f} | {seconds / base:.2f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
