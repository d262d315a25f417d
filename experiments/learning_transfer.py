"""Transferring learning trajectories (Chijiwa, ICLR 2024): GMT, FGMT, naive, oracle.

A source network's training trajectory theta_0 .. theta_T is moved onto a
new initialization theta'_0 without training, theta'_t = theta'_0 +
pi_t(theta_t - theta_0), with permutations pi_t of the hidden units found by
gradient matching (GMT; FGMT caches the gradient pairs). For fresh and
pre-trained initializations: the transferred networks' test accuracy at every
point, then fine-tuning from the best point vs from theta'_0.

    python -m experiments.learning_transfer          # Fashion-MNIST, MLP 784-512-10, 3 seed pairs
    python -m experiments.learning_transfer --inits=fresh --methods=fgmt,naive --points=5
    python -m experiments.learning_transfer --trajectory=snapshots --spacing=uniform
    python -m experiments.learning_transfer --preset=cifar10_conv8 --data_dir=DIR

Writes WORKDIR/results.json, WORKDIR/transfer_accuracy.png (accuracy at every
point, no training) and WORKDIR/finetune.png (test accuracy while
fine-tuning) and prints the table; every training run and every transfer is a
stored run in WORKDIR/runs.
"""
from __future__ import annotations

import os

from absl import app, flags

from experiments import common
from wsjax.studies.learning_transfer import PRESETS, LearningTransferConfig

common.define_flags(LearningTransferConfig(), workdir="runs/learning_transfer")
flags.DEFINE_enum("preset", None, list(PRESETS), "set a paper setting (flags given explicitly "
                  "win): cifar10_conv8 = Conv8 on CIFAR-10 (SGD 0.05, wd 1e-4, cosine, 60 "
                  "epochs, T = 30, 2 gradient batches; AdamW 1e-4 fine-tuning), mnist_mlp = the "
                  "MNIST 784-4096-10 MLP")
FLAGS = flags.FLAGS

LABELS = {"gmt": "GMT", "fgmt": "FGMT", "naive": "naive", "oracle": "oracle", "init": "init"}
# one look per start in both plots: (color, marker, line style)
STYLES = {"init": ("0.15", "o", "-"), "gmt": ("C0", "o", "-"), "fgmt": ("C1", "s", "--"),
          "naive": ("C2", "^", "-"), "oracle": ("C3", "D", ":")}


def _steps(value, total: int) -> str:
  return f"> {total}" if value is None else str(value)


def table(out: dict) -> str:
  """setting | method | acc at T | best point | best acc | fine-tuned acc | steps to target."""
  import numpy as np

  from wsjax import results
  rows = []
  for kind, setting in out["settings"].items():
    ft = setting.get("finetune") or {}
    init = results.summary(setting["target_init_acc"])
    starts = ft.get("starts", {})
    rows.append([kind, "init (theta'_0)", results.pm(init), "", "",
                 results.pm(starts["init"]["final_test_acc"]) if starts else "",
                 _reach(starts.get("init"), ft)])
    for name, m in setting["methods"].items():
      best = m["best_point"]
      rows.append([kind, LABELS[name], results.pm(m["final_point_test_acc"]),
                   f"{np.mean(best):.1f}", results.pm(m["best_point_test_acc"]),
                   results.pm(starts[name]["final_test_acc"]) if starts else "",
                   _reach(starts.get(name), ft)])
    if setting["source_test_acc"]:
      rows.append([kind, "source (trained)", results.pm(results.summary(
          setting["source_test_acc"])), "", "", "", ""])
    rows.append([kind, "target (trained)", results.pm(results.summary(
        setting["oracle_test_acc"])), "", "", "", ""])
  head = ["setting", "start", "test acc at T %", "best point", "best-point test acc %",
          "fine-tuned test acc %", "steps to target"]
  cfg = out["config"]
  note = (f"mean ± std over {cfg['seeds']} seed pairs; no training before fine-tuning; best "
          f"point of T = {cfg['transfer']['points']} chosen on a validation split; fine-tuning "
          f"{cfg['finetune']['epochs']} epoch(s); steps to target: median over pairs of the first evaluation step reaching "
          "the target (default: the accuracy fine-tuning from theta'_0 reaches at the end)")
  return results.format_table(head, rows) + "\n" + note


