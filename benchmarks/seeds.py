"""Seeds side by side: wsjax trains 8 vmapped seeds vs 1 seed, same steps.

The training core's loop (`wsjax.core.loop.train` over a `Program` with
blocks of 32 steps; batch 128, SGD) on MNIST-1D for the 1-D ConvNet and the
MLP (`benchmarks.throughput.JaxSmall`), with 1 seed and with 8 seeds as
replicas of one compiled program, each with wsjax's default layout (one
CPU device per core, at most one per seed: 1 device for 1 seed, the seeds
spread over all cores for 8), and 8 seeds forced onto 1 device for
comparison. Both run the same number of steps (each of the 8 seeds takes every step),
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
    cores = common.cpu_count()
    sides = {"1_seed": common.Worker("benchmarks.throughput:JaxSmall", model=name, seeds=1),
             f"{SEEDS}_seeds": common.Worker("benchmarks.throughput:JaxSmall", model=name,
                                             seeds=SEEDS, host_devices=cores),
             f"{SEEDS}_seeds_1_device": common.Worker("benchmarks.throughput:JaxSmall",
                                                      model=name, seeds=SEEDS)}
    with common.closing_all(sides):
      runs = common.alternate(sides, "run", rounds, n_steps)
      out = {}
      for side, w in sides.items():
        secs = [r["seconds"] for r in runs[side]]
        out[side] = {"seconds": common.median(secs), "seconds_all": secs,
                     "compile_s": w.info["compile_s"], "peak_rss_mb": w.peak_rss_mb()}
      for side, w in sides.items():
        out[side]["devices"] = w.info["devices"]
      one, many = out["1_seed"]["seconds"], out[f"{SEEDS}_seeds"]["seconds"]
      result["models"][name] = {
          "sides": out, "wall_ratio": many / one, "per_seed_speedup": SEEDS * one / many,
          "wall_ratio_1_device": out[f"{SEEDS}_seeds_1_device"]["seconds"] / one}
  return result


def report(result: dict) -> str:
  rows = []
  for name, m in result["models"].items():
    one, many = m["sides"]["1_seed"], m["sides"][f"{result['seeds']}_seeds"]
    dev1 = m["sides"][f"{result['seeds']}_seeds_1_device"]
    rows.append([name, result["steps_per_run"], one["seconds"], many["seconds"],
                 many["devices"], f"{m['wall_ratio']:.2f}x", f"{m['per_seed_speedup']:.2f}x",
                 dev1["seconds"], f"{m['wall_ratio_1_device']:.2f}x",
                 one["compile_s"], many["compile_s"]])
  n = result["seeds"]
  return common.table(rows, ["model", "steps", "1 seed s", f"{n} seeds s", "devices",
                             "wall ratio", "vs sequential", f"{n} seeds 1 device s",
                             "wall ratio 1 device", "compile 1 s", f"compile {n} s"])
