"""What a replica-step costs as replicas share a device: the probe behind `replica_chunk`.

Trains R replicas of the lottery benchmark's setting (the 1-D ConvNet on
MNIST-1D, SGD 0.1 momentum 0.9, batch 128, each replica its own data order;
`--masked` adds a density-0.8 pruning mask per replica) for `--steps` steps
in one `wsjax.core.loop.train` call, after a warm-up call that compiles, and
prints the best of two timings as ms per step and per replica-step. Each
configuration runs in a process of its own (the device count is fixed when
JAX starts), so one command compares several:

    python -m benchmarks.replica_width                      # the table of BENCHMARKS.md s.11
    python -m benchmarks.replica_width --configs=72x2:0,72x2:2 --steps=128
    taskset -c 0 python -m benchmarks.replica_width --configs=1x1,8x1:0,8x1:2

A configuration is `R x DEVICES : CHUNK` (`--replica_chunk`; omitted: the
default, 2 on CPU; 0: all of a device's replicas in one vmap). Not part of
`benchmarks.run`: a probe, its numbers are quoted with their command.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_CONFIGS = "1x1,8x1:0,8x1:2,15x2:0,15x2:2,72x2:0,72x2:2"


def measure(replicas: int, devices: int, chunk: int, steps: int, masked: bool,
            model: str) -> dict:
  """In this process (before JAX starts): the timing of one configuration."""
  import numpy as np
  from wsjax import parallel
  parallel.use_cpu_devices(devices)
  import jax
  from wsjax import pruning
  from wsjax.core.data import TrainData
  from wsjax.core.loop import Until, train
  from wsjax.core.optim import OptimizerConfig
  from wsjax.core.task import Classification
  from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig, Setting
  opt = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
  s = Setting(ModelConfig(name=model, init="kaiming_normal"),
              DataConfig(dataset="mnist1d", batch_size=128), opt, tuple(range(replicas)),
              RunnerConfig(progress=False, replica_chunk=chunk))
  program = s.program(Classification(masked=masked))
  inputs = None
  if masked:
    one = jax.tree.map(lambda x: x[0], parallel.to_host(s.fresh_states().params))
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda m: rng.random((replicas, *m.shape)) < 0.8 if m.ndim
                         else np.ones((replicas,), bool), pruning.ones_mask(one, model))
    inputs = {"mask": parallel.put_replicated(masks)}
  data = TrainData(s.x_train, s.y_train, np.arange(len(s.dataset.y_train)), 128)

  def run(n: int) -> float:
    states = s.fresh_states()
    t0 = time.perf_counter()
    states, _ = train(states, program, data, Until.steps(n), inputs=inputs,
                      data_seeds=[r % 3 for r in range(replicas)])
    jax.block_until_ready(states.params)
    return time.perf_counter() - t0

  run(64)
  seconds = min(run(steps) for _ in range(2))
  return {"replicas": replicas, "devices": devices, "chunk": chunk, "steps": steps,
          "seconds": seconds, "ms_per_step": 1000 * seconds / steps,
          "ms_per_replica_step": 1000 * seconds / steps / replicas}


def parse(config: str) -> tuple[int, int, int]:
  shape, _, chunk = config.partition(":")
  replicas, _, devices = shape.partition("x")
  return int(replicas), int(devices or 1), int(chunk) if chunk else -1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.replica_width",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="R x DEVICES : CHUNK, ...")
  parser.add_argument("--steps", type=int, default=512)
  parser.add_argument("--masked", action="store_true", help="a pruning mask per replica")
  parser.add_argument("--model", default="conv1d")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config, print JSON
  args = parser.parse_args(argv)
  if args.one:
    r, d, c = parse(args.one)
    print(json.dumps(measure(r, d, c, args.steps, args.masked, args.model)))
    return 0
  print(f"{'replicas':>8} {'devices':>7} {'chunk':>5} {'ms/step':>8} {'ms/replica-step':>15}")
  for config in args.configs.split(","):
    cmd = [sys.executable, "-m", "benchmarks.replica_width", "--one", config,
           "--steps", str(args.steps), "--model", args.model] + (["--masked"] if args.masked else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    row = json.loads(out.stdout.strip().splitlines()[-1])
    chunk = "auto" if row["chunk"] < 0 else row["chunk"]
    print(f"{row['replicas']:>8} {row['devices']:>7} {chunk:>5} {row['ms_per_step']:>8.2f} "
          f"{row['ms_per_replica_step']:>15.3f}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
