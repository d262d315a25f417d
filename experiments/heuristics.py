"""Training heuristics through mode connectivity and CCA (Gotmare et al., ICLR 2019).

    python -m experiments.heuristics --study=sgdr          # SGDR vs step decay; curves, CCA
    python -m experiments.heuristics --study=warmup        # large batch with/without warm-up
    python -m experiments.heuristics --study=distillation  # a student with/without a teacher
    python -m experiments.heuristics --study=sgdr --preset=paper --data_dir=DIR  # VGG-16, CIFAR-10

Each study has its own defaults (wsjax.studies.heuristics.STUDY_DEFAULTS,
MNIST-1D's 1-D ConvNet, 3 seeds; flags given explicitly win; --helpfull
shows the sgdr study's). Per-layer similarity: --similarity=cca|svcca|pwcca|
cka|cka_debiased, --cca_layers, --cca_examples, --cca_spatial,
--svcca_directions. The distillation study takes a stored teacher with
--teacher=RUN@SNAPSHOT.

Writes WORKDIR/results.json and the study's plots (sgdr: sgdr_paths.png,
sgdr_cca.png; warmup: warmup_cca.png; distillation: distillation_cca.png)
and prints its table; every group of seeds is a stored run in WORKDIR/runs.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from experiments import common
from wsjax.studies.heuristics import HeuristicsConfig, with_study_defaults

DEFAULT = with_study_defaults(HeuristicsConfig(study="sgdr"))
common.define_flags(DEFAULT, workdir="runs/heuristics")
flags.DEFINE_enum("preset", None, ["paper"], "paper: the paper's VGG-16 on CIFAR-10 settings for "
                  "the chosen study (needs CIFAR-10 prepared in --data_dir; flags given win)")
FLAGS = flags.FLAGS


def _pm(s: dict, scale: float = 100.0, digits: int = 1) -> str:
  from wsjax import results
  return results.pm(s, scale, digits)


# ---- tables -----------------------------------------------------------------------------
def table(out: dict) -> str:
  return {"sgdr": sgdr_table, "warmup": warmup_table,
          "distillation": distillation_table}[out["heuristic"]](out)


def sgdr_table(out: dict) -> str:
  from wsjax import results
  lines = [f"test accuracy %: SGDR {_pm(out['test_acc']['sgdr'])}, step decay "
           f"{_pm(out['test_acc']['step_decay'])} ({out['config']['epochs']} epochs); SGDR at "
           "its cycle ends: " + ", ".join(
               f"ep {e:g}: {_pm(out['iterate_test_acc'][str(c)])}"
               for c, e in zip(out["cycle_ends"], out["cycle_end_epochs"]))]
  rows = []
  per_epoch = out["steps_per_epoch"]
  for pair, group in zip(out["pairs"], out["paths"]["groups"]):
    what = (f"iterates ep {pair['from_step'] / per_epoch:g} -> {pair['to_step'] / per_epoch:g}"
            if pair["kind"] == "iterates" else "independent runs (final)")
    for path in ("line", "curve"):
      if path not in group:
        continue
      g = group[path]
      rows.append([what, path, _pm(g["barrier"]["train_loss"], 1.0, 3),
                   _pm(g["chord_barrier"]["train_loss"], 1.0, 3),
                   _pm(g["barrier"]["test_error"]), _pm(g["chord_barrier"]["test_error"]),
                   _pm(g["max_test_error"])])
  lines.append(results.format_table(
      ["pair", "path", "train loss barrier", "above chord", "test error barrier %",
       "above chord %", "max test error %"], rows))
  lines.append("barrier: max along the path minus the mean of its ends; above chord: max of "
               "f(t) - ((1 - t) f(0) + t f(1))")
  sim = out["similarity"]
  rows = []
  for layer in sim["layers"]:
    row = [layer] + [_pm(v, 1.0, 3) for v in sim["iterates"][layer]]
    if sim["independent"]:
      row.append(_pm(sim["independent"][layer], 1.0, 3))
    rows.append(row)
  head = ["layer"] + [f"ep {a['from_step'] / per_epoch:g}->{a['to_step'] / per_epoch:g}"
                      for a in out["pairs"] if a["kind"] == "iterates"]
  if sim["independent"]:
    head.append("independent")
  measure = out["config"]["similarity"]["measure"]
  lines.append(f"{measure} similarity per layer (mean ± std over seeds):")
  lines.append(results.format_table(head, rows))
  return "\n".join(lines)


def _early_mean(summaries: list) -> tuple[float, float]:
  """Mean over early training of per-seed values, then mean ± std over seeds."""
  per_seed = np.asarray([s["per_seed"] for s in summaries], np.float64).mean(0)
  return float(per_seed.mean()), float(per_seed.std())


def _early_cell(summaries) -> str:
  if not summaries:  # every seed diverged
    return "-"
  m, s = _early_mean(summaries)
  return f"{m:.3f} ± {s:.3f}"


def warmup_table(out: dict) -> str:
  from wsjax import results
  layers = out["layers"]
  rows = []
  for name, c in out["conditions"].items():
    diverged = sum(c.get("diverged", []))
    row = [name, _pm(c["test_acc"]), str(diverged)]
    for layer in layers:
      row.append(_early_cell(c["consecutive"].get(layer)))
    rows.append(row)
  measure = out["config"]["similarity"]["measure"]
  head = ["condition", "test acc %", "diverged"] + [f"{layer} consecutive" for layer in layers]
  text = results.format_table(head, rows)
  rows = []
  for name, c in out["conditions"].items():
    rows.append([name] + [_early_cell(c["to_final"].get(layer)) for layer in layers])
  text += "\n" + results.format_table(["condition"] + [f"{layer} vs final" for layer in layers],
                                      rows)
  snaps = out["snapshots"]["large"]
  text += (f"\n{measure} similarity per layer, averaged over early training (large-batch "
           f"iterations {snaps[0]}..{snaps[-1]} every {snaps[1] - snaps[0]}; the small batch "
           f"at the same examples seen), mean ± std over the seeds that did not diverge; "
           f"large lr {out['large_lr']:g}, frozen: {', '.join(out['frozen_layers']) or '-'}")
  return text


def distillation_table(out: dict) -> str:
  from wsjax import results
  acc = out["test_acc"]
  lines = [f"test accuracy %: teacher {_pm(acc['teacher'])}, student {_pm(acc['student'])}, "
           f"distilled student {_pm(acc['distilled'])}"]
  rows = []
  for student_layer, teacher_layer in out["layer_pairs"]:
    rows.append([f"{student_layer} ~ {teacher_layer}",
                 _pm(out["similarity"]["student"][student_layer], 1.0, 3),
                 _pm(out["similarity"]["distilled"][student_layer], 1.0, 3),
                 _pm(out["similarity_gain"][student_layer], 1.0, 3)])
  measure = out["config"]["similarity"]["measure"]
  lines.append(results.format_table(
      ["student ~ teacher layer", f"{measure}: student", f"{measure}: distilled", "gain"], rows))
  lines.append(f"mean ± std over {out['config']['seeds']} seeds (student r with teacher r)")
  return "\n".join(lines)


# ---- plots ------------------------------------------------------------------------------
def plots(out: dict, workdir: str) -> list[str]:
  return {"sgdr": sgdr_plots, "warmup": warmup_plots,
          "distillation": distillation_plots}[out["heuristic"]](out, workdir)


def sgdr_plots(out: dict, workdir: str) -> list[str]:
  import matplotlib.pyplot as plt

  from wsjax import plotting
  ts = np.asarray(out["paths"]["ts"])
  groups = out["paths"]["groups"]
  per_epoch = out["steps_per_epoch"]
  fig, axes = plt.subplots(2, len(groups), figsize=(4 * len(groups), 6.5), squeeze=False)
  for j, (pair, group) in enumerate(zip(out["pairs"], groups)):
    title = (f"ep {pair['from_step'] / per_epoch:g} -> {pair['to_step'] / per_epoch:g}"
             if pair["kind"] == "iterates" else "independent runs")
    for i, (metric, scale, label) in enumerate((("train_loss", 1.0, "train loss"),
                                                ("test_error", 100.0, "test error (%)"))):
      ax = axes[i, j]
      for path, style in (("curve", "-"), ("line", "--")):
        if path in group:
          ax.plot(ts, scale * np.asarray(group[path]["mean_path"][metric]), style, label=path)
      ax.set_xlabel("t")
      ax.set_ylabel(label)
      ax.grid(alpha=0.3)
      if i == 0:
        ax.set_title(title)
        ax.legend(fontsize=8)
  fig.suptitle("SGDR iterates: curve vs line (mean over pairs)")
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(workdir, "sgdr_paths.png"))

  sim = out["similarity"]
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  iterate_pairs = [p for p in out["pairs"] if p["kind"] == "iterates"]
  x = np.arange(len(sim["layers"]))
  for k, pair in enumerate(iterate_pairs):
    m = [sim["iterates"][layer][k]["mean"] for layer in sim["layers"]]
    e = [sim["iterates"][layer][k]["std"] for layer in sim["layers"]]
    ax.errorbar(x, m, yerr=e, marker="o", ms=3, capsize=2,
                label=f"ep {pair['from_step'] / per_epoch:g} vs {pair['to_step'] / per_epoch:g}")
  if sim["independent"]:
    m = [sim["independent"][layer]["mean"] for layer in sim["layers"]]
    e = [sim["independent"][layer]["std"] for layer in sim["layers"]]
    ax.errorbar(x, m, yerr=e, marker="s", ms=3, capsize=2, ls="--", label="independent runs")
  ax.set_xticks(x, sim["layers"])
  ax.set_ylabel(f"{out['config']['similarity']['measure']} similarity")
  ax.set_title("SGDR iterates: per-layer similarity")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plotting.save_figure(fig, os.path.join(workdir, "sgdr_cca.png"))
  return ["sgdr_paths.png", "sgdr_cca.png"]


def warmup_plots(out: dict, workdir: str) -> list[str]:
  import matplotlib.pyplot as plt

  from wsjax import plotting
  layers = out["layers"]
  snaps = np.asarray(out["snapshots"]["large"])
  fig, axes = plt.subplots(2, len(layers), figsize=(3.8 * len(layers), 6.5), squeeze=False)
  for j, layer in enumerate(layers):
    for name, c in out["conditions"].items():
      for i, (key, xs) in enumerate((("consecutive", snaps[1:]), ("to_final", snaps))):
        if layer not in c[key]:  # every seed diverged
          continue
        m = np.asarray([s["mean"] for s in c[key][layer]])
        e = np.asarray([s["std"] for s in c[key][layer]])
        line, = axes[i, j].plot(xs, m, marker="o", ms=2, label=name)
        axes[i, j].fill_between(xs, m - e, m + e, color=line.get_color(), alpha=0.15)
    axes[0, j].set_title(layer)
    axes[1, j].set_xlabel("large-batch iteration (small batch: same examples)")
  axes[0, 0].set_ylabel("similarity to the previous snapshot")
  axes[1, 0].set_ylabel("similarity to the final model")
  axes[0, 0].legend(fontsize=7)
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  fig.suptitle(f"{out['config']['similarity']['measure']} per layer over early training")
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(workdir, "warmup_cca.png"))
  return ["warmup_cca.png"]


def distillation_plots(out: dict, workdir: str) -> list[str]:
  import matplotlib.pyplot as plt

  from wsjax import plotting
  pairs = out["layer_pairs"]
  x = np.arange(len(pairs))
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name, marker in (("student", "o"), ("distilled", "s")):
    m = [out["similarity"][name][s]["mean"] for s, _ in pairs]
    e = [out["similarity"][name][s]["std"] for s, _ in pairs]
    ax.errorbar(x, m, yerr=e, marker=marker, ms=4, capsize=2, label=name)
  ax.set_xticks(x, [f"{s}~{t}" for s, t in pairs])
  ax.set_ylabel(f"{out['config']['similarity']['measure']} similarity to the teacher")
  ax.set_title("student vs teacher, layers paired by depth")
  ax.grid(alpha=0.3)
  ax.legend()
  plotting.save_figure(fig, os.path.join(workdir, "distillation_cca.png"))
  return ["distillation_cca.png"]


def run() -> None:
  from wsjax.studies.heuristics import HeuristicsStudy, replicas, study_hash
  cfg = with_study_defaults(common.config_from_flags(HeuristicsConfig), common.given_flags(),
                            FLAGS.preset)
  cfg.validate()
  common.run_study(cfg, HeuristicsStudy, study_hash(cfg), replicas(cfg), table, plots)


def main(argv):
  del argv  # parsed by common.parse_flags
  common.run_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
