"""Shared pieces of the warm-start transforms: keyed state, one-call apply.

Every warm-start transform is an `optax.GradientTransformation` whose
`update(updates, state, params)` returns parameter DELTAS:
`optax.apply_updates(params, deltas)` is the transformed parameters.

Composition. Every transform reads the incoming `updates` as the deltas
accumulated so far (zeros when a transform is applied alone) and acts on the
current parameters `params + updates`; it returns `T(params + updates) -
params`. So `optax.chain(t1, t2)` applies t1 then t2, in either order, and
leaves a transform does not touch keep their incoming delta. Inputs other
than the parameters come as extra arguments (optax's
`GradientTransformationExtraArgs`): DASH's loss gradient is
`update(updates, state, params, grads=g)`, which `optax.chain` passes to every
member that takes it. `optax.masked(t, mask)` passes the incoming updates of
masked-out leaves through unchanged.

Randomness. A random transform takes its PRNG key explicitly (`key=`, a key
or an int): its state holds the key, and every update splits it,
`key, sub = split(key)`, and draws with `sub`; there is no default seed.
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


def apply_transform(tx: optax.GradientTransformation, params, **extra_args):
  """init + update + apply_updates in one call, from zero incoming deltas;
  returns the new parameters. `extra_args` go to `update` (e.g. DASH's
  `grads=`)."""
  tx = optax.with_extra_args_support(tx)  # transforms without extra args ignore them
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  deltas, _ = tx.update(zeros, state, params, **extra_args)
  return optax.apply_updates(params, deltas)


def require_key(key, name: str):
  if key is None:
    raise ValueError(f"{name}: pass its PRNG key explicitly (key=jax.random.key(...) or an int); "
                     "random transforms have no default seed")
  return key
