"""CIFAR VGG networks (Simonyan & Zisserman, 2015), with or without BatchNorm.

The configurations of kuangliu/pytorch-cifar (``models/vgg.py``) and open_lth
(``models/cifar_vgg.py``): each number is a conv3x3 (padding 1, with bias) of
that many channels followed by BN (``_bn`` variants) and ReLU, each ``'M'`` a
2x2 stride-2 max-pool; then flatten and Dense(num_classes). On 32x32 inputs
the five pools leave 1x1x512, so the classifier is Dense(512, classes) as in
both codebases; larger inputs flatten a larger map (NHWC order).

VGG-16-BN is DASH's VGG (Shin et al., 2024); VGG-16 Gotmare et al.'s (2019).
open_lth ends with a 2x2 average pool in place of kuangliu's last max-pool
(same parameters); wsjax follows kuangliu. Conv layers are ``conv1`` ..
``convN`` with ``bn1`` .. ``bnN``, the classifier ``head``; sown activations
``relu1`` .. ``reluN``.
"""
from __future__ import annotations

from typing import Any

from flax import linen as nn
import jax.numpy as jnp

from wsjax.models import layers
from wsjax.models.layers import HEAD

VGG_CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"),
}


class VGG(nn.Module):
  """CIFAR VGG-`depth` (11, 13 or 16), with BatchNorm if `batch_norm`."""
  num_classes: int
  depth: int = 16
  batch_norm: bool = False
  init_scheme: str = "torch"
  dtype: Any = jnp.float32  # compute dtype (see CifarResNet); parameters float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in VGG_CONFIGS:
      raise ValueError(f"unknown VGG depth {self.depth}; choose one of "
                       f"{', '.join(map(str, VGG_CONFIGS))}")
    init, dt = self.init_scheme, self.dtype
    x = jnp.asarray(x, dt)
    i = 0
    for spec in VGG_CONFIGS[self.depth]:
      if spec == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      i += 1
      x = layers.conv(spec, 3, x.shape[-1], init, padding=1, name=f"conv{i}", dtype=dt)(x)
      if self.batch_norm:
        x = layers.batch_norm(train, init, name=f"bn{i}", dtype=dt)(x)
      x = nn.relu(x)
      self.sow("activations", f"relu{i}", x)
    x = layers.flatten(x)
    x = layers.dense(self.num_classes, x.shape[-1], init, name=HEAD, dtype=dt)(x)
    return x.astype(jnp.float32)
