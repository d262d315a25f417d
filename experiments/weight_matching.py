"""Git Re-Basin (Ainsworth et al., ICLR 2023): the loss barrier between two
independently trained networks, before and after weight matching, over widths.

    python -m experiments.weight_matching            # Fashion-MNIST, MLP 784-w-w-10, w = 8..512, 3 pairs
    python -m experiments.weight_matching --sweep_widths=16,64,256 --widths=1,1,1   # 3 hidden layers
    python -m experiments.weight_matching --model=conv1d --dataset=mnist1d --sweep_widths=8,32,128

Writes WORKDIR/results.json and WORKDIR/barrier_vs_width.png and prints the
table; every width's training run and matching are stored runs in
WORKDIR/runs.
"""
from __future__ import annotations

import os

from absl import app

from experiments import common
from wsjax.studies.weight_matching import WeightMatchingConfig

common.define_flags(WeightMatchingConfig(), workdir="runs/weight_matching")
FLAGS = common.FLAGS


def table(out: dict) -> str:
  """width | params | test acc | loss barrier (test) naive -> matched | error barrier."""
  from wsjax import results
  rows = []
  for w, rec in out["widths"].items():
    b = rec["barriers"]
    rows.append([w, f"{rec['params']:,}", results.pm(rec["test_acc"]),
                 results.pm(b["naive"]["test_loss"], 1.0, 3),
                 results.pm(b["matched"]["test_loss"], 1.0, 3),
                 results.pm(b["naive"]["train_loss"], 1.0, 3),
                 results.pm(b["matched"]["train_loss"], 1.0, 3),
                 results.pm(b["naive"]["test_error"]), results.pm(b["matched"]["test_error"])])
  head = ["width", "params", "test acc %", "test loss barrier", "after matching",
          "train loss barrier", "after matching", "test error barrier %", "after matching"]
  cfg = out["config"]
  note = (f"mean ± std over {cfg['seeds']} pairs of independently trained networks; "
          f"{cfg['points']} points per line; barrier = max along the line - mean of its ends")
  return results.format_table(head, rows) + "\n" + note


def plots(out: dict, workdir: str) -> list[str]:
  """barrier_vs_width.png: loss and error barriers vs width, before/after."""
  import matplotlib.pyplot as plt
  import numpy as np

  from wsjax import plotting
  widths = [int(w) for w in out["widths"]]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, metric, scale, label in ((axes[0], "test_loss", 1.0, "test loss barrier"),
                                   (axes[1], "train_loss", 1.0, "train loss barrier"),
                                   (axes[2], "test_error", 100.0, "test error barrier (%)")):
    for name, style in (("naive", "o--"), ("matched", "s-")):
      mean = np.asarray([r["barriers"][name][metric]["mean"] for r in out["widths"].values()])
      std = np.asarray([r["barriers"][name][metric]["std"] for r in out["widths"].values()])
      ax.errorbar(widths, scale * mean, yerr=scale * std, fmt=style, capsize=3, ms=4,
                  label="naive (identity)" if name == "naive" else "after weight matching")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel(label)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"Git Re-Basin: {out['config']['model']['name']} on "
               f"{out['config']['data']['dataset']}, {out['config']['seeds']} pairs")
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(workdir, "barrier_vs_width.png"))
  return ["barrier_vs_width.png"]


def run() -> None:
  from wsjax.studies.weight_matching import WeightMatchingStudy, study_hash
  cfg = common.config_from_flags(WeightMatchingConfig)
  cfg.validate()
  common.run_study(cfg, WeightMatchingStudy, study_hash(cfg), 2 * cfg.seeds, table, plots)


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
