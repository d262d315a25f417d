"""Mode-connecting curves between two solutions of one model.

Garipov, Izmailov, Podoprikhin, Vetrov & Wilson, "Loss Surfaces, Mode
Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018 (code:
timgaripov/dnn-mode-connectivity, `curves.py`), used by Gotmare et al.,
ICLR 2019, to show that SGDR's snapshots are connected by low-loss paths.

A curve with n bends (counting the endpoints; default 3) is

    phi(t) = sum_{k=0}^{n-1} c_k(t) theta_k,      t in [0, 1],

with theta_0, theta_{n-1} the two fixed solutions and the middle bends
trainable. Coefficients (`coefficients`):

    bezier      c_k(t) = binom(n-1, k) t^k (1-t)^(n-1-k)    (Bernstein)
    polychain   c_k(t) = max(0, 1 - |t (n-1) - k|)          (hat functions)

Both sum to 1, are exactly (1, 0, ..., 0) at t = 0 and (0, ..., 0, 1) at
t = 1, and both reproduce linear interpolation when the bends are evenly
spaced on the segment, which is how the middle bends start (`init_bends`,
the reference's `init_linear`).

Bends are a params tree whose every leaf has a leading bend axis `(n, ...)`.
Training sees only the middle bends `(n - 2, ...)`: `split_bends` /
`join_bends`, or a `Curve(kind, n)` whose `phi(middle, endpoints, t)` puts the
endpoints under `stop_gradient`. `phi` takes a scalar t or an array of ts (a
leading points axis on every leaf, as `jax.vmap` over t would give).

Training (`curve_loss`): one t ~ U(0, 1) per minibatch (the reference draws
one per forward pass), cross-entropy at phi(t) with BatchNorm in train mode,
plus `0.5 * wd * ||phi(t)||^2` (`l2_at`), with the optimizer's own weight
decay off, SGD momentum 0.9 and `wsjax.schedules.mode_connectivity_schedule`.
Evaluation along the curve (61 points, BatchNorm statistics recomputed at
each t) is `evaluation_ts` plus the analysis helpers for BatchNorm and
interpolation.

Where wsjax differs from the reference code, and why:
- The reference can also train the endpoints (`--fix_start`/`--fix_end` are
  off by default); its README's curve commands and the papers fix both, and
  so does wsjax, always.
- The reference keeps one set of BatchNorm running buffers for all t, updated
  at whatever t each batch drew; `curve_loss` does the same with
  `batch_stats`, which only matter after the per-t recompute.
- The reference's evaluation reports a "train loss" that includes the l2
  term; `curve_loss` returns the two parts separately (`CurveAux`).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from wsjax import losses
from wsjax import tree as wtree
from wsjax.transforms import groups

BEZIER = "bezier"
POLYCHAIN = "polychain"
KINDS = (BEZIER, POLYCHAIN)
DEFAULT_BENDS = 3
EVALUATION_POINTS = 61  # the reference's eval_curve.py --num_points default


# ---- checks -------------------------------------------------------------------
def _check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown curve kind {kind!r}; choose 'bezier' or 'polychain'")
  return kind


def _check_n(n) -> int:
  try:
    value = operator.index(n)
  except TypeError:
    raise ValueError(f"a curve's number of bends must be an integer >= 2, got {n!r}") from None
  if value < 2 or isinstance(n, bool):
    raise ValueError(f"a curve's number of bends (endpoints included) must be >= 2, got {n!r}")
  return value


def num_bends(bends) -> int:
  """The size of the leading bend axis shared by every leaf of `bends`."""
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(bends)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"bends need one leading bend axis of the same size on every leaf; "
                     f"found leading sizes {sorted(map(str, sizes))}")
  return sizes.pop()


# ---- coefficients ---------------------------------------------------------------
def bezier_coefficients(t, n: int = DEFAULT_BENDS) -> jax.Array:
  """Bernstein coefficients `c_k(t) = binom(n-1, k) t^k (1-t)^(n-1-k)`, shape
  `(*t.shape, n)`. Integer powers (0^0 = 1), as the reference's `Bezier`."""
  n = _check_n(n)
  t = jnp.asarray(t, jnp.float32)
  s = 1.0 - t
  return jnp.stack([math.comb(n - 1, k) * t ** k * s ** (n - 1 - k) for k in range(n)], axis=-1)


def polychain_coefficients(t, n: int = DEFAULT_BENDS) -> jax.Array:
  """Hat functions `c_k(t) = max(0, 1 - |t (n-1) - k|)`, shape `(*t.shape, n)`:
  the polygonal chain through the bends, bend k at t = k / (n-1)."""
  n = _check_n(n)
  t = jnp.asarray(t, jnp.float32)
  k = jnp.arange(n, dtype=jnp.float32)
  return jnp.maximum(0.0, 1.0 - jnp.abs(t[..., None] * (n - 1) - k))


