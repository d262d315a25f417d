"""Mode-connecting curves between two solutions (Garipov et al., NeurIPS 2018),
the tool of Gotmare et al. (ICLR 2019).

Trains a Bezier (or polygonal-chain) curve between any two stored snapshots
of one model, then evaluates it and the straight line between the same
endpoints at 61 t (BatchNorm statistics recomputed at every t): train loss
and error, test loss and error, and their barriers.

    python -m experiments.curves                    # trains 3 pairs of endpoints itself
    python -m experiments.curves --start=W/runs/run_<hash>@step_1280:0 \\
        --end=W/runs/run_<hash>@final:0 --workdir=W  # any two stored snapshots
    python -m experiments.curves --start=run_ab12@final:0 --end=run_ab12@final:1 \\
        --curve_kind=polychain --curve_epochs=20

`RUN@SNAPSHOT[:REPLICA]`: a run directory (or `run_<hash>` / a hash prefix
in --workdir's store), a snapshot (`final`, `init`, `step_<k>`) and
optionally one replica of it; replica r of --start is joined to replica r
of --end (a single replica is broadcast). The flags --model (and its
options) and --dataset must describe the endpoints' model and data.

Writes WORKDIR/results.json and WORKDIR/curve.png (train loss and test
error along t, curve vs line) and prints the table; the endpoints and the
curves are stored runs in WORKDIR/runs.
"""
from __future__ import annotations

import os

from absl import app

from experiments import common
from wsjax.studies.curves import CurvesConfig

DEFAULT = CurvesConfig()
common.define_flags(DEFAULT, workdir="runs/curves")


def table(out: dict) -> str:
  """path | train loss barrier | test error barrier | max test error | endpoints' test error."""
  from wsjax import results
  s = out["summary"]
  rows = []
  for path in ("curve", "line"):
    p = s[path]
    rows.append([path, results.pm(p["barrier"]["train_loss"], 1.0, 3),
                 results.pm(p["chord_barrier"]["train_loss"], 1.0, 3),
                 results.pm(p["barrier"]["train_error"]), results.pm(p["barrier"]["test_error"]),
                 results.pm(p["max_test_error"]), results.pm(s["endpoint_test_error"])])
  head = ["path", "train loss barrier", "above chord", "train error barrier %",
          "test error barrier %", "max test error %", "endpoints' test error %"]
  note = (f"mean ± std over {out['curves']} curve(s), {len(out['ts'])} points each, "
          f"{out['config']['curve']['kind']} with {out['config']['curve']['bends']} bends "
          f"trained {out['curve_steps']} steps")
  return results.format_table(head, rows) + "\n" + note


def plots(out: dict, workdir: str) -> list[str]:
  """curve.png: train loss and test error along t, curve vs line."""
  import matplotlib.pyplot as plt
  import numpy as np

  from wsjax import plotting
  ts = np.asarray(out["ts"])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, metric, scale, label in ((axes[0], "train_loss", 1.0, "train loss"),
                                   (axes[1], "test_error", 100.0, "test error (%)")):
    for path, style in (("curve", "-"), ("line", "--")):
      values = np.asarray(out[path][metric], np.float64) * scale   # (curves, points)
      line, = ax.plot(ts, values.mean(0), style, label=path)
      if len(values) > 1:
        ax.fill_between(ts, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("t")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  cfg = out["config"]
  fig.suptitle(f"{cfg['curve']['kind']} curve vs line: {cfg['model']['name']} on "
               f"{cfg['data']['dataset']} ({out['curves']} curve(s), mean and min..max)")
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(workdir, "curve.png"))
  return ["curve.png"]


def run() -> None:
  from wsjax.studies.curves import CurvesStudy, study_hash
  cfg = common.config_from_flags(CurvesConfig)
  cfg.validate()
  common.run_study(cfg, CurvesStudy, study_hash(cfg), 2 * cfg.pairs if cfg.start is None else 2,
                   table, plots)


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
