"""The training state: one explicit pytree per model, or per stack of replicas.

`TrainState` holds everything a step reads and writes: parameters, BatchNorm
running statistics, optimizer state, the step (the run's global iteration,
which the learning-rate schedule reads), a PRNG key, and per-replica
hyperparameters (`hparams`, e.g. `{"lr": x}` for a learning-rate sweep; empty
for a run with one setting). Train and eval steps are pure functions of it.
Independent replicas (seeds, copies with other data orders, sweep cells) are a
`TrainState` whose every leaf has a leading replica axis; they run side by
side under `jax.vmap`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  params: PyTree
  batch_stats: PyTree  # {} for models without BatchNorm
  opt_state: PyTree
  step: jax.Array      # int32 scalar: the global iteration (the schedule's position)
  rng: jax.Array       # uint32[2] raw PRNG key (checkpoint friendly)
  hparams: PyTree = dataclasses.field(default_factory=dict)  # per-replica values, e.g. {"lr": x}

  @property
  def variables(self) -> dict:
    """The Flax variables dict `{'params', ['batch_stats']}` for `apply`."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


InitFn = Callable[[jax.Array], dict]


def create_state(init_variables: InitFn, tx: optax.GradientTransformation,
                 key: jax.Array, hparams: PyTree | None = None) -> TrainState:
  """A fresh state for one replica: new init, new optimizer state, step 0.

  `key` is split into the init key and the state's own key (dropout,
  augmentation, a task's draws): `init_key, rng = split(key)`."""
  init_key, rng = jax.random.split(key)
  variables = init_variables(init_key)
  params = variables["params"]
  return TrainState(params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32),
                    rng=rng,
                    hparams=dict(hparams or {}))


def seed_keys(seeds: Sequence[int], *salt: int) -> jax.Array:
  """Raw uint32 keys, one per seed: `fold_in(... fold_in(PRNGKey(seed), salt_0) ..., salt_n)`.

  A pure function of (seed, *salt), e.g. (seed, stage, 0) for a staged
  study's fresh initialization of a stage. Computed in one jitted program."""
  # host arrays in: no eager conversion programs
  return _seed_keys(np.asarray(list(seeds), np.uint32), np.asarray(list(salt), np.uint32))


@jax.jit
def _seed_keys(seeds, salt):
  def one(seed):
    key = jax.random.PRNGKey(seed)
    for i in range(salt.shape[0]):
      key = jax.random.fold_in(key, salt[i])
    return key
  return jax.vmap(one)(seeds)


def replicate(tree, n: int):
  """Stacks `n` copies of a one-replica tree (a leading replica axis)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n, *jnp.shape(x))), tree)


def unstack(tree, i: int):
  """Replica `i` of a stacked tree."""
  return jax.tree.map(lambda x: x[i], tree)


def num_replicas(tree) -> int:
  """The size of the leading replica axis of a stacked tree."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError("an empty tree has no replica axis")
  return int(jnp.shape(leaves[0])[0])
