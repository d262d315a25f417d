"""Baselines of the DASH paper: layer reset and the L2-init penalty.

Shin et al., "DASH: Warm-Starting Neural Network Training in Stationary
Settings without Loss of Plasticity", NeurIPS 2024. Official code:
baekrok/DASH-Direction-Aware-SHrinking (`reset`: models/*.py `fc_reset`;
`l2_init`: utils/train_utils.py `l2_init`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from wsjax.transforms import base
from wsjax.transforms import groups

# Leaves the official `l2_init` regularizes: every module's `.weight`, i.e.
# conv/dense kernels and norm-layer scales (no biases, no running stats).
L2_INIT_ROLES = (groups.KERNEL, groups.NORM_SCALE)


def _matches(path: tuple[str, ...], name: str) -> bool:
  """True if `name` ('Dense_0' or 'block/Dense_0') is a contiguous run of path
  components."""
  parts = tuple(p for p in name.split("/") if p)
  n = len(parts)
  return n > 0 and any(path[i:i + n] == parts
                       for i in range(len(path) - n + 1))


def reset_layers(names: str | Sequence[str],
                 init_fn: Callable[[jax.Array], Any], *,
                 key=None) -> optax.GradientTransformation:
  """Re-initializes the named layers; the `reset` baseline of the DASH code.

      theta_l <- theta_fresh_l   for layers l named in `names`,
      theta_fresh = init_fn(key)

  Every trainable leaf whose path contains one of `names` as whole components
  ('Dense_0' matches 'params/Dense_0/kernel' but not 'Dense_01/kernel';
  'head/Dense_0' a nested layer) takes its value from a fresh draw of the
  model's initializer; all other leaves and all running statistics are
  unchanged. The official code resets the classifier (`self.fc.apply(
  reset_parameters)`, Conv/Linear/BatchNorm modules inside it) after each
  chunk.

  Args:
    names: a layer name or several.
    init_fn: `key -> params` with the same tree structure as the params.
    key: a PRNG key or an int (required), split on every update; the fresh
      draw is `init_fn(sub)`, `key, sub = split(key)`.

  Raises:
    ValueError (at update) if no leaf matches any name.
  """
  names = (names,) if isinstance(names, str) else tuple(names)
  if not names:
    raise ValueError("reset_layers: give at least one layer name.")
  base.require_key(key, "reset_layers")

  def init(params):
    del params
    return base.PRNGState(base.init_key(key))

  def update(updates, state, params=None):
    base.require_params(params, "reset_layers")
    _, infos, _ = groups.flatten(params)
    if not any(_matches(i.path, n) for i in infos for n in names):
      layers = sorted({"/".join(i.path[:-1]) for i in infos})
      raise ValueError(
          f"reset_layers: no parameter path contains any of {list(names)}; "
          f"layers are {layers}.")
    state, sub = base.split_state(state)
    fresh = init_fn(sub)

    def f(info, p, u, fr):
      if info.role in groups.TRAINABLE and any(
          _matches(info.path, n) for n in names):
        return (fr - p).astype(p.dtype)
      return u

    return groups.map_leaves(f, params, updates, fresh), state

  return optax.GradientTransformation(init, update)


def l2_init_penalty(params, init_params, coef: float = 1e-2, *,
                    roles: Sequence[str] = L2_INIT_ROLES,
                    square_of_sum: bool = True) -> jax.Array:
  """The `l2_init` baseline's regularizer, to add inside a loss function.

  As the official code computes it (default):

      coef * (sum_l ||W_l - W_init_l||_2)^2

  over every layer's weight: conv/dense kernels AND norm-layer scales (the
  code sums `(m.weight - m0.weight).norm()` over all modules that have a
  `weight`, then squares the sum); biases and running statistics are left out.
  With `square_of_sum=False` it is the textbook L2-init penalty
  `coef * sum_l ||W_l - W_init_l||^2`; `roles` picks the leaves (any of
  `groups.KERNEL, BIAS, NORM_SCALE, NORM_BIAS, OTHER`), e.g.
  `roles=(KERNEL, BIAS)` for conv/dense weights and biases only.

  Norms are `optax.safe_norm(., 0)`, so the gradient at `W == W_init` is 0
  (as PyTorch's norm backward), not NaN.
  """
  bad = set(roles) - set(groups.TRAINABLE)
  if bad:
    raise ValueError(
        f"l2_init_penalty: unknown roles {sorted(bad)}; use some of "
        f"{list(groups.TRAINABLE)}.")
  leaves, infos, treedef = groups.flatten(params)
  init_leaves = treedef.flatten_up_to(init_params)
  norms = [optax.safe_norm((p - jax.lax.stop_gradient(p0)).ravel(), 0.0)
           for info, p, p0 in zip(infos, leaves, init_leaves)
           if info.role in roles]
  if not norms:
    return jnp.zeros((), jnp.float32)
  norms = jnp.stack(norms)
  reg = jnp.sum(norms) ** 2 if square_of_sum else jnp.sum(norms ** 2)
  return coef * reg
