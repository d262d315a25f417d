"""Tests of GMT/FGMT (wsjax.transfer.gmt): spacings by hand, naive transfer
onto its own initialization reproduces the trajectory, GMT's solutions
against the identity and against brute force (pairs recomputed by hand),
FGMT == GMT for T <= 2, the oracle and GMT on a permuted copy, errors.

The networks are small MLPs trained here for a few SGD steps on a synthetic
task (labels from a random linear rule), so the trajectories are real.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wsjax import models
from wsjax.transfer import (PermutationSpec, apply_permutation, identity_perms,
                            matching_objective, random_perms, stack_pairs)
from wsjax.transfer import gmt as gmt_lib

INPUTS, CLASSES, N = 6, 3, 256


def task(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, INPUTS)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(INPUTS, CLASSES)), -1).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def mlp(widths):
  model = models.get_model("mlp", CLASSES, widths=tuple(widths))
  init = models.make_init_fn(model, (INPUTS,))
  params = lambda seed: init(jax.random.key(seed))["params"]  # noqa: E731
  return model, PermutationSpec.for_model("mlp", params(0)), params


def trajectory(model, params, x, y, steps, lr=0.5, batch=32, seed=0):
  """theta_0 .. theta_steps of plain SGD (one snapshot per step), stacked."""
  loss = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      model.apply({"params": p}, xb), yb).mean()
  grad = jax.jit(jax.grad(loss))
  rng = np.random.default_rng(seed)
  out = [params]
  for _ in range(steps):
    idx = rng.choice(N, batch, replace=False)
    g = grad(params, x[idx], y[idx])
    params = jax.tree.map(lambda p, d: p - lr * d, params, g)
    out.append(params)
  return gmt_lib.stack(out)


def assert_trees_close(a, b, **tol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


def same(p, q):
  return set(p) == set(q) and all(np.array_equal(np.asarray(p[k]), np.asarray(q[k])) for k in p)


def test_spacing_by_hand():
  # f(t) = 1 + cos(pi t / 4): 2, 1 + sqrt(2)/2, 1, 1 - sqrt(2)/2; sum 5
  r = np.sqrt(2) / 2
  want = np.array([0, 2, 3 + r, 4 + r, 5]) / 5
  np.testing.assert_allclose(gmt_lib.spacing(4), want, rtol=1e-12)
  np.testing.assert_allclose(gmt_lib.spacing(4, "uniform"), [0, .25, .5, .75, 1], rtol=1e-12)
  np.testing.assert_array_equal(gmt_lib.spacing(1), [0.0, 1.0])
  steps = np.diff(gmt_lib.spacing(10))
  assert np.all(steps > 0) and np.all(np.diff(steps) < 0)  # large steps first
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="T must be an int >= 1"):
      gmt_lib.spacing(bad)
  with pytest.raises(ValueError, match="unknown trajectory spacing 'cos'"):
    gmt_lib.spacing(3, "cos")


def test_linear_points_are_exact_at_the_ends():
  model, spec, params = mlp((5,))
  a, b = params(0), params(1)
  pts = gmt_lib.linear_points(a, b, gmt_lib.spacing(3, "uniform"))
  assert gmt_lib.num_points(pts) == 3
  assert_trees_close(jax.tree.map(lambda p: p[0], pts), a, rtol=0, atol=0)
  assert_trees_close(jax.tree.map(lambda p: p[-1], pts), b, rtol=0, atol=0)
  mid = jax.tree.map(lambda u, v: u + (v - u) / 3, a, b)
  assert_trees_close(jax.tree.map(lambda p: p[1], pts), mid, rtol=1e-6, atol=1e-7)


def test_gradient_batches():
  idx = gmt_lib.gradient_batches(np.arange(100, 200), 4, 2, 8, seed=3)
  assert idx.shape == (4, 2, 8) and idx.dtype == np.int32
  assert np.all((idx >= 100) & (idx < 200))
  assert all(len(set(idx[t].ravel())) == 16 for t in range(4))  # no repeats within a point
  assert not np.array_equal(idx[0], idx[1])
  np.testing.assert_array_equal(idx, gmt_lib.gradient_batches(np.arange(100, 200), 4, 2, 8, 3))
  assert not np.array_equal(idx, gmt_lib.gradient_batches(np.arange(100, 200), 4, 2, 8, 4))
  small = gmt_lib.gradient_batches(np.arange(5), 1, 2, 4, seed=0)  # wraps around
  assert sorted(small.ravel()[:5]) == list(range(5))


def test_point_gradient_is_the_mean_over_batches():
  model, spec, params = mlp((5,))
  x, y = task()
  p = params(0)
  xb, yb = x[:64].reshape(2, 32, INPUTS), y[:64].reshape(2, 32)
  loss = lambda q, xs, ys: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      model.apply({"params": q}, xs), ys).mean()
  want = jax.tree.map(lambda u, v: (u + v) / 2, jax.grad(loss)(p, xb[0], yb[0]),
                      jax.grad(loss)(p, xb[1], yb[1]))
  assert_trees_close(gmt_lib.point_gradient(model, p, xb, yb), want, rtol=1e-5, atol=1e-7)


T = 4  # trajectory points of the shared (8, 6) MLP cases


@pytest.fixture(scope="module")
def shared():
  """The (8, 6) MLP, a T-step trajectory, a second init, point batches."""
  model, spec, params = mlp((8, 6))
  x, y = task()
  pts = trajectory(model, params(0), x, y, steps=T)
  idx = gmt_lib.gradient_batches(np.arange(N), T, 1, 32, seed=0)
  return model, spec, params, x, y, pts, idx


def test_transfer_onto_its_own_initialization_reproduces_the_trajectory(shared):
  """Naive: theta_0 + (theta_t - theta_0) = theta_t. GMT/FGMT: the pairs are
  identical networks on identical batches, so the identity is optimal at
  every step (a solve only moves on a strict gain) and they are naive."""
  model, spec, params, x, y, pts, idx = shared
  start = jax.tree.map(lambda p: p[0], pts)
  later = jax.tree.map(lambda p: p[1:], pts)
  naive = gmt_lib.naive(spec, T)
  assert len(naive.perms) == T and all(same(q, identity_perms(spec)) for q in naive.perms)
  assert_trees_close(gmt_lib.transferred_points(spec, naive.perms, pts, start), later,
                     rtol=1e-6, atol=1e-6)
  for fast in (False, True):
    res = gmt_lib.gmt(spec, model, pts, start, x, y, idx, key=jax.random.key(0), fast=fast)
    assert all(same(q, identity_perms(spec)) for q in res.perms)
    for before, after in res.objective:
      np.testing.assert_allclose(after, before, rtol=1e-6)


def pairs_by_hand(model, spec, perms, pts, target, x, y, idx, count):
  """Pairs t < count under `perms`, one jax.grad per pair and batch."""
  loss = lambda q, xs, ys: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      model.apply({"params": q}, xs), ys).mean()
  start = jax.tree.map(lambda p: p[0], pts)
  out = []
  for t in range(count):
    src = jax.tree.map(lambda p, t=t: p[t], pts)
    dst = jax.tree.map(lambda a, d: a + d, target, apply_permutation(
        spec, perms, jax.tree.map(jnp.subtract, src, start)))
    grads = [[jax.grad(loss)(net, x[idx[t, k]], y[idx[t, k]]) for k in range(idx.shape[1])]
             for net in (dst, src)]
    mean = [jax.tree.map(lambda *g: sum(g) / len(g), *gs) for gs in grads]
    out.append((mean[0], mean[1]))
  return out


def test_gmt_solution_beats_the_identity_and_is_the_brute_force_optimum():
  """One hidden layer of 5 units (one permutation, 120 candidates): at every
  step s the pairs t < s, recomputed by hand under pi_{s-1}, give
  L(pi_s) = max over all 120 permutations >= L(identity), and the recorded
  objectives are L(identity) and L(pi_s)."""
  model, spec, params = mlp((5,))
  x, y = task(1)
  steps = 3
  pts = trajectory(model, params(0), x, y, steps=steps, seed=1)
  target = params(7)
  idx = gmt_lib.gradient_batches(np.arange(N), steps, 2, 32, seed=5)
  res = gmt_lib.gmt(spec, model, pts, target, x, y, idx, key=jax.random.key(1), chunk=2)
  assert res.gradient_pairs == steps * (steps + 1) // 2 and len(res.sweeps) == steps
  objective = jax.jit(functools.partial(matching_objective, spec, stacked=True))
  candidates = [jnp.asarray(p, jnp.int32) for p in itertools.permutations(range(5))]
  prev = identity_perms(spec)
  changed = False
  for s in range(1, steps + 1):
    a, b = stack_pairs(pairs_by_hand(model, spec, prev, pts, target, x, y, idx, s))
    values = np.array([float(objective({"dense1": p}, a, b)) for p in candidates])
    found = float(objective(res.perms[s - 1], a, b))
    ident = float(objective(identity_perms(spec), a, b))
    np.testing.assert_allclose(found, values.max(), rtol=1e-5)
    assert found >= ident
    np.testing.assert_allclose(res.objective[s - 1], (ident, found), rtol=1e-4)
    changed = changed or not same(res.perms[s - 1], prev)
    prev = res.perms[s - 1]
  assert changed  # a different init really needs a permutation


def test_fgmt_equals_gmt_up_to_two_points_and_counts_pairs(shared):
  """Pair 0 sits at the two initializations (no displacement), so it does
  not depend on pi: FGMT and GMT solve the same problems at steps 1 and 2
  (so for T = 1 and T = 2), then differ only in the pairs they reuse."""
  model, spec, params, x, y, pts, idx = shared
  target = params(3)
  full = gmt_lib.gmt(spec, model, pts, target, x, y, idx, key=jax.random.key(2), chunk=3)
  fast = gmt_lib.gmt(spec, model, pts, target, x, y, idx, key=jax.random.key(2), fast=True)
  assert all(same(p, q) for p, q in zip(full.perms[:2], fast.perms[:2]))
  np.testing.assert_allclose(full.objective[:2], fast.objective[:2], rtol=1e-5)
  assert (full.gradient_pairs, fast.gradient_pairs) == (T * (T + 1) // 2, T)
  vmapped = gmt_lib.gmt(spec, model, pts, target, x, y, idx, key=jax.random.key(2), chunk=3,
                        vectorize=True)  # the chunk's networks vmapped: the same solves
  assert all(same(p, q) for p, q in zip(full.perms, vmapped.perms))
  np.testing.assert_allclose(full.objective, vmapped.objective, rtol=1e-5)
  assert full.grad_s > 0 and full.assign_s > 0 and full.total_s >= full.grad_s
  one = jax.tree.map(lambda p: p[:2], pts)  # T = 1, literally
  runs = [gmt_lib.gmt(spec, model, one, target, x, y, idx, key=jax.random.key(2), fast=f)
          for f in (False, True)]
  assert same(runs[0].perms[0], runs[1].perms[0]) and same(runs[0].perms[0], full.perms[0])
  assert runs[0].objective == runs[1].objective


def test_oracle_and_gmt_on_a_permuted_copy(shared):
  """The target is a permuted copy of the source, trajectory and all:
  the oracle finds q from the updates, GMT finds q from the gradients at
  every step (grad at q(theta) is q(grad at theta)), and both transfers
  are the target's own trajectory."""
  model, spec, params, x, y, pts, idx = shared
  q = random_perms(spec, jax.random.key(11))
  target_pts = jax.vmap(functools.partial(apply_permutation, spec, q))(pts)
  first = lambda t: jax.tree.map(lambda p: p[0], t)  # noqa: E731
  last = lambda t: jax.tree.map(lambda p: p[-1], t)  # noqa: E731
  later = jax.tree.map(lambda p: p[1:], target_pts)
  orc = gmt_lib.oracle(spec, first(pts), last(pts), first(target_pts), last(target_pts), T,
                       key=jax.random.key(0))
  assert len(orc.perms) == T and all(same(p, q) for p in orc.perms)
  assert orc.objective[0][1] > orc.objective[0][0]
  assert_trees_close(gmt_lib.transferred_points(spec, orc.perms, pts, first(target_pts)),
                     later, rtol=1e-5, atol=1e-6)
  res = gmt_lib.gmt(spec, model, pts, first(target_pts), x, y, idx, key=jax.random.key(0))
  assert all(same(p, q) for p in res.perms)
  assert_trees_close(gmt_lib.transferred_points(spec, res.perms, pts, first(target_pts)),
                     later, rtol=1e-5, atol=1e-6)


