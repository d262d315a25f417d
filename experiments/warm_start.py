"""The warm-start generalization gap (Ash & Adams, NeurIPS 2020), the main job.

Train on part of the data, then on all of it, starting either from the
previous solution (warm) or from a fresh initialization (cold), and compare
test accuracy; shrink-and-perturb and DASH close the gap.

    python -m experiments.warm_start                      # MNIST-1D, 1-D ConvNet, 5 seeds
    python -m experiments.warm_start --schedule=online --chunk_size=500
    python -m experiments.warm_start --dataset=cifar10 --model=resnet18 --width=16

Writes WORKDIR/results.json and WORKDIR/test_accuracy.png and prints a table.
"""
from __future__ import annotations

from absl import app

from experiments import common

common.define_study_flags(workdir="runs/warm_start", methods="cold,warm,sp,shrink_perturb,dash")
FLAGS = common.FLAGS


def run() -> None:
  import jax
  from wsjax import plotting, results
  from wsjax.train.study import Study
  common.setup_jax()
  config = common.study_config("warm_start")
  study = Study(config, FLAGS.workdir, progress=FLAGS.progress)
  common.prepare_workdir(FLAGS.workdir, config)
  out = study.run()
  if jax.process_index() == 0:
    import os
    results.write_json(os.path.join(FLAGS.workdir, "results.json"), out)
    plotting.plot_per_stage(out, os.path.join(FLAGS.workdir, "test_accuracy.png"),
                            title="warm-start gap: test accuracy per stage")
    print(results.methods_table(out))
    print(f"wrote {FLAGS.workdir}/results.json and test_accuracy.png")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.run_main(run)


if __name__ == "__main__":
  app.run(main)
