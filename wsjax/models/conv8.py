"""Conv8: the eight-conv CIFAR network of Chijiwa (2024)'s CIFAR-10 experiments.

Ramanujan et al. (2020, "What's hidden in a randomly weighted neural
network?") extend Frankle & Carbin's Conv-2/4/6 to Conv-8: conv3x3 layers of
64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M (M: 2x2 max-pool), then
dense 256, 256 and the classifier. Chijiwa's released code
(dchiji-ntt/learning-transfer, ``models/networks/convs.py``, ``Conv8``)
builds it as:

- every conv 3x3, stride 1, padding 1, WITH bias, followed by ReLU; no
  BatchNorm anywhere;
- the dense layers as 1x1 convs with bias (the same function and
  parameters as Dense layers), ReLU after the first two;
- the LAST pool is a 4x4 max-pool (the code's comment: "original is
  nn.MaxPool2d((2, 2)), but we have to modify it due to permutation issue"),
  so that on 32x32 inputs the flatten sees 1x1x512 and the first dense layer
  is 512 -> 256. ``last_pool=2`` gives Ramanujan et al.'s network, whose
  flatten sees 2x2x512 (2048 -> 256); its permutation spec permutes the
  flattened axis in blocks (see ``wsjax.models.permutation_specs``);
- PyTorch's default init (``init="torch"``, the default here).

Channel widths scale with ``width`` (the code's ``int(64 * width_factor)``):
convs ``w, w, 2w, 2w, 4w, 4w, 8w, 8w``, dense ``4w, 4w``; ``width=64`` is the
paper's network: 4,885,066 parameters for 10 classes with ``last_pool=4``,
5,278,282 with ``last_pool=2`` (Ramanujan et al.'s ~5.3 M).
Layers ``conv1`` .. ``conv8``, ``dense1``, ``dense2``, ``head``; sown
activations ``relu1`` .. ``relu10``. Inputs NHWC.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from wsjax.models import layers
from wsjax.models.layers import HEAD

# Channels of the conv layers as multiples of `width`; "M" a 2x2 max-pool.
CONV8_PLAN = (1, 1, "M", 2, 2, "M", 4, 4, "M", 8, 8, "last_pool")
DENSE_MULTIPLES = (4, 4)


class Conv8(nn.Module):
  """Chijiwa (2024)'s Conv8 (learning-transfer ``Conv8``): 8 conv3x3 + 3 dense."""
  num_classes: int
  width: int = 64
  last_pool: int = 4
  init_scheme: str = "torch"
  dtype: Any = jnp.float32  # compute dtype (see CifarResNet); parameters float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm or dropout
    if self.width < 1 or self.last_pool < 1:
      raise ValueError(f"Conv8 needs width >= 1 and last_pool >= 1, got width={self.width}, "
                       f"last_pool={self.last_pool}")
    init, dt = self.init_scheme, self.dtype
    x = jnp.asarray(x, dt)
    relu = 0
    for spec in CONV8_PLAN:
      if spec == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      if spec == "last_pool":
        p = self.last_pool
        x = nn.max_pool(x, (p, p), strides=(p, p))
        continue
      relu += 1
      x = layers.conv(spec * self.width, 3, x.shape[-1], init, padding=1,
                      name=f"conv{relu}", dtype=dt)(x)
      x = nn.relu(x)
      self.sow("activations", f"relu{relu}", x)
    x = layers.flatten(x)
    for i, multiple in enumerate(DENSE_MULTIPLES, start=1):
      relu += 1
      x = layers.dense(multiple * self.width, x.shape[-1], init, name=f"dense{i}", dtype=dt)(x)
      x = nn.relu(x)
      self.sow("activations", f"relu{relu}", x)
    x = layers.dense(self.num_classes, x.shape[-1], init, name=HEAD, dtype=dt)(x)
    return x.astype(jnp.float32)
