"""`train`: the one training loop every study composes.

    states, position = train(states, program, data, until, start=k,
                             data_seeds=seeds, inputs=..., hooks=[...])

runs compiled blocks (`wsjax.core.program.Program`) of up to K steps of all
replicas until the stopping rule (`Until`) holds for each replica:

* `Until.steps(end)`: the global step `end` (an int, or a `Step` string
  parsed by the caller);
* `Until.epochs(n)`: n epoch ends after `start`;
* `Until.accuracy(threshold, max_epochs)`: at each epoch end, a replica
  whose epoch-mean training accuracy (correct predictions over the epoch's
  training batches, as the official warm-start and DASH code count it)
  reached `threshold` stops; all stop after `max_epochs` epochs. A stopped
  replica is frozen (handed back its state) while the others go on.

Start and order (the open_lth contract, Frankle et al. 2020): the loop's
clock is the global step. `start=k` sets every replica's `state.step` to k
(the learning-rate schedule reads it; the optimizer state stays whatever
the caller gives, e.g. fresh at a rewind point), and step t trains on batch
t % E of epoch t // E of the replica's data order (`TrainData.epoch`), so a
run started at k from the state saved at k equals the run that went
through k.

Blocks end at every epoch end, at `until`'s end, after K steps, and at every
step a hook asks for (`Hook.boundaries`): hooks see the states at exactly
those steps. The loop's `Position` (a JSON-able dict: global step, per-
replica counters, stopped and diverged replicas, hook records) is all a
checkpoint needs besides the states, so a run restored from any checkpoint
continues exactly as if it had not stopped.

Divergence: a non-finite loss of an active replica raises
`TrainingDivergedError` naming the step (default), or, with
`on_divergence="freeze"` (sweeps), freezes that replica and marks it in
`position["diverged"]` while the others finish.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from wsjax.core.data import TrainData
from wsjax.core.program import Program


class TrainingDivergedError(RuntimeError):
  """The loss became non-finite; the last good checkpoint is kept."""


class Preempted(Exception):
  """A stop was requested (SIGTERM); a checkpoint was saved first."""


@dataclasses.dataclass(frozen=True)
class Until:
  """When each replica stops (see the module docstring)."""
  end: Optional[int] = None           # global step
  epochs: Optional[int] = None        # epoch ends after the start
  threshold: Optional[float] = None   # epoch-mean training accuracy

  @classmethod
  def steps(cls, end: int) -> "Until":
    return cls(end=int(end))

  @classmethod
  def n_epochs(cls, n: int) -> "Until":
    return cls(epochs=int(n))

  @classmethod
  def accuracy(cls, threshold: Optional[float], max_epochs: int) -> "Until":
    return cls(epochs=int(max_epochs), threshold=threshold)

  def validate(self, start: int = 0) -> None:
    if self.end is None and self.epochs is None:
      raise ValueError("a stopping rule needs an end step or an epoch cap")
    if self.end is not None and self.end < start:
      raise ValueError(f"the run ends at step {self.end}, before its start {start}")
    if self.epochs is not None and self.epochs < 1:
      raise ValueError(f"max epochs must be >= 1, got {self.epochs}")
    if self.threshold is not None and not 0 < self.threshold <= 1:
      raise ValueError(f"stopping threshold must be in (0, 1], got {self.threshold}")

  def still_active(self, active: np.ndarray, epoch_acc: np.ndarray, epochs_done: int) -> np.ndarray:
    """Which replicas keep training after `epochs_done` epochs with these accuracies."""
    if self.epochs is not None and epochs_done >= self.epochs:
      return np.zeros_like(active)
    if self.threshold is None:
      return active
    return active & ~(epoch_acc >= self.threshold)


def new_position(n_replicas: int, start: int) -> dict:
  """The loop position of a run about to start at global step `start`."""
  zeros = [0] * n_replicas
  return {"step": int(start), "start": int(start), "epochs_done": 0,
          "active": [True] * n_replicas, "diverged": [False] * n_replicas,
          "epoch_correct": zeros, "epoch_seen": zeros, "steps": zeros,
          "last_epoch_acc": [0.0] * n_replicas, "wall_s": 0.0, "done": False,
          "records": {}}


class Hook:
  """A block-boundary callback. Override what you need; `loop` is the
  running `Loop` (states, position, program, data, inputs, records)."""

  def boundaries(self, start: int, end: Optional[int]) -> Iterable[int]:
    """Global steps at which this hook needs a block to end."""
    del start, end
    return ()

  def on_start(self, loop: "Loop") -> None:
    pass

  def on_block(self, loop: "Loop") -> None:
    pass

  def on_epoch_end(self, loop: "Loop") -> None:
    pass

  def on_end(self, loop: "Loop") -> None:
    pass


class Loop:
  """The state of one `train` call, as hooks see it."""

  def __init__(self, states, program: Program, data: TrainData, until: Until,
               data_seeds: Sequence[int], inputs, position: dict, hooks: Sequence[Hook],
               on_divergence: str, label: str):
    self.states = states
    self.program = program
    self.data = data
    self.until = until
    self.data_seeds = tuple(int(s) for s in data_seeds)
    self.inputs = inputs
    self.position = position
    self.hooks = list(hooks)
    self.on_divergence = on_divergence
    self.label = label
    self.last_block: dict = {}
    self._t0 = time.perf_counter()
    self._epoch_cache: tuple[int, np.ndarray] | None = None

  @property
  def step(self) -> int:
    return self.position["step"]

  @property
  def records(self) -> dict:
    """Hook records (JSON-able), kept in the position: they are checkpointed."""
    return self.position["records"]

  def elapsed(self) -> float:
    """Wall seconds of this run so far (over resumptions)."""
    return self.position["wall_s"] + time.perf_counter() - self._t0

  def bank_time(self) -> None:
    """Moves the wall time so far into the position (before a checkpoint)."""
    now = time.perf_counter()
    self.position["wall_s"] += now - self._t0
    self._t0 = now

  def _epoch(self, e: int) -> np.ndarray:
    if self._epoch_cache is None or self._epoch_cache[0] != e:
      self._epoch_cache = (e, self.data.epoch(self.data_seeds, e))
    return self._epoch_cache[1]

  def _next_boundary(self, step: int, spe: int) -> int:
    candidates = [(step // spe + 1) * spe, step + self.program.block_steps]
    if self.until.end is not None:
      candidates.append(self.until.end)
    for b in self._boundaries:
      if b > step:
        candidates.append(b)
        break
    return min(candidates)

  def run(self):
    pos = self.position
    spe = self.data.steps_per_epoch
    k = self.program.block_steps
    self._boundaries = sorted({int(b) for h in self.hooks
                               for b in h.boundaries(pos["start"], self.until.end)})
    for h in self.hooks:
      h.on_start(self)
    active = np.asarray(pos["active"], bool)
    if self.until.end is not None and pos["step"] >= self.until.end:
      active[:] = False
    while active.any():
      step = pos["step"]
      e, within = divmod(step, spe)
      boundary = self._next_boundary(step, spe)
      n = boundary - step
      order = self._epoch(e)[within:within + n]
      if n < k:
        order = np.concatenate([order, np.zeros((k - n, *order.shape[1:]), order.dtype)])
      self.states, steps, correct, loss_sum = self.program.train_block(
          self.states, active, self.data.x, self.data.y, order, n, self.inputs)
      pos["step"] = boundary
      bad = active & ~np.isfinite(loss_sum)
      if bad.any():
        if self.on_divergence != "freeze":
          raise TrainingDivergedError(
              f"{self.label}non-finite loss at step {boundary} (replicas "
              f"{np.flatnonzero(bad).tolist()}); lower the learning rate")
        pos["diverged"] = (np.asarray(pos["diverged"]) | bad).tolist()
        active = active & ~bad
      batch = self.program.batch_size
      pos["epoch_correct"] = (np.asarray(pos["epoch_correct"]) + correct).tolist()
      pos["epoch_seen"] = (np.asarray(pos["epoch_seen"]) + steps * batch).tolist()
      pos["steps"] = (np.asarray(pos["steps"]) + steps).tolist()
      pos["active"] = active.tolist()
      self.last_block = {"steps": n, "loss_sum": loss_sum, "correct": correct}
      epoch_end = boundary % spe == 0
      if epoch_end:
        seen = np.asarray(pos["epoch_seen"])
        epoch_acc = np.asarray(pos["epoch_correct"]) / np.maximum(seen, 1)
        pos["epochs_done"] += 1
        active = self.until.still_active(active, epoch_acc, pos["epochs_done"])
        pos["last_epoch_acc"] = np.where(seen > 0, epoch_acc, pos["last_epoch_acc"]).tolist()
        pos.update(active=active.tolist(), epoch_correct=[0] * len(active),
                   epoch_seen=[0] * len(active))
      if self.until.end is not None and boundary >= self.until.end:
        active[:] = False
        pos["active"] = active.tolist()
      for h in self.hooks:
        h.on_block(self)
      if epoch_end:
        for h in self.hooks:
          h.on_epoch_end(self)
    pos["done"] = True
    self.bank_time()
    for h in self.hooks:
      h.on_end(self)
    return self.states, pos


def train(states, program: Program, data: TrainData, until: Until, *, data_seeds: Sequence[int],
          start: int = 0, inputs: Any = None, hooks: Sequence[Hook] = (),
          position: Optional[dict] = None, on_divergence: str = "raise", label: str = ""):
  """Trains `states` (a leading replica axis) until `until` holds for every
  replica; returns `(states, position)`.

  `position`: a loop position from a checkpoint to continue from (then the
  states are that checkpoint's and `start` is ignored); otherwise a new run
  starting at global step `start`, every replica's `state.step` set to it.
  `label` prefixes error messages (e.g. "[warm] stage 1: ")."""
  if on_divergence not in ("raise", "freeze"):
    raise ValueError(f"on_divergence must be raise or freeze, got {on_divergence!r}")
  n = len(tuple(data_seeds))
  if position is None:
    until.validate(start)
    position = new_position(n, start)
    states = set_step(states, start)
  elif len(position["active"]) != n:
    raise ValueError(f"the position has {len(position['active'])} replicas, the data seeds {n}")
  loop = Loop(states, program, data, until, data_seeds, inputs, position, hooks,
              on_divergence, label)
  return loop.run()


def set_step(states, step: int):
  """Every replica's global step set to `step` (the schedule's position),
  replicated like the rest of the state (a host value placed, no program)."""
  from wsjax import parallel
  return states.replace(step=parallel.put_replicated(
      np.full(np.shape(states.step), step, np.int32)))
