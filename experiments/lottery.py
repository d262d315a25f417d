"""The early phase of training (Frankle, Schwab & Morcos, ICLR 2020): IMP with
rewinding, its controls, perturbations at the rewind point, altered pre-training.

For every rewind step k (and pre-training kind), the dense network is
trained from k, then pruned by 20% of its remaining weights per level,
rewound to its state at k, and retrained k -> T; the controls (random
pruning, random re-initialization) and the perturbations at k
(sign-preserving re-initialization, shuffling, noise) train beside IMP at
every level, all seeds x variants of a level as one stack of replicas.

    python -m experiments.lottery                       # MNIST-1D, 1-D ConvNet, 5 seeds
    python -m experiments.lottery --seeds=3 \
        --variants=imp,random_pruning,random_reinit,sign_preserving,shuffle
    python -m experiments.lottery --variants=imp,noise --noise_factor=0.5
    python -m experiments.lottery --pretrain=none,blur,random_labels --rewind_steps=0it,400it
    python -m experiments.lottery --dataset=digits --model=mlp --widths=300,100 --pretrain=rotation
    python -m experiments.lottery --preset=cifar10_resnet20 --rewind_steps=0it,500it,2000it \\
        --levels=15 --data_dir=DIR      # the paper's ResNet-20 (open_lth's hyperparameters)

Writes WORKDIR/results.json, WORKDIR/accuracy_vs_sparsity.png and prints the
table (test accuracy, mean ± std over seeds, per sparsity and variant); every
level of every lineage is a stored run in WORKDIR/runs (python -m
experiments.runs --workdir=WORKDIR lists them).
"""
from __future__ import annotations

import os

from absl import app, flags

from experiments import common
from wsjax.studies.lottery import LotteryConfig
from wsjax.studies.pretrain import PRESETS

# MNIST-1D, the 1-D ConvNet, SGD 0.1 / momentum 0.9 / wd 1e-4, 40 epochs with
# lr x0.1 at epochs 20 and 30 (wsjax.studies.pretrain.EarlyPhaseConfig)
DEFAULT = LotteryConfig(rewind_steps=("0it", "100it", "400it"), levels=8, seeds=5)
common.define_flags(DEFAULT, workdir="runs/lottery")
flags.DEFINE_enum("preset", None, list(PRESETS), "set the paper's settings (flags given "
                  "explicitly win): cifar10_resnet20 = open_lth's ResNet-20 on CIFAR-10")
FLAGS = flags.FLAGS


def table(out: dict) -> str:
  """pretrain | rewind | level | density | one column per variant (mean ±
  std over seeds, * = matches the dense network)."""
  from wsjax import results
  variants = out["config"]["variants"]
  rows = []
  for lin in out["lineages"]:
    for rec in lin["levels"]:
      cells = []
      for v in variants:
        acc = rec["variants"].get(v)  # level 0: the dense network, in the imp column
        cells.append("" if acc is None else results.pm(acc) + ("*" if acc["matches"] else " "))
      rows.append([lin["pretrain"], lin["rewind"], rec["level"], f"{100 * rec['density']:.1f}",
                   *cells])
  head = ["pretrain", "rewind", "level", "density %", *variants]
  note = (f"test accuracy %, mean ± std over {out['config']['seeds']} seeds; level 0: the "
          f"dense network trained from k; * = matches the dense network trained 0 -> T "
          f"({results.pm(out['dense'])}): mean >= its mean - its std")
  return results.format_table(head, rows) + "\n" + note


def plots(out: dict, workdir: str) -> list[str]:
  """accuracy_vs_sparsity.png: one panel per lineage (pre-training, k), test
  accuracy vs the density of the prunable weights, the dense band."""
  import matplotlib.pyplot as plt
  import numpy as np

  from wsjax import plotting
  lineages = out["lineages"]
  panels = len(lineages) + (len(lineages) > 1)
  cols = min(3, panels)
  rows = -(-panels // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
  dense = out["dense"]

  def curve(ax, levels, v, label):
    pts = [(100 * r["density"], r["variants"][v]) for r in levels if v in r["variants"]]
    x = np.asarray([p[0] for p in pts])
    y = np.asarray([100 * p[1]["mean"] for p in pts])
    e = np.asarray([100 * p[1]["std"] for p in pts])
    ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, lw=1.2, label=label)

  def frame(ax, levels, title):
    lo, hi = 100 * (dense["mean"] - dense["std"]), 100 * (dense["mean"] + dense["std"])
    ax.axhspan(lo, hi, color="0.8", alpha=0.6, label="dense (0 -> T) ± 1 std")
    ax.axhline(100 * dense["mean"], color="0.4", lw=1)
    ax.set_xscale("log")
    ticks = [100 * r["density"] for r in levels[::max(1, len(levels) // 6)]]
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (% of prunable)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)

  flat = list(axes.flat)
  if len(lineages) > 1:  # IMP of every lineage on one panel
    for lin in lineages:
      curve(flat[0], lin["levels"], "imp", f"k = {lin['rewind']}, {lin['pretrain']}")
    frame(flat[0], lineages[0]["levels"], "IMP with rewinding to k")
    flat = flat[1:]
  for ax, lin in zip(flat, lineages):
    for v in out["config"]["variants"]:
      curve(ax, lin["levels"], v, v)
    frame(ax, lin["levels"], f"rewind to {lin['rewind']}, pre-training: {lin['pretrain']}")
  for ax in flat[len(lineages):]:
    ax.axis("off")
  fig.suptitle(f"IMP with rewinding: {out['config']['model']['name']} on "
               f"{out['config']['data']['dataset']}, {out['config']['seeds']} seeds")
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(workdir, "accuracy_vs_sparsity.png"))
  return ["accuracy_vs_sparsity.png"]


def run() -> None:
  from wsjax.studies.lottery import LotteryStudy, level_variants, study_hash
  from wsjax.studies.pretrain import apply_preset
  cfg = apply_preset(common.config_from_flags(LotteryConfig), FLAGS.preset, common.given_flags())
  cfg.validate()
  common.run_study(cfg, LotteryStudy, study_hash(cfg),
                   len(level_variants(cfg.variants, 1)) * cfg.seeds, table, plots)


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
