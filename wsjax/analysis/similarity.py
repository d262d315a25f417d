"""Representation similarity: CCA, SVCCA, PWCCA and linear CKA.

Every measure compares two activation matrices of the same datapoints,
`x` of shape `(n, p)` and `y` of shape `(n, q)` (datapoints, neurons); turn
conv activations `(N, H, W, C)` / `(N, L, C)` into such a matrix with
`activation_matrix` first. The measures:

- `cca`: canonical correlation analysis (Hotelling 1936), as used on
  networks by Raghu et al. 2017 (SVCCA) and Gotmare et al. 2019: centre each
  side, whiten it with a small `epsilon` added to the covariance diagonal,
  SVD of the whitened cross-covariance; the singular values are the canonical
  correlations, their mean the summary. Invariant to invertible linear maps
  of either side.
- `svcca` (Raghu et al., NeurIPS 2017): each side first reduced to its top
  principal directions (99% of the variance, or the top k), then CCA.
- `pwcca` (Morcos, Raghu & Bengio, NeurIPS 2018): the canonical correlations
  weighted by how much of `x`'s activations each canonical direction
  accounts for.
- `linear_cka` (Kornblith et al., ICML 2019) and `linear_cka_debiased`
  (the unbiased HSIC estimator of Song et al., JMLR 2012, as in Nguyen,
  Raghu & Kornblith, ICLR 2021): invariant to orthogonal maps and isotropic
  scaling, not to arbitrary invertible maps.

`similarity(measure, x, y)` gives any of them as one number and
`batched_similarity(measure, xs, ys)` many pairs at once (leading pair axes,
one compiled program: vmapped on GPU/TPU, a loop on CPU): the heuristics
study compares every layer x snapshot pair of every replica.

Precision. Float32 by default; `dtype="float64"` runs the computation in
double precision under a scoped `jax.enable_x64()` (the context manager that
was `jax.experimental.enable_x64` in older JAX), which leaves the global
`jax_enable_x64` flag alone; a float64 call returns NumPy float64 arrays,
since a JAX float64 array would be truncated by the first `jnp` operation
outside that scope. Float64 needs concrete inputs (it cannot be switched on
inside someone else's `jit` or `vmap`); the float32 functions are pure and
can be jitted and vmapped (on CPU, prefer `batched_similarity` to a `vmap`
over many large pairs: see there). Matrix products use `Precision.HIGHEST` (no TF32
on GPUs: CCA's whitening amplifies rounding).

Reference code: google/svcca (`cca_core.py`, `pwcca.py`, `dft_ccas.py`),
NumPy, activations as (neurons, datapoints). It is written from the math here,
not from that code, which has known bugs: `dft_ccas.fourier_ccas` does not
run; `pwcca.compute_pwcca`, when it weights the second side, projects
`acts1` where it means `acts2`; `cca_core.robust_cca_similarity` passes
`threshold` and `compute_dirns` into the `epsilon` and `threshold`
positions of `get_cca_similarity`. Other differences are listed at each
function. DFT-CCA (per spatial frequency) is not implemented.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 1e-6
"""Default whitening regularizer and rank tolerance, relative to the largest
variance of a side (see `cca`)."""

KEEP = 0.99
"""SVCCA's default: keep the top directions explaining 99% of the variance."""

SPATIAL_MODES = ("positions", "pool")
MEASURES = ("cca", "svcca", "pwcca", "cka", "cka_debiased")
DTYPES = ("float32", "float64")

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Inputs.

