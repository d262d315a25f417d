"""Arrival schedules: which training examples are available at each stage.

A warm-starting study trains in stages on a growing buffer of training data.
A `Schedule` lists, per stage, the buffer (all indices that have arrived so
far, in arrival order) and the indices new at that stage. Every schedule is a
pure function of its arguments and `seed`: the arrival order is the
permutation `np.random.default_rng(seed).permutation(n_train)`, and stage `s`
holds a prefix of it, so

  stages[s] == concatenate(new[0], ..., new[s])
  new[s] are pairwise disjoint, and stages[-1] holds every index that arrives.

The arrays are int64 read-only views of one permutation (a prefix for each
stage), so a schedule with many stages costs the memory of one permutation.

Kinds:
  two_phase(n, fraction)  stage 0: a random `fraction` of the data; stage 1: all
                          (Ash & Adams, "On warm-starting neural network
                          training", 2020).
  online(n, chunk_size)   `chunk_size` new examples per stage until all arrived.
  chunks(n, n_chunks)     `n_chunks` equal random chunks that accumulate (the
                          data-arrival setting of DASH, Shin et al. 2024); the
                          remainder n % n_chunks never arrives.
"""
from __future__ import annotations

import dataclasses
import operator

import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-stage training buffers.

  stages[s]: int64 indices of the training examples available at stage s, in
    arrival order (stages[s - 1] followed by new[s]).
  new[s]: int64 indices that arrive at stage s (the chunk of stage s).
  """
  stages: list[np.ndarray]
  new: list[np.ndarray]

  @property
  def num_stages(self) -> int:
    return len(self.stages)


def _check_count(name: str, value) -> int:
  """`value` as an int; raises ValueError unless it is a positive integer."""
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None
  if value <= 0:
    raise ValueError(f"{name} must be positive, got {value}")
  return value


def _check_seed(seed) -> int:
  """`seed` as an int; raises ValueError unless it is a non-negative integer."""
  try:
    seed = operator.index(seed)
  except TypeError:
    raise ValueError(f"seed must be an integer, got {seed!r}") from None
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  return seed


def _from_bounds(n_train: int, seed: int, ends: list[int]) -> Schedule:
  """Schedule whose stage s is the first ends[s] entries of the permutation."""
  seed = _check_seed(seed)
  order = np.random.default_rng(seed).permutation(n_train).astype(np.int64)
  order.flags.writeable = False
  starts = [0] + ends[:-1]
  return Schedule(
      stages=[order[:end] for end in ends],
      new=[order[start:end] for start, end in zip(starts, ends)])


def two_phase(n_train: int, fraction: float, seed: int) -> Schedule:
  """Stage 0: a random `fraction` of the data; stage 1: all of it.

  Stage 0 holds k = round(fraction * n_train) examples (at least 1); stage 1
  holds the stage-0 indices first, then the remaining n_train - k. When
  k == n_train (fraction 1, or close enough to round to it) the schedule has a
  single stage with all the data.

  Raises:
    ValueError: fraction outside (0, 1], or n_train not a positive integer.
  """
  n_train = _check_count("n_train", n_train)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  k = min(n_train, max(1, round(fraction * n_train)))
  return _from_bounds(n_train, seed, [k, n_train] if k < n_train else [n_train])


def online(n_train: int, chunk_size: int, seed: int) -> Schedule:
  """`chunk_size` new random examples per stage until all n_train arrived.

  ceil(n_train / chunk_size) stages; the last chunk holds the remainder and
  may be smaller.

  Raises:
    ValueError: chunk_size or n_train not a positive integer.
  """
  n_train = _check_count("n_train", n_train)
  chunk_size = _check_count("chunk_size", chunk_size)
  ends = list(range(chunk_size, n_train, chunk_size)) + [n_train]
  return _from_bounds(n_train, seed, ends)


def chunks(n_train: int, n_chunks: int, seed: int) -> Schedule:
  """`n_chunks` equal random chunks of n_train // n_chunks examples, accumulating.

  Stage s holds chunks 0..s. The n_train % n_chunks examples left over (fewer
  than n_chunks) are dropped: they appear in no stage.

  Raises:
    ValueError: n_chunks not in [1, n_train], or n_train not positive.
  """
  n_train = _check_count("n_train", n_train)
  n_chunks = _check_count("n_chunks", n_chunks)
  if n_chunks > n_train:
    raise ValueError(
        f"n_chunks must be at most n_train ({n_train}), got {n_chunks}")
  size = n_train // n_chunks
  return _from_bounds(n_train, seed, [size * (s + 1) for s in range(n_chunks)])


_KINDS = {"two_phase": two_phase, "online": online, "chunks": chunks}


def make_schedule(kind: str, n_train: int, seed: int, **kwargs) -> Schedule:
  """The schedule `kind` ("two_phase", "online" or "chunks") with its keyword
  arguments, e.g. `make_schedule("two_phase", 4000, 0, fraction=0.5)`."""
  if kind not in _KINDS:
    raise ValueError(
        f"unknown schedule kind {kind!r}; known kinds: {', '.join(_KINDS)}")
  return _KINDS[kind](n_train, seed=seed, **kwargs)