def coefficients(kind: str, t, n: int = DEFAULT_BENDS) -> jax.Array:
  """The n coefficients of a `kind` curve at t (`(n,)` for a scalar t,
  `(*t.shape, n)` otherwise); traceable in t, so jit/vmap over t work."""
  if _check_kind(kind) == BEZIER:
    return bezier_coefficients(t, n)
  return polychain_coefficients(t, n)


# ---- bends ------------------------------------------------------------------------
def _combine(c, leaf):
  """sum_k c[..., k] leaf[k] as n multiply-adds in float32 (no dot: a matmul
  may run at reduced precision on accelerators, and this keeps phi(0) and
  phi(1) bit-exact: 1 * x + 0 * y = x)."""
  dtype = jnp.promote_types(leaf.dtype, jnp.float32)
  lead = c.shape[:-1]
  out = None
  for k in range(c.shape[-1]):
    ck = c[..., k].reshape(lead + (1,) * (leaf.ndim - 1)).astype(dtype)
    term = ck * leaf[k].astype(dtype)
    out = term if out is None else out + term
  return out.astype(leaf.dtype)


def phi(bends, t, kind: str = BEZIER):
  """The point of the curve at t: `sum_k c_k(t) bends[k]` on every leaf.

  `bends`: a tree whose leaves have a leading bend axis `(n, ...)`. A scalar
  `t` gives a params tree; an array of ts gives every leaf a leading points
  axis `(*t.shape, ...)`, the same as `jax.vmap(lambda s: phi(bends, s))(t)`.
  """
  n = num_bends(bends)
  c = coefficients(kind, t, n)
  return jax.tree.map(lambda leaf: _combine(c, leaf), bends)


def _check_same_structure(start, end):
  problems = wtree.mismatches(start, end, expected_label="start", found_label="end")
  if problems:
    raise ValueError("the curve's endpoints differ: " + "; ".join(problems))
  if jax.tree.structure(start) != jax.tree.structure(end):
    raise ValueError("the curve's endpoints have different tree structures; pass two params trees "
                     "of the same model")


def init_bends(start, end, n: int = DEFAULT_BENDS):
  """Bends evenly spaced on the segment from `start` to `end` (the reference's
  `CurveNet.init_linear`): bend k = (1 - k/(n-1)) start + k/(n-1) end, the
  endpoints exactly `start` and `end`. Returns a tree of `(n, ...)` leaves."""
  n = _check_n(n)
  _check_same_structure(start, end)

  def stack(a, b):
    a, b = jnp.asarray(a), jnp.asarray(b)
    middle = [((1.0 - k / (n - 1)) * a + (k / (n - 1)) * b).astype(a.dtype) for k in range(1, n - 1)]
    return jnp.stack([a, *middle, b.astype(a.dtype)])
  return jax.tree.map(stack, start, end)


def split_bends(bends):
  """`bends` (n, ...) -> `(middle, endpoints)`: the trainable middle bends
  `(n - 2, ...)` and the fixed endpoints `(2, ...)` (theta_0, theta_{n-1})."""
  num_bends(bends)
  middle = jax.tree.map(lambda leaf: leaf[1:-1], bends)
  endpoints = jax.tree.map(lambda leaf: jnp.stack([leaf[0], leaf[-1]]), bends)
  return middle, endpoints


def join_bends(middle, endpoints):
  """The inverse of `split_bends`: `(n - 2, ...)` and `(2, ...)` -> `(n, ...)`."""
  if num_bends(endpoints) != 2:
    raise ValueError(f"endpoints need a leading axis of size 2 (start, end), got {num_bends(endpoints)}")
  if jax.tree.structure(middle) != jax.tree.structure(endpoints):
    raise ValueError("middle bends and endpoints have different tree structures; pass trees of one model")
  return jax.tree.map(lambda m, e: jnp.concatenate([e[:1], m.astype(e.dtype), e[1:]]),
                      middle, endpoints)


# ---- regularizer and loss ---------------------------------------------------------
def l2_at(params_t, wd) -> jax.Array:
  """The curve's weight decay at the sampled t: `0.5 * wd * ||phi(t)||^2`.

  The squared norm runs over every trainable leaf of `params_t` (Dense/Conv
  kernels and biases, BatchNorm scales and offsets, others); running
  statistics (a `batch_stats` collection, `mean`/`var`) are skipped. This is
  the reference's regularizer: each `CurveModule.compute_weights_t` adds
  `sum(w_t ** 2)` of its weight and bias at t (Linear, Conv2d and BatchNorm
  alike) and `l2_regularizer(wd)` returns `0.5 * wd * l2`; it is the norm of
  the point phi(t), not the coefficient-weighted norms of the bends
  `sum_k c_k(t) ||theta_k||^2`. (The reference's `utils.l2_regularizer`, a
  sum of unsquared norms, is a different function that curve training does
  not use.) Pass one point's params (no leading points axis).
  """
  leaves, infos, _ = groups.flatten(params_t)
  total = jnp.zeros((), jnp.float32)
  for leaf, info in zip(leaves, infos):
    if info.role in groups.TRAINABLE:
      total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return 0.5 * wd * total


