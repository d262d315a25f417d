"""Optimizers and learning-rate schedules, from optax, by name.

`make_optimizer` builds the optimizers the five papers use: SGD with momentum
(Ash & Adams' SGD runs, DASH's standard setting: lr 1e-3, momentum 0.9;
open_lth: lr 0.1, momentum 0.9, wd 1e-4), Adam (Ash & Adams: lr 1e-3) and
AdamW. Weight decay for SGD/Adam is PyTorch's coupled L2 (`wd * theta` added
to the gradient), as in the papers' PyTorch code.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adam"
  lr: float = 1e-3
  momentum: float = 0.9
  weight_decay: float = 0.0
  schedule: str = "constant"
  total_steps: int = 10_000          # horizon for cosine schedules
  warmup_steps: int = 0
  decay_boundaries: Sequence[int] = ()   # steps where lr is multiplied by decay_factor
  decay_factor: float = 0.1

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


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  if cfg.schedule == "constant":
    base = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "step":
    base = optax.piecewise_constant_schedule(
        cfg.lr, {int(b): cfg.decay_factor for b in cfg.decay_boundaries})
  else:  # cosine
    base = optax.cosine_decay_schedule(cfg.lr, max(1, cfg.total_steps - cfg.warmup_steps))
  if cfg.warmup_steps > 0:
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warm, base], [cfg.warmup_steps])
  return base


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """The optax optimizer for `cfg` (validated first)."""
  cfg.validate()
  lr = make_schedule(cfg)
  if cfg.name == "sgd":
    parts = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
    parts.append(optax.sgd(lr, momentum=cfg.momentum or None))
    return optax.chain(*parts)
  if cfg.name == "adam":
    parts = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
    parts.append(optax.adam(lr))
    return optax.chain(*parts)
  return optax.adamw(lr, weight_decay=cfg.weight_decay)
