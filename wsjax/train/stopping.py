"""Stopping rules for a stage.

* Threshold (Ash & Adams 2020: 99%; DASH, Shin et al. 2024: 99.9%): train
  until the epoch-mean training accuracy (correct predictions over the
  epoch's training batches, as the official code counts it) reaches
  `threshold`, for at most `max_epochs` epochs. Each seed stops on its own;
  a stopped seed is frozen while the others continue.
* Fixed: exactly `epochs` epochs (`threshold=None`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class StoppingRule:
  threshold: Optional[float] = 0.99
  max_epochs: int = 100

  def validate(self) -> None:
    if self.threshold is not None and not 0 < self.threshold <= 1:
      raise ValueError(f"stopping threshold must be in (0, 1], got {self.threshold}")
    if self.max_epochs < 1:
      raise ValueError(f"max epochs must be >= 1, got {self.max_epochs}")

  def still_active(self, active: np.ndarray, epoch_acc: np.ndarray, epochs_done: int) -> np.ndarray:
    """Which seeds keep training after `epochs_done` epochs with these accuracies."""
    if epochs_done >= self.max_epochs:
      return np.zeros_like(active)
    if self.threshold is None:
      return active
    return active & ~(epoch_acc >= self.threshold)
