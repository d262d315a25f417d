"""Recompute BatchNorm running statistics with one pass over training inputs.

A network whose weights did not come out of training as they are (a point on
a line or curve between two solutions, a permuted or transferred network)
has no valid BatchNorm running statistics: evaluating it with its endpoints'
(or interpolated) statistics gives a wrong error, even at the endpoints of a
curve (Garipov et al. 2018; PAPERS.md section 4). The remedy used by the
mode-connectivity code (timgaripov/dnn-mode-connectivity, `utils.update_bn`),
by REPAIR-style resets (Jordan et al. 2023) and by `torch.optim.swa_utils.
update_bn`: reset the statistics and run the training inputs through the
network in train mode once, with an exact cumulative average in place of the
exponential one.

For batches k = 1..K of the inputs (in order, batch size b, the last one
possibly smaller, of c_k examples), every BatchNorm layer normalizes with
its own batch statistics in train mode, so one forward pass per batch fixes
every layer's input, and

    mean = sum_k w_k mu_k,      var = sum_k w_k s2_k,
    mu_k  = mean of the layer input over batch k's examples (and spatial
            positions), per feature,
    s2_k  = mean of (input - mu_k)^2 over the same: the BIASED batch
            variance, Flax's convention for its running `var` (PyTorch keeps
            the unbiased one, a factor m/(m-1) with m = c_k x positions),

with weights

    weighting="batches":  w_k = 1 / K          (default)
    weighting="examples": w_k = c_k / n.

"batches" is PyTorch's `momentum=None` cumulative average (every forward
pass counts once whatever its size), what `torch.optim.swa_utils.update_bn`
and REPAIR's `reset_bn_stats` compute. "examples" is what
dnn-mode-connectivity's `update_bn` computes: it sets the momentum to
`c_k / (c_1 + ... + c_k)` before batch k, i.e. weights batches by size, so
that the means are exact dataset means. The two differ only when the last
batch is partial.

How each batch's statistics are obtained, exactly: `flax.linen.
intercept_methods` intercepts every `nn.BatchNorm.__call__` that normalizes
with batch statistics, computes mu_k and s2_k of its input in float32 (two
passes: mean, then mean squared deviation) and sows them; the running
averages Flax itself updates (`ra = 0.9 ra + 0.1 batch`, momentum fixed by
the model) are discarded, so nothing has to be undone. (Flax normalizes the
layer's output with its own one-pass E[x^2] - E[x]^2 statistics of the same
batch; the two agree up to float32 rounding.) Like PyTorch's, the averaged
variance leaves out the spread of the batch means between batches. The
padded rows of the last batch are excluded by handing the same example mask
to BatchNorm (`mask=`), so every layer of the padded batch computes what the
unpadded batch would: one compiled program serves every batch. Replicas (a
leading axis on every parameter) are `jax.vmap`-ed in the same program.

Limits: BatchNorm layers must be `flax.linen.BatchNorm` (or subclasses),
each called once per forward pass, without a `mask` of their own; layers
frozen in eval mode (`use_running_average=True` under `train=True`) keep
no statistics here and are absent from the result.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from wsjax import tree as wtree
from wsjax.analysis import evaluation

WEIGHTINGS = ("batches", "examples")
DEFAULT_BATCH_SIZE = 128  # dnn-mode-connectivity's and open_lth's train batch
_MOMENTS = "wsjax_batch_moments"  # the collection the interceptor sows into


def _check_weighting(weighting: str):
  if weighting not in WEIGHTINGS:
    raise ValueError(
        f"unknown BatchNorm weighting {weighting!r}; use 'batches' (every batch counts once, "
        "PyTorch momentum=None) or 'examples' (batches weighted by size, dnn-mode-connectivity)")


def _uses_batch_stats(module: nn.BatchNorm, args, kwargs) -> bool:
  call_value = args[1] if len(args) > 1 else kwargs.get("use_running_average")
  return not nn.merge_param("use_running_average", module.use_running_average, call_value)


def _masked_moments(x, mask, feature_axes: Sequence[int]):
  """Per-feature mean and biased variance of `x` over every non-feature axis,
  counting only the examples (leading axis) where `mask` is 1. Float32."""
  x = x.astype(jnp.float32)
  axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  weights = jnp.broadcast_to(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
  count = jnp.sum(weights, axis=axes)
  mean = jnp.sum(x * weights, axis=axes) / count
  centred = x - jnp.expand_dims(mean, axes)
  var = jnp.sum(jnp.square(centred) * weights, axis=axes) / count
  return mean, var


def _interceptor(mask):
  """Sows each train-mode BatchNorm input's (mean, var) over the masked
  examples and passes the mask on, so the layer normalizes the real rows with
  the real rows' statistics."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
            and _uses_batch_stats(module, args, kwargs)):
      return next_fun(*args, **kwargs)
    if kwargs.get("mask") is not None:
      raise ValueError(f"BatchNorm layer {'/'.join(module.path)} is called with its own mask; "
                       f"recompute_batch_stats supports BatchNorm without masks only")
    x = args[0]
    feature_axes = [a % x.ndim for a in
                    (module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,))]
    mean, var = _masked_moments(x, mask, feature_axes)
    module.sow(_MOMENTS, "mean", mean)
    module.sow(_MOMENTS, "var", var)
    row_mask = (mask > 0).reshape((-1,) + (1,) * (x.ndim - 1))
    return next_fun(*args, **dict(kwargs, mask=row_mask))
  return intercept