def activation_matrix(activations, spatial: str = "positions") -> jax.Array:
  """Activations `(N, ..., C)` as a `(datapoints, neurons)` matrix.

  A 2-D array `(N, C)` is returned as it is. Conv activations `(N, H, W, C)`
  (or `(N, L, C)`, any number of spatial axes) become either

  - `"positions"`: every spatial position of every example a datapoint,
    `(N * H * W, C)` (the neurons are the C channels, shared over space;
    Raghu et al. 2017, svcca tutorial 002), or
  - `"pool"`: averaged over space, `(N, C)` (the tutorial's cheaper option).
  """
  if spatial not in SPATIAL_MODES:
    raise ValueError(f"unknown spatial mode {spatial!r}; choose 'positions' (every position a "
                     "datapoint) or 'pool' (average over space)")
  a = jnp.asarray(activations)
  if a.ndim < 2:
    raise ValueError(f"activations must be (datapoints, ..., neurons), got shape {a.shape}")
  if a.ndim == 2:
    return a
  if spatial == "pool":
    return jnp.mean(a, axis=tuple(range(1, a.ndim - 1)))
  return a.reshape(-1, a.shape[-1])


def _check_pair(x, y, min_points: int = 2) -> None:
  for label, a in (("x", x), ("y", y)):
    if np.ndim(a) != 2:
      raise ValueError(f"{label} must be a (datapoints, neurons) matrix, got shape {np.shape(a)}; "
                       "flatten conv activations with activation_matrix(acts, 'positions' or 'pool')")
  if np.shape(x)[0] != np.shape(y)[0]:
    raise ValueError(f"x and y must hold the same datapoints: x has {np.shape(x)[0]} rows, "
                     f"y has {np.shape(y)[0]}")
  if np.shape(x)[0] < min_points:
    raise ValueError(f"need at least {min_points} datapoints, got {np.shape(x)[0]}")
  if np.shape(x)[1] < 1 or np.shape(y)[1] < 1:
    raise ValueError(f"x and y need at least one neuron each, got shapes {np.shape(x)} and {np.shape(y)}")


def _check_epsilon(epsilon) -> float:
  if not isinstance(epsilon, (int, float, np.floating)) or not 0 <= float(epsilon) < 1:
    raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")
  return float(epsilon)


def _check_keep(keep, p: int, q: int, n: int) -> tuple[str, float | int]:
  """SVCCA's `keep` as (kind, value): a fraction in (0, 1] or a count of
  directions (the kind is static in the compiled program, the value is not)."""
  if isinstance(keep, (bool, np.bool_)):
    raise ValueError(f"keep must be a variance fraction in (0, 1] or a number of directions, got {keep!r}")
  if isinstance(keep, (int, np.integer)):
    most = min(p, q, n)
    if not 1 <= keep <= most:
      raise ValueError(f"svcca keep={keep} directions, but x has {p} neurons, y {q} and there are "
                       f"{n} datapoints: keep between 1 and {most} directions")
    return "count", int(keep)
  if isinstance(keep, (float, np.floating)) and 0 < keep <= 1:
    return "fraction", float(keep)
  raise ValueError(f"keep must be a variance fraction in (0, 1] or a number of directions, got {keep!r}")


def _check_dtype(dtype) -> str:
  try:
    name = np.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
  return name


@contextlib.contextmanager
def _precision(dtype: str, *arrays):
  """Runs the body at `dtype`; float64 under a scoped `jax.enable_x64()`."""
  if dtype == "float64":
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
      raise ValueError("dtype='float64' needs concrete arrays: call it outside jit/vmap "
                       "(the float32 default can be traced)")
    with jax.enable_x64(True):
      yield
  else:
    yield


def _run(kernel, dtype, arrays, *scalars, **static):
  """`kernel(*arrays, *scalars, **static)` at `dtype`; float64 results come
  back as NumPy. Scalars (epsilon, keep) are traced: new values do not
  recompile."""
  dtype = _check_dtype(dtype)
  with _precision(dtype, *arrays):
    cast = [jnp.asarray(a, dtype) for a in arrays]
    out = kernel(*cast, *scalars, **static)
    if dtype == "float64":
      out = jax.device_get(out)
  return out


# ---------------------------------------------------------------------------
# CCA.

