"""Freezing chosen leaves for the first steps of training.

Gotmare, Keskar, Xiong & Socher ("A Closer Look at Deep Learning Heuristics:
Learning rate restarts, Warmup and Distillation", ICLR 2019, PAPERS.md
section 4) explain learning-rate warm-up as a guard on the deeper layers: in
large-batch training without warm-up the deeper layers' representations
change the most early on, and freezing the last layers for the warm-up's
duration, at the full learning rate, has an effect similar to warm-up. This
is that control as an optax transform:

    freeze(mask, until)        updates of leaves with mask True are 0 while step < until
    frozen_optimizer(cfg, horizon, mask, until)
                               freeze(...) -> make_optimizer(cfg) -> freeze(...)

`freeze` reads the global step passed by the training core
(`update(..., step=s)`, as `wsjax.core.optim.scale_by_step_schedule`), or,
without it, its own update count. `frozen_optimizer` zeroes the frozen
leaves' gradients before the optimizer, so their momentum (or Adam moments)
only ever sees the coupled weight-decay term while frozen (nothing at all
with weight decay 0), and zeroes their final updates after it, so they do not
move at all until `until`; from then on they train like the rest.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from wsjax.core.optim import OptimizerConfig, make_optimizer


class FreezeState(NamedTuple):
  count: jax.Array  # updates made (used when no global step is passed)


def freeze(mask: Any, until: int) -> optax.GradientTransformationExtraArgs:
  """Zeroes the updates of every leaf whose `mask` entry is True while the
  step is below `until` (`mask`: a tree of Python bools shaped like the
  params); other leaves, and every leaf from step `until` on, pass through."""
  until = int(until)
  if until < 0:
    raise ValueError(f"freeze: until must be a step >= 0, got {until}")

  def init(params):
    del params
    return FreezeState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, step=None, **extra):
    del params, extra
    now = state.count if step is None else step
    frozen = jnp.asarray(now) < until
    updates = jax.tree.map(
        lambda u, m: jnp.where(frozen, jnp.zeros_like(u), u) if m else u, updates, mask)
    return updates, FreezeState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def frozen_optimizer(cfg: OptimizerConfig, horizon: Optional[int], mask: Any,
                     until: int) -> optax.GradientTransformationExtraArgs:
  """`make_optimizer(cfg, horizon)` with the leaves in `mask` frozen for the
  first `until` global steps (see the module docstring)."""
  return optax.chain(freeze(mask, until), make_optimizer(cfg, horizon), freeze(mask, until))


__all__ = ["FreezeState", "freeze", "frozen_optimizer"]
