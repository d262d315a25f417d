"""Structure-based classification of parameter leaves, shared by all transforms.

Transforms know nothing of models; they read a parameter pytree's structure:

- a node with a `kernel` leaf is a Dense/Conv layer. Its kernel keeps output
  units on the LAST axis: Dense `(in, out)`, Conv `(*spatial, in, out)`. Its
  sibling `bias` is that layer's bias (role `bias`);
- a node with `scale`/`bias` and no `kernel` is a norm layer (BatchNorm,
  LayerNorm, ...): roles `norm_scale`, `norm_bias`;
- running statistics are `frozen` (never touched): every leaf of a Linen
  `batch_stats` collection, `mean`/`var` leaves of kernel-less nodes, and for a
  Flax NNX `nnx.State` every variable that is not an `nnx.Param`
  (`nnx.BatchStat`, RNG state, ...). Integer, boolean and key leaves are
  `frozen` too;
- anything else (an embedding table, a learned scalar) is `other`.

The same rules apply to a Linen variable tree (`{'params': ...}` or its
`params` subtree, nested dicts) and to an NNX state of the same layers: NNX's
`Variable.value` indirection is dropped from the paths, so both give the same
path names. `optax.MaskedNode` leaves (inserted by `optax.masked`) are kept in
place and passed through untouched.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

KERNEL = "kernel"
BIAS = "bias"
NORM_SCALE = "norm_scale"
NORM_BIAS = "norm_bias"
OTHER = "other"
FROZEN = "frozen"
MASKED = "masked"

ROLES = (KERNEL, BIAS, NORM_SCALE, NORM_BIAS, OTHER, FROZEN, MASKED)
TRAINABLE = (KERNEL, BIAS, NORM_SCALE, NORM_BIAS, OTHER)
LAYER_WEIGHTS = (KERNEL, BIAS)  # conv/dense kernels and their biases

_COLLECTIONS = ("params",)  # Linen collection names dropped from leaf names


@dataclasses.dataclass(frozen=True)
class Leaf:
  """What a transform knows about one leaf: its path of names and its role."""
  path: tuple[str, ...]
  role: str

  @property
  def name(self) -> str:
    """The path joined by '/', without a leading Linen `params` collection.

    Identical for a Linen params tree, its `{'params': ...}` variables and an
    NNX state of the same layers; used to key per-leaf noise and diagnostics.
    """
    path = self.path
    if len(path) > 1 and path[0] in _COLLECTIONS:
      path = path[1:]
    return "/".join(path)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _is_variable_or_masked(x) -> bool:
  return isinstance(x, (nnx.Variable, optax.MaskedNode))


def _key_name(k) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def _is_inexact(leaf) -> bool:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = np.result_type(leaf)
  try:
    return bool(jnp.issubdtype(dtype, jnp.inexact))
  except TypeError:  # extended dtypes (typed PRNG keys)
    return False


def _role(path, var_type, leaf, kernel_layers) -> str:
  if _is_masked(leaf):
    return MASKED
  if var_type is not None and not issubclass(var_type, nnx.Param):
    return FROZEN
  if not _is_inexact(leaf):
    return FROZEN
  if path and path[0] == "batch_stats":
    return FROZEN
  name = path[-1] if path else ""
  layer = path[:-1]
  if name == "kernel":
    return KERNEL
  if layer in kernel_layers:
    return BIAS if name == "bias" else OTHER
  if name == "scale":
    return NORM_SCALE
  if name == "bias":
    return NORM_BIAS
  if name in ("mean", "var"):
    return FROZEN
  return OTHER


def flatten(tree) -> tuple[list[Any], list[Leaf], Any]:
  """Flattens a parameter tree into (leaves, infos, treedef).

  `leaves` are arrays (or `optax.MaskedNode`s), `infos[i]` is the `Leaf` of
  `leaves[i]`, and `treedef.unflatten(leaves)` rebuilds the tree (NNX
  variables included, with their metadata).
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_masked)
  outer = jax.tree_util.tree_leaves(tree, is_leaf=_is_variable_or_masked)
  if len(outer) != len(path_leaves):
    raise ValueError(
        "wsjax.transforms: cannot read this parameter tree (an NNX variable "
        "holds more than one array); pass nnx.state(model, nnx.Param) or a "
        "Linen variable dict.")
  named = []
  for (path, leaf), top in zip(path_leaves, outer):
    names = tuple(_key_name(k) for k in path)
    var_type = None
    if isinstance(top, nnx.Variable):
      var_type = type(top)
      names = names[:-1]  # drop the Variable's `.value`
    named.append((names, var_type, leaf))
  kernel_layers = {names[:-1] for names, _, _ in named
                   if names and names[-1] == "kernel"}
  infos = [Leaf(names, _role(names, var_type, leaf, kernel_layers))
           for names, var_type, leaf in named]
  leaves = [leaf for _, leaf in path_leaves]
  return leaves, infos, treedef


def classify(tree) -> dict[str, str]:
  """Role of every leaf, keyed by its `Leaf.name` (for inspection and tests)."""
  _, infos, _ = flatten(tree)
  return {info.name: info.role for info in infos}


def map_leaves(fn: Callable[..., Any], tree, *others):
  """Maps `fn(info, leaf, *other_leaves) -> new_leaf` over a parameter tree.

  `others` are trees of the same structure as `tree` (gradients, incoming
  updates, a fresh initialization). Masked leaves of `tree` (an
  `optax.MaskedNode`) are returned as they are, without calling `fn`.
  """
  leaves, infos, treedef = flatten(tree)
  other_leaves = [treedef.flatten_up_to(o) for o in others]
  out = []
  for i, (info, leaf) in enumerate(zip(infos, leaves)):
    if info.role == MASKED:
      out.append(leaf)
    else:
      out.append(fn(info, leaf, *(o[i] for o in other_leaves)))
  return treedef.unflatten(out)


def leaf_key(key: jax.Array, info: Leaf) -> jax.Array:
  """A leaf's own PRNG key: `fold_in(key, crc32(info.name) mod 2**31)`.

  Keying noise by path name (not by position) makes draws independent of
  tree order and of masking, and identical for Linen and NNX trees.
  """
  return jax.random.fold_in(key, zlib.crc32(info.name.encode()) & 0x7FFFFFFF)


def cosine(a, b, axis=None, eps: float = 1e-8, keepdims: bool = False):
  """PyTorch's `cosine_similarity` (torch >= 1.12, as used by the DASH code):

      cos(a, b) = <a, b> / (max(||a||, eps) * max(||b||, eps)),  eps = 1e-8

  reduced over `axis` (all axes when None). A zero vector gives cos = 0.
  Computed in float32 at least.
  """
  dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  a = a.astype(dtype)
  b = b.astype(dtype)
  dot = jnp.sum(a * b, axis=axis, keepdims=keepdims)
  na = jnp.sqrt(jnp.sum(a * a, axis=axis, keepdims=keepdims))
  nb = jnp.sqrt(jnp.sum(b * b, axis=axis, keepdims=keepdims))
  return dot / (jnp.maximum(na, eps) * jnp.maximum(nb, eps))