class CurveAux(NamedTuple):
  """What `curve_loss` returns beside the loss (a pytree)."""
  batch_stats: Any         # updated running statistics ({} without BatchNorm)
  cross_entropy: jax.Array  # mean cross-entropy at phi(t)
  l2: jax.Array            # 0.5 * wd * ||phi(t)||^2
  logits: jax.Array


def curve_loss(model, middle, endpoints, batch_stats, x, y, t, wd, kind: str = BEZIER, *,
               rngs=None) -> tuple[jax.Array, CurveAux]:
  """The training loss of a curve at one t: `CE(model at phi(t); x, y) + l2_at(phi(t), wd)`.

  `phi(t)` is built from `join_bends(middle, stop_gradient(endpoints))`, so
  the gradient w.r.t. `endpoints` is zero and the optimizer should only see
  `middle`: `jax.grad(curve_loss, argnums=1, has_aux=True)`. The model runs in
  train mode: BatchNorm normalizes with the batch statistics and its running
  statistics are updated (returned in `CurveAux.batch_stats`; like the
  reference's shared buffers they are not meaningful for any t and are
  recomputed before evaluation). Models without BatchNorm take
  `batch_stats={}`. `rngs` (e.g. `{"dropout": key}`) are passed to
  `model.apply`. `t`, `wd` may be traced (one t ~ U(0, 1) per step and
  replica, per-replica weight decay).
  """
  bends = join_bends(middle, jax.lax.stop_gradient(endpoints))
  params_t = phi(bends, t, kind)
  variables = {"params": params_t}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
    new_stats = updated["batch_stats"]
  else:
    logits = model.apply(variables, x, train=True, rngs=rngs)
    new_stats = batch_stats
  ce = losses.cross_entropy(logits, y)
  l2 = l2_at(params_t, wd)
  return ce + l2, CurveAux(new_stats, ce, l2, logits)


# ---- a curve as a value ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Curve:
  """A curve family: `kind` ("bezier" or "polychain") and `n` bends, endpoints
  included. Its methods take the trainable middle bends `(n - 2, ...)` and the
  fixed endpoints `(2, ...)` separately:

      curve = Curve("bezier", 3)
      middle, endpoints = curve.init(theta_a, theta_b)
      loss, aux = curve.loss(model, middle, endpoints, batch_stats, x, y, t, wd)
      params_t = curve.phi(middle, endpoints, t)     # t scalar or (points,)
  """
  kind: str = BEZIER
  n: int = DEFAULT_BENDS

  def __post_init__(self):
    _check_kind(self.kind)
    _check_n(self.n)

  def coefficients(self, t) -> jax.Array:
    return coefficients(self.kind, t, self.n)

  def init(self, start, end):
    """`(middle, endpoints)` with the middle bends evenly spaced on the segment."""
    return split_bends(init_bends(start, end, self.n))

  def _check_middle(self, middle):
    found = num_bends(middle)
    if found != self.n - 2:
      raise ValueError(f"this curve has {self.n} bends ({self.n - 2} in the middle), but the "
                       f"middle bends have a leading axis of {found}")

  def phi(self, middle, endpoints, t):
    """The point(s) at t; no gradient reaches `endpoints`."""
    self._check_middle(middle)
    return phi(join_bends(middle, jax.lax.stop_gradient(endpoints)), t, self.kind)

  def loss(self, model, middle, endpoints, batch_stats, x, y, t, wd, *, rngs=None):
    """`curve_loss` with this curve's kind (and its number of bends checked)."""
    self._check_middle(middle)
    return curve_loss(model, middle, endpoints, batch_stats, x, y, t, wd, self.kind, rngs=rngs)


def evaluation_ts(n_points: int = EVALUATION_POINTS) -> jax.Array:
  """`n_points` evenly spaced t in [0, 1], both ends included (the reference
  evaluates 61: `np.linspace(0, 1, 61)`)."""
  try:
    n_points = operator.index(n_points)
  except TypeError:
    raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}") from None
  if n_points < 2:
    raise ValueError(f"n_points must be an integer >= 2 (t = 0 and t = 1), got {n_points}")
  return jnp.linspace(0.0, 1.0, n_points, dtype=jnp.float32)
