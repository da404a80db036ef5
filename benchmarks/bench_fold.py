"""fold: bnctl against torch.fx's fuse on three model layouts, one run, ratios.

    python benchmarks/bench_fold.py [--size 224] [--repeats 5]

For each model of benchmarks/zoo.py (BN statistics set as training would leave them):

- BN layers folded by ``torch.fx.experimental.optimization.fuse`` and by bnctl, and each
  result's max relative output error against the original;
- time to fold: fx fuse (its deepcopy and trace included) and bnctl (trace, pairing,
  rewrite and building a module that owns its weights included; the verification forward passes excluded, as they are
  bnctl's extra); best of three;
- eager CPU latency at batch 1 and 8 of the original, the fx-fused and the bnctl-folded
  model: median of ``--repeats`` runs after two warm-up runs, as a ratio to the original.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

from bnctl.core import graph, verify  # noqa: E402
from bnctl.ops.fold.pytorch import fold, fold_traced, trace_for_fold  # noqa: E402


def bnctl_fold_only(model: torch.nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """What bnctl.fold does minus the reference and verification forward passes."""
    return fold_traced(trace_for_fold(model), model, inputs)[0]


def best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def latency(model, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def bn_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if graph.bn_call(gm, n) is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.size}x{args.size}\n")
    rows = []
    for name, factory in zoo.MODELS.items():
        torch.manual_seed(0)
        model = zoo.trained_like(factory())
        x1 = torch.randn(1, 3, args.size, args.size)
        x8 = torch.randn(8, 3, args.size, args.size)
        total = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

        t_fx = best_of(lambda: fuse(model))
        t_bnctl = best_of(lambda: bnctl_fold_only(model, (x1,)))
        fx_model = fuse(model)
        folded, report = fold(model, (x8,))
        reference = verify.run(model, (x8,))
        fx_err = verify.compare(reference, verify.run(fx_model, (x8,)))[1]

        lat = {}
        for label, m in (("original", model), ("fx", fx_model), ("bnctl", folded)):
            lat[label] = (latency(m, x1, args.repeats), latency(m, x8, args.repeats))
        rows.append((name, total, total - bn_calls(fx_model), fx_err, len(report.folded), report.max_rel_error, t_fx, t_bnctl, lat))
        print(f"{name}: done", file=sys.stderr)

    print("| model | BN | folded by fx fuse | fx rel. error | folded by bnctl | bnctl rel. error | fold time fx | fold time bnctl | bnctl / fx |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, total, fx_n, fx_err, b_n, b_err, t_fx, t_b, _ in rows:
        print(f"| {name} | {total} | {fx_n} | {fx_err:.1e} | {b_n} | {b_err:.1e} | {t_fx:.3f} s | {t_b:.3f} s | {t_b / t_fx:.2f} |")
    print("\n| model | batch | original | fx-fused | bnctl-folded | fx / original | bnctl / original |")
    print("|---|---|---|---|---|---|---|")
    for name, *_, lat in rows:
        for i, batch in enumerate((1, 8)):
            o, f, b = lat["original"][i], lat["fx"][i], lat["bnctl"][i]
            print(f"| {name} | {batch} | {o * 1e3:.1f} ms | {f * 1e3:.1f} ms | {b * 1e3:.1f} ms | {f / o:.2f} | {b / o:.2f} |")


if __name__ == "__main__":
    main()
