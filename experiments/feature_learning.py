"""DASH's discrete feature-learning framework (Shin et al., NeurIPS 2024, section 4).

A combinatorial simulation, no network (`wsjax.studies.feature_learning`;
official code: baekrok/DASH-Direction-Aware-SHrinking,
Discrete_Feature_Learning.ipynb). Data arrive in experiments and accumulate;
a feature is learned once gamma candidate points hold it, a point with tau
learned features has zero gradient, and the rest are memorized. Cold starts
over on all the data, warm keeps everything (memorized points never return),
ideal keeps the features but forgets the memorized points.

    python -m experiments.feature_learning                 # the notebook: 10 seeds, 50 experiments
    python -m experiments.feature_learning --guess=draw    # random guesses, as the notebook
    python -m experiments.feature_learning --classes=10 --gamma=30 --tau=2

Writes WORKDIR/results.json and WORKDIR/feature_learning.png (test accuracy,
learned features and points with non-zero gradient per experiment) and
prints a table.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from experiments import common
from wsjax.studies import feature_learning


common.define_flags(feature_learning.FeatureLearningConfig(), workdir="runs/feature_learning",
                    runner=False)
flags.DEFINE_bool("progress", True, "show a progress bar")
FLAGS = common.FLAGS


def config_from_flags() -> feature_learning.FeatureLearningConfig:
  config = common.config_from_flags(feature_learning.FeatureLearningConfig)
  config.validate()
  return config


def table(summary: dict, guess: str) -> str:
  from wsjax.results import format_table, pm
  rows = [[m, pm(s["final_test_accuracy"]), pm(s["mean_test_accuracy"]),
           pm(s["final_learned_features"], 1.0), pm(s["final_active_points"], 1.0),
           pm(s["final_memorized_points"], 1.0)] for m, s in summary.items()]
  return format_table(["method", f"final test acc % ({guess})", "mean test acc %",
                       "learned features", "non-zero-gradient points", "memorized points"], rows)


def run() -> None:
  from wsjax import results
  config = config_from_flags()
  workdir = FLAGS.workdir
  common.check_workdir(workdir)
  bar = None
  if FLAGS.progress:
    import tqdm
    bar = tqdm.tqdm(total=len(config.methods) * config.experiments, desc="experiments",
                    unit="exp", file=sys.stderr)
  try:
    out = feature_learning.run(config, on_experiment=None if bar is None else lambda m, j: bar.update())
  finally:
    if bar is not None:
      bar.close()
  record = feature_learning.to_json(out)
  try:
    results.write_json(os.path.join(workdir, "results.json"), record)
    feature_learning.plot(out, os.path.join(workdir, "feature_learning.png"))
  except OSError as e:
    raise ValueError(f"workdir {workdir} cannot be written ({e.strerror}); choose another --workdir") from e
  print(table(record["summary"], config.guess))
  print(f"final experiment ({config.experiments}); mean ± std over {config.seeds} seeds; "
        f"non-zero-gradient points at the start of the experiment, memorized at its end; "
        f"simulated in {out['wall_s']:.1f} s")
  print(f"wrote {workdir}/results.json and feature_learning.png")


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