class CCA(NamedTuple):
  """Canonical correlation analysis of `x` (n, p) and `y` (n, q), k = min(p, q).

  Attributes:
    correlations: `(k,)` canonical correlations, descending; the entries past
      `count` are 0 (directions dropped as rank-deficient or, for SVCCA, not
      kept).
    count: the number of canonical pairs, `min(rank_x, rank_y)`.
    rank_x, rank_y: the directions of each side that take part (numerical
      rank for `cca`, the kept top directions for `svcca`).
    x_weights: `(p, k)` canonical weights: `(x - mean(x)) @ x_weights` are
      x's canonical variates, each of unit variance (up to `epsilon`).
    y_weights: `(q, k)`, likewise for y; variate i of x and of y correlate
      with `correlations[i]`.
  """
  correlations: jax.Array
  count: jax.Array
  rank_x: jax.Array
  rank_y: jax.Array
  x_weights: jax.Array
  y_weights: jax.Array

  @property
  def mean(self) -> jax.Array:
    """The summary: the mean of the first `count` canonical correlations
    (0 when nothing is left, e.g. a constant side, as svcca's zero result)."""
    xp = np if isinstance(self.correlations, np.ndarray) else jnp  # float64 results are NumPy
    k = self.correlations.shape[-1]
    valid = xp.arange(k) < xp.asarray(self.count)[..., None]
    total = xp.sum(xp.where(valid, self.correlations, 0), axis=-1)
    return total / xp.maximum(self.count, 1)


def _centre(a):
  return a - jnp.mean(a, axis=0, keepdims=True)


def _cov(a, b):
  return jnp.matmul(a.T, b, precision=_HIGHEST) / (a.shape[0] - 1)


def _eigen(cov):
  """Eigen-decomposition of a covariance, and its eigenvalues relative to
  the largest (clipped at 0; all 0 for a constant side)."""
  evals, evecs = jnp.linalg.eigh(cov)  # ascending
  top = evals[-1]
  rel = jnp.where(top > 0, jnp.maximum(evals, 0) / jnp.where(top > 0, top, 1), 0)
  return rel, evecs, top


def _alive(rel, epsilon):
  """Directions above the rank tolerance max(epsilon, dim * machine eps)."""
  return rel > jnp.maximum(epsilon, rel.shape[0] * float(jnp.finfo(rel.dtype).eps))


def _top_directions(rel, keep, keep_kind: str):
  """SVCCA's selection over eigenvalues in ascending order: the top `keep`
  directions ("count"), or the fewest top ones whose variance fraction
  reaches `keep` ("fraction"): direction i is kept iff the directions above
  it explain less than `keep`."""
  p = rel.shape[0]
  if keep_kind == "count":
    return jnp.arange(p) >= p - keep
  frac = rel / jnp.maximum(jnp.sum(rel), jnp.finfo(rel.dtype).tiny)
  above = jnp.cumsum(frac[::-1])[::-1] - frac  # variance of the directions above i
  return above < keep


def _whitener(rel, evecs, top, mask, epsilon):
  """W with W^T Sxx W = diag(rel / (rel + epsilon)) on `mask`, 0 elsewhere:
  W = V diag(mask / sqrt(rel + epsilon)) / sqrt(top)."""
  safe = jnp.where(mask, rel + epsilon, 1)
  factor = jnp.where(mask, jax.lax.rsqrt(safe), 0)
  return evecs * factor / jnp.sqrt(jnp.where(top > 0, top, 1))


def _whiten_pair(x, y, epsilon, keep, keep_kind):
  """Both sides' whiteners and the whitened cross-covariance W_x^T Sxy W_y;
  `keep` selects SVCCA's top directions (`keep_kind` None: plain CCA)."""
  xc, yc = _centre(x), _centre(y)
  sxx, syy, sxy = _cov(xc, xc), _cov(yc, yc), _cov(xc, yc)
  rel_x, vec_x, top_x = _eigen(sxx)
  rel_y, vec_y, top_y = _eigen(syy)
  mask_x, mask_y = _alive(rel_x, epsilon), _alive(rel_y, epsilon)
  if keep_kind is not None:
    mask_x = mask_x & _top_directions(rel_x, keep, keep_kind)
    mask_y = mask_y & _top_directions(rel_y, keep, keep_kind)
  wx = _whitener(rel_x, vec_x, top_x, mask_x, epsilon)
  wy = _whitener(rel_y, vec_y, top_y, mask_y, epsilon)
  m = jnp.matmul(jnp.matmul(wx.T, sxy, precision=_HIGHEST), wy, precision=_HIGHEST)
  rank_x = jnp.sum(mask_x).astype(jnp.int32)
  rank_y = jnp.sum(mask_y).astype(jnp.int32)
  return m, wx, wy, rank_x, rank_y, sxx


