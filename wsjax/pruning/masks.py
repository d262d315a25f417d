"""Pruning masks: which weights of a sparse network are kept.

Representation. A mask is a pytree with the tree structure of the parameters
it masks (a Linen `params` tree, a `{'params': ..., 'batch_stats': ...}`
variables dict, or an NNX state of the same layers):

- a PRUNABLE leaf (a conv/dense kernel the model prunes, see `prunable`)
  holds a bool array of that leaf's shape: True = kept, False = pruned;
- every other leaf (biases, norm scales and offsets, running statistics, a
  kernel the model keeps dense such as an MLP's or VGG's classifier) holds a
  0-d `True`: never pruned. It broadcasts against its leaf.

So a mask says by itself which leaves are prunable: `apply_mask`, `density`,
`sparsity_report`, `random_prune_like` and the rewind perturbations of
`wsjax.transforms.rewind` need no model name. Float masks of 0/1 are accepted
everywhere (nonzero = kept); the functions here return bool masks.

Masks are matched to parameters by leaf NAME (`wsjax.tree`: "conv1/kernel",
"layer1_0/shortcut_conv/kernel"), not by position: a mask built on
`variables['params']` also applies to the full variables (names it lacks,
such as "batch_stats/bn1/mean", are never pruned) and to an NNX state of the
same layers. A mask leaf must have shape () or its parameter's shape.

Replicas. A stack of masks (one per replica, a leading axis on every leaf)
is handled with `jax.vmap`; every numeric function here is jit- and
vmap-friendly. `sparsity_report` reads values back to the host (one mask).

Which leaves are prunable follows open_lth (facebookresearch/open_lth):
`models/base.py` `prunable_layer_names` is every Conv2d/Linear `.weight`
(kernels; never biases or BatchNorm), and the default pruning hparams of
`models/cifar_vgg.py` and `models/mnist_lenet.py` set
`pruning_layers_to_ignore='fc.weight'` (the classifier stays dense), while
`models/cifar_resnet.py` ignores nothing (classifier and 1x1 shortcut convs
are pruned).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wsjax import tree
from wsjax.models.layers import HEAD
from wsjax.transforms import groups

# Models whose classifier `head` is pruned with everything else: open_lth's
# CIFAR ResNets, and logistic regression (its only layer is the head, so
# keeping it dense would leave nothing to prune).
PRUNE_HEAD_MODELS = ("resnet18", "resnet20", "logreg")


def _check_model_name(model_name) -> None:
  if not isinstance(model_name, str) or not model_name:
    raise ValueError(
        f"model_name must be a model's name such as 'resnet20', got "
        f"{model_name!r}")


def _in_head(name: str) -> bool:
  return name.split("/")[0] == HEAD


def prunable(params, model_name: str) -> tuple[str, ...]:
  """Names (`wsjax.tree`) of the leaves of `params` that `model_name` prunes.

  Conv and dense kernels (role `kernel` of `wsjax.transforms.groups`), never
  biases, norm parameters or running statistics. Per model, as open_lth:
  `resnet18`, `resnet20` prune every kernel, the classifier `head` and the
  1x1 shortcut convs included; `mlp`, `vgg*`, `conv1d`, `conv8` and any
  other (unknown) model name keep the classifier `head` dense (open_lth's
  `pruning_layers_to_ignore='fc.weight'` of its VGG and LeNet). `logreg`
  prunes its head, its only layer. Reads the tree's structure only (arrays
  or `jax.ShapeDtypeStruct`s), in leaf order.
  """
  _check_model_name(model_name)
  keep_head = model_name not in PRUNE_HEAD_MODELS
  _, infos, _ = groups.flatten(params)
  return tuple(info.name for info in infos
               if info.role == groups.KERNEL
               and not (keep_head and _in_head(info.name)))


def kept(mask_leaf) -> jax.Array:
  """A mask leaf as bool: itself if bool, else `leaf != 0`."""
  mask_leaf = jnp.asarray(mask_leaf)
  if mask_leaf.dtype == jnp.bool_:
    return mask_leaf
  return mask_leaf != 0


def mask_by_name(params, mask, who: str) -> dict[str, Any]:
  """`{name: mask leaf}` of `mask`, checked against the leaves of `params`.

  Returns {} for `mask=None` (nothing pruned). Raises ValueError (one line,
  prefixed by `who`) if the mask names a leaf `params` lacks or a mask leaf's
  shape is neither () nor its parameter's shape.
  """
  if mask is None:
    return {}
  found = tree.to_dict(mask)
  leaves, infos, _ = groups.flatten(params)
  shapes = {info.name: tuple(np.shape(leaf))
            for info, leaf in zip(infos, leaves, strict=True)}
  extra = sorted(set(found) - set(shapes))
  if extra:
    raise ValueError(
        f"{who}: the mask has leaves the parameters lack ({', '.join(extra)});"
        " build it with ones_mask(params, model_name) on the same tree.")
  bad = [f"{n} {tuple(np.shape(m))} vs {shapes[n]}" for n, m in found.items()
         if tuple(np.shape(m)) not in ((), shapes[n])]
  if bad:
    raise ValueError(
        f"{who}: a mask leaf must have shape () or its parameter's shape: "
        f"{'; '.join(bad)}.")
  return found


def ones_mask(params, model_name: str):
  """The dense mask of `params` for `model_name`: nothing pruned.

  Prunable leaves (`prunable(params, model_name)`) get an all-True bool array
  of their shape, every other leaf a 0-d True (see the module docstring).
  """
  names = set(prunable(params, model_name))

  def f(info, leaf):
    if info.name in names:
      return jnp.ones(np.shape(leaf), jnp.bool_)
    return jnp.ones((), jnp.bool_)

  return groups.map_leaves(f, params)


def apply_mask(params, mask):
  """The masked parameters: `where(mask, w, 0)` leaf by leaf.

  Pruned positions become exact (+0.0) zeros of the leaf's dtype; kept
  positions and leaves the mask does not name are unchanged. This is
  open_lth's `PrunedModel._apply_mask` (`param *= mask`), applied after every
  update (PAPERS.md section 3, "pruned weights held at exactly zero").
  """
  found = mask_by_name(params, mask, "apply_mask")

  def f(info, p):
    m = found.get(info.name)
    if m is None:
      return p
    return jnp.where(kept(m), p, jnp.zeros((), jnp.result_type(p)))

  return groups.map_leaves(f, params)


def _prunable_leaves(mask) -> list[tuple[str, jax.Array]]:
  """(name, bool leaf) of the mask's prunable (not 0-d) leaves."""
  return [(name, kept(m)) for name, m in tree.named_leaves(mask)
          if np.ndim(m) > 0]


