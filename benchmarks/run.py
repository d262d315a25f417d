"""Runs the wsjax benchmarks and writes benchmarks/results/NAME.json.

    python -m benchmarks.run                    # throughput, study, seeds, gpu
    python -m benchmarks.run --quick            # a short smoke run (~3 min on 2 cores)
    python -m benchmarks.run --only=throughput,seeds
    python -m benchmarks.run --only=resnet_probe   # ResNet-18 CPU investigation
    python -m benchmarks.run --only=core --baseline=/tmp/wsjax-644b3fb  # the core refactor, before/after

Not run by default: resnet_probe, transforms_cost, weight_matching,
similarity, lottery, transfer, shrink_perturb_grid, core (`--baseline` is the pre-refactor checkout it compares
against: `git worktree add /tmp/wsjax-644b3fb 644b3fb`; see benchmarks/core.py).

Each benchmark prints a table; BENCHMARKS.md records the numbers measured
with these commands. The PyTorch reference is an optional extra
(`pip install wsjax[bench]`); without it only the wsjax sides run.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks import common

# name -> (module, run by default)
BENCHMARKS = {
    "throughput": ("benchmarks.throughput", True),
    "study": ("benchmarks.study", True),
    "seeds": ("benchmarks.seeds", True),
    "gpu": ("benchmarks.gpu", True),
    "resnet_probe": ("benchmarks.resnet_probe", False),
    "transforms_cost": ("benchmarks.transforms_cost", False),
    "weight_matching": ("benchmarks.weight_matching", False),
    "similarity": ("benchmarks.similarity", False),
    "core": ("benchmarks.core", False),
    "lottery": ("benchmarks.lottery", False),
    "transfer": ("benchmarks.transfer", False),
    "shrink_perturb_grid": ("benchmarks.shrink_perturb_grid", False),
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
  parser.add_argument("--only", default="", help="comma-separated benchmark names: "
                      + ", ".join(BENCHMARKS))
  parser.add_argument("--out", default=common.RESULTS_DIR, help="where NAME.json files go")
  parser.add_argument("--baseline", default=None,
                      help="core: the pre-refactor checkout (default: $WSJAX_BASELINE, else "
                      "/tmp/wsjax-644b3fb)")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.only.split(",") if n.strip()]
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    print(f"error: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
          file=sys.stderr)
    return 2
  if not names:
    names = [n for n, (_, default) in BENCHMARKS.items() if default]
  for name in names:
    module = importlib.import_module(BENCHMARKS[name][0])
    t0 = time.perf_counter()
    kwargs = {"baseline": args.baseline} if name == "core" and args.baseline else {}
    result = module.run(quick=args.quick, **kwargs)
    result["wall_s"] = time.perf_counter() - t0
    result["environment"]["load_average_end"] = list(common.load_average())
    suffix = "_quick" if args.quick else ""
    path = common.write_result(name + suffix, result, args.out)
    print(f"\n== {name} ({result['wall_s']:.0f} s){' [quick]' if args.quick else ''}")
    print(module.report(result))
    if result.get("note"):
      print(result["note"])
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
