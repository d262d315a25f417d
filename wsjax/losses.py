"""Classification losses: softmax cross-entropy and knowledge distillation.

    cross_entropy(logits, labels)                      mean softmax CE
    distillation_loss(student, teacher, labels, T, a)  Hinton et al. 2015

Both take logits `(..., classes)` and integer labels `(...)` and return the
mean over all examples, a float32 scalar; both are pure and jit/vmap-friendly.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels) -> jax.Array:
  """Mean softmax cross-entropy with integer labels:

      CE = mean_i [ -log softmax(logits_i)[labels_i] ]

  (`optax.softmax_cross_entropy_with_integer_labels`, averaged over every
  leading axis.)
  """
  logits = jnp.asarray(logits)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _concrete(value) -> float | None:
  """`value` as a float, or None when it is traced (a per-replica value)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def distillation_loss(student_logits, teacher_logits, labels, temperature=4.0,
                      alpha=0.9) -> jax.Array:
  """Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge
  in a Neural Network", 2015), the loss Gotmare et al. (2019) train students
  with:

      L = (1 - a) CE(student, y) + a T^2 KL(p_T || q_T),
      p_T = softmax(teacher / T),  q_T = softmax(student / T),
      KL(p || q) = sum_c p_c (log p_c - log q_c),

  averaged over the batch. The factor T^2 keeps the soft term's gradients on
  the scale of the hard term's as T changes (the soft gradients scale as
  1 / T^2). The teacher's logits are under `stop_gradient`: the loss trains
  the student only. `a = 0` is plain cross-entropy; `a = 1` pure distillation.

  Args:
    student_logits: `(..., classes)`.
    teacher_logits: `(..., classes)`, same shape.
    labels: integer labels `(...)`.
    temperature: T > 0 (default 4).
    alpha: the soft term's weight a, in [0, 1] (default 0.9).

  `temperature` and `alpha` may be traced (per-replica hyperparameters); they
  are validated when concrete.
  """
  t = _concrete(temperature)
  if t is not None and not (math.isfinite(t) and t > 0):
    raise ValueError(f"distillation_loss: temperature must be a finite number > 0, got {temperature!r}")
  a = _concrete(alpha)
  if a is not None and not 0.0 <= a <= 1.0:
    raise ValueError(f"distillation_loss: alpha must be in [0, 1], got {alpha!r}")
  if jnp.shape(student_logits) != jnp.shape(teacher_logits):
    raise ValueError(f"distillation_loss: student logits {jnp.shape(student_logits)} and teacher "
                     f"logits {jnp.shape(teacher_logits)} must have the same shape")
  dtype = jnp.promote_types(jnp.asarray(student_logits).dtype, jnp.float32)
  student = jnp.asarray(student_logits, dtype)
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logits, dtype))
  hard = cross_entropy(student, labels)
  log_q = jax.nn.log_softmax(student / temperature, axis=-1)
  log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
  kl = optax.losses.kl_divergence_with_log_targets(log_q, log_p).mean()
  return (1.0 - alpha) * hard + alpha * temperature ** 2 * kl