def density(mask) -> jax.Array:
  """Fraction of the prunable weights that are kept (float32 scalar).

      density = sum_l kept_l / sum_l total_l   over prunable (non-0-d) leaves

  open_lth's `Mask.density`. 1.0 for a mask with no prunable leaf. Traceable
  (jit, vmap over a stack of replica masks).
  """
  leaves = [m for _, m in _prunable_leaves(mask)]
  if not leaves:
    return jnp.ones((), jnp.float32)
  kept_count = sum(jnp.sum(m, dtype=jnp.int32) for m in leaves)
  total = sum(int(m.size) for m in leaves)
  return (kept_count / total).astype(jnp.float32)


def sparsity_report(mask) -> dict[str, Any]:
  """Per-layer and overall counts of one mask, as plain Python numbers.

  Returns `{"layers": {name: {"kept", "total", "density"}}, "overall":
  {"kept", "total", "density"}}` over the prunable (non-0-d) leaves, keyed by
  leaf name ("conv1/kernel"); `kept` and `total` are ints, `density` =
  kept / total a float (open_lth's `sparsity_report.json` has the overall
  `total` and `unpruned`). Reads the mask back to the host.
  """
  layers = {}
  for name, m in _prunable_leaves(mask):
    k = int(np.sum(np.asarray(m)))
    layers[name] = {"kept": k, "total": int(m.size),
                    "density": k / int(m.size) if m.size else 1.0}
  k = sum(v["kept"] for v in layers.values())
  t = sum(v["total"] for v in layers.values())
  return {"layers": layers,
          "overall": {"kept": k, "total": t, "density": k / t if t else 1.0}}
