"""Optimizers whose learning-rate schedule reads the run's global step.

`make_optimizer(config)` builds the optimizers the five papers use: SGD with
momentum (Ash & Adams' SGD runs; DASH's standard setting lr 1e-3, momentum
0.9; open_lth lr 0.1, momentum 0.9, wd 1e-4), Adam (Ash & Adams, lr 1e-3) and
AdamW. Weight decay for SGD/Adam is PyTorch's coupled L2 (`wd * theta` added
to the gradient), as in the papers' PyTorch code.

The schedule is applied by the last transform, `scale_by_step_schedule`, an
`optax.GradientTransformationExtraArgs` whose `update(..., step=s)` reads the
learning rate at global step `s` (the training core passes the state's
`step`). So the schedule's position and the optimizer's own state are
independent: a run rewound to step k with a FRESH optimizer (open_lth's
rewinding: momentum restarts, the schedule is at k) is `state.step = k` with
`opt_state = tx.init(params)`. Without `step` the transform falls back to its
own update count, like optax's `scale_by_schedule`.

Per-replica hyperparameters: `update(..., hparams={"lr": x})` overrides the
peak learning rate with a traced value, so replicas of one compiled program
(vmapped, each with its `TrainState.hparams`) can sweep it as data.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "warmup_cosine", "sgdr")
SWEEPABLE = ("lr",)  # hyperparameters a replica may carry in TrainState.hparams


def _f(default, help_text: str, **meta):
  return dataclasses.field(default=default, metadata={"help": help_text, **meta})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """An optimizer and its learning-rate schedule.

  `total_steps` is the schedule's horizon (cosine, warmup_cosine, sgdr):
  None means the run's own length, which the study supplies
  (`make_optimizer(config, horizon=...)`)."""
  name: str = _f("adam", "sgd, adam or adamw", flag="optimizer", choices=OPTIMIZERS)
  lr: float = _f(1e-3, "peak learning rate")
  momentum: float = _f(0.9, "SGD momentum")
  weight_decay: float = _f(0.0, "weight decay (coupled L2 for sgd/adam, decoupled for adamw)")
  schedule: str = _f("constant", "learning-rate schedule over the run: " + ", ".join(SCHEDULES),
                     flag="lr_schedule", choices=SCHEDULES)
  total_steps: Optional[int] = _f(None, "the schedule's horizon in steps (default: the run's "
                                  "length)")
  warmup_steps: int = _f(0, "linear learning-rate warm-up steps")
  decay_boundaries: tuple[int, ...] = _f((), "step schedule: steps where lr is multiplied by "
                                         "--decay_factor", flag="decay_steps")
  decay_factor: float = _f(0.1, "step schedule: the factor at each decay step")
  sgdr_t0: int = _f(0, "sgdr: the first cycle's length in steps")
  sgdr_t_mult: float = _f(2.0, "sgdr: each cycle is this many times longer than the last")

  def validate(self) -> None:
    if self.name not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not self.lr > 0:
      raise ValueError(f"learning rate must be positive, got {self.lr}")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
    if self.weight_decay < 0:
      raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup steps must be >= 0, got {self.warmup_steps}")
    if self.total_steps is not None and self.total_steps < 1:
      raise ValueError(f"the schedule's total steps must be >= 1, got {self.total_steps}")
    if self.schedule == "sgdr" and self.sgdr_t0 < 1:
      raise ValueError(f"the sgdr schedule needs a first cycle of >= 1 step, got {self.sgdr_t0}")
    if self.sgdr_t_mult < 1:
      raise ValueError(f"sgdr's cycle multiplier must be >= 1, got {self.sgdr_t_mult}")


Schedule = Callable[[jax.Array, jax.Array], jax.Array]  # (step, peak lr) -> lr


def make_schedule(cfg: OptimizerConfig, horizon: Optional[int] = None) -> Optional[Schedule]:
  """`(step, peak_lr) -> lr`, or None for a constant learning rate.

  The horizon of the decaying schedules is `cfg.total_steps`, else
  `horizon` (the run's length); a decaying schedule with neither is an
  error rather than a hidden default."""
  from wsjax import schedules
  if cfg.schedule == "constant" and cfg.warmup_steps == 0:
    return None
  total = cfg.total_steps or horizon
  if cfg.schedule in ("cosine", "warmup_cosine") and not total:
    raise ValueError(f"the {cfg.schedule} schedule needs a horizon: give its total steps "
                     "(--total_steps) or a run of known length")
  if cfg.schedule == "constant":
    return lambda step, lr: schedules.linear_warmup(lr, cfg.warmup_steps)(step)
  if cfg.schedule == "step":
    base = lambda lr: schedules.step_decay(lr, tuple(cfg.decay_boundaries), cfg.decay_factor)
  elif cfg.schedule == "cosine":
    base = lambda lr: schedules.cosine(lr, total)
  elif cfg.schedule == "warmup_cosine":
    warm = cfg.warmup_steps or max(1, total // 20)
    return lambda step, lr: schedules.warmup_cosine(lr, warm, total)(step)
  else:  # sgdr
    base = lambda lr: schedules.sgdr(lr, cfg.sgdr_t0, cfg.sgdr_t_mult)
  if cfg.warmup_steps:
    return lambda step, lr: schedules.linear_warmup(lr, cfg.warmup_steps, then=base(lr))(step)
  return lambda step, lr: base(lr)(step)


class StepScheduleState(NamedTuple):
  count: jax.Array  # updates made with this state (used when no step is passed)


def scale_by_step_schedule(lr: float, schedule: Optional[Schedule] = None
                           ) -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by `-lr_t`, the learning rate at the global step.

  `update(updates, state, params, *, step=None, hparams=None)`:
  `lr_t = schedule(step, lr')` where `lr' = hparams["lr"]` if given, else `lr`;
  `step` defaults to the transform's own update count. With a constant
  schedule and no `hparams["lr"]` this is optax's `scale(-lr)` exactly (a
  Python-float constant), so results do not change against `optax.sgd/adam`.
  """
  def init(params):
    del params
    return StepScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, step=None, hparams=None, **extra):
    del params, extra
    peak = (hparams or {}).get("lr")
    if step is None:
      step = state.count
    if schedule is None and peak is None:
      step_size = -1 * lr
      updates = jax.tree.map(lambda g: step_size * g, updates)
    else:
      rate = schedule(step, lr if peak is None else peak) if schedule is not None else peak
      updates = jax.tree.map(lambda g: jnp.array(-1 * rate, dtype=g.dtype) * g, updates)
    return updates, StepScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(cfg: OptimizerConfig, horizon: Optional[int] = None
                   ) -> optax.GradientTransformationExtraArgs:
  """The optax optimizer for `cfg` (validated first); its `update` takes
  `step=` (the global step the schedule reads) and `hparams=` (per-replica
  overrides, see `SWEEPABLE`)."""
  cfg.validate()
  parts = []
  if cfg.weight_decay and cfg.name in ("sgd", "adam"):
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  if cfg.name == "sgd":
    if cfg.momentum:
      parts.append(optax.trace(decay=cfg.momentum, nesterov=False))
  else:
    parts.append(optax.scale_by_adam())
    if cfg.name == "adamw":
      parts.append(optax.add_decayed_weights(cfg.weight_decay))
  parts.append(scale_by_step_schedule(cfg.lr, make_schedule(cfg, horizon)))
  return optax.chain(*parts)


def learning_rate(cfg: OptimizerConfig, steps, horizon: Optional[int] = None, lr=None):
  """The learning rate at each of `steps` (for plots and tests)."""
  schedule = make_schedule(cfg, horizon)
  peak = cfg.lr if lr is None else lr
  steps = jnp.asarray(steps)
  if schedule is None:
    return jnp.full(steps.shape, peak, jnp.float32)
  return jax.vmap(lambda s: schedule(s, peak))(steps)