def batch_moments(model, params, x, mask=None):
  """Every train-mode BatchNorm layer's (mean, biased var) on one batch.

  Args:
    model: a Linen module called as `model.apply(vars, x, train=True)`.
    params: one network's params (no replica axis).
    x: a batch of inputs (b, ...).
    mask: (b,) 1 for the examples to count, 0 for padding; None: all.

  Returns:
    A tree shaped like the model's `batch_stats` collection:
    `{layer path...: {"mean": (features,), "var": (features,)}}`, float32;
    `{}` for a model without BatchNorm.
  """
  if mask is None:
    mask = jnp.ones((x.shape[0],), jnp.float32)
  with nn.intercept_methods(_interceptor(jnp.asarray(mask, jnp.float32))):
    # batch_stats is mutable so Flax may create and update its own running
    # averages; they are dropped.
    _, cols = model.apply({"params": params}, x, train=True,
                          mutable=["batch_stats", _MOMENTS])
  sown = cols.get(_MOMENTS, {})

  def single(path, value):
    if len(value) != 1:
      name = wtree.name(path[:-1])
      raise ValueError(f"BatchNorm layer {name} ran {len(value)} times in one forward pass; "
                       f"recompute_batch_stats needs each layer called once")
    return value[0]
  return jax.tree_util.tree_map_with_path(single, sown, is_leaf=lambda v: isinstance(v, tuple))


def first_replica_shapes(tree):
  """The shapes and dtypes of one replica of a stacked tree (abstract)."""
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf)[1:], leaf.dtype), tree)


def has_batch_norm(model, params, input_shape: Sequence[int]) -> bool:
  """Whether `model` has BatchNorm layers that use batch statistics in train
  mode. `params`: one network's (no replica axis; arrays or
  `jax.ShapeDtypeStruct`s); `input_shape`: one example's. Traced abstractly,
  nothing is computed."""
  x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  shapes = jax.eval_shape(functools.partial(batch_moments, model), params, x)
  return bool(jax.tree.leaves(shapes))


@functools.partial(jax.jit, static_argnames=("model", "batch_size", "weighting"))
def _recompute(model, params, x, *, batch_size: int, weighting: str):
  xb, mask = evaluation.padded_batches(x, batch_size)
  n_batches = xb.shape[0]

  def one_replica(replica_params):
    def body(total, batch):
      x_k, m_k = batch
      moments = batch_moments(model, replica_params, x_k, m_k)
      w = 1.0 / n_batches if weighting == "batches" else jnp.sum(m_k) / x.shape[0]
      return jax.tree.map(lambda t, s: t + w * s, total, moments), None

    shapes = jax.eval_shape(functools.partial(batch_moments, model), replica_params,
                            xb[0], mask[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    total, _ = jax.lax.scan(body, zeros, (xb, mask))
    return total

  return jax.vmap(one_replica)(params)


def recompute_batch_stats(model, params, x, *, batch_size: int = DEFAULT_BATCH_SIZE,
                          weighting: str = "batches"):
  """Fresh BatchNorm running statistics for a stack of replicas (see the
  module docstring for the math).

  Args:
    model: a Linen module called as `model.apply(vars, x, train=True)`.
    params: parameters with a leading replica axis (R) on every leaf.
    x: training inputs (n, ...), host or device, visited in order in batches
      of `batch_size` (the last one partial if b does not divide n). The
      statistics depend on the batch size (train-mode BatchNorm normalizes
      each batch with its own statistics); use the training batch size.
    weighting: "batches" (each batch counts once; PyTorch momentum=None,
      REPAIR) or "examples" (by size; dnn-mode-connectivity's update_bn).

  Returns:
    `batch_stats` with the leading replica axis: `{layer: {"mean": (R, f),
    "var": (R, f)}}` (var biased, Flax's convention), float32; `{}` when
    the model has no BatchNorm.
  """
  _check_weighting(weighting)
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  evaluation.replica_count(params, "params")
  n = jnp.shape(x)[0] if jnp.ndim(x) else 0
  if n == 0:
    raise ValueError("recompute_batch_stats needs at least one training input")
  # Without BatchNorm the result is {} and XLA drops the unused forward
  # passes: nothing runs.
  return _recompute(model, params, x, batch_size=int(batch_size), weighting=weighting)
