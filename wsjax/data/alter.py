"""Altered training data for pre-training 0 -> k on a changed task.

Frankle, Schwab & Morcos, "The Early Phase of Neural Network Training", ICLR
2020, section 5: the network is trained from 0 to the rewind step k on
changed data, then k -> T (with IMP) on the real task. The changes:

- `blur`: inputs downsampled by an integer factor and upsampled back;
- `rotate_batch`: a self-supervised task, predict which of the exact
  rotations by 0/90/180/270 degrees an image underwent (a 4-way head, to be
  swapped for the real head afterwards);
- `random_labels`: a fraction of the training labels replaced at random.

open_lth's versions are broken and not followed (PAPERS.md section 3): its
blur flag raises a TypeError, its "rotation" draws a random angle instead of
an exact multiple of 90 degrees (and rotates the test set too).

`blur` and `rotate_batch` are JAX (jit-friendly; `factor` is static), to run
on device on a gathered batch or once on a whole split; `random_labels` is
NumPy, applied once to a split's labels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

UPSAMPLE_METHODS = ("nearest", "linear")
NUM_ROTATIONS = 4


def blur(x, factor: int, upsample: str = "nearest") -> jax.Array:
  """Downsamples by `factor` (block means) and upsamples back to x's shape.

  Images NHWC: each non-overlapping factor x factor block of every channel is
  replaced by its mean; 1-D signals NWC (MNIST-1D's (N, 40, 1)): each run of
  `factor` positions. Then upsampled back to the original size:

  - "nearest" (default): every pixel takes its block's mean, i.e.
    blur(x)[i, j] = mean(x[f*(i//f) : f*(i//f)+f, f*(j//f) : f*(j//f)+f]).
    The result holds exactly the information of the low-resolution image, no
    interpolated detail, and blur(blur(x)) = blur(x);
  - "linear": (bi)linear interpolation with half-pixel centers, edge values
    clamped (`jax.image.resize`, PyTorch's `align_corners=False`), a smoother
    image like a library resize.

  Both are affine with weights summing to 1, so blurring normalized inputs
  equals normalizing blurred ones. The paper's appendix does not fix the
  resampling filter; nearest is the plainest "lower resolution, same size".
  The spatial size must be divisible by `factor` (no partial blocks: a
  ValueError names the divisors); `factor=1` returns x. Float inputs keep
  their dtype, integer ones (uint8 images) come back as float32 means.

  Raises:
    ValueError: factor is not a positive int, x is not NHWC or NWC, the size
      is not divisible, or `upsample` is unknown.
  """
  if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) \
      or factor < 1:
    raise ValueError(f"blur: factor must be a positive int, got {factor!r}")
  if upsample not in UPSAMPLE_METHODS:
    raise ValueError(f"blur: unknown upsample {upsample!r}; use "
                     f"{' or '.join(UPSAMPLE_METHODS)}")
  x = jnp.asarray(x)
  if x.ndim not in (3, 4):
    raise ValueError(
        f"blur expects images (N, H, W, C) or 1-D signals (N, L, C), got "
        f"shape {x.shape}")
  factor = int(factor)
  spatial = x.shape[1:-1]
  for size in spatial:
    if size % factor:
      divisors = [d for d in range(1, size + 1) if size % d == 0]
      raise ValueError(
          f"blur: factor {factor} does not divide the size {size} of inputs "
          f"{x.shape}; use one of {divisors}")
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  xf = x.astype(jnp.promote_types(dtype, jnp.float32))
  if factor == 1:
    return xf.astype(dtype)
  n, c = x.shape[0], x.shape[-1]
  blocks = [s // factor for s in spatial]
  shape = [n]
  for b in blocks:
    shape += [b, factor]
  small = xf.reshape(*shape, c).mean(axis=tuple(2 + 2 * i
                                                for i in range(len(blocks))))
  if upsample == "nearest":
    out = small
    for axis in range(1, 1 + len(blocks)):
      out = jnp.repeat(out, factor, axis=axis)
  else:
    out = jax.image.resize(small, xf.shape, "linear")
  return out.astype(dtype)


def rotate_batch(key: jax.Array, x) -> tuple[jax.Array, jax.Array]:
  """Rotates each image by exactly k * 90 degrees, k ~ uniform{0, 1, 2, 3}.

      out[i] = rot90(x[i], k[i]),   k = randint(key, (N,), 0, 4)

  `rot90` as `np.rot90(image, k, axes=(0, 1))` on an (H, W, C) image: k
  quarter turns counterclockwise (from the H axis towards the W axis), so
  pixels move exactly, with no interpolation. k is drawn per example from
  `key` (pass the step's key for fresh rotations every step) and returned as
  the label of the self-supervised 4-way task (int32). Pure JAX.

  Raises:
    ValueError: x is 1-D data (N, L, C) (rotation pre-training needs images)
      or its images are not square.
  """
  x = jnp.asarray(x)
  if x.ndim == 3:
    raise ValueError(
        f"rotation pre-training needs image data (N, H, W, C); got 1-D "
        f"signals of shape {x.shape}: use blur or random_labels instead")
  if x.ndim != 4:
    raise ValueError(
        f"rotate_batch expects images (N, H, W, C), got shape {x.shape}")
  if x.shape[1] != x.shape[2]:
    raise ValueError(
        f"rotation needs square images; got {x.shape[1]}x{x.shape[2]}")
  k = jax.random.randint(key, (x.shape[0],), 0, NUM_ROTATIONS, jnp.int32)
  turns = jnp.stack([jnp.rot90(x, i, axes=(1, 2))
                     for i in range(NUM_ROTATIONS)])
  return turns[k, jnp.arange(x.shape[0])], k


def _check_fraction(fraction) -> float:
  if isinstance(fraction, bool) or not isinstance(
      fraction, (int, float, np.integer, np.floating)) \
      or not 0 <= float(fraction) <= 1:
    raise ValueError(
        f"random_labels: fraction must be in [0, 1], got {fraction!r}")
  return float(fraction)


def _choose(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
  count = int(round(fraction * n))
  return np.sort(rng.choice(n, size=count, replace=False))


def relabeled_indices(n: int, fraction: float, seed: int) -> np.ndarray:
  """The sorted indices whose labels `random_labels(y, fraction, ., seed)`
  replaces (len(y) == n): a uniformly random subset of size
  `round(fraction * n)` (Python's round, halves to even)."""
  return _choose(np.random.default_rng(seed), int(n), _check_fraction(fraction))


def random_labels(y, fraction: float, num_classes: int,
                  seed: int) -> np.ndarray:
  """Replaces a fraction of the labels by uniformly random labels.

  A seeded random subset of `round(fraction * n)` examples
  (`relabeled_indices`) gets labels drawn uniformly from {0, ...,
  num_classes - 1}; the others keep theirs. A new label may coincide with the
  true one (probability 1 / num_classes, as in Zhang et al. 2017's partially
  random labels), so about `fraction * (1 - 1/num_classes)` of the labels
  actually change. Fixed by `seed`: `numpy.random.default_rng(seed)` draws
  the subset, then the labels. Returns a new array of y's dtype.

  Raises:
    ValueError: fraction outside [0, 1], num_classes < 1, y not 1-D.
  """
  fraction = _check_fraction(fraction)
  if isinstance(num_classes, bool) or not isinstance(
      num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(
        f"random_labels: num_classes must be a positive int, got "
        f"{num_classes!r}")
  y = np.array(y)
  if y.ndim != 1:
    raise ValueError(
        f"random_labels expects integer labels of shape (N,), got {y.shape}")
  rng = np.random.default_rng(seed)
  which = _choose(rng, y.shape[0], fraction)
  y[which] = rng.integers(0, num_classes, size=which.shape[0]).astype(y.dtype)
  return y
