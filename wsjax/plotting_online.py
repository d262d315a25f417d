"""The online protocol's two panels (Ash & Adams 2020, the online experiments).

Ash & Adams ("On Warm-Starting Neural Network Training", NeurIPS 2020,
PAPERS.md section 1; code github.com/JordanAsh/warm_start, run.py with
`--n_samples` > 1) grow the training set by a fixed number of examples per
round, train every round to 99% training accuracy, and plot, against the
number of training examples, (left) the test accuracy reached in each round
and (right) the training time each round took, for the warm start, the
fresh ("random") initialization and shrink-and-perturb. Here training time
is counted in optimizer steps (their figure: wall-clock seconds, which
depend on the machine; steps are what a warm start saves).

`plot_online_panels(results, path)` reads the staged study's results
(`experiments.warm_start --schedule=online`: `results["methods"][name]
["stages"]`, each stage with `n_train` and per-seed `test_acc` and
`steps`) and draws the mean over seeds per round with a min..max band;
the legend gives each method's final test accuracy and total steps.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from wsjax.plotting import plt, save_figure


def online_curves(results: dict, name: str) -> dict:
  """Per round of method `name`: training examples, and (rounds, seeds)
  arrays of test accuracy (%) and steps."""
  stages = results["methods"][name]["stages"]
  return {"n_train": np.asarray([s["n_train"] for s in stages]),
          "test_acc": np.asarray([s["test_acc"] for s in stages], np.float64) * 100.0,
          "steps": np.asarray([s["steps"] for s in stages], np.float64)}


def plot_online_panels(results: dict, path: str, *, methods: Optional[Sequence[str]] = None,
                       title: Optional[str] = None) -> None:
  """Test accuracy per round (left) and training steps per round (right),
  mean over seeds with a min..max band, one line per method (default: all
  methods of `results`, in their order)."""
  names = list(methods) if methods is not None else list(results["methods"])
  unknown = [n for n in names if n not in results["methods"]]
  if unknown:
    raise ValueError(f"no method {unknown[0]!r} in these results; they have "
                     f"{', '.join(results['methods'])}")
  fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.2))
  for name in names:
    c = online_curves(results, name)
    acc, steps = c["test_acc"], c["steps"]
    label = (f"{name} (final {acc[-1].mean():.1f}%, {steps.sum(0).mean():,.0f} steps in all)")
    line, = left.plot(c["n_train"], acc.mean(1), marker="o", ms=3, label=label)
    left.fill_between(c["n_train"], acc.min(1), acc.max(1), color=line.get_color(), alpha=0.2)
    right.plot(c["n_train"], steps.mean(1), marker="o", ms=3, color=line.get_color(), label=name)
    right.fill_between(c["n_train"], steps.min(1), steps.max(1), color=line.get_color(),
                       alpha=0.2)
  seeds = len(results["methods"][names[0]]["stages"][0]["test_acc"]) if names else 0
  left.set_ylabel("test accuracy (%)")
  right.set_ylabel("training steps in the round")
  for ax in (left, right):
    ax.set_xlabel("training examples")
    ax.grid(alpha=0.3)
  left.legend(fontsize=8)
  left.set_title("test accuracy after each round", fontsize=10)
  right.set_title("training steps of each round (to the threshold)", fontsize=10)
  fig.suptitle(title or f"online protocol: mean of {seeds} seeds, min..max shaded", fontsize=11)
  save_figure(fig, path)
