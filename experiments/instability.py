"""Instability analysis (Frankle et al., ICML 2020; Frankle, Schwab & Morcos, ICLR
2020): how far apart do copies of the network at step k end up?

For every rewind step k, copies of the network at k are trained to the end
with different data orders; the error barrier along the straight line
between them (30 points, train and test) is the instability of the state at
k. Barrier vs k, for the dense network and, with --imp_levels, for IMP
subnetworks rewound to k (masks from a stored lottery run in the same
workdir, else computed).

    python -m experiments.instability                   # MNIST-1D, 1-D ConvNet, 5 seeds x 2 copies
    python -m experiments.instability --imp_levels=4,8  # also IMP subnetworks at 41% and 17%
    python -m experiments.instability --pretrain=none,blur --rewind_steps=0it,100it,400it
    python -m experiments.instability --preset=cifar10_resnet20 --data_dir=DIR \\
        --rewind_steps=0it,100it,500it,2000it,5000it --seeds=2 --copies=2

Writes WORKDIR/results.json, WORKDIR/instability.png (barrier vs k) and
WORKDIR/interpolation.png (error along the line for every k) and prints the
table; every state's copies are a stored run in WORKDIR/runs.
"""
from __future__ import annotations

import os

from absl import app, flags

from experiments import common
from wsjax.studies.instability import InstabilityConfig
from wsjax.studies.pretrain import PRESETS

# the lottery program's setting (wsjax.studies.pretrain.EarlyPhaseConfig)
DEFAULT = InstabilityConfig(
    rewind_steps=("0it", "25it", "50it", "100it", "200it", "400it", "800it"), seeds=5, copies=2)
common.define_flags(DEFAULT, workdir="runs/instability")
flags.DEFINE_enum("preset", None, list(PRESETS), "set the paper's settings (flags given "
                  "explicitly win): cifar10_resnet20 = open_lth's ResNet-20 on CIFAR-10")
FLAGS = flags.FLAGS


def _curve_name(curve: dict) -> str:
  what = "dense" if curve["level"] == 0 else (
      f"IMP level {curve['level']} ({100 * curve['nominal_density']:.0f}%)")
  return what if curve["pretrain"] == "none" else f"{what}, pretrain {curve['pretrain']}"


def table(out: dict) -> str:
  """network | rewind | test error barrier | train error barrier | test acc (%)."""
  from wsjax import results
  rows = []
  for curve in out["curves"]:
    for p in curve["points"]:
      acc = results.summary(p["test_acc"])
      rows.append([_curve_name(curve), p["rewind"], results.pm(p["barrier"]["test_error"]),
                   results.pm(p["barrier"]["train_error"]), results.pm(acc)])
  head = ["network", "rewind k", "test error barrier %", "train error barrier %",
          "final test acc %"]
  note = (f"mean ± std over {out['config']['seeds']} seeds of the mean barrier over each "
          f"seed's pairs of {out['config']['copies']} copies; stable: barrier ~0 (paper's cut 2%)")
  return results.format_table(head, rows) + "\n" + note


def plots(out: dict, workdir: str) -> list[str]:
  """instability.png (barrier vs k) and interpolation.png (test error
  along the line, one line per k)."""
  import matplotlib.pyplot as plt
  import numpy as np

  from wsjax import plotting
  curves = out["curves"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  nonzero = [p["rewind_step"] for c in curves for p in c["points"] if p["rewind_step"] > 0]
  for ax, metric in zip(axes, ("test_error", "train_error")):
    for curve in curves:
      k = np.asarray([p["rewind_step"] for p in curve["points"]])
      m = np.asarray([100 * p["barrier"][metric]["mean"] for p in curve["points"]])
      e = np.asarray([100 * p["barrier"][metric]["std"] for p in curve["points"]])
      line, = ax.plot(k, m, marker="o", ms=3, label=_curve_name(curve))
      ax.fill_between(k, m - e, m + e, color=line.get_color(), alpha=0.2)
    if nonzero:
      ax.set_xscale("symlog", linthresh=min(nonzero))
    ax.axhline(2.0, color="0.5", ls="--", lw=1)
    ax.set_xlabel("rewind step k (iterations)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} barrier (%)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"instability: {out['config']['model']['name']} on "
               f"{out['config']['data']['dataset']}, T = {out['total_steps']} iterations")
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(workdir, "instability.png"))

  fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.9), squeeze=False)
  for ax, curve in zip(axes.flat, curves):
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(curve["points"])))
    for p, color in zip(curve["points"], colors):
      ax.plot(p["alphas"], 100 * np.asarray(p["path"]["test_error"]), color=color,
              label=f"k = {p['rewind']}")
    ax.set_xlabel("alpha (interpolation between two copies)")
    ax.set_ylabel("test error (%)")
    ax.set_title(_curve_name(curve))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(workdir, "interpolation.png"))
  return ["instability.png", "interpolation.png"]


def run() -> None:
  from wsjax.studies.instability import InstabilityStudy, study_hash
  from wsjax.studies.pretrain import apply_preset
  cfg = apply_preset(common.config_from_flags(InstabilityConfig), FLAGS.preset,
                     common.given_flags())
  cfg.validate()
  common.run_study(cfg, InstabilityStudy, study_hash(cfg), cfg.seeds * cfg.copies, table, plots)


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
