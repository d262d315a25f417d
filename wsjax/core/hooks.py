"""Hooks of the training loop, called at block boundaries (`wsjax.core.loop`).

* `EvaluateEvery(every, sets)`: accuracy and loss of every replica on named
  sets (e.g. `{"test": (x, y)}`) every `every` global steps (and at the end);
  records `loop.records["eval"] = [{"step", "<set>_acc", "<set>_loss"}, ...]`.
* `SaveSnapshots(steps, save)`: calls `save(name, states)` with
  name `step_<k>` at each global step k (a run's named snapshots).
* `Checkpoint(save, every)`: calls `save(loop)` every `every` steps and when a
  stop is requested (SIGTERM: `request_stop`), then raises `Preempted`.
* `Progress(bar)`: a tqdm bar's postfix (epoch, mean training accuracy).
* `Timing()`: wall time and steps of every block in `loop.records["timing"]`
  (benchmarks read it instead of patching library internals).

A hook's records live in the loop position, so they are checkpointed and
survive resumption.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from wsjax.core.loop import Hook, Loop, Preempted

_STOP = threading.Event()


def request_stop(*_) -> None:
  """Signal handler: finish the current block, checkpoint, raise `Preempted`."""
  _STOP.set()


def stop_requested() -> bool:
  return _STOP.is_set()


def clear_stop() -> None:
  _STOP.clear()


class EvaluateEvery(Hook):
  """Evaluates every replica on named sets every `every` steps (0: only at the end)."""

  def __init__(self, every: int, sets: Mapping[str, tuple], at_end: bool = True):
    if every < 0:
      raise ValueError(f"evaluation period must be >= 0, got {every}")
    self.every = every
    self.sets = dict(sets)
    self.at_end = at_end

  def boundaries(self, start: int, end: Optional[int]) -> Iterable[int]:
    if not self.every or end is None:
      return ()
    first = (start // self.every + 1) * self.every
    return range(first, end + 1, self.every)

  def _record(self, loop: Loop) -> None:
    rows = loop.records.setdefault("eval", [])
    if rows and rows[-1]["step"] == loop.step:
      return
    row = {"step": loop.step}
    for name, (x, y) in self.sets.items():
      acc, loss = loop.program.evaluate(loop.states, x, y)
      row[f"{name}_acc"] = [float(a) for a in acc]
      row[f"{name}_loss"] = [float(v) for v in loss]
    rows.append(row)

  def on_start(self, loop: Loop) -> None:
    if self.every and loop.step == loop.position["start"] and not loop.records.get("eval"):
      self._record(loop)

  def on_block(self, loop: Loop) -> None:
    if self.every and loop.step % self.every == 0:
      self._record(loop)

  def on_end(self, loop: Loop) -> None:
    if self.at_end:
      self._record(loop)


class SaveSnapshots(Hook):
  """`save("step_<k>", states)` at each of the given global steps."""

  def __init__(self, steps: Iterable[int], save: Callable[[str, object], None]):
    self.steps = sorted({int(s) for s in steps})
    self.save = save

  def boundaries(self, start, end):
    return [s for s in self.steps if s > start and (end is None or s <= end)]

  def on_start(self, loop: Loop) -> None:
    if loop.step in self.steps:
      self.save(f"step_{loop.step}", loop.states)

  def on_block(self, loop: Loop) -> None:
    if loop.step in self.steps:
      self.save(f"step_{loop.step}", loop.states)


class Checkpoint(Hook):
  """Periodic and preemption checkpoints through `save(loop)`."""

  def __init__(self, save: Callable[[Loop], None], every: int = 0, where: str = ""):
    if every < 0:
      raise ValueError(f"checkpoint_every must be >= 0, got {every}")
    self.save = save
    self.every = every
    self.where = where
    self._last = None

  def boundaries(self, start, end):
    return ()

  def on_start(self, loop: Loop) -> None:
    self._last = loop.step

  def on_block(self, loop: Loop) -> None:
    stop = stop_requested()
    every = self.every
    crossed = every and loop.step // every > self._last // every
    if (stop or crossed) and not loop.position["done"]:
      loop.bank_time()
      self.save(loop)
    self._last = loop.step
    if stop:
      raise Preempted(f"{loop.label}stopped at step {loop.step}; checkpoint saved in {self.where}")


class Progress(Hook):
  """Shows the run's epoch and mean training accuracy on a tqdm bar."""

  def __init__(self, bar, label: str = ""):
    self.bar = bar
    self.label = label

  def on_epoch_end(self, loop: Loop) -> None:
    if self.bar is None or getattr(self.bar, "disable", False):
      return
    acc = float(np.mean(loop.position["last_epoch_acc"]))
    self.bar.set_postfix_str(f"{self.label} epoch {loop.position['epochs_done']} "
                             f"train acc {acc:.3f}", refresh=False)


class Timing(Hook):
  """Records (steps, seconds) of every block: `loop.records["timing"]`."""

  def __init__(self):
    self._t = None

  def on_start(self, loop: Loop) -> None:
    self._t = time.perf_counter()

  def on_block(self, loop: Loop) -> None:
    now = time.perf_counter()
    loop.records.setdefault("timing", []).append(
        [int(loop.last_block.get("steps", 0)), now - self._t])
    self._t = now