def _masked(s, count):
  return jnp.where(jnp.arange(s.shape[0]) < count, s, 0)


def _cca_kernel(x, y, epsilon, keep=None, keep_kind=None):
  """CCA (`keep_kind=None`) or SVCCA (`keep` a fraction or a count); also
  returns x's covariance for PWCCA."""
  m, wx, wy, rank_x, rank_y, sxx = _whiten_pair(x, y, epsilon, keep, keep_kind)
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  count = jnp.minimum(rank_x, rank_y)
  result = CCA(_masked(s, count), count, rank_x, rank_y,
               jnp.matmul(wx, u, precision=_HIGHEST), jnp.matmul(wy, vt.T, precision=_HIGHEST))
  return result, sxx


def _cca_mean_kernel(x, y, epsilon, keep=None, keep_kind=None):
  """`_cca_kernel(...).mean` without the canonical weights (singular values
  only: the cheaper SVD)."""
  m, _, _, rank_x, rank_y, _ = _whiten_pair(x, y, epsilon, keep, keep_kind)
  s = jnp.linalg.svd(m, compute_uv=False)
  count = jnp.minimum(rank_x, rank_y)
  return jnp.sum(_masked(s, count)) / jnp.maximum(count, 1)


@functools.partial(jax.jit, static_argnames=("keep_kind",))
def _cca(x, y, epsilon, keep, keep_kind):
  return _cca_kernel(x, y, epsilon, keep, keep_kind)[0]


def cca(x, y, *, epsilon: float = EPSILON, dtype="float32") -> CCA:
  """Canonical correlations of two activation matrices (Hotelling 1936).

  With `xc`, `yc` the centred `x` (n, p) and `y` (n, q):

      Sxx = xc^T xc / (n-1),  Syy = yc^T yc / (n-1),  Sxy = xc^T yc / (n-1)
      Sxx = V diag(lam) V^T,  W_x = V diag(1 / sqrt(lam + epsilon lam_max))
      W_x^T Sxy W_y = U diag(rho) R^T

  The singular values `rho` (descending) are the canonical correlations;
  `W_x U` and `W_y R` are the canonical weights. `epsilon` (default 1e-6)
  is added to the covariance diagonal relative to the side's largest
  variance `lam_max` (adding `epsilon lam_max I` to Sxx), which makes the
  result independent of the activations' scale. Rank deficiency: directions
  with `lam <= max(epsilon, p * machine eps) * lam_max` (dead or constant
  neurons, neurons that are linear combinations of others, p > n) are dropped:
  their whitened component is 0, their correlations are reported as 0 and not
  counted in `count` or in the summary `mean`, which averages the
  `min(rank_x, rank_y)` remaining correlations (0 if a side is constant).
  The `p * machine eps` floor is what a covariance can resolve: in float32
  about 3e-5 for 256 neurons. A layer whose spectrum has a tail below it gets
  a different (higher) mean in float32 than in float64, where the tail's
  noise directions take part; use `svcca` (its 99% cut is far above the
  floor) or `dtype="float64"` when that tail matters.

  Differences from google/svcca `get_cca_similarity` (same math otherwise):
  svcca also adds `epsilon` to the diagonal of covariances rescaled by their
  largest entry (default `epsilon=0`, its tutorials pass 1e-10) and drops
  neurons whose rescaled variance is below `epsilon`; here the scale is the
  largest eigenvalue (rotation invariant, so CCA stays exactly invariant to
  orthogonal maps) and whole directions, not just single neurons, are dropped
  below the tolerance, so collinear neurons do not produce spurious
  correlations of noise. svcca's `mean` drops trailing correlations until
  98% of their sum is kept (`threshold=0.98`); here it is the plain mean
  (Raghu et al. 2017, Gotmare et al. 2019).

  Args:
    x: `(n, p)` activations (datapoints, neurons).
    y: `(n, q)` activations of the same datapoints.
    epsilon: regularizer and rank tolerance relative to the largest variance.
    dtype: "float32" (default) or "float64" (scoped `jax.enable_x64`).

  Returns:
    A `CCA` (correlations, count, ranks, canonical weights); `.mean` is the
    summary.
  """
  _check_pair(x, y)
  return _run(_cca, dtype, (x, y), _check_epsilon(epsilon), 0, keep_kind=None)


