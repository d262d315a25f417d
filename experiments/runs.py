"""Lists the stored runs of a workdir: hash, status, label, snapshots, settings.

    python -m experiments.runs --workdir=runs/warm_start
    python -m experiments.runs --workdir=runs/warm_start --verbose   # every spec field

A run's directory name is the hash of what decides its result
(`wsjax.core.store`); the label says which study made it first. Any listed
run's snapshot is a warm-start source: `--warm_start_from=<dir>@final`.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from experiments import common

flags.DEFINE_string("workdir", "runs/warm_start", "the workdir whose runs to list")
flags.DEFINE_bool("verbose", False, "print every run's whole spec")
FLAGS = flags.FLAGS


def _summary(spec: dict) -> str:
  parts = []
  for key in ("model", "data", "optimizer"):
    if isinstance(spec.get(key), dict) and spec[key]:
      parts.append(",".join(f"{k}={v}" for k, v in spec[key].items()))
  origin = spec.get("origin", {})
  if "parent" in origin:
    parts.append(f"from {origin['parent']}@{origin.get('snapshot', 'final')}")
  return "  ".join(parts)


def list_runs() -> None:
  from wsjax.core.store import RunStore
  from wsjax.results import format_table
  root = os.path.join(FLAGS.workdir, "runs")
  if not os.path.isdir(root):
    raise ValueError(f"{FLAGS.workdir} holds no runs (no {root}); pass the --workdir of a study")
  runs = RunStore(root).runs()
  rows = [[f"run_{r['hash']}", r["status"], r.get("label", ""), ",".join(r["snapshots"]),
           _summary(r.get("spec", {}))] for r in runs]
  print(format_table(["run", "status", "label", "snapshots", "settings"], rows))
  if FLAGS.verbose:
    for r in runs:
      print(f"\nrun_{r['hash']} ({r.get('label', '')}):")
      print(json.dumps(r.get("spec", {}), indent=2))
  print(f"{len(runs)} runs in {root}", file=sys.stderr)


def main(argv):
  del argv
  common.run_main(list_runs)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
