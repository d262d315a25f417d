"""Shared pieces of the warm-start transforms: seeded state, one-call apply.

Every warm-start transform is an `optax.GradientTransformation` whose
`update(updates, state, params)` returns parameter DELTAS:
`optax.apply_updates(params, deltas)` is the transformed parameters.

Composition. Except DASH (whose incoming `updates` are loss gradients), the
transforms read the incoming `updates` as deltas accumulated so far (zeros when
a transform is applied alone) and act on the current parameters
`params + updates`; they return `T(params + updates) - params`. So
`optax.chain(t1, t2)` applies t1 then t2, and leaves a transform does not touch
keep their incoming delta. `optax.masked(t, mask)` passes the incoming updates
of masked-out leaves through unchanged: with zero incoming deltas those leaves
stay as they are. (For DASH, whose incoming updates are gradients, mask with
`optax.multi_transform({'dash': dash(), 'keep': optax.set_to_zero()}, labels)`
or put it first in a chain.)
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class PRNGState(NamedTuple):
  """State of a random transform: a PRNG key, split on every update."""
  key: jax.Array


def init_key(seed) -> jax.Array:
  """`seed` is an int (-> `jax.random.PRNGKey(seed)`) or already a key."""
  if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
    return jax.random.PRNGKey(int(seed))
  return jnp.asarray(seed)


def split_state(state: PRNGState) -> tuple[PRNGState, jax.Array]:
  """Returns the next state and a fresh subkey for this update's draws."""
  key, sub = jax.random.split(state.key)
  return PRNGState(key), sub


def require_params(params, name: str):
  if params is None:
    raise ValueError(
        f"{name}: update() needs params (call tx.update(updates, state, "
        "params)); the transform acts on the parameters' values.")


def apply_transform(tx: optax.GradientTransformation, params, grads=None):
  """init + update + apply_updates in one call; returns the new parameters.

  `grads` are the incoming updates: loss gradients for DASH, otherwise left
  None (zeros of `params`' structure).
  """
  state = tx.init(params)
  if grads is None:
    grads = jax.tree.map(jnp.zeros_like, params)
  deltas, _ = tx.update(grads, state, params)
  return optax.apply_updates(params, deltas)
