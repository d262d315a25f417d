"""Tasks: what a training program minimizes and measures.

A task turns (model, parameters, a batch, the program's `inputs`) into the
loss to differentiate and the metrics to count, and may project the
parameters after every update. Everything a task needs besides the
parameters (a penalty's reference, a pruning mask, a curve's endpoints, a
teacher's variables) comes in `inputs`, a per-replica pytree that is an
ARGUMENT of the compiled program, never a closure: one program serves every
mask, reference or teacher, and replicas can differ in them.

Tasks are frozen dataclasses (hashable: a program is compiled per task):

* `Classification(penalty=None, masked=False, batch_transform=None)`:
  mean softmax cross-entropy `CE(f(theta; x), y)`, plus
  `penalty(theta, inputs["penalty"])` if given (e.g. DASH's `l2_init`); with
  `masked`, pruned weights are held at exactly zero after every update,
  `theta <- theta * inputs["mask"]` (a cleaner equivalent of open_lth's
  re-zeroing before every forward pass: gradients and momentum of pruned
  weights are not masked in either); `batch_transform(key, x, y) -> (x, y)`
  alters each batch inside the step (e.g. rotation pre-training).
* `Distillation(teacher, temperature, alpha)`: Hinton et al. (2015),
  `(1 - a) CE(s, y) + a T^2 KL(softmax(t / T) || softmax(s / T))` with the
  teacher's variables in `inputs["teacher"]`.
* `CurveTask(curve, weight_decay)`: Garipov et al. (2018): the trained
  parameters are a curve's middle bends, the loss is the cross-entropy at
  `phi(t)`, one `t ~ U(0, 1)` per step and replica, plus
  `0.5 * wd * ||phi(t)||^2`; the endpoints are `inputs["endpoints"]`.

`Task.loss(model, params, batch_stats, x, y, inputs, key)` returns
`(objective, (ce, logits, new_batch_stats, labels))`: the program reports `ce`
(the batch's mean cross-entropy) and counts `argmax(logits) == labels` (the
labels the loss used, e.g. rotation indices)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def apply_model(model, params, batch_stats, x, *, train: bool, key=None):
  """`model.apply` in train or eval mode; returns (logits, new batch_stats).

  In train mode BatchNorm normalizes with the batch's statistics and its
  running statistics are updated; models without BatchNorm (`batch_stats`
  empty) return theirs unchanged."""
  variables = {"params": params}
  rngs = {"dropout": key} if key is not None else None
  if batch_stats:
    variables["batch_stats"] = batch_stats
    if train:
      logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
      return logits, new["batch_stats"]
    return model.apply(variables, x, train=False), batch_stats
  return model.apply(variables, x, train=train, rngs=rngs), batch_stats


@dataclasses.dataclass(frozen=True)
class Task:
  """The base task: classification cross-entropy, nothing else."""

  def loss(self, model, params, batch_stats, x, y, inputs, key):
    logits, new_stats = apply_model(model, params, batch_stats, x, train=True, key=key)
    ce = cross_entropy(logits, y)
    return ce, (ce, logits, new_stats, y)

  def after_update(self, params, inputs):
    """A projection of the parameters after every update (identity here)."""
    del inputs
    return params

  def model_params(self, params, inputs):
    """The parameters the model is evaluated with (a curve: its midpoint)."""
    del inputs
    return params


@dataclasses.dataclass(frozen=True)
class Classification(Task):
  """Cross-entropy, an optional penalty, an optional mask, an optional batch transform."""
  penalty: Optional[Callable[[Any, Any], jax.Array]] = None
  masked: bool = False
  batch_transform: Optional[Callable] = None

  def loss(self, model, params, batch_stats, x, y, inputs, key):
    drop_key = key
    if self.batch_transform is not None:
      key, drop_key = jax.random.split(key)
      x, y = self.batch_transform(key, x, y)
    logits, new_stats = apply_model(model, params, batch_stats, x, train=True, key=drop_key)
    ce = cross_entropy(logits, y)
    total = ce if self.penalty is None else ce + self.penalty(params, inputs["penalty"])
    return total, (ce, logits, new_stats, y)

  def after_update(self, params, inputs):
    if not self.masked:
      return params
    return jax.tree.map(lambda p, m: p * m.astype(p.dtype), params, inputs["mask"])


@dataclasses.dataclass(frozen=True)
class Distillation(Task):
  """Knowledge distillation from a teacher (Hinton et al. 2015), the teacher's
  variables in `inputs["teacher"]` (`{"params"[, "batch_stats"]}`)."""
  teacher: Any = None                 # the teacher's Flax module
  temperature: float = 4.0
  alpha: float = 0.9

  def loss(self, model, params, batch_stats, x, y, inputs, key):
    from wsjax import losses
    logits, new_stats = apply_model(model, params, batch_stats, x, train=True, key=key)
    t_vars = inputs["teacher"]
    t_logits, _ = apply_model(self.teacher, t_vars["params"], t_vars.get("batch_stats", {}), x,
                              train=False)
    total = losses.distillation_loss(logits, t_logits, y, temperature=self.temperature,
                                     alpha=self.alpha)
    ce = cross_entropy(logits, y)
    return total, (ce, logits, new_stats, y)


@dataclasses.dataclass(frozen=True)
class CurveTask(Task):
  """Training a mode-connecting curve (Garipov et al. 2018): `params` are the
  middle bends (a leading bend axis), `inputs["endpoints"]` the two fixed
  ends; per step one `t ~ U(0, 1)` from the step's key."""
  curve: Any = None                   # a wsjax.analysis.curves.Curve
  weight_decay: float = 0.0

  def loss(self, model, params, batch_stats, x, y, inputs, key):
    t_key, drop_key = jax.random.split(key)
    t = jax.random.uniform(t_key, ())
    point = self.curve.phi(params, inputs["endpoints"], t)
    logits, new_stats = apply_model(model, point, batch_stats, x, train=True, key=drop_key)
    ce = cross_entropy(logits, y)
    l2 = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(point))
    return ce + 0.5 * self.weight_decay * l2, (ce, logits, new_stats, y)

  def model_params(self, params, inputs):
    return self.curve.phi(params, inputs["endpoints"], 0.5)
