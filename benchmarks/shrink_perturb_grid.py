"""The shrink-and-perturb grid as one program vs the same cells one at a time.

`python -m experiments.shrink_perturb_grid` trains every (shrink, perturb)
cell and seed of its stage 2 as a replica of ONE compiled program
(`wsjax.studies.shrink_perturb_grid`); Ash & Adams' code runs one process
per cell. Both sides here are wsjax, each in its own worker process with
the study's default device layout (one CPU device per core): the study's
default workload (MNIST-1D, the 1-D ConvNet, Adam 3e-3, batch 128, the
6 x 4 grid, 3 seeds, stage 2 on all 4,000 examples), every replica taking
the same fixed number of steps from the grid's start:

* `grid`: the 72 replicas (24 cells x 3 seeds) in one program;
* `one_by_one`: each cell's 3 seeds in a program of their own, the 24
  cells one after another (one compilation, reused by every cell).

Sides alternate after warm-up (compilation timed apart); the ratio
t(one_by_one) / t(grid) is what the grid saves at equal steps. (In the
study the grid runs as long as its slowest replica, whereas cells run
alone would stop at their own threshold; the study's results report each
cell's own steps, from which the one-by-one cost follows.)
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks import common

from wsjax.studies.shrink_perturb_grid import GridConfig

SHRINKS, PERTURBS, SEEDS = GridConfig().shrinks, GridConfig().perturbs, GridConfig().seeds


class GridSide:
  """One side: the grid's stage-2 start trained `steps` steps, as one
  program (`mode="grid"`) or cell by cell (`mode="one_by_one"`)."""

  def __init__(self, mode: str, block_steps: int = 32):
    import jax
    from wsjax import parallel
    replicas = len(SHRINKS) * len(PERTURBS) * SEEDS if mode == "grid" else SEEDS
    parallel.use_cpu_devices(0, at_most=replicas)  # the study's layout, before any JAX operation
    from wsjax.studies import shrink_perturb_grid as G
    from wsjax.studies.common import RunnerConfig
    self.mode = mode
    cfg = G.GridConfig(shrinks=SHRINKS, perturbs=PERTURBS, seeds=SEEDS)
    runner = RunnerConfig(block_steps=block_steps, progress=False,
                          seed_devices=parallel.default_seed_devices(replicas))
    self.study = G.GridStudy(cfg, "/tmp/wsjax-benchmark-unused", runner, log=lambda s: None)
    s = self.study.setting
    self.prev = s.fresh_states(0, 0)  # stands in for stage 1's result: the cost is the same
    self.program = s.program(tx=self.study.tx(1))
    self.data = self.study.data(1)
    self.cells = cfg.cells
    t0 = time.perf_counter()
    self.run(block_steps)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    self.run(block_steps)
    second = time.perf_counter() - t0
    self.info = {"first_call_s": first, "second_call_s": second,
                 "compile_s": max(first - second, 0.0), "devices": jax.device_count(),
                 "seed_devices": self.program.mesh.shape[parallel.SEEDS_AXIS],
                 "replicas_per_program": replicas, "cells": len(self.cells), "seeds": SEEDS}

  def run(self, steps: int) -> dict:
    """Trains every cell and seed `steps` steps from the grid's start; times it."""
    import jax
    from wsjax.core.loop import Until, train
    seeds = list(self.study.setting.seeds)
    start = self.study.start_states(self.prev)
    jax.block_until_ready(start)
    cpu0, t0 = common.cpu_seconds(), time.perf_counter()
    if self.mode == "grid":
      states, pos = train(start, self.program, self.data, Until.steps(steps),
                          data_seeds=seeds * len(self.cells))
      jax.block_until_ready(states)
      total = int(np.sum(pos["steps"]))
    else:
      total = 0
      for c in range(len(self.cells)):
        rows = slice(c * SEEDS, (c + 1) * SEEDS)
        alone = jax.tree.map(lambda x, rows=rows: x[rows], start)
        alone, pos = train(alone, self.program, self.data, Until.steps(steps), data_seeds=seeds)
        jax.block_until_ready(alone)
        total += int(np.sum(pos["steps"]))
    return {"seconds": time.perf_counter() - t0, "cpu_s": common.cpu_seconds() - cpu0,
            "replica_steps": total}


def run(quick: bool = False) -> dict:
  steps = 64 if quick else 320  # 2 or 10 epochs of the 4,000 examples at batch 128
  rounds = 2 if quick else 3
  result = {"benchmark": "shrink_perturb_grid", "environment": common.environment(),
            "quick": quick, "shrinks": list(SHRINKS), "perturbs": list(PERTURBS),
            "seeds": SEEDS, "steps_per_replica": steps, "rounds": rounds}
  common.log("shrink_perturb_grid: building the two sides ...")
  sides = {"grid": common.Worker("benchmarks.shrink_perturb_grid:GridSide", mode="grid"),
           "one_by_one": common.Worker("benchmarks.shrink_perturb_grid:GridSide",
                                       mode="one_by_one")}
  with common.closing_all(sides):
    runs = common.alternate(sides, "run", rounds, steps)
    out = {}
    for name, w in sides.items():
      secs = [r["seconds"] for r in runs[name]]
      out[name] = {"seconds": common.median(secs), "seconds_all": secs,
                   "cpu_s": common.median([r["cpu_s"] for r in runs[name]]),
                   "replica_steps": runs[name][0]["replica_steps"],
                   "peak_rss_mb": w.peak_rss_mb(), **w.info}
  result["sides"] = out
  result["wall_ratio"] = out["one_by_one"]["seconds"] / out["grid"]["seconds"]
  result["cpu_ratio"] = out["one_by_one"]["cpu_s"] / out["grid"]["cpu_s"]
  return result


def report(result: dict) -> str:
  rows = []
  for name, side in result["sides"].items():
    rows.append([name, side["replicas_per_program"], side["replica_steps"], side["devices"],
                 side["seconds"], side["cpu_s"], side["compile_s"], side["peak_rss_mb"]])
  table = common.table(rows, ["side", "replicas/program", "replica steps", "devices", "wall s",
                              "cpu s", "compile s", "peak MB"])
  return (f"{table}\none at a time / grid: wall {result['wall_ratio']:.2f}x, "
          f"cpu {result['cpu_ratio']:.2f}x ({len(result['shrinks'])} x "
          f"{len(result['perturbs'])} cells, {result['seeds']} seeds, "
          f"{result['steps_per_replica']} steps each)")
