"""Plots of staged studies (PNG, written atomically)."""
from __future__ import annotations

import io
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wsjax.results import atomic_write_bytes  # noqa: E402


def save_figure(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())


def plot_per_stage(results: dict, path: str, key: str = "test_acc", *, ylabel: str = "test accuracy (%)",
                   scale: float = 100.0, cumulative: bool = False, title: Optional[str] = None) -> None:
  """Mean over seeds per stage for each method, shaded min..max over seeds.

  x axis: training-set size at each stage.
  """
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, m in results["methods"].items():
    n_train = [s["n_train"] for s in m["stages"]]
    vals = np.asarray([s[key] for s in m["stages"]], np.float64) * scale  # (stages, seeds)
    if cumulative:
      vals = np.cumsum(vals, axis=0)
    mean = vals.mean(1)
    line, = ax.plot(n_train, mean, marker="o", ms=3, label=name)
    ax.fill_between(n_train, vals.min(1), vals.max(1), color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training examples in the buffer")
  ax.set_ylabel(ylabel)
  ax.set_title(title or results.get("experiment", ""))
  ax.grid(alpha=0.3)
  ax.legend()
  save_figure(fig, path)


def plot_diagnostics(results: dict, path: str) -> None:
  """Plasticity diagnostics per stage: dead ReLUs, parameter norm, distance
  moved within the stage, and the final stage's DASH-cosine histogram."""
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
  panels = [("dead_relu", "dead ReLU units (%), overall", 100.0),
            ("param_norm", "parameter norm", 1.0),
            ("dist_from_stage_start", "distance from the stage's start", 1.0)]
  for ax, (key, label, scale) in zip(axes.flat, panels):
    for name, m in results["methods"].items():
      stages = [s for s in m["stages"] if key in s]
      if not stages:
        continue
      vals = [s[key]["overall"] if isinstance(s[key], dict) else s[key] for s in stages]
      vals = np.asarray(vals, np.float64) * scale
      ax.plot([s["n_train"] for s in stages], vals.mean(1), marker="o", ms=3, label=name)
    ax.set_xlabel("training examples in the buffer")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=8)
  ax = axes.flat[3]
  for name, m in results["methods"].items():
    last = m["stages"][-1]
    if "dash_cosine_hist" in last:
      edges = np.asarray(last["dash_cosine_bins"])
      counts = np.asarray(last["dash_cosine_hist"]["overall"], np.float64)
      centers = (edges[:-1] + edges[1:]) / 2
      ax.plot(centers, counts / max(counts.sum(), 1), drawstyle="steps-mid", label=name)
  ax.set_xlabel("cos(W group, -gradient EMA), last stage")
  ax.set_ylabel("fraction of groups")
  ax.grid(alpha=0.3)
  fig.suptitle(f"{results.get('experiment', '')}: plasticity diagnostics")
  save_figure(fig, path)
