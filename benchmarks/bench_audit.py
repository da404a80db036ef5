"""audit: time per check group, against inspect, one run.

    python benchmarks/bench_audit.py [--size-gb 1.5] [--size 224]

1. Statistics checks on a large checkpoint (bench_inspect's file: ``--size-gb`` of conv
   weights, 100 BN layers), each in a fresh process with a warm page cache: ``bnctl.inspect``
   against ``bnctl.audit`` (statistics group only: no --arch), time and peak RSS added.
2. Every group on a ResNet-50 layout (benchmarks/zoo.py) at ``--size`` x ``--size``, loaded
   with --arch from a state_dict: the seconds the runner records per group. Behaviour checks
   run a batch of 2 twice, then each sample alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_inspect  # noqa: E402
import zoo  # noqa: E402

from bnctl.audit.runner import audit  # noqa: E402
from bnctl.io.source import CheckInputs, ModelSource  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big, _ = bench_inspect.build(Path(tmp), args.size_gb, 100)
        bench_inspect.warm(big)
        rows = {}
        for label, body in (
            ("bnctl.inspect", f"r = bnctl.inspect({str(big)!r})\nassert len(r.rows) == 100"),
            ("bnctl.audit (statistics)", f"from bnctl.audit.runner import audit\nr = audit([{str(big)!r}])\nassert r.layers == 100"),
        ):
            rows[label] = bench_inspect.measure("import bnctl, bnctl.ops.inspect, bnctl.audit.runner", body)
        print(f"1. statistics checks on a {big.stat().st_size / 1e9:.2f} GB checkpoint with 100 BN layers (fresh process each, warm cache)\n")
        print(f"{'':28s} {'seconds':>8s} {'x inspect':>10s} {'RSS added MB':>13s}")
        base = rows["bnctl.inspect"][0]
        for label, (t, floor, peak) in rows.items():
            print(f"{label:28s} {t:8.3f} {t / base:10.2f} {(peak - floor) / 1e6:13.1f}")

        model = zoo.trained_like(zoo.resnet50())
        weights = Path(tmp) / "resnet50.pt"
        torch.save(model.state_dict(), weights)
        start = time.perf_counter()
        result = audit([weights], model=ModelSource(arch=f"{HERE / 'zoo.py'}:resnet50"), inputs=CheckInputs(shapes=[(1, 3, args.size, args.size)]))
        total = time.perf_counter() - start
    (fa,) = result.files
    assert fa.error is None, fa.error
    print(f"\n2. every check group on ResNet-50 ({fa.layers} BN layers) at {args.size}x{args.size}, {torch.get_num_threads()} threads\n")
    print(f"{'group':16s} {'seconds':>8s}")
    for group, seconds in fa.seconds.items():
        print(f"{group:16s} {seconds:8.3f}")
    print(f"{'total':16s} {total:8.3f}   findings: {len(result.findings)}")


if __name__ == "__main__":
    main()
