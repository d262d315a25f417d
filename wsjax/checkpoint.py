"""Orbax checkpoints: resume a run, and use any run as a warm-start source.

A run keeps one orbax `CheckpointManager` directory per method
(`WORKDIR/checkpoints/METHOD/STEP/`), each checkpoint holding two items:

* `state`: the seed-stacked `TrainState` plus loop counters (arrays);
* `meta`: JSON with the loop position and the results gathered so far.

Checkpoints are written at the end of every stage (kept) and every N steps
(only the latest kept). Orbax writes to a temporary directory and renames it
when complete, so a run killed mid-write never leaves a checkpoint that reads
as complete; `latest_complete_step` returns the newest finalized one.
With several processes, orbax writes each array's shards from the process
that holds them and the JSON item from process 0.

`load_warm_start_source` reads `DIR[@STEP]` (a run's checkpoint directory for
one method, or a single step directory) as the starting point of another run,
checking every parameter's path and shape against the new model.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from wsjax import parallel


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not fit the model."""


def make_manager(directory: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()


def _abstract_like(tree, sharding=None):
  sharding = sharding or parallel.replicated()
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict]:
  """Restores (state, meta) at `step` into the structure and shapes of `target`."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract_like(target)),
        meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for corrupt files
    raise CheckpointError(
        f"checkpoint {manager.directory}/{step} cannot be read ({type(e).__name__}: "
        f"{_first_line(e)}); delete it or start with --overwrite") from e
  return restored["state"], restored["meta"]


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise CheckpointError(
        f"checkpoint {manager.directory}/{step} has no readable metadata "
        f"({type(e).__name__}: {_first_line(e)}); delete it or start with --overwrite") from e


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else ""


# ---------------------------------------------------------------------------
# Warm-start sources
# ---------------------------------------------------------------------------

def parse_source(spec: str) -> tuple[str, Optional[int]]:
  """`DIR[@STEP]` -> (directory, step or None)."""
  m = re.fullmatch(r"(.+?)(?:@(\d+))?", spec)
  return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)


def _resolve_source(spec: str) -> tuple[str, int]:
  directory, step = parse_source(spec)
  directory = os.path.abspath(directory)
  base = os.path.basename(directory.rstrip("/"))
  if step is None and base.isdigit() and os.path.isdir(os.path.join(directory, "state")):
    directory, step = os.path.dirname(directory), int(base)
  if not os.path.isdir(directory):
    raise CheckpointError(f"warm-start source {directory} does not exist; pass a run's "
                          "checkpoint directory, e.g. WORKDIR/checkpoints/cold[@STEP]")
  manager = ocp.CheckpointManager(directory)
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"warm-start source {directory} holds no complete checkpoint")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"warm-start source {directory} has no step {step}; "
                          f"available: {', '.join(map(str, sorted(steps)))}")
  return directory, step


def tree_mismatches(expected: Any, found: Any) -> list[str]:
  """Every path whose presence or shape differs, as readable lines."""
  exp = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(found)}
  lines = []
  for path in sorted(exp.keys() | got.keys()):
    if path not in got:
      lines.append(f"{path}: missing in source (model expects {exp[path]})")
    elif path not in exp:
      lines.append(f"{path}: in source {got[path]} but not in the model")
    elif exp[path] != got[path]:
      lines.append(f"{path}: source {got[path]} vs model {exp[path]}")
  return lines


def load_warm_start_source(spec: str, expected: dict, n_seeds: int) -> tuple[dict, dict]:
  """Reads `params`, `batch_stats` and `opt_state` of a checkpoint `DIR[@STEP]`.

  `expected` is `{'params', 'batch_stats', 'opt_state'}` of ONE model (no seed
  axis). The source's seed axis is matched to this run's seeds: equal counts
  map seed i to seed i, a single-seed source is broadcast. Returns
  (seed-stacked host trees, source meta). Raises `CheckpointError` listing
  every mismatched path and shape.
  """
  directory, step = _resolve_source(spec)
  manager = ocp.CheckpointManager(directory)
  try:
    meta_tree = manager.item_metadata(step)["state"]
    raw = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract_from_metadata(meta_tree)),
        meta=ocp.args.JsonRestore()))
  except Exception as e:
    raise CheckpointError(f"warm-start source {directory}@{step} cannot be read "
                          f"({type(e).__name__}: {_first_line(e)})") from e
  states = raw["state"]["states"]
  source = {k: states.get(k, {}) for k in expected}
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(source)}
  if len(sizes) != 1:
    raise CheckpointError(f"warm-start source {directory}@{step} is not a seed-stacked wsjax state")
  n_src = sizes.pop()
  per_seed = jax.tree.map(lambda x: x[0], source)
  problems = tree_mismatches(expected, per_seed)
  if problems:
    raise CheckpointError(f"warm-start source {directory}@{step} does not match the model: "
                          + "; ".join(problems))
  if n_src == n_seeds:
    stacked = source
  elif n_src == 1:
    stacked = jax.tree.map(lambda x: np.repeat(np.asarray(x), n_seeds, axis=0), source)
  else:
    raise CheckpointError(f"warm-start source {directory}@{step} has {n_src} seeds; "
                          f"this run has {n_seeds} (use the same number, or a 1-seed source)")
  stacked = jax.tree.map(np.asarray, stacked)
  return stacked, dict(raw["meta"], source=f"{directory}@{step}")


def _abstract_from_metadata(meta_tree):
  rep = parallel.replicated()

  def leaf(m):
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=rep)
  return jax.tree.map(leaf, meta_tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
