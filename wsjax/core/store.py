"""Content-addressed runs: a run's directory is named by what decides its result.

A *run* is one `train` call of a stack of replicas: its start state (where it
comes from), its program (model, optimizer, task), its data and order, its
start step and stopping rule, its replicas' seeds. A study describes each run
by a `spec`, a JSON-able dict of exactly those things, built from configs
with `nondefault` (open_lth's rule: only non-default fields are named, so a
new field with a default renames nothing); the run lives in

    STORE/run_<hash>/      hash = sha256(canonical JSON of spec, RESULTS_VERSION)[:16]
      spec.json            the spec, and a human label
      snapshots/<name>/    named states as orbax checkpoints: init, step_500, final
      checkpoints/<step>/  the in-progress run's checkpoints (states + loop position)
      result.json          the finished run's position and hook records
      DONE                 written last: the run is complete
      .lock                held (fcntl) while a process trains it

Operational knobs (block size, checkpoint cadence, device layout,
diagnostics, where data lives) are not in the spec: they do not change a
result beyond float rounding. `RESULTS_VERSION` is bumped when a fix changes
results, which renames every run.

A hash covers one stacked GROUP of replicas, not one replica: the group is
what one program computes together (bit-exactly reproducible on the same
device layout), what one checkpoint holds and what resumes together; a
replica trained inside another group (other seeds beside it, another
padding of the replica axis) agrees only to float rounding, and claiming it
as the same run would hide that.

A finished run is loaded, not retrained; two processes asking for the same
run train it once (the second waits on the lock, then loads it). A changed
spec is a new run beside the old ones: nothing is mixed or destroyed.
`python -m experiments.runs --workdir=W` lists a store's runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from wsjax import parallel
from wsjax.results import write_json

RESULTS_VERSION = 1  # bump when a fix changes results: every run gets a new name


class StoreError(ValueError):
  """A run, snapshot or store that is missing, unreadable or does not fit."""


def spec_hash(spec: dict) -> str:
  """sha256 of the canonical JSON of `spec` and `RESULTS_VERSION`, 16 hex digits."""
  text = json.dumps({"spec": spec, "results_version": RESULTS_VERSION}, sort_keys=True,
                    separators=(",", ":"), default=_json_default)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, (tuple, set, np.ndarray)):
    return list(o)
  raise TypeError(f"{type(o).__name__} is not JSON-able in a run spec")


def _abstract(tree):
  rep = parallel.replicated()
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=rep), tree)


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else ""


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Run:
  """One content-addressed run directory (see the module docstring)."""

  def __init__(self, root: str, spec: dict, label: str = ""):
    self.spec = json.loads(json.dumps(spec, default=_json_default))
    self.hash = spec_hash(self.spec)
    self.dir = os.path.join(root, f"run_{self.hash}")
    self.label = label

  def __repr__(self) -> str:
    return f"Run({self.label or ''} {self.dir})"

  # ---- status ---------------------------------------------------------------
  @property
  def done(self) -> bool:
    return os.path.exists(os.path.join(self.dir, "DONE"))

  def ensure(self) -> None:
    """Creates the directory and writes spec.json (process 0)."""
    if _is_primary():
      try:
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, "spec.json")
        if not os.path.exists(path):
          write_json(path, {"hash": self.hash, "label": self.label,
                            "results_version": RESULTS_VERSION, "spec": self.spec})
      except OSError as e:
        raise StoreError(f"run store {os.path.dirname(self.dir)} cannot be written "
                         f"({e.strerror}); choose another --workdir") from e
    _sync(f"run {self.hash} ready")

  @contextlib.contextmanager
  def lock(self):
    """An exclusive lock on the run (process 0 takes it; the others wait at a
    barrier), so two jobs never train the same run at once."""
    self.ensure()
    f = None
    if _is_primary():
      f = open(os.path.join(self.dir, ".lock"), "a")
      fcntl.flock(f, fcntl.LOCK_EX)
    _sync(f"run {self.hash} locked")
    try:
      yield
    finally:
      if f is not None:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()

  # ---- snapshots ------------------------------------------------------------
  def snapshot_dir(self, name: str) -> str:
    return os.path.join(self.dir, "snapshots", name)

  def snapshots(self) -> list[str]:
    d = os.path.join(self.dir, "snapshots")
    if not os.path.isdir(d):
      return []
    return sorted(n for n in os.listdir(d) if not n.startswith(".") and "tmp" not in n)

  def save_snapshot(self, name: str, states) -> None:
    """Saves `states` as snapshot `name` (replaced if it exists)."""
    path = self.snapshot_dir(name)
    if _is_primary() and os.path.exists(path):
      shutil.rmtree(path)
    _sync(f"snapshot {self.hash}/{name} cleared")
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, parallel.to_host(states))  # host copies: no per-device slicing programs
      ckptr.wait_until_finished()

  def load_snapshot(self, name: str, template):
    """Snapshot `name` restored into the structure, shapes and dtypes of
    `template` (replicated on the mesh)."""
    path = self.snapshot_dir(name)
    if not os.path.isdir(path):
      have = ", ".join(self.snapshots()) or "none"
      raise StoreError(f"run {self.dir} has no snapshot {name!r} (it has: {have})")
    try:
      with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, _abstract(template))
    except Exception as e:  # orbax raises many types for corrupt or mismatched files
      raise StoreError(f"snapshot {path} cannot be read ({type(e).__name__}: "
                       f"{_first_line(e)}); delete the run directory to retrain it") from e

  def snapshot_metadata(self, name: str):
    """The stored tree of shapes/dtypes of snapshot `name` (no arrays read)."""
    path = self.snapshot_dir(name)
    if not os.path.isdir(path):
      have = ", ".join(self.snapshots()) or "none"
      raise StoreError(f"run {self.dir} has no snapshot {name!r} (it has: {have})")
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(path)
    return getattr(meta, "item_metadata", meta)

  # ---- in-progress checkpoints ---------------------------------------------
  def _manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False,
                                           max_to_keep=1)
    return ocp.CheckpointManager(os.path.join(self.dir, "checkpoints"), options=options)

  def latest_checkpoint(self) -> Optional[int]:
    if not os.path.isdir(os.path.join(self.dir, "checkpoints")):
      return None
    with self._manager() as m:
      return m.latest_step()

  def save_checkpoint(self, states, position: dict, extra: Any = None) -> None:
    """The in-progress run at `position["step"]`: states, `extra` arrays and
    the JSON position (only the latest is kept)."""
    with self._manager() as m:
      step = int(position["step"])
      if step in m.all_steps():
        m.delete(step)
      m.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave({"states": states, "extra": extra or {}}),
          position=ocp.args.JsonSave(position)))
      m.wait_until_finished()

  def restore_checkpoint(self, template, extra_template: Any = None):
    """(states, extra, position) of the latest checkpoint."""
    with self._manager() as m:
      step = m.latest_step()
      try:
        out = m.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract({"states": template,
                                                      "extra": extra_template or {}})),
            position=ocp.args.JsonRestore()))
      except Exception as e:
        raise StoreError(f"checkpoint {self.dir}/checkpoints/{step} cannot be read "
                         f"({type(e).__name__}: {_first_line(e)}); delete it to restart the "
                         "run from its start") from e
    return out["state"]["states"], out["state"]["extra"], out["position"]

  # ---- results --------------------------------------------------------------
  def finish(self, states, result: dict) -> None:
    """Saves the `final` snapshot and `result.json`, then marks the run done
    and drops its in-progress checkpoints."""
    self.save_snapshot("final", states)
    if _is_primary():
      write_json(os.path.join(self.dir, "result.json"), result)
      with open(os.path.join(self.dir, "DONE"), "w") as f:
        f.write(self.hash + "\n")
      shutil.rmtree(os.path.join(self.dir, "checkpoints"), ignore_errors=True)
    _sync(f"run {self.hash} done")

  def result(self) -> dict:
    try:
      with open(os.path.join(self.dir, "result.json")) as f:
        return json.load(f)
    except (OSError, ValueError) as e:
      raise StoreError(f"run {self.dir} has no readable result.json ({e}); delete the run "
                       "directory to retrain it") from e

  def update_result(self, **fields) -> None:
    """Adds fields to a finished run's result (e.g. diagnostics computed later)."""
    if _is_primary():
      result = self.result()
      result.update(fields)
      write_json(os.path.join(self.dir, "result.json"), result)


