"""The warm-start generalization gap (Ash & Adams, NeurIPS 2020), the main job.

Train on part of the data, then on all of it, starting either from the
previous solution (warm) or from a fresh initialization (cold), and compare
test accuracy; shrink-and-perturb and DASH are the remedies compared beside
them.

    python -m experiments.warm_start                      # MNIST-1D, 1-D ConvNet, 5 seeds
    python -m experiments.warm_start --schedule=online --chunk_size=500
    python -m experiments.warm_start --dataset=cifar10 --model=resnet18 --width=16

Writes WORKDIR/results.json, WORKDIR/test_accuracy.png (and diagnostics.png)
and prints a table; every stage of every method is a stored run in
WORKDIR/runs (list them: python -m experiments.runs --workdir=WORKDIR).
"""
from __future__ import annotations

import os

from absl import app

from experiments import common, staged
from wsjax.core.optim import OptimizerConfig
from wsjax.studies.staged import StagedConfig

DEFAULT = StagedConfig(experiment="warm_start", optimizer=OptimizerConfig(lr=3e-3),
                       max_epochs=200, methods=("cold", "warm", "shrink_perturb", "dash"))
common.define_flags(DEFAULT, workdir="runs/warm_start")


def _plots(out: dict, workdir: str) -> list[str]:
  names = staged.standard_plots(out, workdir, "warm-start gap: test accuracy per stage")
  if out["config"]["arrivals"]["schedule"] == "online":
    from wsjax import plotting_online
    plotting_online.plot_online_panels(out, os.path.join(workdir, "online_panels.png"))
    names.append("online_panels.png")
  return names


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(lambda: staged.run("warm_start", _plots))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
