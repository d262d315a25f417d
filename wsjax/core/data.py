"""The data a run trains on, and its order: a pure function of (seed, epoch).

`TrainData` is a training set on device (`x`, `y`, replicated), the indices
the run may draw from (`buffer`, e.g. a stage of an arrival schedule or a
class subset) and the batch size. Epoch `e` of a replica with data seed `s`
is `wsjax.data.epoch_batches` over the buffer, shuffled by
`np.random.default_rng([s, *salt, e])`: ceil(n / B) batches of exactly B
indices (the last completed by wrapping around). `salt` names the data
stream: () for a plain run (open_lth's "epoch e is shuffled with seed
data_seed + e" in spirit), `(stage,)` for a staged study (the order wsjax's
warm-start studies have always used).

Because the order is a function of the epoch alone, a run started at step k
sees exactly the batches the uninterrupted run saw from k on: step t is
batch `t % steps_per_epoch` of epoch `t // steps_per_epoch`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from wsjax.data import batching


@dataclasses.dataclass(frozen=True, eq=False)
class TrainData:
  """A training set, the indices a run trains on, the batch size, the stream."""
  x: Any                       # (N, ...) inputs, on device (replicated)
  y: Any                       # (N,) int32 labels, on device
  buffer: np.ndarray           # indices into x/y this run trains on
  batch_size: int
  salt: tuple[int, ...] = ()   # extra ints in every epoch's shuffle seed

  def __post_init__(self):
    buffer = np.asarray(self.buffer)
    if buffer.ndim != 1 or buffer.size == 0:
      raise ValueError("a run needs a non-empty 1-D buffer of training indices")
    if not 1 <= self.batch_size <= buffer.size:
      raise ValueError(f"batch size {self.batch_size} must be in [1, {buffer.size}] "
                       f"(the examples this run trains on)")

  @property
  def size(self) -> int:
    return int(np.asarray(self.buffer).size)

  @property
  def steps_per_epoch(self) -> int:
    return batching.steps_per_epoch(self.size, self.batch_size)

  def epoch(self, data_seeds: Sequence[int], epoch: int) -> np.ndarray:
    """(steps_per_epoch, R, B) int32 indices: epoch `epoch` of every replica."""
    return np.stack([batching.epoch_order(self.buffer, self.batch_size, (int(s), *self.salt, epoch))
                     for s in data_seeds], 1).astype(np.int32)