def svcca(x, y, keep: float | int = KEEP, *, epsilon: float = EPSILON, dtype="float32") -> CCA:
  """SVCCA (Raghu, Gilmer, Yosinski & Sohl-Dickstein, NeurIPS 2017).

  Step 1, each side separately: the top principal directions of the centred
  activations, i.e. the top eigenvectors of `Sxx` (the right singular vectors
  of `xc`, as svcca's SVD of the activations), either the fewest whose
  variance fraction `sum(lam_top) / sum(lam)` reaches `keep` (a float in
  (0, 1], default 0.99) or exactly `keep` of them (an int; svcca's tutorials
  keep 20). Step 2: CCA (`cca`) of the two projections. Projecting onto the
  top eigenvectors and whitening there is the same as whitening with only
  those eigenvectors, which is how it is computed (static shapes: one compiled
  program whatever the number kept). `rank_x` / `rank_y` of the result are
  the numbers of directions kept (after the rank tolerance of `cca`).

  Raises:
    ValueError: `keep` not in (0, 1] nor a count in 1..min(p, q, n).
  """
  _check_pair(x, y)
  kind, keep = _check_keep(keep, np.shape(x)[1], np.shape(y)[1], np.shape(x)[0])
  return _run(_cca, dtype, (x, y), _check_epsilon(epsilon), keep, keep_kind=kind)


class PWCCA(NamedTuple):
  """Projection-weighted CCA of `x` and `y`.

  Attributes:
    similarity: `sum_i alpha_i rho_i` (the distance is `1 - similarity`).
    weights: `(k,)` normalized weights `alpha_i` (sum 1; 0 past `count`).
    correlations: `(k,)` the canonical correlations `rho_i` (as `cca`).
  """
  similarity: jax.Array
  weights: jax.Array
  correlations: jax.Array


def _pwcca_kernel(x, y, epsilon):
  result, sxx = _cca_kernel(x, y, epsilon)
  a = result.x_weights                                  # (p, k)
  sa = jnp.matmul(sxx, a, precision=_HIGHEST)           # xc^T h_i / (n-1)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(a * sa, axis=0), 0))  # ||h_i|| / sqrt(n-1)
  k = a.shape[1]
  valid = (jnp.arange(k) < result.count) & (norm > 0)
  alpha = jnp.where(valid, jnp.sum(jnp.abs(sa), axis=0) / jnp.where(valid, norm, 1), 0)
  weights = alpha / jnp.maximum(jnp.sum(alpha), jnp.finfo(alpha.dtype).tiny)
  return PWCCA(jnp.sum(weights * result.correlations), weights, result.correlations)


_pwcca = jax.jit(_pwcca_kernel)


