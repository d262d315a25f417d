"""Training durations and positions: the `Step` type and its strings.

A step is a global iteration count: the number of optimizer steps since the
run's origin (step 0, the initialization). As in open_lth (Frankle et al.
2020; `foundations/step.py`), a step can be written in iterations, epochs or
both, where an epoch is `iterations_per_epoch` iterations of the data the run
trains on:

    "500it"     iteration 500
    "2ep"       iteration 2 * iterations_per_epoch
    "2ep100it"  iteration 2 * iterations_per_epoch + 100

and `Step.ep`, `Step.it` give it back as (whole epochs, iterations into the
epoch). A bare integer string ("500") means iterations.
"""
from __future__ import annotations

import dataclasses
import re

_PATTERN = re.compile(r"^\s*(?:(\d+)\s*ep)?\s*(?:(\d+)\s*it)?\s*$")


class StepError(ValueError):
  """A malformed step string or an impossible step."""


@dataclasses.dataclass(frozen=True, order=True)
class Step:
  """A global iteration, with the epoch length that reads it as epochs."""
  iteration: int
  iterations_per_epoch: int = dataclasses.field(compare=False)

  def __post_init__(self):
    if self.iterations_per_epoch < 1:
      raise StepError(f"iterations per epoch must be >= 1, got {self.iterations_per_epoch}")
    if self.iteration < 0:
      raise StepError(f"a step must be >= 0, got {self.iteration}")

  @classmethod
  def parse(cls, text: str | int, iterations_per_epoch: int) -> "Step":
    """`Step` from "500it", "2ep", "2ep100it", "500" or an int (iterations)."""
    if isinstance(text, int):
      return cls(text, iterations_per_epoch)
    m = _PATTERN.match(str(text))
    if text is None or not str(text).strip() or not m:
      if str(text).strip().isdigit():
        return cls(int(text), iterations_per_epoch)
      raise StepError(f"malformed step {text!r}; write iterations and/or epochs, e.g. "
                      "500it, 2ep or 2ep100it")
    if m.group(1) is None and m.group(2) is None:
      raise StepError(f"malformed step {text!r}; write e.g. 500it, 2ep or 2ep100it")
    ep = int(m.group(1) or 0)
    it = int(m.group(2) or 0)
    return cls(ep * iterations_per_epoch + it, iterations_per_epoch)

  @classmethod
  def zero(cls, iterations_per_epoch: int) -> "Step":
    return cls(0, iterations_per_epoch)

  @property
  def ep(self) -> int:
    """Whole epochs before this step."""
    return self.iteration // self.iterations_per_epoch

  @property
  def it(self) -> int:
    """Iterations into the current epoch."""
    return self.iteration % self.iterations_per_epoch

  def __add__(self, other: "Step | int") -> "Step":
    n = other.iteration if isinstance(other, Step) else int(other)
    return Step(self.iteration + n, self.iterations_per_epoch)

  def __int__(self) -> int:
    return self.iteration

  def __str__(self) -> str:
    if self.iteration == 0:
      return "0it"
    ep, it = self.ep, self.it
    return (f"{ep}ep" if ep else "") + (f"{it}it" if it else "")


def parse_step(text: str | int, iterations_per_epoch: int) -> int:
  """The iteration a step string names (see `Step.parse`)."""
  return Step.parse(text, iterations_per_epoch).iteration
