"""Transferring learning trajectories: GMT and FGMT (Chijiwa, ICLR 2024).

Chijiwa, "Transferring Learning Trajectories of Neural Networks", ICLR 2024
(dchiji-ntt/learning-transfer, ``utils/learning_transfer.py``,
``get_transferred_params_faster``). Given a source trajectory theta_0 ..
theta_T (one training run) and a new initialization theta'_0 of the same
architecture, build

    theta'_t = theta'_0 + pi_t(theta_t - theta_0),      t = 1 .. T,

without training, with pi_t a permutation of the hidden units
(``wsjax.transfer``'s specs: every leaf that touches a unit moves with it).
pi_s is found by gradient matching over the points before s:

    pi_s = argmax_pi  sum_{t < s} < grad L(theta'_t), pi(grad L(theta_t)) >
         = argmin_pi  sum_{t < s} || pi(grad L(theta_t)) - grad L(theta'_t) ||^2

(the norms do not depend on pi), where theta'_t = theta'_0 + pi_{s-1}(theta_t
- theta_0) is the transferred network under the CURRENT permutation
(pi_0 = identity), and both gradients of a pair are the mean cross-entropy
gradient, in train mode, on the SAME minibatches (``grad_batches`` of them;
the code's ``gm_iters``). The sum over pairs is one weight-matching problem
(``weight_matching(..., stacked=True)``: Git Re-Basin's coordinate descent,
a linear assignment per permutation, seeded order, the code's tolerance
1e-7), solved from the identity at every step as the code does
(``wm_use_prev_perm: false``).

- ``gmt(..., fast=False)`` (GMT): at step s = 1..T recompute every pair t =
  0..s-1 under pi_{s-1}, then solve: T(T+1)/2 gradient pairs in all.
- ``gmt(..., fast=True)`` (FGMT, the code's ``fast_perm_optim``): keep the
  pairs computed so far and add only pair s-1 (under pi_{s-1}), then solve
  over all cached pairs: T gradient pairs (2T gradients, like 2T training
  steps) and T solves. Pair 0 sits at the initializations (no
  displacement), so it does not depend on pi: FGMT equals GMT for T <= 2.
- ``naive(T)``: pi = identity, theta'_t = theta'_0 + theta_t - theta_0.
- ``oracle(...)``: train theta'_0 for real to theta'_T, then one pi for every
  point from weight matching of the target's update theta'_T - theta'_0
  against the source's theta_T - theta_0 (the code's
  ``baseline_use_target``).

Trajectory points (``linear_points``, ``spacing``): the source's stored
snapshots, or the straight line theta_t = (1 - l_t) theta_0 + l_t theta_T
with the code's cosine spacing (default; its ``split_scheduling_fn``)

    l_i = sum_{t < i} f(t) / sum_{t < T} f(t),   f(t) = 1 + cos(pi t / T),

(large steps first), or the paper's uniform l_i = i / T.

Gradients stay on the device: one jitted program computes a chunk of pairs
(vmapped over the pairs on accelerators, one after another on a CPU, see
``vectorize_default``) and writes them into a fixed (T, ...) buffer of
gradient trees whose rows past the current step are zero; zero pairs add
nothing to the objective, so the solve at step s reads the first
2^ceil(log2 s) rows (log2 T + 1 compiled shapes of the matcher's cost
functions, at most twice the work of the s pairs). BatchNorm: a pair's
gradients are taken in train mode, where BatchNorm normalizes with each
batch's own statistics (running statistics do not enter them);
re-estimating the transferred network's running statistics (the code's
``reset_bn_stats_`` + ``update_bn_stats_``) is for its evaluation,
``wsjax.analysis.batchnorm.recompute_batch_stats``. The
code draws fresh shuffled minibatches for every gradient; here point t's
minibatches are fixed (``gradient_batches``: a pure function of a seed and
t), so GMT's recomputed pair t differs from FGMT's cached one only through
the permutation.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsjax import tree as wtree
from wsjax.transfer.permutation import (PermutationSpec, Perms, check_perms, identity_perms,
                                        permute_leaf)
from wsjax.transfer.weight_matching import MatchInfo, weight_matching

SPACINGS = ("cosine", "uniform")
METHODS = ("gmt", "fgmt", "naive", "oracle")
DEFAULT_CHUNK = 8  # pairs per compiled gradient call of GMT


# ---- trajectories -------------------------------------------------------------

def check_points(n_points) -> int:
  """T as an int >= 1, or a one-line ValueError."""
  if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)) or n_points < 1:
    raise ValueError(f"the number of trajectory points T must be an int >= 1, got {n_points!r}")
  return int(n_points)


def spacing(n_points: int, kind: str = "cosine") -> np.ndarray:
  """The coefficients ``l_0 = 0 < l_1 < ... < l_T = 1`` of a straight-line
  trajectory (float64, shape (T + 1,)).

  ``cosine`` (the released code's ``split_scheduling_fn``,
  ``'1+math.cos((t/T)*math.pi)'``): ``l_i = sum_{t<i} f(t) / sum_{t<T}
  f(t)`` with ``f(t) = 1 + cos(pi t / T)``, large steps first. ``uniform``
  (the paper's text): ``l_i = i / T``.
  """
  n = check_points(n_points)
  if kind not in SPACINGS:
    raise ValueError(f"unknown trajectory spacing {kind!r}; choose cosine or uniform")
  if kind == "uniform":
    return np.arange(n + 1, dtype=np.float64) / n
  f = 1.0 + np.cos(np.pi * np.arange(n, dtype=np.float64) / n)
  return np.concatenate([[0.0], np.cumsum(f)]) / f.sum()


@jax.jit
def linear_points(start, end, coefficients):
  """``theta_i = (1 - l_i) start + l_i end`` for every coefficient, stacked
  on a new leading axis (exactly `start` at l = 0 and `end` at l = 1; leaf
  dtypes kept)."""
  def mix(a, b):
    c = jnp.asarray(coefficients, jnp.float32).reshape((-1,) + (1,) * jnp.ndim(a))
    return ((1 - c) * a[None] + c * b[None]).astype(jnp.result_type(a))
  return jax.tree.map(mix, start, end)


def stack(trees: Sequence[Any]):
  """``[tree_0, ..., tree_T]`` -> one tree with a leading axis (snapshots as
  trajectory points)."""
  if not trees:
    raise ValueError("a trajectory needs at least its first and last points")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def num_points(points) -> int:
  """T of a stacked trajectory theta_0 .. theta_T (leading axis T + 1)."""
  sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(points)}
  if len(sizes) != 1:
    raise ValueError(f"trajectory points disagree on their leading axis: {sorted(sizes)}")
  n = sizes.pop() - 1
  if n < 1:
    raise ValueError("a trajectory needs at least two points (theta_0 and theta_T)")
  return n


# ---- transferring parameters --------------------------------------------------

def _permute(spec: PermutationSpec, perms, tree_):
  """``pi(tree_)`` without the host-side checks (inside jit)."""
  return wtree.map_named(lambda name, w: permute_leaf(w, spec.axes[name], perms), tree_)


def _transfer(spec, perms, source_start, source_point, target_start):
  delta = jax.tree.map(jnp.subtract, source_point, source_start)
  return jax.tree.map(jnp.add, target_start, _permute(spec, perms, delta))


def transfer(spec: PermutationSpec, perms: Mapping[str, jax.Array], source_start,
             source_point, target_start):
  """``theta' = target_start + pi(source_point - source_start)`` (one point;
  params trees of one network, every leaf in `spec`)."""
  spec.check(source_start)
  check_perms(spec, perms)
  problems = wtree.mismatches(source_start, target_start, "source", "target")
  if problems:
    raise ValueError("source and target differ: " + "; ".join(problems[:8]))
  return _transfer_jit(spec, dict(perms), source_start, source_point, target_start)


_transfer_jit = jax.jit(_transfer, static_argnums=(0,))


def stack_perms(perms_list: Sequence[Mapping[str, Any]]) -> Perms:
  """``[pi_1, ..., pi_T]`` -> ``{name: (T, n) int32}``."""
  return {p: jnp.stack([jnp.asarray(q[p], jnp.int32) for q in perms_list])
          for p in perms_list[0]}


@functools.partial(jax.jit, static_argnums=(0,))
def _transferred_points(spec, perms, points, target_start):
  start = jax.tree.map(lambda x: x[0], points)
  later = jax.tree.map(lambda x: x[1:], points)
  return jax.vmap(_transfer, in_axes=(None, 0, None, 0, None))(
      spec, perms, start, later, target_start)


def transferred_points(spec: PermutationSpec, perms_list: Sequence[Mapping[str, Any]],
                       points, target_start):
  """``theta'_s = theta'_0 + pi_s(theta_s - theta_0)`` for s = 1..T, stacked
  (leading axis T): `points` theta_0..theta_T stacked, `perms_list` pi_1..pi_T."""
  n = num_points(points)
  if len(perms_list) != n:
    raise ValueError(f"{len(perms_list)} permutations for a trajectory of T = {n} points")
  for perms in perms_list:
    check_perms(spec, perms)
  return _transferred_points(spec, stack_perms(perms_list), points, target_start)


# ---- gradient pairs -----------------------------------------------------------

def gradient_batches(buffer: np.ndarray, n_points: int, n_batches: int, batch_size: int,
                     seed: int) -> np.ndarray:
  """``(T, n_batches, batch_size)`` int32 example indices: point t's
  minibatches, the first ``n_batches * batch_size`` examples of a shuffle of
  `buffer` by ``default_rng([seed, t])`` (wrapping around a small buffer).
  The source and transferred networks of a pair use the same ones."""
  buffer = np.asarray(buffer)
  if buffer.ndim != 1 or buffer.size == 0:
    raise ValueError("gradient batches need a non-empty 1-D buffer of training indices")
  if n_batches < 1 or batch_size < 1:
    raise ValueError(f"gradient batches need n_batches, batch_size >= 1, got {n_batches}, "
                     f"{batch_size}")
  need = n_batches * batch_size
  out = []
  for t in range(check_points(n_points)):
    order = np.random.default_rng([int(seed), t]).permutation(buffer)
    order = np.resize(order, need) if order.size < need else order[:need]
    out.append(order.reshape(n_batches, batch_size))
  return np.stack(out).astype(np.int32)


def _loss(model, params, x, y):
  logits, _ = model.apply({"params": params}, x, train=True, mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


UNROLL_BATCHES = 8  # point_gradient unrolls up to this many minibatches, scans beyond


def point_gradient(model, params, x, y):
  """The mean over minibatches ``x: (K, B, ...)``, ``y: (K, B)`` of the
  gradient of the batch-mean cross-entropy, train mode (the code's
  ``get_sync_grads``: one backward per batch, summed, divided by K).

  Up to ``UNROLL_BATCHES`` minibatches are unrolled, more are scanned: on
  XLA:CPU a convolution inside a loop body ran 12x slower than the same
  one unrolled (Conv8 width 8, one batch of 128: 6.7 s against 0.43 s;
  jax 0.10.2)."""
  grad = jax.grad(functools.partial(_loss, model))
  k = x.shape[0]
  if k <= UNROLL_BATCHES:
    total = grad(params, x[0], y[0])
    for i in range(1, k):
      total = jax.tree.map(jnp.add, total, grad(params, x[i], y[i]))
  else:
    def body(acc, batch):
      return jax.tree.map(jnp.add, acc, grad(params, *batch)), None
    total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (x, y))
  return jax.tree.map(lambda g: g / k, total)


def _pair_gradients(model, targets, sources, xb, yb, vectorize: bool):
  """Gradients of C pairs (leading axis C everywhere), the 2C networks
  vmapped together (`vectorize`) or one after another."""
  one = functools.partial(point_gradient, model)
  if vectorize:
    nets = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), targets, sources)
    grads = jax.vmap(one)(nets, jnp.concatenate([xb, xb]), jnp.concatenate([yb, yb]))
    c = xb.shape[0]
    return jax.tree.map(lambda g: g[:c], grads), jax.tree.map(lambda g: g[c:], grads)
  pairs = [(one(jax.tree.map(lambda p, i=i: p[i], targets), xb[i], yb[i]),
            one(jax.tree.map(lambda p, i=i: p[i], sources), xb[i], yb[i]))
           for i in range(xb.shape[0])]
  stack_ = lambda trees: jax.tree.map(lambda *g: jnp.stack(g), *trees)  # noqa: E731
  return stack_([p[0] for p in pairs]), stack_([p[1] for p in pairs])


def vectorize_default() -> bool:
  """Whether GMT vmaps a chunk's gradients by default: not on a CPU.

  On XLA:CPU a vmapped convolution over per-pair kernels becomes a grouped
  convolution: two Conv8 (width 8) gradients vmapped took 2.4 s against 2 x
  0.43 s one after another; for the 784-512-10 MLP both ways cost the same
  (8 pairs: 89 against 95 ms). On accelerators vmap batches small networks."""
  return jax.default_backend() != "cpu"


@functools.partial(jax.jit, static_argnums=(0, 1, 10), donate_argnums=(2,))
def _fill_pairs(model, spec, buffers, perms, points, target_start, x, y, batch_index, rows,
                vectorize):
  """Pairs at the point indices `rows` (C,) under `perms` written into rows
  `rows` of `buffers = (target grads, source grads)`, each (T_pad, ...).
  Rows past the current step are never written (a chunk is padded by
  repeating its last row), so they stay zero."""
  start = jax.tree.map(lambda p: p[0], points)
  source = jax.tree.map(lambda p: p[rows], points)
  target = jax.vmap(_transfer, in_axes=(None, None, None, 0, None))(
      spec, perms, start, source, target_start)
  xb, yb = x[batch_index[rows]], y[batch_index[rows]]
  g_target, g_source = _pair_gradients(model, target, source, xb, yb, vectorize)

  def write(buf, g):
    return buf.at[rows].set(g.astype(buf.dtype))
  return (jax.tree.map(write, buffers[0], g_target), jax.tree.map(write, buffers[1], g_source))


# ---- results ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TransferResult:
  """The permutations a method chose, and what it cost.

  Attributes:
    method: gmt, fgmt, naive or oracle.
    perms: pi_1 .. pi_T, ``{name: int32 host array}`` each (pi_s makes
      theta'_s; naive: identities; oracle: T copies of one).
    objective: per solve, (L at the identity, L at the solution) of that
      solve's pairs (GMT/FGMT: T solves; oracle: one; naive: none).
    sweeps: per solve, the coordinate-descent sweeps run.
    gradient_pairs: gradient pairs evaluated (each is two gradients of
      `grad_batches` minibatches).
    grad_s: seconds computing gradient pairs (device work included,
      compilation of the first call too).
    cost_s, assign_s, objective_s: seconds in weight matching, as
      ``MatchInfo`` splits them (cost matrices, ``linear_sum_assignment``,
      the objective after each sweep).
    total_s: wall seconds of the whole method.
  """
  method: str
  perms: tuple[dict[str, np.ndarray], ...]
  objective: tuple[tuple[float, float], ...] = ()
  sweeps: tuple[int, ...] = ()
  gradient_pairs: int = 0
  grad_s: float = 0.0
  cost_s: float = 0.0
  assign_s: float = 0.0
  objective_s: float = 0.0
  total_s: float = 0.0

  def summary(self) -> dict:
    """JSON-able counts and timings (no permutations)."""
    return {"method": self.method, "solves": len(self.sweeps), "sweeps": list(self.sweeps),
            "objective": [list(o) for o in self.objective],
            "gradient_pairs": self.gradient_pairs, "grad_s": self.grad_s,
            "cost_s": self.cost_s, "assign_s": self.assign_s,
            "objective_s": self.objective_s, "total_s": self.total_s}


def _host(perms) -> dict[str, np.ndarray]:
  return {p: np.asarray(v, np.int32) for p, v in perms.items()}


def naive(spec: PermutationSpec, n_points: int) -> TransferResult:
  """pi_s = identity for every s: ``theta'_t = theta'_0 + theta_t - theta_0``."""
  n = check_points(n_points)
  identity = _host(identity_perms(spec))
  return TransferResult("naive", tuple(identity for _ in range(n)))


def oracle(spec: PermutationSpec, source_start, source_end, target_start, target_end,
           n_points: int, *, key: jax.Array, max_sweeps: int = 100,
           tol: float = 1e-7) -> TransferResult:
  """One pi for every point: weight matching of the really trained target's
  update ``theta'_T - theta'_0`` (a) against the source's ``theta_T -
  theta_0`` (b), i.e. ``pi(theta_T - theta_0) ~ theta'_T - theta'_0``."""
  n = check_points(n_points)
  t0 = time.perf_counter()
  a = jax.tree.map(jnp.subtract, target_end, target_start)
  b = jax.tree.map(jnp.subtract, source_end, source_start)
  perms, info = weight_matching(spec, a, b, key=key, max_sweeps=max_sweeps, tol=tol)
  host = _host(perms)
  return TransferResult("oracle", tuple(host for _ in range(n)),
                        objective=((info.objective[0], info.objective[-1]),),
                        sweeps=(info.sweeps,), cost_s=info.cost_s, assign_s=info.assign_s,
                        objective_s=info.objective_s, total_s=time.perf_counter() - t0)


def _bucket(s: int, rows_total: int) -> int:
  """The smallest power of two >= s (at most `rows_total`): the pairs a
  solve at step s reads. Zero rows add nothing to the objective but cost
  matrix work; prefixes of log2(T) sizes bound that work by 2x the s
  pairs while compiling the matcher's cost functions log2(T) + 1 times."""
  return min(rows_total, 1 << max(0, (s - 1).bit_length()))


def gmt(spec: PermutationSpec, model, points, target_start, x, y, batch_index, *,
        key: jax.Array, fast: bool = False, max_sweeps: int = 100, tol: float = 1e-7,
        chunk: int = DEFAULT_CHUNK, vectorize: bool | None = None) -> TransferResult:
  """GMT (``fast=False``) or FGMT (``fast=True``) for one source trajectory
  and one target initialization (see the module docstring).

  Args:
    spec: the permutation spec of the params (``PermutationSpec.for_model``).
    model: the Linen module (``model.apply({"params": p}, x, train=True)``).
    points: the source's theta_0 .. theta_T, params stacked on a leading
      axis of size T + 1 (``linear_points`` or ``stack`` of snapshots).
    target_start: theta'_0, params of one network.
    x, y: the training set (device arrays) the minibatches index.
    batch_index: ``(T, K, B)`` int indices, point t's minibatches
      (``gradient_batches``); at least T rows.
    key: PRNG key of the matcher's visiting order (solve s: ``fold_in(key, s)``).
    fast: FGMT (cache pairs) instead of GMT (recompute them).
    max_sweeps, tol: the matcher's (100 and the code's 1e-7).
    chunk: pairs per compiled gradient call when GMT recomputes (memory vs
      calls; no effect on the result).
    vectorize: vmap the networks of a chunk together (default
      ``vectorize_default()``: not on a CPU); results agree to rounding.

  Returns:
    A ``TransferResult`` with pi_1 .. pi_T.
  """
  n = num_points(points)
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  spec.check(target_start)
  problems = wtree.mismatches(jax.tree.map(lambda p: p[0], points), target_start,
                              "source", "target")
  if problems:
    raise ValueError("source and target differ: " + "; ".join(problems[:8]))
  batch_index = jnp.asarray(batch_index, jnp.int32)
  if batch_index.ndim != 3 or batch_index.shape[0] < n:
    raise ValueError(f"batch_index must be (T, K, B) with T >= {n}, got {batch_index.shape}")
  t_start = time.perf_counter()
  vectorize = vectorize_default() if vectorize is None else bool(vectorize)
  size = 1 if fast else min(chunk, n)
  rows_total = -(-n // size) * size
  zeros = jax.tree.map(lambda p: jnp.zeros((rows_total, *p.shape[1:]), jnp.float32), points)
  buffers = (zeros, jax.tree.map(jnp.copy, zeros))
  perms = identity_perms(spec)
  out_perms, objective, sweeps = [], [], []
  pairs = 0
  grad_s = cost_s = assign_s = objective_s = 0.0
  for s in range(1, n + 1):
    t0 = time.perf_counter()
    todo = [s - 1] if fast else list(range(s))
    for c in range(0, len(todo), size):
      rows = todo[c:c + size]
      rows = np.asarray(rows + [rows[-1]] * (size - len(rows)), np.int32)
      buffers = _fill_pairs(model, spec, buffers, perms, points, target_start, x, y,
                            batch_index, jnp.asarray(rows), vectorize)
      pairs += len(todo[c:c + size])
    jax.block_until_ready(buffers)
    grad_s += time.perf_counter() - t0
    prefix = _bucket(s, rows_total)  # rows >= s are zero: match over a prefix of them
    pairs_a, pairs_b = (jax.tree.map(lambda g, k=prefix: g[:k], b) for b in buffers)
    perms, info = weight_matching(spec, pairs_a, pairs_b, key=jax.random.fold_in(key, s),
                                  max_sweeps=max_sweeps, tol=tol, stacked=True)
    out_perms.append(_host(perms))
    objective.append((info.objective[0], info.objective[-1]))
    sweeps.append(info.sweeps)
    cost_s += info.cost_s
    assign_s += info.assign_s
    objective_s += info.objective_s
  return TransferResult("fgmt" if fast else "gmt", tuple(out_perms), objective=tuple(objective),
                        sweeps=tuple(sweeps), gradient_pairs=pairs, grad_s=grad_s,
                        cost_s=cost_s, assign_s=assign_s, objective_s=objective_s,
                        total_s=time.perf_counter() - t_start)


def match_info_summary(info: MatchInfo) -> dict:
  """A ``MatchInfo`` as JSON-able numbers (sweeps, objective, timings)."""
  return {"sweeps": info.sweeps, "converged": info.converged,
          "objective": [float(v) for v in info.objective], "cost_s": info.cost_s,
          "assign_s": info.assign_s, "objective_s": info.objective_s}


__all__ = [
    "DEFAULT_CHUNK", "METHODS", "SPACINGS", "TransferResult", "UNROLL_BATCHES", "check_points",
    "gmt",
    "gradient_batches", "linear_points", "match_info_summary", "naive", "num_points",
    "oracle", "point_gradient", "spacing", "stack", "stack_perms", "transfer",
    "transferred_points", "vectorize_default",
]