class RunStore:
  """A directory of content-addressed runs."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)

  def run(self, spec: dict, label: str = "") -> Run:
    return Run(self.root, spec, label)

  def runs(self) -> list[dict]:
    """Every run directory's spec.json, with `status` (done / in progress /
    started) and its snapshots."""
    out = []
    if not os.path.isdir(self.root):
      return out
    for name in sorted(os.listdir(self.root)):
      d = os.path.join(self.root, name)
      if not name.startswith("run_") or not os.path.isdir(d):
        continue
      try:
        with open(os.path.join(d, "spec.json")) as f:
          info = json.load(f)
      except (OSError, ValueError):
        info = {"hash": name[4:], "label": "?", "spec": {}}
      done = os.path.exists(os.path.join(d, "DONE"))
      ckpts = os.path.isdir(os.path.join(d, "checkpoints"))
      info["status"] = "done" if done else ("in progress" if ckpts else "started")
      info["dir"] = d
      snaps = os.path.join(d, "snapshots")
      info["snapshots"] = sorted(os.listdir(snaps)) if os.path.isdir(snaps) else []
      out.append(info)
    return out

  def find(self, ref: str) -> Run:
    """A run by its directory path, `run_<hash>`, or a unique hash prefix."""
    path = os.path.abspath(ref)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "spec.json")):
      return load_run(path)
    key = os.path.basename(ref.rstrip("/"))
    key = key[4:] if key.startswith("run_") else key
    matches = [r for r in self.runs() if r["hash"].startswith(key)] if key else []
    if len(matches) != 1:
      raise StoreError(f"{'no' if not matches else 'more than one'} run matches {ref!r} in "
                       f"{self.root}; list them with python -m experiments.runs")
    return load_run(matches[0]["dir"])


def load_run(directory: str) -> Run:
  """The `Run` of an existing run directory."""
  path = os.path.join(directory, "spec.json")
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise StoreError(f"{directory} is not a wsjax run (no readable spec.json)") from e
  run = Run(os.path.dirname(os.path.abspath(directory)), info["spec"], info.get("label", ""))
  if run.hash != info.get("hash"):  # another results version: keep its own directory
    run.hash = info.get("hash", run.hash)
    run.dir = os.path.abspath(directory)
  return run
