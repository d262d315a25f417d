"""Layer constructors shared by the wsjax models.

Each returns a plain Flax Linen layer (``nn.Dense``, ``nn.Conv``,
``nn.BatchNorm``) wired to an init scheme of ``wsjax.models.initializers``,
so parameter trees keep Flax's leaf names: a Dense/Conv layer is a module with
a ``kernel`` leaf (and its ``bias`` sibling when it has one), a BatchNorm layer
a module with ``scale``/``bias`` leaves and no kernel, its running statistics
``mean``/``var`` in the ``batch_stats`` collection.

Conventions, PyTorch-compatible so that shapes and statistics match the
official code:
- Conv padding is explicit and symmetric (``padding=p`` pads p on both sides
  of every spatial axis), like ``nn.Conv2d(padding=p)``; output length
  ``floor((L + 2p - k) / s) + 1``.
- BatchNorm: ``momentum=0.9`` in Flax's convention (``ra = 0.9 ra + 0.1
  batch``), i.e. PyTorch's ``momentum=0.1``, and ``epsilon=1e-5``. It
  normalizes with the batch statistics when ``train`` and with the running
  ones otherwise. One difference from PyTorch: Flax updates the running
  variance with the biased batch variance, PyTorch with the unbiased one (a
  factor n/(n-1), n = examples x spatial positions per batch).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from wsjax.models import initializers

HEAD = "head"  # name of the output (classifier) layer in every wsjax model


def _tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * ndim
  value = tuple(value)
  if len(value) != ndim:
    raise ValueError(f"expected an int or {ndim} values, got {value}")
  return value


def dense(features: int, in_features: int, init: str, *, use_bias: bool = True,
          name: str | None = None, dtype=None) -> nn.Dense:
  """A Dense layer (kernel ``(in_features, features)``) with init scheme `init`.

  `dtype`: the compute dtype (e.g. bfloat16 for mixed precision); the
  parameters stay float32."""
  return nn.Dense(
      features, use_bias=use_bias, name=name, dtype=dtype,
      kernel_init=initializers.kernel_init(init),
      bias_init=initializers.bias_init(init, in_features))


def conv(features: int, kernel_size: int | Sequence[int], in_features: int,
         init: str, *, ndim: int = 2, strides: int | Sequence[int] = 1,
         padding: int | Sequence[int] = 0, use_bias: bool = True,
         name: str | None = None, dtype=None) -> nn.Conv:
  """An `ndim`-D convolution with PyTorch's symmetric zero padding.

  Kernel ``(*kernel_size, in_features, features)``; fan_in for the init is
  ``in_features * prod(kernel_size)``. `dtype`: the compute dtype (float32
  parameters either way).
  """
  kernel_size = _tuple(kernel_size, ndim)
  padding = tuple((p, p) for p in _tuple(padding, ndim))
  fan_in = in_features
  for k in kernel_size:
    fan_in *= k
  return nn.Conv(
      features, kernel_size, strides=_tuple(strides, ndim), padding=padding,
      use_bias=use_bias, name=name, dtype=dtype,
      kernel_init=initializers.kernel_init(init),
      bias_init=initializers.bias_init(init, fan_in))


def batch_norm(train: bool, init: str, *, name: str | None = None,
               dtype=None) -> nn.BatchNorm:
  """BatchNorm over the last (feature) axis, PyTorch's momentum 0.1 and eps 1e-5.

  With a low-precision `dtype` the output is in that dtype; the statistics
  are reduced in float32 and kept in float32."""
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name, dtype=dtype,
      scale_init=initializers.bn_scale_init(init),
      bias_init=initializers.bn_bias_init(init))


def flatten(x):
  """Flattens all but the batch axis, in NHWC (NWC) order.

  PyTorch flattens NCHW, channel-major: the two differ by a fixed permutation
  of the following Dense kernel's rows (none when the spatial size is 1).
  """
  return x.reshape((x.shape[0], -1))


def patch_matmul(patches, kernel, custom_grad: bool = True):
  """A patch convolution's one matmul: ``y[..., o] = sum_{p, c} patches[..., p, c] kernel[p, c, o]``.

  ``patches (..., P, C)``: the P kernel positions' input slices, stacked;
  ``kernel (P, C, O)``: the layer's parameter. Both are flattened to one
  contraction axis of size P*C first: written as ``einsum("...pc,pco->...o")``,
  XLA:CPU orders the two contracting axes channel-major and makes a
  transposed copy of the patches for the forward pass besides the one for
  the backward pass.

  ``custom_grad``: differentiate with `_flat_matmul`'s own backward pass
  (same gradients, a faster form under ``jax.vmap``). Gradients and
  Hessian-vector products (also forward-over-reverse, ``jvp(grad(f))``)
  work either way; forward mode through the output itself (``jax.jvp`` of
  the model, ``jax.jacfwd``) needs False: plain autodiff.
  """
  p, c = patches.shape[-2:]
  flat = patches.reshape(*patches.shape[:-2], p * c)
  kernel = kernel.reshape(p * c, kernel.shape[-1])
  return _flat_matmul(flat, kernel) if custom_grad else flat @ kernel


@jax.custom_vjp
def _flat_matmul(a, b):
  """``a @ b`` for ``a (..., F)``, ``b (F, O)``, with a hand-written backward pass.

  The gradients are autodiff's, ``da = g b^T`` and ``db = sum_m a[m]^T g[m]``
  over every leading position m, but ``db`` is computed as ``(g^T a)^T``
  with ``g^T`` materialized: that is the plain ``A @ B`` that XLA:CPU's fast
  (YNNPACK) matmul takes also under ``jax.vmap``, and the form XLA itself
  picks for one replica. Autodiff's form (contracting the leading axis of
  both operands) runs as a generic batched dot under ``vmap``: ~1.3x slower
  per replica for the 1-D ConvNet's step (BENCHMARKS.md, section 11).
  Barriers keep XLA from folding the transposes back. Being a custom VJP,
  its output has no forward mode (its gradient has): models take
  ``custom_grad=False`` for that.
  """
  return a @ b


def _flat_matmul_fwd(a, b):
  return a @ b, (a, b)


def _flat_matmul_bwd(res, g):
  a, b = res
  g_t = jax.lax.optimization_barrier(g.reshape(-1, g.shape[-1]).T)
  db_t = jax.lax.optimization_barrier(g_t @ a.reshape(-1, a.shape[-1]))
  return g @ b.T, db_t.T


_flat_matmul.defvjp(_flat_matmul_fwd, _flat_matmul_bwd)


class Conv1DPatches(nn.Module):
  """A 1-D convolution computed as one matmul over gathered patches.

  Same parameters as ``nn.Conv`` (``kernel (k, in, out)``, ``bias (out,)``)
  and the same result (``y[n, l] = sum_{j, c} x_pad[n, s*l + j, c] K[j, c] + b``),
  but expressed as k strided slices and one matmul (`patch_matmul`). Why: on XLA's
  CPU backend a convolution inside a loop (``lax.scan``, ``lax.cond``) runs
  ~10x slower than at top level, and a convolution with per-seed kernels
  under ``jax.vmap`` becomes a grouped convolution; the matmul form stays
  fast in both, so whole epochs can be one scan and seeds a vmap.
  """
  features: int
  kernel_size: int
  in_features: int
  init_scheme: str
  strides: int = 1
  padding: int = 0
  use_bias: bool = True
  custom_grad: bool = True  # see `patch_matmul`; False for forward-mode autodiff

  @nn.compact
  def __call__(self, x):
    k, s, p = self.kernel_size, self.strides, self.padding
    fan_in = self.in_features * k
    kernel = self.param("kernel", initializers.kernel_init(self.init_scheme),
                        (k, self.in_features, self.features))
    xp = jnp.pad(x, ((0, 0), (p, p), (0, 0)))
    length = (x.shape[1] + 2 * p - k) // s + 1
    patches = jnp.stack([xp[:, j: j + s * (length - 1) + 1: s, :] for j in range(k)], axis=2)
    y = patch_matmul(patches, kernel, self.custom_grad)
    if self.use_bias:
      y = y + self.param("bias", initializers.bias_init(self.init_scheme, fan_in), (self.features,))
    return y
