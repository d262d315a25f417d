"""Plasticity diagnostics: dead ReLUs, parameter norms and distances, cosine
histograms. Pure JAX (jittable); results are 0-d arrays, `float()` them.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

OVERALL = "overall"


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _named_activations(activations) -> dict[str, jax.Array]:
  """Flattens a sown 'activations' collection into {layer name: array}."""
  if isinstance(activations, Mapping) and set(activations) == {"activations"}:
    activations = activations["activations"]
  flat = jax.tree_util.tree_flatten_with_path(
      activations, is_leaf=lambda x: isinstance(x, tuple))[0]
  named = {}
  for path, value in flat:
    name = "/".join(_key_name(k) for k in path)
    # A sown value is a tuple with one array per call of `sow`.
    values = value if isinstance(value, tuple) else (value,)
    for i, a in enumerate(values):
      named[name if len(values) == 1 else f"{name}/{i}"] = a
  return named


def dead_relu_fraction(activations) -> dict[str, jax.Array]:
  """Fraction of dead units per sown layer, and overall.

  A unit (last axis) is dead if its activation is <= 0 on every example and
  every spatial position of the batch: for an array `(N, ..., units)`,
  `dead_u = all(a[..., u] <= 0)`. Per layer: `mean_u dead_u`; `'overall'`:
  dead units over all units of all layers.

  Args:
    activations: the 'activations' collection of
      `model.apply(vars, x, train=False, mutable=['activations'])`, i.e.
      `{'activations': {...: (array,)}}` or its inner dict; each sown value a
      tuple of arrays `(N, ..., units)`.

  Returns:
    `{layer name: fraction}` plus `{'overall': fraction}` (0-d float32).
  """
  named = _named_activations(activations)
  out = {}
  dead_total = jnp.zeros((), jnp.float32)
  units_total = 0
  for name, a in named.items():
    dead = jnp.all(a.reshape(-1, a.shape[-1]) <= 0, axis=0)
    out[name] = jnp.mean(dead.astype(jnp.float32))
    dead_total = dead_total + jnp.sum(dead.astype(jnp.float32))
    units_total += a.shape[-1]
  out[OVERALL] = dead_total / max(units_total, 1)
  return out


def _float_leaves(tree):
  return [jnp.asarray(x) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]


def param_norm(params) -> jax.Array:
  """Global L2 norm over all floating-point leaves: sqrt(sum_i ||p_i||^2)."""
  total = jnp.zeros((), jnp.float32)
  for x in _float_leaves(params):
    total = total + jnp.sum(jnp.square(x.astype(jnp.float32)))
  return jnp.sqrt(total)


def param_distance(a, b) -> jax.Array:
  """Global L2 distance between two trees of the same structure:
  sqrt(sum_i ||a_i - b_i||^2) over floating-point leaves."""
  diff = jax.tree.map(lambda x, y: jnp.asarray(x) - jnp.asarray(y), a, b)
  return param_norm(diff)


def cosine_histograms(cosines_per_layer: Mapping[str, jax.Array],
                      bins=20) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Histograms of per-group cosines (e.g. from `wsjax.transforms.
  dash_cosines`), per layer and over all layers (`'overall'`).

  Args:
    cosines_per_layer: `{name: array of cosines}` (any shapes).
    bins: number of equal bins on [-1, 1], or an array of bin edges.

  Returns:
    `{name: (counts, edges)}`; the same edges for every entry.
  """
  if isinstance(bins, (int, np.integer)):
    edges = jnp.linspace(-1.0, 1.0, int(bins) + 1)
  else:
    edges = jnp.asarray(bins, jnp.float32)
  out = {}
  for name, c in cosines_per_layer.items():
    counts, _ = jnp.histogram(jnp.ravel(c), bins=edges)
    out[name] = (counts, edges)
  if cosines_per_layer:
    every = jnp.concatenate([jnp.ravel(c) for c in cosines_per_layer.values()])
    out[OVERALL] = (jnp.histogram(every, bins=edges)[0], edges)
  return out
