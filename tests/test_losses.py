"""wsjax.losses: cross-entropy and Hinton et al.'s distillation loss against NumPy float64."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax import losses

RNG = np.random.default_rng(0)
STUDENT = RNG.normal(0, 2, (6, 5)).astype(np.float32)
TEACHER = RNG.normal(0, 3, (6, 5)).astype(np.float32)
LABELS = np.array([0, 4, 2, 2, 1, 3])


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ce64(logits, labels):
  return -np.mean(_log_softmax64(logits)[np.arange(len(labels)), labels])


def _kd64(student, teacher, labels, temperature, alpha):
  log_q = _log_softmax64(np.asarray(student, np.float64) / temperature)
  log_p = _log_softmax64(np.asarray(teacher, np.float64) / temperature)
  kl = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))
  return (1 - alpha) * _ce64(student, labels) + alpha * temperature ** 2 * kl


def test_cross_entropy_against_numpy():
  np.testing.assert_allclose(losses.cross_entropy(STUDENT, LABELS), _ce64(STUDENT, LABELS), rtol=1e-6)


@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.9), (1.0, 0.5), (2.5, 1.0), (10.0, 0.1)])
def test_distillation_loss_against_numpy(temperature, alpha):
  got = losses.distillation_loss(STUDENT, TEACHER, LABELS, temperature, alpha)
  np.testing.assert_allclose(got, _kd64(STUDENT, TEACHER, LABELS, temperature, alpha), rtol=1e-5)


def test_alpha_zero_is_cross_entropy_and_a_matching_student_has_no_soft_loss():
  np.testing.assert_allclose(losses.distillation_loss(STUDENT, TEACHER, LABELS, 4.0, 0.0),
                             losses.cross_entropy(STUDENT, LABELS), rtol=1e-7)
  np.testing.assert_allclose(losses.distillation_loss(TEACHER, TEACHER, LABELS, 4.0, 1.0), 0.0, atol=1e-6)
  # the defaults are T = 4, a = 0.9
  np.testing.assert_allclose(losses.distillation_loss(STUDENT, TEACHER, LABELS),
                             _kd64(STUDENT, TEACHER, LABELS, 4.0, 0.9), rtol=1e-5)


def test_temperature_scaling():
  # Scaling both logits and T by c leaves the softened distributions alone: only T^2 changes.
  c = 3.0
  base = losses.distillation_loss(STUDENT, TEACHER, LABELS, 2.0, 1.0)
  scaled = losses.distillation_loss(c * STUDENT, c * TEACHER, LABELS, 2.0 * c, 1.0)
  np.testing.assert_allclose(scaled, c ** 2 * base, rtol=1e-5)
  # High-T limit (Hinton et al. 2015, sec. 2.1): T^2 KL -> sum_c (v'_c - z'_c)^2 / (2 C) per example,
  # with v', z' the teacher's and student's logits centred over the classes.
  with jax.enable_x64(True):
    s64, t64 = STUDENT.astype(np.float64), TEACHER.astype(np.float64)
    soft = float(losses.distillation_loss(s64, t64, LABELS, 1e3, 1.0))
  centred = (t64 - t64.mean(-1, keepdims=True)) - (s64 - s64.mean(-1, keepdims=True))
  limit = np.mean(np.sum(centred ** 2, -1)) / (2 * STUDENT.shape[-1])
  np.testing.assert_allclose(soft, limit, rtol=2e-2)


def test_gradients_reach_the_student_only():
  temperature, alpha = 3.0, 0.7

  def loss(s, t):
    return losses.distillation_loss(s, t, LABELS, temperature, alpha)

  g_student, g_teacher = jax.grad(loss, argnums=(0, 1))(jnp.asarray(STUDENT), jnp.asarray(TEACHER))
  np.testing.assert_array_equal(g_teacher, 0.0)
  # by hand: d/dz [(1 - a) CE + a T^2 KL] = ((1 - a)(softmax(z) - onehot) + a T (q_T - p_T)) / B
  batch = STUDENT.shape[0]
  onehot = np.eye(5)[LABELS]
  q1 = np.exp(_log_softmax64(STUDENT))
  q_t = np.exp(_log_softmax64(STUDENT / temperature))
  p_t = np.exp(_log_softmax64(TEACHER / temperature))
  expected = ((1 - alpha) * (q1 - onehot) + alpha * temperature * (q_t - p_t)) / batch
  np.testing.assert_allclose(g_student, expected, rtol=1e-4, atol=1e-7)


def test_traced_hyperparameters_under_vmap():
  temps = jnp.array([1.0, 4.0])
  alphas = jnp.array([0.5, 0.9])
  got = jax.jit(jax.vmap(lambda t, a: losses.distillation_loss(STUDENT, TEACHER, LABELS, t, a)))(temps, alphas)
  expected = [_kd64(STUDENT, TEACHER, LABELS, 1.0, 0.5), _kd64(STUDENT, TEACHER, LABELS, 4.0, 0.9)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature must be"),
    ({"temperature": -1.0}, "temperature must be"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
])
def test_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    losses.distillation_loss(STUDENT, TEACHER, LABELS, **kwargs)


def test_shape_mismatch_is_a_value_error():
  with pytest.raises(ValueError, match="same shape"):
    losses.distillation_loss(STUDENT, TEACHER[:, :4], LABELS)
