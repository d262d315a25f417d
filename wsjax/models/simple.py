"""Small models: logistic regression, the MLP of Ash & Adams, the MNIST-1D ConvNet.

Every model maps a batch of inputs to float32 logits, ``__call__(x, train)``
(``train`` is unused here: no BatchNorm or dropout), and sows each ReLU output
into the ``activations`` collection. The output layer is named ``head`` in
every wsjax model.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from wsjax.models import layers
from wsjax.models.layers import HEAD


class LogisticRegression(nn.Module):
  """Multinomial logistic regression: flatten -> Dense(num_classes).

  The convex control of Ash & Adams (2020), which shows no warm-start gap.
  """
  num_classes: int
  init_scheme: str = "torch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = layers.flatten(jnp.asarray(x, jnp.float32))
    x = layers.dense(self.num_classes, x.shape[-1], self.init_scheme, name=HEAD)(x)
    return x.astype(jnp.float32)


class MLP(nn.Module):
  """Fully connected ReLU network: flatten -> [Dense(w) -> ReLU]* -> Dense.

  The default widths (100, 100) are Ash & Adams' MLP (3072-100-100-classes on
  CIFAR, ``mlp`` in github.com/JordanAsh/warm_start ``run.py``). Hidden layers
  are ``dense1``, ``dense2``, ...; sown activations ``relu1``, ``relu2``, ...
  """
  num_classes: int
  widths: Sequence[int] = (100, 100)
  init_scheme: str = "torch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = layers.flatten(jnp.asarray(x, jnp.float32))
    for i, width in enumerate(self.widths, start=1):
      x = layers.dense(width, x.shape[-1], self.init_scheme, name=f"dense{i}")(x)
      x = nn.relu(x)
      self.sow("activations", f"relu{i}", x)
    x = layers.dense(self.num_classes, x.shape[-1], self.init_scheme, name=HEAD)(x)
    return x.astype(jnp.float32)


class Conv1D(nn.Module):
  """The 1-D ConvNet for MNIST-1D (Greydanus, 2020) used in wsjax's main study.

  Input ``(N, 40, 1)`` (``(N, 40)`` is given a channel axis). Three Conv1d
  layers of `channels` filters, each followed by ReLU: kernel 5 stride 2
  padding 2, then kernel 3 stride 2 padding 1 twice (lengths 40 -> 20 -> 10
  -> 5), flatten (NWC order), Dense(num_classes). With 32 channels and 10
  classes: 192 + 3104 + 3104 + 1610 = 8,010 parameters. Layers ``conv1``..
  ``conv3``, ``head``; sown activations ``relu1``..``relu3``.
  ``custom_grad=False`` for forward-mode autodiff (see `layers.patch_matmul`).
  """
  num_classes: int
  channels: int = 32
  init_scheme: str = "torch"
  custom_grad: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 2:
      x = x[..., None]
    specs = ((5, 2), (3, 1), (3, 1))  # (kernel, padding); stride 2 throughout
    for i, (kernel, pad) in enumerate(specs, start=1):
      x = layers.Conv1DPatches(self.channels, kernel, x.shape[-1], self.init_scheme,
                               strides=2, padding=pad, name=f"conv{i}",
                               custom_grad=self.custom_grad)(x)
      x = nn.relu(x)
      self.sow("activations", f"relu{i}", x)
    x = layers.flatten(x)
    x = layers.dense(self.num_classes, x.shape[-1], self.init_scheme, name=HEAD)(x)
    return x.astype(jnp.float32)
