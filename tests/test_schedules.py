"""wsjax.schedules: values by hand and by brute force, at and around every boundary."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax import schedules as S

ALL = {
    "constant": lambda: S.constant(0.3),
    "step_decay": lambda: S.step_decay(0.3, [7, 20], 0.1),
    "cosine": lambda: S.cosine(0.3, 40, final=0.01),
    "linear_warmup": lambda: S.linear_warmup(0.3, 8),
    "warmup_cosine": lambda: S.warmup_cosine(0.3, 8, 40),
    "sgdr": lambda: S.sgdr(0.3, 5, 2, lr_min=0.003),
    "mode_connectivity": lambda: S.mode_connectivity_schedule(0.3, 40),
    "mode_connectivity_epochs": lambda: S.mode_connectivity_schedule(0.3, 40, steps_per_epoch=4),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_schedule_is_elementwise_and_jits_with_traced_steps(name):
  schedule = ALL[name]()
  steps = np.arange(0, 50)
  vector = np.asarray(jax.jit(schedule)(jnp.asarray(steps, jnp.int32)))
  assert vector.shape == steps.shape and vector.dtype == np.float32
  assert np.isfinite(vector).all() and (vector >= 0).all()
  scalar = jax.jit(schedule)
  for s in (0, 1, 7, 19, 20, 31, 49):
    assert float(scalar(jnp.int32(s))) == pytest.approx(float(vector[s]), rel=1e-6)
  scanned = jax.lax.scan(lambda c, s: (c, schedule(s)), 0, jnp.arange(50))[1]
  np.testing.assert_allclose(scanned, vector, rtol=1e-6)


def test_constant():
  np.testing.assert_allclose(S.constant(0.3)(jnp.arange(4)), [0.3] * 4, rtol=1e-7)


def test_step_decay_decays_at_each_boundary():
  values = np.asarray(S.step_decay(1.0, [3, 5], 0.1)(jnp.arange(7)))
  np.testing.assert_allclose(values, [1, 1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_cosine_by_hand():
  f = S.cosine(1.0, 100, final=0.2)
  np.testing.assert_allclose(f(jnp.array([0, 25, 50, 100, 150])),
                             [1.0, 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2, 0.6, 0.2, 0.2], rtol=1e-6)


def test_linear_warmup_values():
  np.testing.assert_allclose(S.linear_warmup(1.0, 4)(jnp.arange(7)),
                             [0.25, 0.4375, 0.625, 0.8125, 1, 1, 1], rtol=1e-6)
  np.testing.assert_allclose(S.linear_warmup(1.0, 4, init=0.0)(jnp.arange(6)),
                             [0, 0.25, 0.5, 0.75, 1, 1], rtol=1e-6)
  # Goyal et al.: from the small-batch rate eta to k * eta (here eta = 0.1, k = 5)
  np.testing.assert_allclose(S.linear_warmup(0.5, 5, init=0.1)(jnp.arange(7)),
                             [0.1, 0.18, 0.26, 0.34, 0.42, 0.5, 0.5], rtol=1e-6)
  # `then` takes over at the end of warm-up, counting from 0 there
  then = S.step_decay(1.0, [3], 0.1)
  np.testing.assert_allclose(S.linear_warmup(1.0, 4, then=then, init=0.0)(jnp.arange(9)),
                             [0, 0.25, 0.5, 0.75, 1, 1, 1, 0.1, 0.1], rtol=1e-6)


def test_warmup_cosine_by_hand_and_unlike_cosine():
  warm = S.warmup_cosine(1.0, 10, 110)
  plain = S.cosine(1.0, 110)
  np.testing.assert_allclose(warm(jnp.array([0, 5, 10, 60, 110, 200])),
                             [0.1, 0.55, 1.0, 0.5, 0.0, 0.0], rtol=1e-6, atol=1e-7)
  steps = jnp.arange(111)
  diff = np.abs(np.asarray(warm(steps)) - np.asarray(plain(steps)))
  assert diff[0] == pytest.approx(0.9) and diff.max() > 0.1
  # after warm-up, warmup_cosine is a cosine over the remaining 100 steps
  np.testing.assert_allclose(warm(steps[10:]), S.cosine(1.0, 100)(steps[10:] - 10), rtol=1e-6, atol=1e-7)


# ---- SGDR ---------------------------------------------------------------------------
def _sgdr_brute_force(step, lr, t0, t_mult, lr_min):
  start, length = 0, t0
  while step >= start + length:
    start += length
    length *= t_mult
  return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * (step - start) / length)) / 2


def test_sgdr_t0_10_t_mult_2_by_hand():
  f = jax.jit(S.sgdr(1.0, 10, 2))
  # restarts at 10, 30, 70: back to the maximum, exactly
  for s in (0, 10, 30, 70, 150):
    assert float(f(jnp.int32(s))) == 1.0
  # the step before a restart: T_cur = T_i - 1
  for s, length in ((9, 10), (29, 20), (69, 40)):
    assert float(f(jnp.int32(s))) == pytest.approx((1 + math.cos(math.pi * (length - 1) / length)) / 2,
                                                  abs=1e-7)
  # mid-cycle: T_cur / T_i = 1/2 -> lr / 2; a quarter in -> (1 + cos(pi / 4)) / 2
  for s in (5, 20, 50, 110):
    assert float(f(jnp.int32(s))) == pytest.approx(0.5, abs=1e-6)
  assert float(f(jnp.int32(35))) == pytest.approx((1 + math.cos(math.pi / 8)) / 2, rel=1e-6)
  assert float(f(jnp.int32(11))) == pytest.approx((1 + math.cos(math.pi / 20)) / 2, rel=1e-6)


@pytest.mark.parametrize("t0,t_mult", [(10, 1), (10, 2), (1, 2), (3, 3), (7, 3), (2, 5)])
def test_sgdr_matches_brute_force_at_every_step(t0, t_mult):
  lr, lr_min = 0.1, 0.001
  steps = np.arange(0, 3000)
  got = np.asarray(jax.jit(S.sgdr(lr, t0, t_mult, lr_min))(jnp.asarray(steps, jnp.int32)))
  expected = [_sgdr_brute_force(int(s), lr, t0, t_mult, lr_min) for s in steps]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  for end in S.sgdr_cycle_ends(t0, t_mult, 2999):
    assert got[end] == np.float32(lr)  # exactly the maximum at every restart


@pytest.mark.parametrize("t0,t_mult", [(1, 2), (3, 3), (1, 7)])
def test_sgdr_restarts_stay_exact_at_large_steps(t0, t_mult):
  f = jax.jit(S.sgdr(1.0, t0, t_mult))
  ends = S.sgdr_cycle_ends(t0, t_mult, 20_000_000)
  restarts = jnp.asarray(ends, jnp.int32)
  np.testing.assert_array_equal(f(restarts), 1.0)
  before = np.asarray(f(restarts - 1))
  expected = [_sgdr_brute_force(e - 1, 1.0, t0, t_mult, 0.0) for e in ends]
  np.testing.assert_allclose(before, expected, rtol=1e-4, atol=1e-6)
  assert (before[1:] < 0.5).all()  # (with t0 = 1 the first cycle is one step: a restart)


def test_sgdr_cycle_ends():
  assert S.sgdr_cycle_ends(10, 2, 100) == (10, 30, 70)
  assert S.sgdr_cycle_ends(10, 2, 70) == (10, 30, 70)
  assert S.sgdr_cycle_ends(10, 2, 69) == (10, 30)
  assert S.sgdr_cycle_ends(10, 2, 9) == ()
  assert S.sgdr_cycle_ends(10, 1, 35) == (10, 20, 30)
  assert S.sgdr_cycle_ends(1, 3, 40) == (1, 4, 13, 40)


def test_sgdr_with_per_replica_rates_under_vmap():
  lrs = jnp.array([0.1, 0.2])
  values = jax.jit(jax.vmap(lambda lr, s: S.sgdr(lr, 10, 2)(s)))(lrs, jnp.array([10, 15]))
  np.testing.assert_allclose(values, [0.1, 0.2 * (1 + math.cos(math.pi / 4)) / 2], rtol=1e-6)


# ---- mode connectivity ---------------------------------------------------------------
def test_mode_connectivity_schedule_at_fractions_of_training():
  f = S.mode_connectivity_schedule(0.05, 1000)
  got = np.asarray(f(jnp.array([0, 250, 500, 600, 700, 900, 950, 1000])))
  np.testing.assert_allclose(got, 0.05 * np.array([1, 1, 1, 0.7525, 0.505, 0.01, 0.01, 0.01]), rtol=1e-5)


def test_mode_connectivity_schedule_per_epoch_like_the_reference():
  # 10 epochs of 3 steps; epoch e = 1..10 runs at the fraction e / 10 (end of the epoch)
  f = S.mode_connectivity_schedule(1.0, 30, steps_per_epoch=3)
  got = np.asarray(f(jnp.arange(30))).reshape(10, 3)
  assert (got == got[:, :1]).all()  # constant within an epoch
  per_epoch = [1, 1, 1, 1, 1, 1 - 0.25 * 0.99, 1 - 0.5 * 0.99, 1 - 0.75 * 0.99, 0.01, 0.01]
  np.testing.assert_allclose(got[:, 0], per_epoch, rtol=1e-5)


# ---- errors ------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: S.sgdr(0.1, 0, 2), "t0"),
    (lambda: S.sgdr(0.1, 10, 1.5), "t_mult"),
    (lambda: S.sgdr(-0.1, 10, 2), "lr must be"),
    (lambda: S.sgdr(float("nan"), 10, 2), "lr must be"),
    (lambda: S.step_decay(0.1, [5, 3]), "strictly increasing"),
    (lambda: S.step_decay(0.1, [0]), "boundary"),
    (lambda: S.cosine(0.1, 0), "total_steps"),
    (lambda: S.linear_warmup(0.1, 0), "warmup_steps"),
    (lambda: S.warmup_cosine(0.1, 10, 10), "must exceed warmup_steps"),
    (lambda: S.mode_connectivity_schedule(0.1, 100, steps_per_epoch=0), "steps_per_epoch"),
    (lambda: S.sgdr_cycle_ends(10, 2, 0), "total_steps"),
])
def test_user_errors_are_value_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()