def pwcca(x, y, *, epsilon: float = EPSILON, dtype="float32") -> PWCCA:
  """Projection-weighted CCA (Morcos, Raghu & Bengio, NeurIPS 2018).

  With `h_i = xc a_i` x's canonical variates (CCA vectors, a_i the canonical
  weights of `cca`), normalized to unit length, and `xc_j` the (centred)
  activations of x's neuron j over the datapoints:

      alpha_i = sum_j |<h_i / ||h_i||, xc_j>|,   weights = alpha / sum(alpha)
      PWCCA(x, y) = sum_i weights_i rho_i        (distance: 1 - PWCCA)

  The weights say how much of x's activations each canonical direction
  accounts for, so x (the paper's L1) is the weighted side and the measure is
  not symmetric: `pwcca(y, x)` weights y. The sum runs over the
  `min(rank_x, rank_y)` canonical pairs. Centring `xc_j` changes nothing
  (`h_i` has mean 0) and the unit length makes the weights independent of
  `epsilon`'s slight shrinking of the variates. Computed without forming
  `h`: `xc^T h_i = (n-1) Sxx a_i` and `||h_i||^2 = (n-1) a_i^T Sxx a_i`.

  Differences from google/svcca `pwcca.compute_pwcca`: the code weights
  whichever side has fewer neurons left after dropping small ones (pass the
  narrower layer as `x` to do the same), and there (a) when that is the
  second side it projects `acts1` with y's coefficients (a bug: it means
  `acts2`), (b) its "directions" are `coef^T (acts - mean) + mean`, the
  rotation `u^T` applied to unwhitened activations with the neuron means
  added back, not the canonical variates `u^T Sxx^{-1/2} xc` of the paper,
  before it orthonormalizes them with a QR decomposition. Here the paper's
  variates are used; with the plain variates (orthogonal already) QR and
  normalizing agree.

  Returns:
    A `PWCCA`: similarity, weights, correlations.
  """
  _check_pair(x, y)
  return _run(_pwcca, dtype, (x, y), _check_epsilon(epsilon))


# ---------------------------------------------------------------------------
# CKA.

def _frobenius_sq(a, b):
  """||a^T b||_F^2."""
  return jnp.sum(jnp.square(jnp.matmul(a.T, b, precision=_HIGHEST)))


