"""The cost of a warm-start transform relative to one epoch of training.

On DASH's default setting (`experiments.dash`: MNIST-1D large, the 1-D
ConvNet, 5 seeds vmapped, SGD) at its last stage (the whole 40,000-example
buffer, 10 chunks), times after warm-up:

* one DASH update: the gradient EMA over all 10 chunks in eval mode
  (`methods.dash_signal`) plus the per-group cosine shrink;
* one shrink-and-perturb update (Ash & Adams: mix with a fresh init, new
  optimizer state) and one Gaussian `sp` update;
* one training epoch on the same buffer (313 steps of batch 128, all seeds).

    python -m benchmarks.transforms_cost [--repeats=5] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np


def _time(fn, repeats):
  jax.block_until_ready(fn())  # warm-up (compile)
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return statistics.median(out)


def run(quick: bool = False, repeats: int = 5) -> dict:
  from wsjax.data import epoch_batches
  from wsjax.train import methods
  from wsjax.train.optim import OptimizerConfig
  from wsjax.train.policies import StageContext
  from wsjax.train.stopping import StoppingRule
  from wsjax.train.study import Study, StudyConfig

  dataset = "mnist1d" if quick else "mnist1d_large"
  cfg = StudyConfig(dataset=dataset, model="conv1d", seeds=5, schedule="chunks",
                    schedule_kwargs=(("n_chunks", 10),),
                    optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9),
                    stopping=StoppingRule(threshold=0.99, max_epochs=30), methods=("dash",))
  study = Study(cfg, tempfile.mkdtemp(), progress=False)
  last = len(study.schedule.stages) - 1
  buffer = study.schedule.stages[last]
  hp = methods.MethodParams()
  ctx = StageContext(stage=last, seeds=study.seeds, tx=study.tx,
                     fresh=lambda: study.fresh_states(last), data_x=study.data_x,
                     data_y=study.data_y, arrivals=study.schedule.new, n_stages=last + 1,
                     model=study.model, stepper=study.stepper(None))
  states = study.fresh_states(0)
  stepper = ctx.stepper
  k = cfg.block_steps
  order = np.stack([epoch_batches(buffer, cfg.batch_size, s, last, 0) for s in study.seeds], 1)
  n_steps = len(order)
  n_blocks = -(-n_steps // k)
  order = np.concatenate([order, np.zeros((n_blocks * k - n_steps, *order.shape[1:]), order.dtype)])
  valid = np.arange(n_blocks * k) < n_steps
  active = np.ones(len(study.seeds), bool)
  holder = {"states": states}

  def epoch():
    s = holder["states"]
    for b in range(n_blocks):
      sl = slice(b * k, (b + 1) * k)
      s, *_ = stepper.train_block(s, active, study.data_x, study.data_y, order[sl], valid[sl])
    holder["states"] = s
    return s.params

  def copy(s):
    return jax.tree.map(lambda x: x.copy(), s)

  def dash():
    return methods.get_method("dash").prepare(copy(holder["states"]), ctx, hp).params

  def dash_gradient_only():
    return methods.dash_signal(holder["states"], ctx, hp)

  def shrink_perturb():
    return methods.get_method("shrink_perturb").prepare(copy(holder["states"]), ctx, hp).params

  def sp():
    return methods.get_method("sp").prepare(copy(holder["states"]), ctx, hp).params

  reps = 2 if quick else repeats
  times = {"epoch": _time(epoch, reps), "dash": _time(dash, reps),
           "dash_gradient_only": _time(dash_gradient_only, reps),
           "shrink_perturb": _time(shrink_perturb, reps), "sp": _time(sp, reps)}
  return {"benchmark": "transforms_cost", "dataset": dataset, "buffer": int(len(buffer)),
          "chunks": last + 1, "seeds": len(study.seeds), "epoch_steps": int(n_steps),
          "seconds": times, "relative_to_epoch": {k_: v / times["epoch"] for k_, v in times.items()},
          "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                          "devices": jax.device_count(), "load_average": list(os.getloadavg())}}


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
  os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
  path = os.path.join(os.path.dirname(__file__), "results", "transforms_cost.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