def test_errors():
  model, spec, params = mlp((5,))
  x, y = task()
  pts = trajectory(model, params(0), x, y, steps=2)
  idx = gmt_lib.gradient_batches(np.arange(N), 2, 1, 8, seed=0)
  _, _, wide = mlp((6,))
  with pytest.raises(ValueError, match="dense1/kernel"):
    gmt_lib.gmt(spec, model, pts, wide(1), x, y, idx, key=jax.random.key(0))
  with pytest.raises(ValueError, match="source and target differ: dense1/bias"):
    gmt_lib.transfer(spec, identity_perms(spec), params(0), params(1),
                     {**wide(1), "head": params(1)["head"]})
  with pytest.raises(ValueError, match=r"batch_index must be \(T, K, B\) with T >= 2"):
    gmt_lib.gmt(spec, model, pts, params(1), x, y, idx[:1], key=jax.random.key(0))
  with pytest.raises(ValueError, match="at least two points"):
    gmt_lib.num_points(jax.tree.map(lambda p: p[:1], pts))
  with pytest.raises(ValueError, match="3 permutations for a trajectory of T = 2"):
    gmt_lib.transferred_points(spec, gmt_lib.naive(spec, 3).perms, pts, params(1))
  with pytest.raises(ValueError, match="T must be an int >= 1"):
    gmt_lib.naive(spec, 0)


def test_gmt_with_batchnorm_on_a_permuted_copy():
  """ResNet-20 (BatchNorm scale/offset permuted with their units, train-mode
  gradients): GMT on a permuted copy of the trajectory recovers q."""
  model = models.get_model("resnet20", 4, width=2)  # tiny: compiling ResNet-20 dominates
  init = models.make_init_fn(model, (4, 4, 3))
  variables = [init(jax.random.key(s)) for s in (0, 1)]
  params = [v["params"] for v in variables]
  spec = PermutationSpec.for_model("resnet20", params[0])
  pts = gmt_lib.linear_points(params[0], params[1], gmt_lib.spacing(1))
  q = random_perms(spec, jax.random.key(5))
  target_pts = jax.vmap(functools.partial(apply_permutation, spec, q))(pts)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 4, 4, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 64), jnp.int32)
  idx = gmt_lib.gradient_batches(np.arange(64), 1, 1, 32, seed=0)
  res = gmt_lib.gmt(spec, model, pts, jax.tree.map(lambda p: p[0], target_pts), x, y, idx,
                    key=jax.random.key(0), fast=True)
  assert same(res.perms[-1], q)