def _ratio(num, den):
  """num / den, 0 where the denominator vanishes (a constant side)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


@jax.jit
def _linear_cka(x, y):
  xc, yc = _centre(x), _centre(y)
  n, p, q = x.shape[0], x.shape[1], y.shape[1]
  if n < p + q:  # the n x n Gram matrices are the smaller computation
    k = jnp.matmul(xc, xc.T, precision=_HIGHEST)
    l_ = jnp.matmul(yc, yc.T, precision=_HIGHEST)
    return _ratio(jnp.sum(k * l_), jnp.linalg.norm(k) * jnp.linalg.norm(l_))
  cross = _frobenius_sq(yc, xc)
  return _ratio(cross, jnp.sqrt(_frobenius_sq(xc, xc)) * jnp.sqrt(_frobenius_sq(yc, yc)))


def linear_cka(x, y, *, dtype="float32") -> jax.Array:
  """Linear CKA (Kornblith, Norouzi, Lee & Hinton, ICML 2019).

  With `xc`, `yc` the centred `x` (n, p) and `y` (n, q):

      CKA = ||yc^T xc||_F^2 / (||xc^T xc||_F ||yc^T yc||_F)

  (computed from the n x n Gram matrices `<K, L>_F / (||K||_F ||L||_F)`,
  `K = xc xc^T`, when n < p + q; the two are equal). In [0, 1]; invariant to
  orthogonal maps and isotropic scaling of either side, not to arbitrary
  invertible maps. 0 when a side is constant (where the index is undefined).
  """
  _check_pair(x, y)
  return _run(_linear_cka, dtype, (x, y))


def _hsic_unbiased(a, b):
  """Song et al. (2012) unbiased HSIC of the linear kernels K = a a^T,
  L = b b^T, in feature space (never forming n x n matrices):

      HSIC_1 = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2))
                - 2/(n-2) 1^T K~ L~ 1] / (n (n-3)),

  K~, L~ being K, L with zero diagonals:
  tr(K~ L~) = ||b^T a||_F^2 - sum_i K_ii L_ii, 1^T K~ 1 = ||a^T 1||^2 - tr K,
  K~ 1 = a (a^T 1) - diag K.
  """
  n = a.shape[0]
  dk = jnp.sum(a * a, axis=1)
  dl = jnp.sum(b * b, axis=1)
  sa, sb = jnp.sum(a, axis=0), jnp.sum(b, axis=0)
  trace_kl = _frobenius_sq(b, a) - jnp.sum(dk * dl)
  sum_k = jnp.sum(sa * sa) - jnp.sum(dk)
  sum_l = jnp.sum(sb * sb) - jnp.sum(dl)
  k1 = jnp.matmul(a, sa, precision=_HIGHEST) - dk
  l1 = jnp.matmul(b, sb, precision=_HIGHEST) - dl
  return (trace_kl + sum_k * sum_l / ((n - 1) * (n - 2))
          - 2.0 / (n - 2) * jnp.sum(k1 * l1)) / (n * (n - 3))


@jax.jit
def _linear_cka_debiased(x, y):
  xc, yc = _centre(x), _centre(y)
  den = _hsic_unbiased(xc, xc) * _hsic_unbiased(yc, yc)
  return _ratio(_hsic_unbiased(xc, yc), jnp.sqrt(jnp.maximum(den, 0)))


def linear_cka_debiased(x, y, *, dtype="float32") -> jax.Array:
  """Debiased linear CKA (Nguyen, Raghu & Kornblith, ICLR 2021).

      CKA_1 = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)),
      K = x x^T, L = y y^T,

  HSIC_1 the unbiased estimator of Song, Smola, Gretton, Bedo & Borgwardt
  (ICML 2007; JMLR 2012; see `_hsic_unbiased`), which removes the bias of the
  plug-in estimate when neurons are many relative to datapoints. Kornblith et
  al.'s CKA colab (`feature_space_linear_cka(..., debiased=True)`) computes
  the same ratio, without the factor 1 / (n (n-3)), which cancels.
  HSIC_1 is unchanged by centring, which is done first for accuracy. Can be
  slightly negative; 0 when a side is constant. Needs n >= 4 datapoints.
  """
  _check_pair(x, y, min_points=4)
  return _run(_linear_cka_debiased, dtype, (x, y))


# ---------------------------------------------------------------------------
# One number per pair, and many pairs at once.

_OPTIONS = {"cca": ("epsilon",), "svcca": ("keep", "epsilon"), "pwcca": ("epsilon",),
            "cka": (), "cka_debiased": ()}


def _scalar_kernel(measure: str, keep_kind: str | None):
  """`(x, y, epsilon, keep) -> similarity` for `measure`."""
  if measure in ("cca", "svcca"):
    return lambda x, y, epsilon, keep: _cca_mean_kernel(x, y, epsilon, keep, keep_kind)
  if measure == "pwcca":
    return lambda x, y, epsilon, keep: _pwcca_kernel(x, y, epsilon).similarity
  cka = _linear_cka if measure == "cka" else _linear_cka_debiased
  return lambda x, y, epsilon, keep: cka(x, y)


def _check_measure(measure: str, options: dict, n: int, p: int, q: int):
  """`(keep_kind, epsilon, keep)` of `measure` with `options`, validated."""
  if measure not in MEASURES:
    raise ValueError(f"unknown similarity measure {measure!r}; choose from {', '.join(MEASURES)}")
  unknown = sorted(set(options) - set(_OPTIONS[measure]))
  if unknown:
    allowed = ", ".join(_OPTIONS[measure]) or "none"
    raise ValueError(f"{measure} has no option {', '.join(unknown)}; its options: {allowed}")
  epsilon = _check_epsilon(options.get("epsilon", EPSILON))
  if measure == "svcca":
    kind, keep = _check_keep(options.get("keep", KEEP), p, q, n)
    return kind, epsilon, keep
  return None, epsilon, 0


def _min_points(measure: str) -> int:
  return 4 if measure == "cka_debiased" else 2


def similarity(measure: str, x, y, *, dtype="float32", **options) -> jax.Array:
  """One number for one pair: `measure` is "cca" (mean canonical correlation),
  "svcca" (its mean), "pwcca", "cka" or "cka_debiased"; `options` are the
  measure's own (`epsilon`; `keep` for svcca)."""
  _check_pair(x, y, _min_points(measure))
  _check_measure(measure, options, *np.shape(x), np.shape(y)[1])
  if measure == "cca":
    return cca(x, y, dtype=dtype, **options).mean
  if measure == "svcca":
    return svcca(x, y, dtype=dtype, **options).mean
  if measure == "pwcca":
    return pwcca(x, y, dtype=dtype, **options).similarity
  if measure == "cka":
    return linear_cka(x, y, dtype=dtype)
  return linear_cka_debiased(x, y, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("measure", "keep_kind", "chunk_size"))
