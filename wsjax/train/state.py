"""The training state: one explicit pytree per model (or per stack of seeds).

`TrainState` holds everything a step reads and writes: parameters, BatchNorm
running statistics, optimizer state, the step count and a PRNG key. Train and
eval steps are pure functions of it (see `wsjax.train.steps`). Independent
seeds are a `TrainState` whose every leaf has a leading seed axis; they run
side by side under `jax.vmap`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from wsjax.models import make_init_fn

PyTree = Any


@flax.struct.dataclass
class TrainState:
  params: PyTree
  batch_stats: PyTree  # {} for models without BatchNorm
  opt_state: PyTree
  step: jax.Array      # int32 scalar: optimizer steps taken in this state
  rng: jax.Array       # uint32[2] raw PRNG key (checkpoint friendly)

  @property
  def variables(self) -> dict:
    """The Flax variables dict `{'params', ['batch_stats']}` for `apply`."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


InitFn = Callable[[jax.Array], dict]


# `key -> variables`, a fresh draw of the model's own initializer
# (`{'params'[, 'batch_stats']}`): the models' own `make_init_fn`.
make_variables_init = make_init_fn


def create_state(init_variables: InitFn, tx: optax.GradientTransformation,
                 key: jax.Array) -> TrainState:
  """A fresh state for one seed: new init, new optimizer state, step 0."""
  init_key, rng = jax.random.split(key)
  variables = init_variables(init_key)
  params = variables["params"]
  return TrainState(params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32),
                    rng=rng)


def seed_keys(seeds: Sequence[int], stage: int, salt: int = 0) -> jax.Array:
  """Raw uint32 keys, one per seed, a pure function of (seed, stage, salt)."""
  keys = [jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s), stage), salt)
          for s in seeds]
  return jnp.stack(keys)
