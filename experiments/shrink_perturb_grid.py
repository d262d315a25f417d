"""Ash & Adams' shrink-and-perturb grid: test accuracy and training steps over (shrink, perturb).

Stage 1 trains every seed on half the data until 99% training accuracy;
stage 2 starts every (shrink, perturb) cell of every seed from
`shrink * theta + perturb * theta_fresh` (fresh optimizer and BatchNorm
statistics) and trains all of them, side by side in ONE compiled program,
each until its own 99% (see `wsjax.studies.shrink_perturb_grid`).

    python -m experiments.shrink_perturb_grid            # MNIST-1D, 1-D ConvNet, Adam 3e-3, 6x4 grid, 3 seeds
    python -m experiments.shrink_perturb_grid --shrinks=0,0.5,1 --perturbs=0,0.1,1
    python -m experiments.shrink_perturb_grid --dataset=fashion_mnist --model=mlp --widths=100,100 --lr=1e-3

Writes WORKDIR/results.json (per cell: per-seed final test accuracy, steps,
train accuracy, the test accuracy at the start of stage 2),
WORKDIR/grid_accuracy.png and WORKDIR/grid_steps.png (heatmaps of the means
over seeds) and prints the two tables; the two stages are stored runs in
WORKDIR/runs (python -m experiments.runs --workdir=WORKDIR).
"""
from __future__ import annotations

import os

from absl import app

from experiments import common
from wsjax.studies.shrink_perturb_grid import GridConfig

DEFAULT = GridConfig()
common.define_flags(DEFAULT, workdir="runs/shrink_perturb_grid")


def plot_heatmap(results: dict, path: str, key: str) -> None:
  """A heatmap of the mean over seeds of a per-seed cell field (test_acc in
  %, or steps), shrink across, perturb down, each cell annotated; cells
  where some seed stopped at the epoch cap below the threshold get a '*'.
  The colour scale spans the cells where every seed converged (when there
  are some), so a dead corner does not flatten the rest."""
  import matplotlib.pyplot as plt
  import numpy as np
  from wsjax import plotting
  from wsjax.studies.shrink_perturb_grid import grid_arrays
  grid = results["grid"]
  values = grid_arrays(grid, key).mean(-1) * (100.0 if key == "test_acc" else 1.0)
  converged = grid_arrays(grid, "converged").all(-1) if results["config"]["threshold"] else None
  fig, ax = plt.subplots(figsize=(1.1 * len(grid["shrinks"]) + 2.5,
                                  0.8 * len(grid["perturbs"]) + 1.8))
  scale = values[converged] if converged is not None and converged.any() else values
  low, high = float(np.nanmin(scale)), float(np.nanmax(scale))
  image = ax.imshow(values, cmap="viridis" if key == "test_acc" else "magma_r", aspect="auto",
                    origin="lower", vmin=low, vmax=max(high, low + 1e-6))
  ax.set_xticks(range(len(grid["shrinks"])), [f"{v:g}" for v in grid["shrinks"]])
  ax.set_yticks(range(len(grid["perturbs"])), [f"{v:g}" for v in grid["perturbs"]])
  ax.set_xlabel("shrink (factor on the stage-1 parameters)")
  ax.set_ylabel("perturb (factor on a fresh init)")
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      v = values[i, j]
      text = f"{v:.1f}" if key == "test_acc" else f"{v:.0f}"
      if converged is not None and not converged[i, j]:
        text += "*"
      dark = (min(max(v, low), high) - low) / max(high - low, 1e-12) < 0.5
      ax.text(j, i, text, ha="center", va="center", fontsize=8,
              color=("white" if dark else "black") if key == "test_acc" else
              ("black" if dark else "white"))
  label = "final test accuracy (%)" if key == "test_acc" else "training steps, stage 2"
  fig.colorbar(image, ax=ax, label=label)
  seeds = len(grid["cells"][0][key])
  note = "; * some seed hit the epoch cap" if converged is not None and not converged.all() else ""
  ax.set_title(f"{label}, mean of {seeds} seeds\n{results['config']['data']['dataset']}, "
               f"{results['config']['model']['name']}, "
               f"{results['config']['optimizer']['name']}{note}", fontsize=9)
  plotting.save_figure(fig, path)


def _plots(out: dict, workdir: str) -> list[str]:
  plot_heatmap(out, os.path.join(workdir, "grid_accuracy.png"), "test_acc")
  plot_heatmap(out, os.path.join(workdir, "grid_steps.png"), "steps")
  return ["grid_accuracy.png", "grid_steps.png"]


def run() -> None:
  from wsjax.studies.shrink_perturb_grid import GridStudy, grid_tables, study_hash
  cfg = common.config_from_flags(GridConfig)
  cfg.validate()  # before the devices are laid out for cfg.replicas
  common.run_study(cfg, GridStudy, study_hash(cfg), cfg.replicas, grid_tables, _plots)


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