def _reach(start, ft) -> str:
  import numpy as np
  if not start:
    return ""
  values = start["steps_to_target"]
  total = ft["total_steps"]
  if any(v is None for v in values):
    reached = [v for v in values if v is not None]
    return f"{len(reached)}/{len(values)} reach ({_steps(None, total)})" if not reached else (
        f"{int(np.median([v if v is not None else total + 1 for v in values]))} "
        f"({len(reached)}/{len(values)} reach)")
  return str(int(np.median(values)))


def plots(out: dict, workdir: str) -> list[str]:
  """transfer_accuracy.png (test accuracy of theta'_t at every point t, no
  training) and finetune.png (test accuracy while fine-tuning)."""
  import matplotlib.pyplot as plt
  import numpy as np

  from wsjax import plotting
  kinds = list(out["settings"])
  fig, axes = plt.subplots(1, len(kinds), figsize=(5.6 * len(kinds), 4.2), squeeze=False)
  for ax, kind in zip(axes.flat, kinds):
    setting = out["settings"][kind]
    init = 100 * np.asarray(setting["target_init_acc"])
    for name, m in setting["methods"].items():
      acc = 100 * np.asarray(m["test_acc"])  # (pairs, T)
      acc = np.concatenate([init[:, None], acc], 1)
      t = np.arange(acc.shape[1])
      color, marker, ls = STYLES[name]
      ax.plot(t, acc.mean(0), color=color, marker=marker, ls=ls, ms=4, label=LABELS[name])
      ax.fill_between(t, acc.min(0), acc.max(0), color=color, alpha=0.12)
    path = np.asarray(setting["source_path_acc"])
    if path.size:
      ax.plot(np.arange(path.shape[1]), 100 * path.mean(0), color="0.55", lw=1,
              label="source's own points")
    ax.axhline(100 * np.mean(setting["oracle_test_acc"]), color="0.3", ls="--", lw=1,
               label="target trained")
    ax.set_xlabel("trajectory point t (transferred, no training)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{kind} initialization")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"learning transfer: {out['config']['model']['name']} on "
               f"{out['config']['data']['dataset']}")
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(workdir, "transfer_accuracy.png"))

  fig, axes = plt.subplots(1, len(kinds), figsize=(5.6 * len(kinds), 4.2), squeeze=False)
  for ax, kind in zip(axes.flat, kinds):
    ft = out["settings"][kind].get("finetune") or {}
    for name, start in ft.get("starts", {}).items():
      acc = 100 * np.asarray(start["test_acc"])
      color, marker, ls = STYLES[name]
      ax.plot(ft["steps"], acc.mean(0), color=color, marker=marker, ls=ls, ms=3,
              label=("from theta'_0" if name == "init" else f"from {LABELS[name]}'s best"))
      ax.fill_between(ft["steps"], acc.min(0), acc.max(0), color=color, alpha=0.12)
    if ft:
      ax.axhline(100 * np.mean(ft["target_acc"]), color="0.3", ls="--", lw=1, label="target")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{kind} initialization")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(workdir, "finetune.png"))
  return ["transfer_accuracy.png", "finetune.png"]


def run() -> None:
  from wsjax.studies.learning_transfer import (LearningTransferStudy, apply_preset,
                                               model_defaults, study_hash)
  given = common.given_flags()
  cfg = apply_preset(common.config_from_flags(LearningTransferConfig), PRESETS, FLAGS.preset,
                     given)
  cfg = model_defaults(cfg, given)
  cfg.validate()
  common.run_study(cfg, LearningTransferStudy, study_hash(cfg),
                   max(2, len(cfg.methods) + 1) * cfg.seeds, table, plots)


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
