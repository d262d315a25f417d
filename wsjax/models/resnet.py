"""CIFAR ResNets (He et al., 2016) with BasicBlocks, as in the studies' code.

- ``ResNet18``: the CIFAR ResNet-18 of kuangliu/pytorch-cifar
  (``models/resnet.py``), which Ash & Adams (2020) and DASH (Shin et al.,
  2024) use: a 3x3 stride-1 stem conv (no bias) + BN + ReLU, no max-pool, four
  stages of two BasicBlocks with widths w, 2w, 4w, 8w (strides 1, 2, 2, 2),
  global average pooling, Dense. ``width=64`` is the usual network (11.17 M
  parameters for 10 classes); Ash & Adams' official code uses the narrow
  ``width=16`` (widths 16/32/64/128).
- ``ResNet20``: open_lth's ``cifar_resnet_20`` (Frankle et al., 2020): the
  same stem, three stages of three BasicBlocks with widths 16, 32, 64
  (``width=16``, i.e. ``cifar_resnet_20_16``), global average pooling, Dense;
  open_lth's Kaiming-normal init with uniform BN scale is its default.

A BasicBlock is conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus a shortcut
(identity, or a 1x1 strided conv without bias + BN when the stride or width
changes), then ReLU. Parameter names follow kuangliu's: ``conv1``/``bn1``
(stem), ``layer{stage}_{block}`` with ``conv1``, ``bn1``, ``conv2``, ``bn2``,
``shortcut_conv``, ``shortcut_bn`` inside, and the classifier ``head``. Sown
activations: ``relu`` (stem) and ``relu1``/``relu2`` in each block.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from wsjax.models import layers
from wsjax.models.layers import HEAD


class BasicBlock(nn.Module):
  """The two-conv residual block of a CIFAR ResNet (kuangliu / open_lth)."""
  features: int
  strides: int = 1
  init_scheme: str = "torch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    init, in_features, dt = self.init_scheme, x.shape[-1], self.dtype
    y = layers.conv(self.features, 3, in_features, init, strides=self.strides,
                    padding=1, use_bias=False, name="conv1", dtype=dt)(x)
    y = layers.batch_norm(train, init, name="bn1", dtype=dt)(y)
    y = nn.relu(y)
    self.sow("activations", "relu1", y)
    y = layers.conv(self.features, 3, self.features, init, padding=1,
                    use_bias=False, name="conv2", dtype=dt)(y)
    y = layers.batch_norm(train, init, name="bn2", dtype=dt)(y)
    if self.strides != 1 or in_features != self.features:
      x = layers.conv(self.features, 1, in_features, init, strides=self.strides,
                      use_bias=False, name="shortcut_conv", dtype=dt)(x)
      x = layers.batch_norm(train, init, name="shortcut_bn", dtype=dt)(x)
    y = nn.relu(y + x)
    self.sow("activations", "relu2", y)
    return y


class CifarResNet(nn.Module):
  """A CIFAR ResNet: stem, stages of BasicBlocks, global average pool, Dense.

  Stage i has ``stage_sizes[i]`` blocks of ``width * 2**i`` channels; the
  first block of every stage but the first has stride 2. The stem has
  `width` channels. Inputs NHWC.

  `dtype` is the compute dtype: ``bfloat16`` runs convolutions, matmuls and
  activations in bfloat16 (mixed precision: float32 parameters, optimizer
  and BatchNorm statistics, float32 logits for the loss).
  """
  num_classes: int
  stage_sizes: Sequence[int]
  width: int = 16
  init_scheme: str = "torch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    init, dt = self.init_scheme, self.dtype
    x = jnp.asarray(x, dt)
    x = layers.conv(self.width, 3, x.shape[-1], init, padding=1, use_bias=False,
                    name="conv1", dtype=dt)(x)
    x = layers.batch_norm(train, init, name="bn1", dtype=dt)(x)
    x = nn.relu(x)
    self.sow("activations", "relu", x)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, init, dt,
                       name=f"layer{stage + 1}_{block}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = layers.dense(self.num_classes, x.shape[-1], init, name=HEAD, dtype=dt)(x)
    return x.astype(jnp.float32)


class ResNet18(CifarResNet):
  """CIFAR ResNet-18 of kuangliu/pytorch-cifar (Ash & Adams; DASH): stages
  (2, 2, 2, 2), widths w/2w/4w/8w, PyTorch default init."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  init_scheme: str = "torch"


class ResNet20(CifarResNet):
  """open_lth's ``cifar_resnet_20`` (Frankle et al., 2020): stages (3, 3, 3),
  widths 16/32/64, open_lth's Kaiming-normal init with uniform BN scale."""
  stage_sizes: Sequence[int] = (3, 3, 3)
  width: int = 16
  init_scheme: str = "kaiming_normal"
