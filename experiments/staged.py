"""The body shared by the staged programs (`warm_start`, `dash`): flags ->
`StagedConfig` -> `StagedStudy` in --workdir -> results.json, plots, table."""
from __future__ import annotations

import os
from typing import Callable

from experiments import common


def run(experiment: str, plots: Callable[[dict, str], list[str]]) -> None:
  from wsjax import results
  from wsjax.studies.staged import StagedConfig, StagedStudy, study_hash
  cfg = common.config_from_flags(StagedConfig, experiment=experiment)
  common.run_study(cfg, StagedStudy, study_hash(cfg), cfg.seeds, results.methods_table, plots)


def standard_plots(out: dict, workdir: str, title: str) -> list[str]:
  """test_accuracy.png and (with diagnostics) diagnostics.png."""
  from wsjax import plotting
  plotting.plot_per_stage(out, os.path.join(workdir, "test_accuracy.png"), title=title)
  names = ["test_accuracy.png"]
  if out["config"]["diagnostics"]:
    plotting.plot_diagnostics(out, os.path.join(workdir, "diagnostics.png"))
    names.append("diagnostics.png")
  return names
