"""Epoch batching: the dataset indices of every batch of one epoch.

An epoch over a buffer of n training indices is a random permutation of the
buffer cut into steps_per_epoch(n, batch_size) = ceil(n / batch_size) batches
of exactly `batch_size` indices. The last batch is completed by wrapping
around to the start of the same permutation, so every example of the buffer
is seen at least once per epoch (the first n_steps * batch_size - n of the
permutation twice) and every batch has the same shape, which keeps a jitted
train step or a `lax.scan` over the epoch to a single compilation.

The permutation is a pure function of a key of integers: (seed, stage, epoch)
in a staged study (`np.random.default_rng([seed, stage, epoch])`), (seed,
epoch) in a plain run (`epoch_order`), so a run resumed at any stage and
epoch sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import operator

import numpy as np


def steps_per_epoch(n: int, batch_size: int) -> int:
  """ceil(n / batch_size): the number of batches of one epoch over n examples.

  Raises:
    ValueError: n or batch_size is not positive.
  """
  n, batch_size = operator.index(n), operator.index(batch_size)
  if n <= 0:
    raise ValueError(f"the number of examples must be positive, got {n}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return -(-n // batch_size)


def epoch_batches(buffer: np.ndarray, batch_size: int, seed: int, stage: int,
                  epoch: int) -> np.ndarray:
  """The (steps, batch_size) int64 dataset indices of one epoch over `buffer`
  in a staged study: `epoch_order(buffer, batch_size, (seed, stage, epoch))`.

  Args:
    buffer: 1-D array of the dataset indices available (e.g. a schedule stage).
    batch_size: examples per batch, at most len(buffer).
    seed, stage, epoch: non-negative integers; the batches are a pure function
      of them and the buffer.

  Returns:
    Row i is batch i. The rows, read in order, are a permutation of `buffer`
    followed by its first steps * batch_size - len(buffer) entries again.

  Raises:
    ValueError: buffer not 1-D or empty, batch_size not in [1, len(buffer)].
  """
  return epoch_order(buffer, batch_size, (seed, stage, epoch))


def epoch_order(buffer: np.ndarray, batch_size: int, key: tuple[int, ...]) -> np.ndarray:
  """The (steps, batch_size) int64 indices of one epoch, shuffled by
  `np.random.default_rng(list(key))` (non-negative integers, e.g.
  `(data_seed, epoch)`); see `epoch_batches` for the layout."""
  buffer = np.asarray(buffer)
  if buffer.ndim != 1 or buffer.size == 0:
    raise ValueError(
        f"buffer must be a non-empty 1-D array of indices, got shape "
        f"{buffer.shape}")
  n = buffer.size
  steps = steps_per_epoch(n, batch_size)
  if batch_size > n:
    raise ValueError(
        f"batch_size {batch_size} is larger than the buffer of {n} examples")
  rng = np.random.default_rng(list(key))
  order = buffer[rng.permutation(n)].astype(np.int64, copy=False)
  order = np.concatenate([order, order[:steps * batch_size - n]])
  return order.reshape(steps, batch_size)
