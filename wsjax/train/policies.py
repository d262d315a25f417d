"""Warm-start policies: how each stage after the first begins.

A policy maps the previous stage's final state (seed-stacked; `None` before
the first stage unless the run warm-starts from a checkpoint) and a fresh
initialization to the state the next stage trains from:

    state_{k+1}^0 = policy(state_k^final, fresh_{k+1}, context)

* `cold`: the fresh state (new init, new optimizer): the "random init" arm
  of Ash & Adams (2020) and DASH's `cold`.
* `warm`: keep params, BatchNorm statistics and optimizer state (DASH's
  `warm`).
* `warm_rm`: keep the model, reset the optimizer (DASH's `warm_rm`).

The transforms of `wsjax.transforms` (shrink-and-perturb, DASH, layer
resets) register further policies in `wsjax.train.methods`; each policy is a
plain function, so research code can pass its own.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import numpy as np

from wsjax.train.state import TrainState


@dataclasses.dataclass
class StageContext:
  """What a policy may read when preparing stage `stage`."""
  stage: int
  seeds: tuple[int, ...]
  tx: Any                          # the optax optimizer
  fresh: Callable[[], TrainState]  # fresh seed-stacked states for this stage
  data_x: jax.Array                # the whole training set (replicated)
  data_y: jax.Array
  arrivals: list[np.ndarray]       # indices that arrived at each stage <= `stage`
  n_stages: int                    # stages in the whole schedule
  model: Any
  stepper: Any                     # the compiled `Stepper`


Policy = Callable[[Optional[TrainState], StageContext], TrainState]


@functools.lru_cache(maxsize=None)
def vmapped_opt_init(tx):
  """`tx.init` over a leading seed axis, jitted once per optimizer."""
  return jax.jit(jax.vmap(tx.init))


def reset_opt_states(states: TrainState, tx) -> TrainState:
  """Fresh optimizer state for every seed's current params; step to 0."""
  opt_state = vmapped_opt_init(tx)(states.params)
  return states.replace(opt_state=opt_state, step=states.step * 0)


def cold(prev: Optional[TrainState], ctx: StageContext) -> TrainState:
  del prev
  return ctx.fresh()


def warm(prev: Optional[TrainState], ctx: StageContext) -> TrainState:
  return ctx.fresh() if prev is None else prev


def warm_rm(prev: Optional[TrainState], ctx: StageContext) -> TrainState:
  return ctx.fresh() if prev is None else reset_opt_states(prev, ctx.tx)
