"""Global magnitude pruning (IMP) and its random-pruning control.

Frankle, Schwab & Morcos, "The Early Phase of Neural Network Training", ICLR
2020, and Frankle et al., "Linear Mode Connectivity and the Lottery Ticket
Hypothesis", ICML 2020, prune as open_lth (facebookresearch/open_lth) does:
`pruning/sparse_global.py` (global unstructured magnitude pruning, 20% of
the remaining weights per level) and `lottery/branch/randomly_prune.py`
(the layerwise random-pruning control). Masks are described in
`wsjax.pruning.masks`.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from wsjax import tree
from wsjax.pruning import masks
from wsjax.transforms import groups

# Largest denominator for which a fraction's count is computed exactly in
# integers (0.2 = 1/5, 0.15 = 3/20, ...); keeps every int32 product < 2**31.
_MAX_DENOMINATOR = 4096


def _check_fraction(fraction) -> None:
  if isinstance(fraction, bool) or not isinstance(
      fraction, (int, float, np.integer, np.floating)):
    raise ValueError(
        f"pruning fraction must be a number in (0, 1), got {fraction!r}")
  if not 0 < float(fraction) < 1:
    raise ValueError(
        f"pruning fraction must be in (0, 1) (0.2 prunes 20% of the remaining"
        f" weights), got {fraction}")


def prune_count(remaining, fraction: float) -> jax.Array:
  """open_lth's number of weights to prune: `ceil(fraction * remaining)`.

  `sparse_global.py`: `np.ceil(pruning_fraction * number_of_remaining_weights)`
  in float64. Here `remaining` may be traced (int32), so the count is computed
  in integers: when `fraction` is the float of a ratio n / d with d <= 4096
  (0.2 -> 1/5, 0.15 -> 3/20) and
  `remaining = q d + r`, `ceil(n remaining / d) = n q + ceil(n r / d)`, which
  equals open_lth's float64 value (checked against NumPy for 0.05 ... 0.95
  on every remaining < 3e6 and 2e7 random ones below 2**31). Other fractions
  fall back to float32 `ceil(fraction * remaining)`, which can differ by one
  when the product is within float32 rounding of an integer.
  """
  _check_fraction(fraction)
  remaining = jnp.asarray(remaining, jnp.int32)
  ratio = Fraction(float(fraction)).limit_denominator(_MAX_DENOMINATOR)
  if float(ratio) == float(fraction):
    n, d = ratio.numerator, ratio.denominator
    q, r = remaining // d, remaining % d
    return n * q + (n * r + d - 1) // d
  count = jnp.ceil(jnp.float32(fraction) * remaining.astype(jnp.float32))
  return jnp.minimum(count.astype(jnp.int32), remaining)


def global_magnitude_prune(params, mask=None, fraction: float = 0.2, *,
                           model_name: str | None = None,
                           open_lth_threshold: bool = False):
  """Prunes `fraction` of the still-unpruned weights with the smallest |w|.

  Global unstructured magnitude pruning, open_lth's `sparse_global`: over all
  prunable leaves together, the weights still kept by `mask` are ranked by
  |w| in `params` (the FINAL weights of the previous level, in IMP) and the

      count = ceil(fraction * remaining),  remaining = number kept by `mask`

  smallest are pruned (`prune_count`: ceil, as open_lth). Already-pruned
  weights stay pruned whatever their value. Ties are broken
  deterministically: among equal |w| the weight that comes first in the
  concatenation of the prunable leaves (leaf order of `wsjax.tree.names`,
  then row-major within a leaf) is pruned first, so exactly `count` weights
  are pruned. Runs on device; jit- and vmap-friendly (a stack of replicas:
  `jax.vmap`).

  open_lth's own threshold prunes one weight more than its count: it takes
  `threshold = sort(|w_kept|)[count]` (the (count+1)-th smallest) and keeps
  `|w| > threshold`, so count + 1 weights (plus any ties at the threshold)
  go. `open_lth_threshold=True` reproduces that rule bit for bit; the default
  prunes exactly `count`, the fraction its hparams state.

  Args:
    params: the weights to rank (a params tree or full variables).
    mask: the current mask (`wsjax.pruning.masks`), or None for the dense
      network (then `model_name` is required).
    fraction: in (0, 1); 0.2 as open_lth and the paper.
    model_name: if given, the prunable leaves are `prunable(params,
      model_name)` (a 0-d mask leaf there counts as all kept); otherwise the
      kernels that `mask` marks prunable (its non-0-d leaves).
    open_lth_threshold: open_lth's threshold rule (count + 1, see above).

  Returns:
    The new mask, structured like `params`: bool arrays for the prunable
    leaves, every other leaf taken from `mask` (as bool) or a 0-d True.
  """
  _check_fraction(fraction)
  found = masks.mask_by_name(params, mask, "global_magnitude_prune")
  leaves, infos, _ = groups.flatten(params)
  if model_name is not None:
    names = set(masks.prunable(params, model_name))
  elif mask is None:
    raise ValueError(
        "global_magnitude_prune: pass the current mask (ones_mask(params, "
        "model_name) for a dense network) or model_name.")
  else:
    names = {info.name for info in infos
             if info.role == groups.KERNEL and np.ndim(found.get(info.name, True)) > 0}
  chosen = [(info, leaf) for info, leaf in zip(infos, leaves, strict=True)
            if info.name in names]
  if not chosen:
    raise ValueError(
        "global_magnitude_prune: no prunable weights (conv/dense kernels the "
        "mask marks prunable); build the mask with ones_mask(params, "
        "model_name).")

  new_leaves = _prune_leaves(
      tuple(jnp.asarray(leaf) for _, leaf in chosen),
      tuple(masks.kept(found.get(info.name, True)) for info, _ in chosen),
      float(fraction), bool(open_lth_threshold))
  new = {info.name: m for (info, _), m in zip(chosen, new_leaves, strict=True)}

  def f(info, leaf):
    del leaf
    if info.name in new:
      return new[info.name]
    if info.name in found:
      return masks.kept(found[info.name])
    return jnp.ones((), jnp.bool_)

  return groups.map_leaves(f, params)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _prune_leaves(weights: tuple, kept: tuple, fraction: float,
                  open_lth_threshold: bool) -> tuple:
  """The ranking of `global_magnitude_prune` on the prunable leaves
  (compiled once per shapes and options; inlined under an outer jit)."""
  kept_all = jnp.concatenate([
      jnp.broadcast_to(k, w.shape).ravel() for w, k in zip(weights, kept,
                                                           strict=True)])
  scores = jnp.concatenate([jnp.abs(w).ravel().astype(jnp.float32)
                            for w in weights])
  scores = jnp.where(kept_all, scores, jnp.inf)
  n = scores.shape[0]
  remaining = jnp.sum(kept_all, dtype=jnp.int32)
  count = prune_count(remaining, fraction)
  if open_lth_threshold:
    ordered = jnp.sort(scores)
    threshold = jnp.where(count < remaining,
                          ordered[jnp.minimum(count, n - 1)], jnp.inf)
    new_all = kept_all & (scores > threshold)
  else:
    order = jnp.argsort(scores, stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(
        jnp.arange(n, dtype=jnp.int32))
    new_all = kept_all & (rank >= count)
  sizes = [math.prod(w.shape) for w in weights]
  pieces = jnp.split(new_all, np.cumsum(sizes)[:-1].tolist())
  return tuple(piece.reshape(w.shape)
               for w, piece in zip(weights, pieces, strict=True))


@jax.jit
def _permute(key: jax.Array, m: jax.Array) -> jax.Array:
  return jax.random.permutation(key, m.ravel()).reshape(m.shape)


def random_prune_like(mask, key: jax.Array):
  """The random-pruning control: per layer, as many kept weights, placed at random.

  Each prunable (non-0-d) leaf of `mask` is replaced by a uniformly random
  permutation of its own entries, so every layer keeps exactly as many
  weights as in `mask` (its sparsity), at uniformly random positions; 0-d
  leaves (not prunable) are unchanged. This is open_lth's `randomly_prune`
  branch with its default `strategy='layerwise'` (`shuffle_state_dict`: each
  mask tensor shuffled on its own). The leaf's permutation is drawn with
  `groups.leaf_key(key, leaf)` (a key folded with the leaf's name), so
  results do not depend on tree order. Traceable; vmap over keys and masks
  for replicas.
  """
  key = jnp.asarray(key)

  def f(name, m):
    m = masks.kept(m)
    if m.ndim == 0:
      return m
    leaf_key = groups.leaf_key(key, groups.Leaf((name,), groups.FROZEN))
    return _permute(leaf_key, m)

  return tree.map_named(f, mask)
