"""Warm-start sources: any stored run's named snapshot, `RUN[@SNAPSHOT]`.

`RUN` is a run directory (`WORKDIR/runs/run_<hash>`), or `run_<hash>` / a
unique hash prefix in the study's own store; `SNAPSHOT` a snapshot name
(`final` by default; `init`, `step_500`, ...). The source's parameters
(and BatchNorm statistics, and on request the optimizer state) are checked
path by path against the model: a mismatch lists every differing path and
shape. The source's replicas are matched to the run's: equal counts map
replica i to replica i, a single-replica source is broadcast.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import jax
import numpy as np

from wsjax import tree
from wsjax.core import store as store_lib


class SourceError(store_lib.StoreError):
  """A warm-start source that is missing, unreadable or does not fit."""


def parse(ref: str) -> tuple[str, str]:
  """`RUN[@SNAPSHOT]` -> (run reference, snapshot name; default `final`)."""
  m = re.fullmatch(r"(.+?)(?:@([A-Za-z0-9_.\-]+))?", ref.strip())
  if not m:
    raise SourceError(f"malformed warm-start source {ref!r}; write RUN[@SNAPSHOT]")
  return m.group(1), m.group(2) or "final"


def resolve(ref: str, default_store: Optional[store_lib.RunStore] = None):
  """(Run, snapshot name) of a source reference."""
  run_ref, snapshot = parse(ref)
  path = os.path.abspath(run_ref)
  if os.path.isdir(os.path.join(path, "checkpoints")) and not os.path.exists(
      os.path.join(path, "spec.json")) or "/checkpoints/" in run_ref + "/":
    raise SourceError(
        f"{run_ref} is a checkpoint directory of the old layout; a source is now a stored run "
        "RUN[@SNAPSHOT], e.g. WORKDIR/runs/run_<hash>@final (list them with python -m "
        "experiments.runs --workdir=WORKDIR)")
  if os.path.isdir(path):
    run = store_lib.load_run(path)
  elif default_store is not None and not os.sep in run_ref:
    run = default_store.find(run_ref)
  else:
    raise SourceError(f"warm-start source {run_ref} does not exist; pass a stored run "
                      "RUN[@SNAPSHOT], e.g. WORKDIR/runs/run_<hash>@final")
  if snapshot not in run.snapshots():
    have = ", ".join(run.snapshots()) or "none"
    raise SourceError(f"warm-start source {run.dir} has no snapshot {snapshot!r} (it has: {have})")
  return run, snapshot


def load_source(ref: str, expected: dict, n_replicas: int,
                default_store: Optional[store_lib.RunStore] = None) -> tuple[dict, dict]:
  """Reads `expected`'s keys (params, batch_stats[, opt_state]) of a source.

  `expected` holds ONE replica's trees (no replica axis). Returns
  (replica-stacked host trees, {"source": "<run dir>@<snapshot>", "run",
  "snapshot"}). Raises `SourceError` listing every mismatched path."""
  run, snapshot = resolve(ref, default_store)
  where = f"{run.dir}@{snapshot}"
  meta = _as_dict(run.snapshot_metadata(snapshot))
  found = {k: meta.get(k) or {} for k in expected}
  is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
  sizes = {tuple(m.shape)[:1] for m in jax.tree.leaves(found, is_leaf=is_array)}
  if len(sizes) != 1 or not next(iter(sizes)):
    raise SourceError(f"warm-start source {where} is not a replica-stacked wsjax state")
  n_src = next(iter(sizes))[0]
  one = jax.tree.map(lambda m: np.zeros(tuple(m.shape)[1:]), found, is_leaf=is_array)
  problems = tree.mismatches(expected, one)
  if problems:
    raise SourceError(f"warm-start source {where} does not match the model: " + "; ".join(problems))
  if n_src not in (1, n_replicas):
    raise SourceError(f"warm-start source {where} has {n_src} replicas; this run has "
                      f"{n_replicas} (use the same number, or a 1-replica source)")
  # restore the snapshot as stored, then place its leaves, by name, into the
  # structure this model uses (the stored tree has dicts and lists where the
  # state has dataclasses and named tuples)
  stored = run.load_snapshot(snapshot, jax.tree.map(
      lambda m: np.zeros(tuple(m.shape), m.dtype), meta, is_leaf=is_array))
  out = {}
  for key, want in expected.items():
    by_name = tree.to_dict(stored.get(key) or {})
    out[key] = tree.map_named(lambda name, _, by_name=by_name: np.asarray(by_name[name]), want)
  if n_src == 1 and n_replicas > 1:
    out = jax.tree.map(lambda x: np.repeat(x, n_replicas, axis=0), out)
  return out, {"source": where, "run": f"run_{run.hash}", "snapshot": snapshot}


def _as_dict(meta):
  """Orbax's tree metadata as nested dicts and lists."""
  if hasattr(meta, "keys") and not isinstance(meta, dict):
    return {k: _as_dict(meta[k]) for k in meta.keys()}
  if isinstance(meta, dict):
    return {k: _as_dict(v) for k, v in meta.items()}
  if isinstance(meta, (list, tuple)):
    return [_as_dict(v) for v in meta]
  return meta
