"""Shrink-and-perturb: scale the weights down and add fresh randomness.

Two variants:

- `shrink_perturb`: Ash & Adams, "On the Difficulty of Warm-Starting Neural
  Network Training", NeurIPS 2020 (code: JordanAsh/warm_start, run.py,
  `shrink_perturb`). The perturbation is a fresh draw of the model's own
  initializer, and every parameter is touched.
- `gaussian_shrink_perturb`: the `sp` baseline of the DASH code (Shin et al.,
  NeurIPS 2024; baekrok/DASH-Direction-Aware-SHrinking, models/*.py,
  `weight_sp`): isotropic Gaussian noise on conv/dense weights and biases only.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from wsjax.transforms import base
from wsjax.transforms import groups


def shrink_perturb(shrink: float = 0.4, perturb: float = 0.1,
                   init_fn: Callable[[jax.Array], Any] | None = None, *,
                   key=None) -> optax.GradientTransformation:
  """Ash & Adams (2020) shrink-and-perturb with a fresh initialization.

      theta <- shrink * theta + perturb * theta_fresh,
      theta_fresh = init_fn(key)

  applied to every parameter: conv/dense kernels and biases, norm scales and
  offsets, anything else that is trainable. `theta_fresh` is a new draw from
  the model's own initializer (not isotropic noise), as in the official
  `shrink_perturb(net, shrink, perturb)`, which builds a new network and mixes
  it in parameter by parameter. Running statistics (Linen `batch_stats`, NNX
  `nnx.BatchStat`) are left alone: the official code's fresh network also
  brings fresh BatchNorm statistics, which is the caller's choice to copy.
  `shrink=1, perturb=0` is a plain warm start; `shrink=0, perturb=1` a cold
  start from `init_fn(key)`. Defaults 0.4 / 0.1 (the paper's README).

  Args:
    shrink: factor on the current parameters.
    perturb: factor on the fresh initialization.
    init_fn: `key -> params`, a fresh draw with the same tree structure as
      the params this transform is applied to, e.g.
      `lambda k: model.init(k, x)['params']` (Linen) or
      `lambda k: nnx.state(Model(rngs=nnx.Rngs(k)), nnx.Param)` (NNX).
    key: a PRNG key or an int (required); every update splits it,
      `key, sub = split(key)`, and draws `init_fn(sub)`, so repeated
      applications draw fresh initializations.

  Returns:
    A transform whose `update(updates, state, params)` returns
    `shrink * (params + updates) + perturb * theta_fresh - params`.
  """
  if init_fn is None:
    raise ValueError(
        "shrink_perturb needs init_fn (key -> a fresh draw of the model's "
        "params, e.g. lambda k: model.init(k, x)['params']); for isotropic "
        "noise use gaussian_shrink_perturb.")
  base.require_key(key, "shrink_perturb")

  def init(params):
    del params
    return base.PRNGState(base.init_key(key))

  def update(updates, state, params=None):
    base.require_params(params, "shrink_perturb")
    state, sub = base.split_state(state)
    fresh = init_fn(sub)

    def f(info, p, u, fr):
      if info.role not in groups.TRAINABLE:
        return u
      new = shrink * (p + u) + perturb * fr
      return (new - p).astype(p.dtype)

    return groups.map_leaves(f, params, updates, fresh), state

  return optax.GradientTransformation(init, update)


def gaussian_shrink_perturb(shrink: float = 0.3, sigma: float = 0.01, *,
                            key=None) -> optax.GradientTransformation:
  """The DASH code's `sp` baseline: shrink, then add isotropic Gaussian noise.

      W <- shrink * W + N(0, sigma^2)     for conv/dense kernels and biases

  Norm-layer parameters, running statistics and other leaves are untouched
  (the official `weight_sp` visits only `nn.Conv2d`/`nn.Linear` modules).
  Defaults: shrink (the code's `sp_lambda`) 0.3, sigma 0.01.

  Draws: each update splits the state's key, `key, sub = split(key)`, and a
  leaf's noise is `sigma * normal(groups.leaf_key(sub, leaf), shape, dtype)`,
  keyed by the leaf's path name; identical keys give identical draws, on
  Linen and NNX trees alike. `key` (a PRNG key or an int) is required.
  """
  base.require_key(key, "gaussian_shrink_perturb")

  def init(params):
    del params
    return base.PRNGState(base.init_key(key))

  def update(updates, state, params=None):
    base.require_params(params, "gaussian_shrink_perturb")
    state, sub = base.split_state(state)

    def f(info, p, u):
      if info.role not in groups.LAYER_WEIGHTS:
        return u
      noise = sigma * jax.random.normal(
          groups.leaf_key(sub, info), p.shape, p.dtype)
      new = shrink * (p + u) + noise
      return (new - p).astype(p.dtype)

    return groups.map_leaves(f, params, updates), state

  return optax.GradientTransformation(init, update)
