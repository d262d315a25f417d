"""Learning-rate schedules of the training heuristics wsjax studies.

Every factory returns an optax-style schedule, `step -> learning rate`: a pure
function of the number of updates done so far (optax's `count`; step 0 is the
rate of the first update), traceable by jax: `step` may be a traced int array
inside `jit`, `vmap` or `scan`, and any shape (the rate is computed
elementwise). Rates (`lr`, `final`, `lr_min`, `init`) may be arrays too, e.g.
per-replica hyperparameters under `vmap`; they are validated only when they
are concrete numbers. Durations are in steps: for a duration in epochs pass
`epochs * steps_per_epoch`.

    constant(lr)                              lr
    step_decay(lr, boundaries, factor)        lr * factor ** #{b <= step}
    cosine(lr, total_steps, final=0)          half-cosine from lr to final
    linear_warmup(lr, warmup_steps, then)     Goyal et al. 2017, then `then`
    warmup_cosine(lr, warmup_steps, total)    linear warm-up, then cosine
    sgdr(lr, t0, t_mult, lr_min=0)            Loshchilov & Hutter 2017
    sgdr_cycle_ends(t0, t_mult, total)        where SGDR's cycles end
    mode_connectivity_schedule(lr, total)     Garipov et al. 2018's curve training

Gotmare et al., "A Closer Look at Deep Learning Heuristics: Learning rate
restarts, Warmup and Distillation", ICLR 2019, compare SGDR (T0 = 10 epochs,
Tmult = 2) with step decay, and large-batch training with and without linear
warm-up; the mode-connecting curves between SGDR's snapshots are trained with
`mode_connectivity_schedule`.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Schedule = Callable[[jax.Array], jax.Array]


# ---- argument checks ---------------------------------------------------------
def _positive_int(name: str, value, minimum: int = 1) -> int:
  """`value` as an int >= `minimum`, else a one-line ValueError."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
  return value


