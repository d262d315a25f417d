"""The cost of a warm-start transform relative to one epoch of training.

On the DASH setting BENCHMARKS.md records (`experiments.dash`'s default
when it was measured: MNIST-1D large, the 1-D ConvNet, 5 seeds vmapped, SGD
lr 0.05 momentum 0.9) at its last stage (the whole 40,000-example buffer,
10 chunks), built by `wsjax.studies.staged.StagedStudy` (its
`Setting`, `context(stage)` and compiled `Program`), times after warm-up:

* one DASH update: the gradient EMA over all 10 chunks in eval mode
  (`Dash.signal`, i.e. `wsjax.studies.methods.dash_signal`) plus the
  per-group cosine shrink (`Dash.prepare`);
* one shrink-and-perturb update (Ash & Adams: mix with a fresh draw of the
  model's initializer, fresh BatchNorm statistics, new optimizer state) and
  one Gaussian `sp` update (`ShrinkPerturb.prepare`, `SP.prepare`);
* one training epoch on the same buffer (313 steps of batch 128, all seeds:
  `wsjax.core.loop.train` for one epoch, blocks of 32 steps).

    python -m benchmarks.transforms_cost [--repeats=5] [--quick]
    python -m benchmarks.run --only=transforms_cost
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from benchmarks import common

SEEDS = 5


def _time(fn, repeats):
  import jax
  jax.block_until_ready(fn())  # warm-up (compile)
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return statistics.median(out)


class TransformCosts:
  """The last stage of DASH's default study, set up in a worker process."""

  def __init__(self, quick: bool):
    from wsjax import parallel
    # as the experiment programs do: one CPU device per core, at most one per seed
    parallel.use_cpu_devices(0, at_most=SEEDS)
    from wsjax.core.data import TrainData
    from wsjax.core.optim import OptimizerConfig
    from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig
    from wsjax.studies.staged import ArrivalConfig, StagedConfig, StagedStudy

    self.dataset = "mnist1d" if quick else "mnist1d_large"
    cfg = StagedConfig(model=ModelConfig(name="conv1d"), data=DataConfig(dataset=self.dataset),
                       optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9),
                       arrivals=ArrivalConfig(schedule="chunks", chunks=10), threshold=0.99,
                       max_epochs=30, methods=("dash", "shrink_perturb", "sp"), seeds=SEEDS,
                       diagnostics=False)
    with tempfile.TemporaryDirectory(prefix="wsjax-bench-") as workdir:  # nothing is stored
      study = StagedStudy(cfg, workdir, RunnerConfig(progress=False), log=lambda s: None)
    self.setting = setting = study.setting
    self.last = len(study.schedule.stages) - 1
    self.buffer = study.schedule.stages[self.last]
    self.ctx = study.context(self.last)
    self.methods = {m: cfg.method(m) for m in ("dash", "shrink_perturb", "sp")}
    self.program = setting.program(self.methods["dash"].task())
    self.data = TrainData(setting.x_train, setting.y_train, self.buffer, cfg.data.batch_size,
                          salt=(self.last,))
    self.states = setting.fresh_states(0, 0)

  def _epoch(self):
    from wsjax.core.loop import Until, train
    self.states, _ = train(self.states, self.program, self.data, Until.n_epochs(1),
                           data_seeds=self.setting.seeds)
    return self.states.params

  def measure(self, repeats: int) -> dict:
    import jax
    dash, shrink_perturb, sp = (self.methods[m] for m in ("dash", "shrink_perturb", "sp"))
    times = {"epoch": _time(self._epoch, repeats),
             "dash": _time(lambda: dash.prepare(self.states, self.ctx).params, repeats),
             "dash_gradient_only": _time(lambda: dash.signal(self.states, self.ctx), repeats),
             "shrink_perturb": _time(lambda: shrink_perturb.prepare(self.states, self.ctx).params,
                                     repeats),
             "sp": _time(lambda: sp.prepare(self.states, self.ctx).params, repeats)}
    return {"dataset": self.dataset, "buffer": int(len(self.buffer)), "chunks": self.last + 1,
            "seeds": len(self.setting.seeds), "epoch_steps": self.data.steps_per_epoch,
            "seconds": times,
            "relative_to_epoch": {k: v / times["epoch"] for k, v in times.items()},
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "seed_devices": self.setting.replica_devices}


def run(quick: bool = False, repeats: int = 5) -> dict:
  result = {"benchmark": "transforms_cost", "environment": common.environment(), "quick": quick}
  with common.Worker("benchmarks.transforms_cost:TransformCosts", quick=quick) as worker:
    result.update(worker.call("measure", 2 if quick else repeats))
    result["setup_s"] = worker.setup_s
    result["peak_rss_mb"] = worker.peak_rss_mb()
  return result


def report(result: dict) -> str:
  lines = [f"{result['dataset']}: buffer {result['buffer']} examples in {result['chunks']} chunks, "
           f"{result['seeds']} seeds, epoch = {result['epoch_steps']} steps",
           f"{'operation':<22}{'median s':>10}{'x one epoch':>14}"]
  for name, sec in result["seconds"].items():
    lines.append(f"{name:<22}{sec:>10.3f}{result['relative_to_epoch'][name]:>14.3f}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  result = run(quick=args.quick, repeats=args.repeats)
  print(report(result))
  print(f"wrote {common.write_result('transforms_cost' + ('_quick' if args.quick else ''), result)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
