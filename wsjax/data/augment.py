"""Image augmentation on device: random crops with zero padding and flips.

The standard CIFAR/SVHN augmentation (He et al., 2016): pad each image with
`crop_padding` zeros on every side, cut a random H x W window out of it, and
mirror it left-right with probability 1/2, independently per example. Pure
JAX, so it runs inside a jitted train step on the gathered batch. wsjax never
augments by default: the caller decides.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def augment_images(key: jax.Array, x: jax.Array, crop_padding: int = 4,
                   flip: bool = True) -> jax.Array:
  """Randomly crops (with zero padding) and flips each image of a batch.

  Example i gets its own key `jax.random.split(key, N)[i]`, which is split
  into a crop key and a flip key. The crop offsets (dy, dx) are uniform in
  [0, 2 * crop_padding]: output pixel (r, c) is input pixel
  (r + dy - crop_padding, c + dx - crop_padding), or 0 outside the image. The
  flip reverses the W axis with probability 1/2 after the crop.

  Args:
    key: a PRNG key.
    x: a batch of images, NHWC, any dtype.
    crop_padding: zeros added on each side before cropping; 0 disables the
      crop. A Python int (static under `jax.jit`).
    flip: whether to flip; a Python bool (static under `jax.jit`).

  Returns:
    An array of x's shape and dtype.

  Raises:
    ValueError: x is not 4-D (e.g. MNIST-1D's (N, 40, 1)), or crop_padding < 0.
  """
  if x.ndim != 4:
    raise ValueError(
        f"augment_images expects an NHWC batch of images, got shape {x.shape}")
  if crop_padding < 0:
    raise ValueError(f"crop_padding must be non-negative, got {crop_padding}")
  _, h, w, c = x.shape
  p = crop_padding

  def one(key, image):
    crop_key, flip_key = jax.random.split(key)
    if p > 0:
      padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
      dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * p + 1)
      image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
    if flip:
      image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    return image

  return jax.vmap(one)(jax.random.split(key, x.shape[0]), x)