def _concrete(value) -> float | None:
  """`value` as a float, or None when it is traced (or not a scalar)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _check_rate(name: str, value):
  """A learning rate must be finite and >= 0 (checked when concrete)."""
  v = _concrete(value)
  if v is not None and not (math.isfinite(v) and v >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  return value


def _float_step(step) -> jax.Array:
  """The step as a float32 array, negative steps clamped to 0."""
  return jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)


def _int_step(step) -> jax.Array:
  """The step as an int32 array (floored), negative steps clamped to 0."""
  step = jnp.asarray(step)
  if not jnp.issubdtype(step.dtype, jnp.integer):
    step = jnp.floor(step)
  return jnp.maximum(step.astype(jnp.int32), 0)


# ---- schedules ---------------------------------------------------------------
def constant(lr) -> Schedule:
  """`lr` at every step."""
  _check_rate("lr", lr)

  def schedule(step):
    return (jnp.zeros(jnp.shape(step), jnp.float32) + lr).astype(jnp.float32)
  return schedule


def step_decay(lr, boundaries: Sequence[int], factor: float = 0.1) -> Schedule:
  """Piecewise-constant decay: `lr * factor ** k` after the k-th boundary.

      lr(step) = lr * factor ** #{i : boundaries[i] <= step}

  A boundary is the first step with the decayed rate, as PyTorch's
  `MultiStepLR(milestones)` (the step-decay baselines of Gotmare et al. 2019
  and of most CIFAR code). optax's `piecewise_constant_schedule` decays one
  step later (`b_i < step`).

  Args:
    lr: the initial rate.
    boundaries: strictly increasing positive steps.
    factor: the multiplier at each boundary, >= 0 (0.1 in most CIFAR recipes).
  """
  _check_rate("lr", lr)
  bounds = [_positive_int("step_decay: each boundary", b) for b in boundaries]
  if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
    raise ValueError(f"step_decay: boundaries must be strictly increasing, got {list(boundaries)}")
  _check_rate("step_decay: factor", factor)
  bounds_array = jnp.asarray(bounds, jnp.int32)

  def schedule(step):
    step = _int_step(step)
    passed = jnp.sum(step[..., None] >= bounds_array, axis=-1)
    return (lr * jnp.power(jnp.asarray(factor, jnp.float32), passed)).astype(jnp.float32)
  return schedule


def _half_cosine(high, low, fraction):
  """`low + (high - low) (1 + cos(pi fraction)) / 2`: high at 0, low at 1."""
  return low + (high - low) * 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))


def cosine(lr, total_steps: int, final=0.0) -> Schedule:
  """Cosine annealing without restarts (Loshchilov & Hutter, ICLR 2017):

      lr(step) = final + (lr - final) (1 + cos(pi min(step, T) / T)) / 2,
      T = total_steps

  `lr` at step 0, `final` from step T on (optax's `cosine_decay_schedule`
  with `alpha = final / lr`).
  """
  _check_rate("lr", lr)
  _check_rate("cosine: final", final)
  total = _positive_int("cosine: total_steps", total_steps)

  def schedule(step):
    fraction = jnp.minimum(_float_step(step), float(total)) / total
    return _half_cosine(lr, final, fraction).astype(jnp.float32)
  return schedule


def linear_warmup(lr, warmup_steps: int, then: Schedule | None = None,
                  init=None) -> Schedule:
  """Linear warm-up (Goyal et al., "Accurate, Large Minibatch SGD", 2017).

      lr(step) = init + (lr - init) * step / W      for step < W = warmup_steps
      lr(step) = then(step - W)                     for step >= W

  Goyal et al. start from the small-batch rate eta and add a constant amount
  each iteration so that the large-batch rate k * eta is reached after the
  warm-up: `init=eta`, `lr=k*eta`. The default `init = lr / W` starts from a
  small non-zero rate (so the first update is not wasted) and rises by
  `(lr - init) / W` per step, reaching `lr` at step W. `init=0` is a ramp
  "from 0" (how third-party summaries describe Gotmare et al. 2019's warm-up
  to lr 2.5 over 200 iterations at batch 5000), whose first step has rate 0.

  `then` is an optax-style schedule that takes over at step W and is called
  with the steps since the warm-up ended (as `optax.join_schedules`); the
  default holds `lr`. Its rate at 0 should be `lr` for a continuous schedule.
  """
  _check_rate("lr", lr)
  warmup = _positive_int("linear_warmup: warmup_steps", warmup_steps)
  if init is None:
    init = lr / warmup
  _check_rate("linear_warmup: init", init)
  after = constant(lr) if then is None else then

  def schedule(step):
    step = _int_step(step)
    ramp = init + (lr - init) * step.astype(jnp.float32) / warmup
    rest = jnp.asarray(after(jnp.maximum(step - warmup, 0)), jnp.float32)
    return jnp.where(step < warmup, ramp, rest).astype(jnp.float32)
  return schedule


def warmup_cosine(lr, warmup_steps: int, total_steps: int, final=0.0, init=None) -> Schedule:
  """Linear warm-up to `lr` over `warmup_steps`, then cosine annealing to
  `final` over the remaining `total_steps - warmup_steps` steps:

      linear_warmup(lr, W, then=cosine(lr, total_steps - W, final), init)

  Unlike `cosine`, the rate starts small (`init`, default lr / W) and peaks at
  step W; the cosine part is compressed into the steps left after warm-up.
  """
  warmup = _positive_int("warmup_cosine: warmup_steps", warmup_steps)
  total = _positive_int("warmup_cosine: total_steps", total_steps)
  if total <= warmup:
    raise ValueError(f"warmup_cosine: total_steps ({total}) must exceed warmup_steps ({warmup})")
  return linear_warmup(lr, warmup, then=cosine(lr, total - warmup, final), init=init)


def _sgdr_checks(t0, t_mult) -> tuple[int, int]:
  t0 = _positive_int("sgdr: t0 (the first cycle's length in steps)", t0)
  t_mult = _positive_int("sgdr: t_mult (the cycle-length multiplier)", t_mult)
  return t0, t_mult


def _cycle_start(i, t0: int, t_mult: int):
  """The first step of cycle i: t0 (t_mult^i - 1) / (t_mult - 1), or t0 i."""
  if t_mult == 1:
    return t0 * i
  return t0 * (jnp.power(jnp.int32(t_mult), i) - 1) // (t_mult - 1)


def sgdr(lr, t0: int, t_mult: int = 1, lr_min=0.0) -> Schedule:
  """SGDR: cosine annealing with warm restarts (Loshchilov & Hutter, ICLR 2017).

  Cycle i (i = 0, 1, ...) lasts T_i = t0 * t_mult^i steps and starts at
  S_i = t0 (t_mult^i - 1) / (t_mult - 1) (t0 * i when t_mult = 1). Within it,
  with T_cur = step - S_i,

      lr(step) = lr_min + (lr - lr_min) (1 + cos(pi T_cur / T_i)) / 2,

  so the rate is exactly `lr` at every restart S_i and approaches `lr_min` at
  the end of a cycle (the last step of cycle i has T_cur = T_i - 1; the paper
  updates T_cur per batch, in fractional epochs, which is the same thing in
  steps: `t0 = epochs * steps_per_epoch`). Gotmare et al. (2019) use T0 = 10
  epochs, Tmult = 2, restarts at epochs 10, 30, 70, 150.

  The cycle index has a closed form, i = floor(log_m(1 + step (m - 1) / t0)),
  m = t_mult; it is computed in float32 and then corrected with exact integer
  cycle starts (S_i <= step < S_{i+1}), so steps exactly at a restart are
  right under `jit`. Integers are int32: steps up to about 2^31 / t_mult.

  Args:
    lr: the rate at each restart (the paper's eta_max).
    t0: the first cycle's length in steps, an integer >= 1.
    t_mult: the cycle-length multiplier, an integer >= 1 (as PyTorch's
      `CosineAnnealingWarmRestarts`).
    lr_min: the rate approached at the end of each cycle (eta_min).
  """
  _check_rate("lr", lr)
  _check_rate("sgdr: lr_min", lr_min)
  t0, t_mult = _sgdr_checks(t0, t_mult)

  def schedule(step):
    n = _int_step(step)
    if t_mult == 1:
      i = n // t0
    else:
      x = 1.0 + n.astype(jnp.float32) * ((t_mult - 1) / t0)
      i = jnp.floor(jnp.log(x) / math.log(t_mult)).astype(jnp.int32)
      i = jnp.maximum(i, 0)
      # float rounding can put i one off next to a restart: fix it exactly.
      i = jnp.where(_cycle_start(i + 1, t0, t_mult) <= n, i + 1, i)
      i = jnp.where(_cycle_start(i, t0, t_mult) > n, i - 1, i)
    start = _cycle_start(i, t0, t_mult)
    length = t0 * jnp.power(jnp.int32(t_mult), i) if t_mult > 1 else t0
    t_cur = n - start
    value = _half_cosine(lr, lr_min, t_cur.astype(jnp.float32) / length)
    # exactly lr at a restart (lr_min + (lr - lr_min) may round otherwise)
    return jnp.where(t_cur == 0, jnp.asarray(lr, jnp.float32), value).astype(jnp.float32)
  return schedule


def sgdr_cycle_ends(t0: int, t_mult: int, total_steps: int) -> tuple[int, ...]:
  """The steps at which SGDR's cycles end, up to and including `total_steps`.

  Cycle i covers steps [S_i, S_{i+1}); its end is S_{i+1} = the number of
  updates done when it completes, which is where Gotmare et al. (2019) take
  the snapshot before each restart (the state after step S_{i+1} - 1). For
  t0 = 10, t_mult = 2, total_steps = 100: (10, 30, 70). A cycle still running
  at `total_steps` is not listed.
  """
  t0, t_mult = _sgdr_checks(t0, t_mult)
  total = _positive_int("sgdr_cycle_ends: total_steps", total_steps)
  ends = []
  end, length = t0, t0
  while end <= total:
    ends.append(end)
    length *= t_mult
    end += length
  return tuple(ends)


def mode_connectivity_schedule(lr, total_steps: int, steps_per_epoch: int | None = None) -> Schedule:
  """The learning rate of curve training (Garipov et al., "Loss Surfaces, Mode
  Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018; code
  timgaripov/dnn-mode-connectivity, train.py `learning_rate_schedule`):

      alpha = fraction of training done
      lr(alpha) = lr                                      alpha <= 0.5
                = lr (1 - 0.99 (alpha - 0.5) / 0.4)       0.5 < alpha <= 0.9
                = 0.01 lr                                 alpha > 0.9

  constant for the first half, linear decay to 1% of `lr` at 90%, then 1%.

  The reference sets the rate once per epoch e = 1..E with alpha = e / E (the
  fraction at the END of the epoch). With `steps_per_epoch` this schedule
  does the same: alpha = (step // steps_per_epoch + 1) * steps_per_epoch /
  total_steps, constant within an epoch. Without it (default) the rate is
  updated every step with alpha = step / total_steps, a continuous version
  that is at most one epoch's worth of decay later than the reference.
  """
  _check_rate("lr", lr)
  total = _positive_int("mode_connectivity_schedule: total_steps", total_steps)
  per_epoch = None
  if steps_per_epoch is not None:
    per_epoch = _positive_int("mode_connectivity_schedule: steps_per_epoch", steps_per_epoch)

  def schedule(step):
    n = _int_step(step)
    if per_epoch is not None:
      n = (n // per_epoch + 1) * per_epoch
    alpha = n.astype(jnp.float32) / total
    decay = 1.0 - (alpha - 0.5) / 0.4 * 0.99
    factor = jnp.where(alpha <= 0.5, 1.0, jnp.where(alpha <= 0.9, decay, 0.01))
    return (lr * factor).astype(jnp.float32)
  return schedule


__all__ = [
    "Schedule", "constant", "cosine", "linear_warmup", "mode_connectivity_schedule", "sgdr",
    "sgdr_cycle_ends", "step_decay", "warmup_cosine",
]
