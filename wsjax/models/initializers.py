"""Parameter initializers of the official code of the studies wsjax reimplements.

Initialization changes results (see /work/shared/PAPERS.md, "Initialization in
the official code"), so every wsjax model takes an init scheme by name:

- ``"torch"``: PyTorch's default for ``nn.Linear`` / ``nn.Conv{1,2}d``
  (``reset_parameters``): the weight is drawn by ``kaiming_uniform_(w,
  a=sqrt(5))``, whose bound ``gain * sqrt(3 / fan_in)`` with ``gain =
  sqrt(2 / (1 + a^2)) = sqrt(1/3)`` is ``1/sqrt(fan_in)``, and the bias is
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; BatchNorm weight 1, bias 0. The
  official code of Ash & Adams (2020, github.com/JordanAsh/warm_start) and of
  DASH (Shin et al., 2024) builds its models with these defaults.
- ``"kaiming_normal"``: open_lth (Frankle et al., 2020;
  facebookresearch/open_lth), ``models/initializers.kaiming_normal`` with
  ``models/bn_initializers.uniform``: weights ``N(0, 2/fan_in)``
  (``torch.nn.init.kaiming_normal_``: fan_in mode, ReLU gain sqrt(2), not
  truncated); BatchNorm weight ``U[0, 1)``, bias 0. open_lth only re-draws
  ``.weight`` of Linear/Conv layers, so their biases keep PyTorch's default
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; wsjax does the same.
- ``"flax"``: Flax's defaults: ``lecun_normal`` kernels (truncated normal with
  variance 1/fan_in), zero biases, BatchNorm scale 1, offset 0 (the framework
  default of the Git Re-Basin code, Ainsworth et al., 2023).

fan_in follows PyTorch's ``_calculate_fan_in_and_fan_out``: input features
times the kernel's spatial size. With wsjax's layouts (Dense ``(in, out)``,
Conv ``(*spatial, in, out)``, no feature groups) that is the product of every
kernel axis but the last.

Flax calls a bias initializer with the bias shape only, which does not contain
fan_in; ``torch_bias_init(fan_in)`` therefore takes it explicitly, and the
layer helpers in ``wsjax.models.layers`` pass it from the layer's input.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Initializer = Callable[..., jax.Array]

INIT_SCHEMES = ("torch", "kaiming_normal", "flax")


def check_scheme(scheme: str) -> str:
  """Returns `scheme` if it names a known init scheme, else raises ValueError."""
  if scheme not in INIT_SCHEMES:
    raise ValueError(
        f"unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
  return scheme


def fan_in(shape: Sequence[int]) -> int:
  """fan_in of a Dense `(in, out)` or Conv `(*spatial, in, out)` kernel."""
  if len(shape) < 2:
    raise ValueError(f"fan_in needs a kernel of rank >= 2, got shape {tuple(shape)}")
  return math.prod(shape[:-1])


def torch_kernel_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """PyTorch's default weight init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

  ``kaiming_uniform_(w, a=sqrt(5))`` of ``nn.Linear``/``nn.Conv*d``
  ``reset_parameters``; its variance is ``1 / (3 fan_in)``.
  """
  bound = 1.0 / math.sqrt(fan_in(shape))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias init for a layer with `fan_in` inputs per unit:
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  if fan_in <= 0:
    raise ValueError(f"fan_in must be positive, got {fan_in}")
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def kaiming_normal_kernel_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """``torch.nn.init.kaiming_normal_`` defaults (fan_in, ReLU gain):
  ``N(0, 2 / fan_in)``, not truncated (open_lth's ``kaiming_normal``)."""
  std = math.sqrt(2.0 / fan_in(shape))
  return std * jax.random.normal(key, shape, dtype)


def uniform_bn_scale_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """open_lth's ``bn_initializers.uniform``: BatchNorm weight ``U[0, 1)``
  (``torch.rand``)."""
  return jax.random.uniform(key, shape, dtype)


def kernel_init(scheme: str) -> Initializer:
  """The Dense/Conv kernel initializer of an init scheme."""
  return {
      "torch": torch_kernel_init,
      "kaiming_normal": kaiming_normal_kernel_init,
      "flax": nn.initializers.lecun_normal(),
  }[check_scheme(scheme)]


def bias_init(scheme: str, fan_in: int) -> Initializer:
  """The Dense/Conv bias initializer of an init scheme, for `fan_in` inputs.

  Both PyTorch-based schemes keep PyTorch's default bias (open_lth re-draws
  weights only); Flax's is zero.
  """
  if check_scheme(scheme) == "flax":
    return nn.initializers.zeros_init()
  return torch_bias_init(fan_in)


def bn_scale_init(scheme: str) -> Initializer:
  """The BatchNorm scale (PyTorch: weight) initializer of an init scheme."""
  if check_scheme(scheme) == "kaiming_normal":
    return uniform_bn_scale_init
  return nn.initializers.ones_init()


def bn_bias_init(scheme: str) -> Initializer:
  """The BatchNorm offset (PyTorch: bias) initializer: zero in every scheme."""
  check_scheme(scheme)
  return nn.initializers.zeros_init()
