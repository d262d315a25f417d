"""A small image ConvNet for warm-starting studies on 28x28 images on a CPU.

Ash & Adams (2020) report the warm-start gap for an MLP and a ResNet-18; the
narrow ResNet is a GPU model. ``CNN`` is wsjax's cheap convolutional model
for Fashion-MNIST / MNIST-sized images (not a network of the paper): the 2-D
analogue of the MNIST-1D ``Conv1D`` (Greydanus 2020), strided convolutions
instead of pooling.

    conv1  3x3, stride 2, padding 1, `channels` filters        -> ReLU
    conv2  3x3, stride 2, padding 1, 2 * `channels` filters    -> ReLU
    flatten (NHWC order)
    dense1 .. denseK  Dense(widths[k]) -> ReLU                 (default one of 128)
    head   Dense(num_classes)

On 28x28x1 inputs the maps are 14x14x16 and 7x7x32 and the flatten sees
1,568 features; with the defaults (16 channels, one hidden layer of 128)
and 10 classes: 160 + 4,640 + 200,832 + 1,290 = 206,922 parameters, about
0.46 M multiply-adds per example (the MLP 784-100-100-10 of Ash & Adams:
89,610 parameters, 0.09 M).

Convolutions are computed as one matmul over the 9 strided slices of the
padded input (`Conv2DPatches`: the parameters and the result of
``nn.Conv(features, (3, 3), strides, padding=((p, p), (p, p)))``). Why: inside
the training core's compiled loop (a ``fori_loop`` over steps) with seeds
under ``jax.vmap``, XLA:CPU turns ``nn.Conv`` into a grouped convolution in a
loop, 5-7x slower than the matmul form for this network (measured on the
2-core CPU: 687 against 135 ms per step for 3 seeds at batch 128), the
same reason as ``wsjax.models.layers.Conv1DPatches``.

PyTorch's default init (``init="torch"``, as Ash & Adams' code), no
BatchNorm or dropout (``train`` is unused), ReLU outputs sown as ``relu1``,
``relu2``, ... into ``activations``, float32 parameters, ``dtype`` the
compute dtype (e.g. bfloat16), float32 logits.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from wsjax.models import initializers, layers
from wsjax.models.layers import HEAD


class Conv2DPatches(nn.Module):
  """A 2-D convolution as one matmul over the k*k strided slices of the input.

  Parameters as ``nn.Conv``: ``kernel (k, k, in, out)``, ``bias (out,)``;
  result ``y[n, h, w, o] = sum_{i, j, c} x_pad[n, s*h + i, s*w + j, c]
  K[i, j, c, o] + b[o]`` (zero padding `padding` on every side, output side
  ``floor((H + 2p - k) / s) + 1``), the cross-correlation of ``nn.Conv`` and
  PyTorch's ``nn.Conv2d``.
  """
  features: int
  kernel_size: int
  in_features: int
  init_scheme: str
  strides: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Any = jnp.float32
  custom_grad: bool = True  # see `layers.patch_matmul`; False for forward-mode autodiff

  @nn.compact
  def __call__(self, x):
    k, s, p = self.kernel_size, self.strides, self.padding
    kernel = self.param("kernel", initializers.kernel_init(self.init_scheme),
                        (k, k, self.in_features, self.features))
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    height = (x.shape[1] + 2 * p - k) // s + 1
    width = (x.shape[2] + 2 * p - k) // s + 1
    patches = jnp.stack([xp[:, i: i + s * (height - 1) + 1: s, j: j + s * (width - 1) + 1: s, :]
                         for i in range(k) for j in range(k)], axis=3)  # (n, h, w, k*k, c)
    flat = kernel.reshape(k * k, self.in_features, self.features).astype(self.dtype)
    y = layers.patch_matmul(patches.astype(self.dtype), flat, self.custom_grad)
    if self.use_bias:
      fan_in = self.in_features * k * k
      bias = self.param("bias", initializers.bias_init(self.init_scheme, fan_in), (self.features,))
      y = y + bias.astype(self.dtype)
    return y


class CNN(nn.Module):
  """Two strided 3x3 convolutions, hidden Dense layers, a Dense head (see the module docstring)."""
  num_classes: int
  channels: int = 16
  widths: Sequence[int] = (128,)
  init_scheme: str = "torch"
  dtype: Any = jnp.float32  # compute dtype; parameters float32
  custom_grad: bool = True  # False for forward-mode autodiff (see `layers.patch_matmul`)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm or dropout
    if self.channels < 1:
      raise ValueError(f"cnn needs channels >= 1, got {self.channels}")
    init, dt = self.init_scheme, self.dtype
    x = jnp.asarray(x, dt)
    if x.ndim != 4:
      raise ValueError(f"cnn takes images (batch, height, width, channels), got an input of "
                       f"shape {x.shape}")
    relu = 0
    for i, features in enumerate((self.channels, 2 * self.channels), start=1):
      x = Conv2DPatches(features, 3, x.shape[-1], init, strides=2, padding=1,
                        name=f"conv{i}", dtype=dt, custom_grad=self.custom_grad)(x)
      x = nn.relu(x)
      relu += 1
      self.sow("activations", f"relu{relu}", x)
    x = layers.flatten(x)
    for i, width in enumerate(self.widths, start=1):
      x = layers.dense(width, x.shape[-1], init, name=f"dense{i}", dtype=dt)(x)
      x = nn.relu(x)
      relu += 1
      self.sow("activations", f"relu{relu}", x)
    x = layers.dense(self.num_classes, x.shape[-1], init, name=HEAD, dtype=dt)(x)
    return x.astype(jnp.float32)
