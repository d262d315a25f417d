"""Linear interpolation between networks, loss/error along the line, barriers.

The straight line between two networks of one architecture,

    theta(alpha) = (1 - alpha) * theta_a + alpha * theta_b,   alpha in [0, 1],

evaluated at evenly spaced alphas (both endpoints included) on the train and
test splits, and its barrier

    barrier(f) = max_alpha f(alpha) - (f(0) + f(1)) / 2

for f = error (1 - accuracy) or loss. Two uses in wsjax:

- Instability analysis (Frankle, Dziugaite, Roy & Carbin, "Linear Mode
  Connectivity and the Lottery Ticket Hypothesis", ICML 2020; used by
  Frankle, Schwab & Morcos, ICLR 2020): from one state at step k, copies
  trained to the end with different data orders; the instability of the
  state is the error barrier between their final weights (about 30 alphas,
  `INSTABILITY_POINTS`), averaged over pairs of copies (`pairwise_barriers`).
  A run is "stable" at k when it is near zero (about 2%).
- Git Re-Basin (Ainsworth, Hayase & Srinivasa, ICLR 2023;
  samuela/git-re-basin): the loss barrier between a network and another one
  permuted to match it, at 25 alphas (`REBASIN_POINTS`).

BatchNorm: an interpolated network has no valid running statistics, so by
default they are recomputed at every point from the training inputs with one
pass in train mode (`wsjax.analysis.batchnorm`; PAPERS.md sections 3-5).
`recompute_bn=False` interpolates the endpoints' statistics instead (the
naive variant that REPAIR shows to fail).

The points of a path (and of all pairs' paths) are evaluated as replicas of
one compiled program, `chunk_size` at a time: the last chunk is padded by
repeating its last point, so one program serves any number of points, and
points of many pairs are built chunk by chunk from the endpoints (memory
O(chunk_size) networks, not points x pairs).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wsjax import tree as wtree
from wsjax.analysis import batchnorm
from wsjax.analysis import evaluation

INSTABILITY_POINTS = 30  # Frankle et al. 2020: about 30 alphas, 0 and 1 included
REBASIN_POINTS = 25      # Ainsworth et al. 2023 (git-re-basin's plots)
DEFAULT_CHUNK_SIZE = 8
METRICS = ("train_loss", "train_error", "test_loss", "test_error")


def alphas(n_points: int) -> np.ndarray:
  """`n_points` evenly spaced alphas from 0 to 1 inclusive, float32."""
  if not isinstance(n_points, (int, np.integer)) or n_points < 2:
    raise ValueError(f"n_points must be an int >= 2 (the two endpoints at least), got {n_points!r}")
  return np.linspace(0.0, 1.0, int(n_points), dtype=np.float32)


def _check_float(tree):
  for name, leaf in wtree.named_leaves(tree):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(f"cannot interpolate leaf {name!r} of dtype {jnp.result_type(leaf)}; "
                       f"pass floating-point trees (params, batch_stats)")


def _check_pair(a, b):
  problems = wtree.mismatches(a, b, "first network", "second network")
  if problems:
    raise ValueError("the two networks differ: " + "; ".join(problems))
  _check_float(a)


def _mix(x, y, alpha):
  """(1 - alpha) x + alpha y, exact at alpha 0 and 1, in x's dtype; alpha
  broadcasts against the leading axis of x and y."""
  alpha = alpha.reshape(alpha.shape + (1,) * (jnp.ndim(x) - alpha.ndim))
  return ((1 - alpha) * x + alpha * y).astype(jnp.result_type(x))


@jax.jit
def _interpolate(a, b, alpha):
  return jax.tree.map(lambda x, y: _mix(x[None], y[None], alpha), a, b)


def interpolate(a, b, alphas):
  """The points `(1 - alpha) a + alpha b` for every alpha, stacked.

  Args:
    a, b: two trees of the same structure and shapes (params, or whole
      variables), floating point.
    alphas: (P,) values (any reals; [0, 1] is the segment).

  Returns:
    The tree with a leading axis of size P on every leaf (the points as
    replicas); leaf dtypes kept. Exactly `a` at alpha 0 and `b` at alpha 1.
  """
  _check_pair(a, b)
  alphas = jnp.asarray(alphas, jnp.float32)
  if alphas.ndim != 1:
    raise ValueError(f"alphas must be a 1-D array, got shape {alphas.shape}")
  return _interpolate(a, b, alphas)


def barrier(values, axis: int = -1):
  """max along the path minus the mean of the path's two endpoints.

  `values` holds f(alpha_0 = 0), ..., f(alpha_{P-1} = 1) along `axis` (any
  leading batch axes, e.g. (pairs, points)); returns
  `max_p values[..., p] - (values[..., 0] + values[..., P-1]) / 2`, shaped
  like `values` without `axis`. Frankle et al. (2020)'s error barrier for
  f = error; Git Re-Basin's loss barrier for f = loss. Zero for a flat path,
  never negative.
  """
  v = jnp.moveaxis(jnp.asarray(values), axis, -1)
  if v.shape[-1] < 2:
    raise ValueError(f"a path needs at least 2 points (its endpoints), got {v.shape[-1]}")
  return jnp.max(v, axis=-1) - 0.5 * (v[..., 0] + v[..., -1])


def _as_variables(tree) -> dict:
  """`{"params": ..., ...}` from a variables dict or a bare params tree."""
  if isinstance(tree, Mapping) and "params" in tree:
    return dict(tree)
  return {"params": tree}


def _split_arrays(data):
  """(x_train, y_train, x_test, y_test) from a `wsjax.data.Dataset` (or
  anything with those attributes) or a 4-tuple."""
  if all(hasattr(data, k) for k in ("x_train", "y_train", "x_test", "y_test")):
    return data.x_train, data.y_train, data.x_test, data.y_test
  if isinstance(data, (tuple, list)) and len(data) == 4:
    return tuple(data)
  raise ValueError("data must be a wsjax.data.Dataset or a tuple (x_train, y_train, x_test, y_test)")


def _evaluate_points(model, make_chunk: Callable[[np.ndarray], dict], n_total: int,
                     x_train, y_train, x_test, y_test, *, batch_norm: bool,
                     batch_size: int, bn_batch_size: int, bn_weighting: str,
                     chunk_size: int) -> dict[str, np.ndarray]:
  """Metrics of `n_total` points built `chunk_size` at a time by
  `make_chunk(indices)` (a stacked variables tree, one replica per index)."""
  n_chunks = -(-n_total // chunk_size)
  index = np.minimum(np.arange(n_chunks * chunk_size), n_total - 1)  # pad: repeat the last
  out = {m: [] for m in METRICS}
  for c in range(n_chunks):
    variables = make_chunk(index[c * chunk_size:(c + 1) * chunk_size])
    if batch_norm:
      variables["batch_stats"] = batchnorm.recompute_batch_stats(
          model, variables["params"], x_train, batch_size=bn_batch_size, weighting=bn_weighting)
    for split, (x, y) in (("train", (x_train, y_train)), ("test", (x_test, y_test))):
      res = evaluation.evaluate(model, variables, x, y, batch_size=batch_size)
      out[f"{split}_loss"].append(res["loss"])
      out[f"{split}_error"].append(1.0 - res["acc"])
  return {m: np.concatenate([np.asarray(v) for v in vals])[:n_total].astype(np.float32)
          for m, vals in out.items()}


def _prepare(model, variables: dict, x_train, y_train, x_test, y_test, recompute_bn: bool,
             bn_weighting: str, chunk_size: int):
  """Validates the inputs; returns (variables to build points from, whether
  to recompute BatchNorm, device arrays)."""
  batchnorm._check_weighting(bn_weighting)
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  evaluation.check_split(x_train, y_train, "train split")
  evaluation.check_split(x_test, y_test, "test split")
  one = batchnorm.first_replica_shapes(variables["params"])
  has_bn = batchnorm.has_batch_norm(model, one, np.shape(x_train)[1:])
  if has_bn and recompute_bn:
    variables = {k: v for k, v in variables.items() if k != "batch_stats"}
  elif has_bn and "batch_stats" not in variables:
    raise ValueError("the model has BatchNorm but no batch_stats were given; pass variables "
                     "with batch_stats or recompute_bn=True")
  # On device once: every chunk gathers from these.
  variables = jax.tree.map(jnp.asarray, variables)
  arrays = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
  return variables, has_bn and recompute_bn, arrays


def evaluate_path(model, points, x_train, y_train, x_test, y_test, *,
                  recompute_bn: bool = True,
                  batch_size: int = evaluation.DEFAULT_BATCH_SIZE,
                  bn_batch_size: int = batchnorm.DEFAULT_BATCH_SIZE,
                  bn_weighting: str = "batches",
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, np.ndarray]:
  """Loss and error on train and test at every point of a path.

  Args:
    model: a Linen module (`model.apply(vars, x, train=...)`).
    points: stacked networks, a leading axis of size P on every leaf:
      `{"params": ..., ["batch_stats": ...]}` or a bare params tree (e.g.
      `interpolate(a, b, alphas(30))`).
    x_train, y_train, x_test, y_test: whole splits (host or device).
    recompute_bn: for a model with BatchNorm, recompute every point's running
      statistics from `x_train` (one pass, batches of `bn_batch_size`,
      `bn_weighting` as in `batchnorm.recompute_batch_stats`); False uses
      the points' own `batch_stats`. No effect without BatchNorm.
    batch_size: evaluation batch size.
    chunk_size: points evaluated together as replicas of one program.

  Returns:
    `{"train_loss", "train_error", "test_loss", "test_error"}`, each (P,)
    float32 numpy: mean cross-entropy and 1 - accuracy.
  """
  variables = _as_variables(points)
  n_total = evaluation.replica_count(variables, "points")
  variables, bn, arrays = _prepare(model, variables, x_train, y_train, x_test, y_test,
                                   recompute_bn, bn_weighting, chunk_size)
  return _evaluate_points(
      model, lambda idx: _take(variables, idx), n_total, *arrays, batch_norm=bn,
      batch_size=batch_size, bn_batch_size=bn_batch_size, bn_weighting=bn_weighting,
      chunk_size=chunk_size)


@jax.jit
def _take(tree, idx):
  """The replicas `idx` of a stacked tree."""
  return jax.tree.map(lambda leaf: leaf[idx], tree)


@jax.jit
def _pair_points(finals, first, second, alpha):
  """Points (1 - alpha_p) finals[first_p] + alpha_p finals[second_p]."""
  return jax.tree.map(lambda leaf: _mix(leaf[first], leaf[second], alpha), finals)


def pairwise_barriers(model, finals, data, *, n_points: int = INSTABILITY_POINTS,
                      recompute_bn: bool = True,
                      batch_size: int = evaluation.DEFAULT_BATCH_SIZE,
                      bn_batch_size: int = batchnorm.DEFAULT_BATCH_SIZE,
                      bn_weighting: str = "batches",
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
  """Paths and barriers between every pair i < j of N networks.

  The instability of a state at step k (Frankle et al. 2020) is the mean
  test-error barrier over pairs of copies trained from it with different data
  orders: `result["mean_barriers"]["test_error"]`.

  Args:
    model: a Linen module.
    finals: N >= 2 networks stacked on a leading axis: variables
      `{"params": ..., ["batch_stats": ...]}` or bare params.
    data: a `wsjax.data.Dataset` or `(x_train, y_train, x_test, y_test)`.
    n_points: alphas per path, evenly spaced in [0, 1] with both endpoints.
    recompute_bn, batch_size, bn_batch_size, bn_weighting, chunk_size: as in
      `evaluate_path`; the chunks hold points of any pairs.

  Returns:
    `{"alphas": (P,), "pairs": [(i, j), ...] in lexicographic order,
      metric: (n_pairs, P) for each of METRICS,
      "barriers": {metric: (n_pairs,)}, "mean_barriers": {metric: float}}`,
    numpy arrays and floats.
  """
  a = alphas(n_points)
  variables = _as_variables(finals)
  n = evaluation.replica_count(variables, "finals")
  if n < 2:
    raise ValueError(f"pairwise barriers need at least 2 networks, got {n}")
  _check_float(variables)
  variables, bn, arrays = _prepare(model, variables, *_split_arrays(data), recompute_bn,
                                   bn_weighting, chunk_size)
  pairs = list(itertools.combinations(range(n), 2))
  first = np.repeat([i for i, _ in pairs], len(a)).astype(np.int32)
  second = np.repeat([j for _, j in pairs], len(a)).astype(np.int32)
  alpha = np.tile(a, len(pairs))

  def make_chunk(idx):
    return _pair_points(variables, first[idx], second[idx], alpha[idx])

  flat = _evaluate_points(model, make_chunk, len(alpha), *arrays, batch_norm=bn,
                          batch_size=batch_size, bn_batch_size=bn_batch_size,
                          bn_weighting=bn_weighting, chunk_size=chunk_size)
  result: dict[str, Any] = {"alphas": a, "pairs": pairs}
  result.update({m: v.reshape(len(pairs), len(a)) for m, v in flat.items()})
  result["barriers"] = {m: np.asarray(barrier(result[m])) for m in METRICS}
  result["mean_barriers"] = {m: float(np.mean(b)) for m, b in result["barriers"].items()}
  return result


def line_barriers(model, a, b, data, *, n_points: int = INSTABILITY_POINTS,
                  **options) -> dict[str, Any]:
  """The path from network `a` to network `b` and its barriers.

  `a`, `b`: one network each (no replica axis), variables or bare params;
  `data`, `n_points` and the keyword `options` (recompute_bn, batch_size,
  bn_batch_size, bn_weighting, chunk_size) as in `pairwise_barriers`. Returns
  `{"alphas": (P,), metric: (P,) for each of METRICS,
    "barriers": {metric: float}}`.
  """
  a, b = _as_variables(a), _as_variables(b)
  _check_pair(a, b)
  stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
  result = pairwise_barriers(model, stacked, data, n_points=n_points, **options)
  out: dict[str, Any] = {"alphas": result["alphas"]}
  out.update({m: result[m][0] for m in METRICS})
  out["barriers"] = {m: float(result["barriers"][m][0]) for m in METRICS}
  return out


__all__ = [
    "INSTABILITY_POINTS", "METRICS", "REBASIN_POINTS", "alphas", "barrier", "evaluate_path",
    "interpolate", "line_barriers", "pairwise_barriers",
]