def _batched(xs, ys, epsilon, keep, measure, keep_kind, chunk_size):
  kernel = _scalar_kernel(measure, keep_kind)

  def fn(x, y):
    return kernel(x, y, epsilon, keep)

  if chunk_size == 1:  # a loop over the pairs, one unbatched LAPACK call at a time
    return jax.lax.map(lambda pair: fn(*pair), (xs, ys))
  if chunk_size >= xs.shape[0]:
    return jax.vmap(fn)(xs, ys)
  return jax.lax.map(lambda pair: fn(*pair), (xs, ys), batch_size=chunk_size)


def batched_similarity(measure: str, xs, ys, *, dtype="float32", chunk_size: int | None = None,
                       **options) -> Any:
  """`similarity` for many pairs at once, one compiled program.

  `xs` is `(*batch, n, p)` and `ys` `(*batch, n, q)` with the same leading
  axes (e.g. replicas x snapshot pairs of one layer); the result is
  `(*batch,)`, element `b` equal to `similarity(measure, xs[b], ys[b])`.

  `chunk_size` pairs are vmapped at a time, in a loop over the chunks
  (`jax.lax.map`; fewer at once bound memory). The default (None): all pairs
  at once, except for the CCA family on CPU: one pair at a time there. On
  CPU, jaxlib's batched LAPACK kernels spread a batch over XLA's intra-op
  thread pool and wait for it, and programs with vmapped eigendecompositions
  of 8-12 pairs have hung for good, every thread idle (jax/jaxlib 0.10.2 on
  2 cores; a pure-JAX program with two vmapped `eigh` calls does it; hangs of
  XLA CPU vmap graphs are reported elsewhere too, e.g.
  PyAutoLabs/PyAutoFit#1530). A loop of unbatched ones has not, and costs
  little: on CPU LAPACK takes one matrix at a time anyway. CKA has no
  eigendecomposition.
  """
  xs_shape, ys_shape = np.shape(xs), np.shape(ys)
  if len(xs_shape) < 2 or len(ys_shape) < 2 or xs_shape[:-2] != ys_shape[:-2]:
    raise ValueError(f"xs and ys must be (*batch, datapoints, neurons) with the same batch axes, "
                     f"got shapes {xs_shape} and {ys_shape}")
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  if chunk_size is None:
    uses_lapack = measure in ("cca", "svcca", "pwcca")
    one_at_a_time = uses_lapack and jax.default_backend() == "cpu"
    chunk_size = 1 if one_at_a_time else max(int(np.prod(xs_shape[:-2], dtype=np.int64)), 1)
  batch = xs_shape[:-2]
  _check_pair(np.empty(xs_shape[-2:], np.int8), np.empty(ys_shape[-2:], np.int8), _min_points(measure))
  kind, epsilon, keep = _check_measure(measure, options, *xs_shape[-2:], ys_shape[-1])
  size = int(np.prod(batch, dtype=np.int64))
  if size == 0:
    raise ValueError(f"no pairs to compare: batch axes {batch}")

  def kernel(a, b, epsilon, keep):
    a = a.reshape((size,) + a.shape[-2:])
    b = b.reshape((size,) + b.shape[-2:])
    out = _batched(a, b, epsilon, keep, measure=measure, keep_kind=kind, chunk_size=chunk_size)
    return out.reshape(batch)

  return _run(kernel, dtype, (xs, ys), epsilon, keep)
