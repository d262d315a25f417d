"""What inputs each model takes, and a one-line error when a dataset does not fit.

Per-example input shapes (no batch axis):

* `logreg`, `mlp`: anything (flattened);
* `conv1d`: 1-D signals `(length, channels)` (or `(length,)`), e.g. MNIST-1D's
  `(40, 1)`;
* `resnet*`, `vgg*`, `conv8`: images `(height, width, channels)`; VGGs and
  Conv8 pool 5 and 4 times by 2, so their images need a side of at least 32
  and 16.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_IMAGES = "images (height, width, channels)"
_EXPECTED = {
    "conv1d": (2, "1-D signals (length, channels), e.g. MNIST-1D's (40, 1)"),
}


def expected_input(name: str) -> tuple[int | None, str]:
  """(rank of one example or None for any, description) of model `name`."""
  if name in _EXPECTED:
    return _EXPECTED[name]
  if name.startswith(("resnet", "vgg", "conv8")):
    return 3, _IMAGES
  return None, "inputs of any shape (flattened)"


def check_input(name: str, model, input_shape: Sequence[int]) -> None:
  """Raises ValueError (one line) unless `model` accepts one example of
  `input_shape`: the rank first, then an abstract forward pass."""
  input_shape = tuple(int(d) for d in input_shape)
  rank, what = expected_input(name)
  if rank is not None and len(input_shape) not in ((rank, rank - 1) if name == "conv1d" else (rank,)):
    raise ValueError(f"model {name!r} takes {what}; this dataset's examples have shape "
                     f"{input_shape}; choose a model that fits the data")
  try:
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)),
                                      train=False))
  except Exception as e:  # noqa: BLE001 - any failure means the shapes do not fit
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    raise ValueError(f"model {name!r} takes {what} and cannot run on this dataset's examples "
                     f"of shape {input_shape} ({detail})") from e
