"""The body shared by the staged programs (`warm_start`, `dash`): flags ->
`StagedConfig` -> `StagedStudy` in --workdir -> results.json, plots, table."""
from __future__ import annotations

import os
from typing import Callable

from experiments import common


def run(experiment: str, plots: Callable[[dict, str], list[str]]) -> None:
  from wsjax import results
  from wsjax.studies.staged import StagedConfig, StagedStudy, study_hash
  FLAGS = common.FLAGS
  cfg = common.config_from_flags(StagedConfig, experiment=experiment)
  runner = common.runner_from_flags()
  common.setup_jax(cfg.seeds)
  study = StagedStudy(cfg, FLAGS.workdir, runner)
  common.check_workdir(FLAGS.workdir)
  out = study.run()
  names = common.write_results(FLAGS.workdir, study_hash(cfg), out, plots)
  if names:
    print(results.methods_table(out))
    print(f"wrote {FLAGS.workdir}/results.json and {', '.join(names)}")


def standard_plots(out: dict, workdir: str, title: str) -> list[str]:
  """test_accuracy.png and (with diagnostics) diagnostics.png."""
  from wsjax import plotting
  plotting.plot_per_stage(out, os.path.join(workdir, "test_accuracy.png"), title=title)
  names = ["test_accuracy.png"]
  if out["config"]["diagnostics"]:
    plotting.plot_diagnostics(out, os.path.join(workdir, "diagnostics.png"))
    names.append("diagnostics.png")
  return names
