"""Seeds side by side: wsjax trains 8 vmapped seeds vs 1 seed, same steps.

`Stepper` blocks of 32 steps (batch 128, SGD) on MNIST-1D for the 1-D
ConvNet and the MLP, with 1 seed and with 8 seeds in one compiled program.
Both run the same number of steps (each of the 8 seeds takes every step),
alternating after warm-up; the wall-time ratio t(8 seeds) / t(1 seed) says
what a seed costs when it rides along (8.0: no gain over running the seeds
one after another; 1.0: free).
"""
from __future__ import annotations

from benchmarks import common

MODELS = ("conv1d", "mlp")
SEEDS = 8


def run(quick: bool = False) -> dict:
  n_steps = 256 if quick else 1024
  rounds = 2 if quick else 3
  result = {"benchmark": "seeds", "environment": common.environment(), "quick": quick,
            "seeds": SEEDS, "steps_per_run": n_steps, "rounds": rounds, "models": {}}
  for name in MODELS:
    common.log(f"seeds: {name} ...")
    sides = {f"{s}_seed{'s' if s > 1 else ''}": common.Worker(
        "benchmarks.throughput:JaxSmall", model=name, seeds=s) for s in (1, SEEDS)}
    try:
      runs = common.alternate(sides, "run", rounds, n_steps)
      out = {}
      for side, w in sides.items():
        secs = [r["seconds"] for r in runs[side]]
        out[side] = {"seconds": common.median(secs), "seconds_all": secs,
                     "compile_s": w.info["compile_s"], "peak_rss_mb": w.peak_rss_mb()}
      one, many = out["1_seed"]["seconds"], out[f"{SEEDS}_seeds"]["seconds"]
      result["models"][name] = {"sides": out, "wall_ratio": many / one,
                                "per_seed_speedup": SEEDS * one / many}
    finally:
      for w in sides.values():
        w.close()
  return result


def report(result: dict) -> str:
  rows = []
  for name, m in result["models"].items():
    one, many = m["sides"]["1_seed"], m["sides"][f"{result['seeds']}_seeds"]
    rows.append([name, result["steps_per_run"], one["seconds"], many["seconds"],
                 f"{m['wall_ratio']:.2f}x", f"{m['per_seed_speedup']:.2f}x",
                 one["compile_s"], many["compile_s"]])
  return common.table(rows, ["model", "steps", "1 seed s", f"{result['seeds']} seeds s",
                             "wall ratio", "vs sequential", "compile 1 s",
                             f"compile {result['seeds']} s"])
