"""DASH's stationary chunked framework (Shin et al., NeurIPS 2024).

The training set is split at random into equal chunks that arrive one at a
time and accumulate; at every stage each method trains on the whole buffer
until its epoch-mean training accuracy reaches the threshold (with a cap).
Compares cold, warm, warm_rm, sp, reset, l2_init and DASH by final test
accuracy, mean test accuracy over stages and total optimizer steps, and
records plasticity diagnostics (dead ReLUs, norms, DASH cosines) per stage.

    python -m experiments.dash                       # MNIST-1D (large), 1-D ConvNet, 5 seeds
    python -m experiments.dash --chunks=20 --methods=cold,warm,dash
    python -m experiments.dash --dataset=cifar10 --model=resnet18 --chunks=50 --lr=1e-3

Writes WORKDIR/results.json, test_accuracy.png, cumulative_steps.png and
diagnostics.png, and prints a table.
"""
from __future__ import annotations

import os

from absl import app

from experiments import common, staged
from wsjax.core.optim import OptimizerConfig
from wsjax.studies.common import DataConfig
from wsjax.studies.staged import ArrivalConfig, StagedConfig

DEFAULT = StagedConfig(
    experiment="dash", data=DataConfig(dataset="mnist1d_large"),
    optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9),
    arrivals=ArrivalConfig(schedule="chunks", chunks=10), threshold=0.99, max_epochs=30,
    methods=("cold", "warm", "sp", "dash"))
common.define_flags(DEFAULT, workdir="runs/dash")


def _plots(out: dict, workdir: str) -> list[str]:
  from wsjax import plotting
  names = staged.standard_plots(out, workdir, "DASH framework: test accuracy per stage")
  plotting.plot_per_stage(out, os.path.join(workdir, "cumulative_steps.png"), key="steps",
                          ylabel="optimizer steps (cumulative)", scale=1.0, cumulative=True,
                          title="DASH framework: cumulative steps")
  return names + ["cumulative_steps.png"]


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(lambda: staged.run("dash", _plots))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
