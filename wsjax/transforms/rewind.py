"""Perturbations of the weights at the rewind point k, for pruned networks.

Frankle, Schwab & Morcos, "The Early Phase of Neural Network Training", ICLR
2020: after IMP has found a mask, the rewound weights theta_k are perturbed
before training k -> T, and the damage to the subnetwork's final accuracy
measures what the first k iterations stored in the weights:

- `random_reinit`: a fresh draw of the initializer (the original lottery
  ticket control; open_lth's `randomly_reinitialize` branch);
- `sign_preserving_reinit`: fresh magnitudes, the signs of theta_k;
- `shuffle_weights`: theta_k permuted within each layer (optionally keeping
  every position's sign);
- `gaussian_noise`: theta_k plus Gaussian noise scaled to each layer's std.

None of these is in open_lth's public code; the definitions follow the paper
(PAPERS.md section 3). Each is an optax `GradientTransformation` whose
`update(updates, state, params)` returns parameter deltas and acts on
`params + updates` (see `wsjax.transforms.base`), so `apply_transform(tx,
theta_k)` is the perturbed state.

What is touched. The paper perturbs the WEIGHTS, so by default only the
kernels the mask marks prunable (non-0-d mask leaves; with `mask=None`,
every conv/dense kernel) change; biases, norm scales and offsets, kernels the
model keeps dense (an MLP's or VGG's classifier) and running statistics are
kept. `prunable_only=False` perturbs every trainable leaf (biases and norm
parameters too; running statistics never). Pruned positions come out as
exact zeros in every case.

Keys are explicit: every factory takes a required `key` (a PRNG key or an
int), split on each update as the other random transforms do:
`key, sub = split(key)`; per-leaf draws use `groups.leaf_key(sub, leaf)`
(keyed by the leaf's name), the fresh initialization `init_fn(sub)`.
Constructing the transform inside a vmapped function vmaps over replicas'
keys and masks.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsjax import tree
from wsjax.pruning import masks as masks_lib
from wsjax.transforms import base
from wsjax.transforms import groups


def _selected(info: groups.Leaf, mask_leaf, has_mask: bool,
              prunable_only: bool) -> bool:
  if not prunable_only:
    return info.role in groups.TRAINABLE
  if info.role != groups.KERNEL:
    return False
  return not has_mask or (mask_leaf is not None and np.ndim(mask_leaf) > 0)


def _fresh_by_name(fresh_tree, params, who: str) -> dict[str, Any]:
  """init_fn's draw as {name: leaf}, checked to cover params' leaves."""
  fresh = tree.to_dict(fresh_tree)
  leaves, infos, _ = groups.flatten(params)
  bad = [info.name for info, leaf in zip(infos, leaves, strict=True)
         if info.role in groups.TRAINABLE and (
             info.name not in fresh
             or np.shape(fresh[info.name]) != np.shape(leaf))]
  if bad:
    raise ValueError(
        f"{who}: init_fn(key) must return a fresh draw of the same "
        f"parameters; missing or differently shaped: {', '.join(bad)}.")
  return fresh


def _reinit(leaf_key, w, keep, fresh, factor):
  del leaf_key, keep, factor
  return fresh.astype(w.dtype)


def _sign_preserving(leaf_key, w, keep, fresh, factor):
  del leaf_key, keep, factor
  return jnp.abs(fresh).astype(w.dtype) * jnp.sign(w)


def _shuffle_kept(leaf_key: jax.Array, w: jax.Array,
                  keep: jax.Array) -> jax.Array:
  """w with its kept values permuted uniformly at random among the kept
  positions (static shapes, so jit/vmap-friendly).

  `src` lists the kept positions in index order, then the pruned ones;
  `dst` lists the kept positions in the order of a uniform random
  permutation of all positions (its restriction to the kept positions is a
  uniform permutation of them), then the pruned ones. Value `w[src[j]]`
  moves to `dst[j]`; pruned positions only exchange among themselves and are
  zeroed by the caller.
  """
  flat, keep_flat = w.ravel(), keep.ravel()
  n = flat.shape[0]
  src = jnp.argsort(~keep_flat, stable=True)
  perm = jax.random.permutation(leaf_key, n)
  dst = perm[jnp.argsort(~keep_flat[perm], stable=True)]
  return jnp.zeros_like(flat).at[dst].set(flat[src]).reshape(w.shape)


def _shuffle(leaf_key, w, keep, fresh, factor):
  del fresh, factor
  return _shuffle_kept(leaf_key, w, keep)


def _shuffle_magnitudes(leaf_key, w, keep, fresh, factor):
  del fresh, factor
  return jnp.abs(_shuffle_kept(leaf_key, w, keep)) * jnp.sign(w)


def _noise(leaf_key, w, keep, fresh, factor):
  del fresh
  wf = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  count = jnp.maximum(jnp.sum(keep, dtype=jnp.int32), 1).astype(wf.dtype)
  mean = jnp.sum(jnp.where(keep, wf, 0)) / count
  var = jnp.sum(jnp.where(keep, (wf - mean) ** 2, 0)) / count
  eps = jax.random.normal(leaf_key, w.shape, wf.dtype)
  return (wf + factor * jnp.sqrt(var) * eps).astype(w.dtype)


# perturb(leaf_key, w, keep, fresh, factor) -> the leaf's new value
_PERTURBATIONS: dict[str, Callable[..., jax.Array]] = {
    "random_reinit": _reinit,
    "sign_preserving_reinit": _sign_preserving,
    "shuffle_weights": _shuffle,
    "shuffle_magnitudes": _shuffle_magnitudes,
    "gaussian_noise": _noise,
}


@functools.partial(jax.jit, static_argnums=0)
def _leaf_delta(kind: str, leaf_key, p, u, m, fresh, factor):
  """The delta taking leaf `p` to `where(m, perturb(p + u), 0)`.

  Compiled once per kind and leaf shape, shared by all transform instances
  (inlined when the update runs under an outer jit or vmap).
  """
  keep = jnp.broadcast_to(m, p.shape)
  new = _PERTURBATIONS[kind](leaf_key, p + u, keep, fresh, factor)
  new = jnp.where(keep, new.astype(p.dtype), jnp.zeros((), p.dtype))
  return (new - p).astype(p.dtype)


def _masked_transform(who: str, kind: str, key, mask, prunable_only: bool,
                      init_fn: Callable[[jax.Array], Any] | None = None,
                      factor=0.0) -> optax.GradientTransformation:
  """A transform setting each selected leaf to `where(kept, perturb(...), 0)`
  with the perturbation `_PERTURBATIONS[kind]`."""
  if key is None:
    raise ValueError(f"{who}: pass a PRNG key (or an int seed) as key.")

  def init(params):
    del params
    return base.PRNGState(base.init_key(key))

  def update(updates, state, params=None):
    base.require_params(params, who)
    found = masks_lib.mask_by_name(params, mask, who)
    state, sub = base.split_state(state)
    fresh = None if init_fn is None else _fresh_by_name(init_fn(sub), params,
                                                        who)
    scale = jnp.asarray(factor, jnp.float32)

    def f(info, p, u):
      m = found.get(info.name)
      if not _selected(info, m, mask is not None, prunable_only):
        return u
      return _leaf_delta(kind, groups.leaf_key(sub, info), p, u,
                         masks_lib.kept(True if m is None else m),
                         None if fresh is None else fresh[info.name], scale)

    return groups.map_leaves(f, params, updates), state

  return optax.GradientTransformation(init, update)


def random_reinit(init_fn: Callable[[jax.Array], Any], key, mask, *,
                  prunable_only: bool = True) -> optax.GradientTransformation:
  """Random re-initialization under the mask (the lottery-ticket control).

      w <- m * w_fresh,   w_fresh = init_fn(sub),  key, sub = split(key)

  on the prunable kernels (`prunable_only=False`: every trainable leaf, the
  whole fresh network of open_lth's `randomly_reinitialize` branch, running
  statistics excepted). Frankle & Carbin (2019) and Frankle et al. (2020)
  train such a network with the same mask to show the rewound values matter.

  Args:
    init_fn: `key -> params`, a fresh draw of the model's own initializer;
      its leaves are matched by name (`wsjax.tree`), so a Linen `{'params':
      ..., 'batch_stats': ...}` draw (`wsjax.models.make_init_fn`) serves a
      params tree too.
    key: a PRNG key or int (required: no default seed).
    mask: the subnetwork's mask (`wsjax.pruning`), or None (dense).
    prunable_only: False also redraws biases and norm parameters.
  """
  if init_fn is None:
    raise ValueError("random_reinit needs init_fn (key -> a fresh draw of the"
                     " model's params).")

  return _masked_transform("random_reinit", "random_reinit", key, mask,
                           prunable_only, init_fn)


def sign_preserving_reinit(init_fn: Callable[[jax.Array], Any], key, mask, *,
                           prunable_only: bool = True
                           ) -> optax.GradientTransformation:
  """Fresh magnitudes with the rewound weights' signs.

      w <- m * |w_fresh| * sign(w_k),   w_fresh = init_fn(sub)

  (Frankle, Schwab & Morcos 2020, "are signs all you need?": deep networks
  are not robust to it at k). A kept weight that is exactly 0 stays 0
  (sign 0). Arguments as `random_reinit`.
  """
  if init_fn is None:
    raise ValueError("sign_preserving_reinit needs init_fn (key -> a fresh "
                     "draw of the model's params).")

  return _masked_transform("sign_preserving_reinit", "sign_preserving_reinit",
                           key, mask, prunable_only, init_fn)


def shuffle_weights(key, mask, keep_signs: bool = False, *,
                    prunable_only: bool = True) -> optax.GradientTransformation:
  """Shuffles each layer's kept weights among that layer's kept positions.

      w_l <- m_l * P_l(w_l)                           keep_signs=False
      w_l <- m_l * |P_l(w_l)| * sign(w_l)             keep_signs=True

  P_l is a uniformly random permutation of layer l's UNPRUNED positions,
  drawn per leaf (`groups.leaf_key(sub, leaf)`); the pruned positions stay
  exactly 0 and the layer's multiset of kept values is unchanged (with
  `keep_signs`, of kept magnitudes: each position keeps its own sign).
  Frankle, Schwab & Morcos (2020): weights at k are highly non-independent,
  shuffling them within layers hurts deep networks.

  Args:
    key: a PRNG key or int (required).
    mask: the subnetwork's mask, or None (dense: all positions).
    keep_signs: shuffle magnitudes only.
    prunable_only: False also shuffles biases and norm parameters, each
      within its own leaf.
  """
  kind = "shuffle_magnitudes" if keep_signs else "shuffle_weights"
  return _masked_transform("shuffle_weights", kind, key, mask, prunable_only)


def gaussian_noise(key, mask, factor: float, *,
                   prunable_only: bool = True) -> optax.GradientTransformation:
  """Adds Gaussian noise scaled to each layer's weight std.

      w_l <- m_l * (w_l + factor * std_l * eps),   eps ~ N(0, I)
      std_l = sqrt(mean_{kept} (w_l - mean_{kept} w_l)^2)

  std_l is the population std (ddof 0) of layer l's UNPRUNED weights at k
  (0 for a layer with none kept); noise lands on unpruned positions only,
  pruned ones stay exactly 0. `factor` is the paper's noise scale (noise of
  factor 1 is as large as the layer's own spread). eps is drawn per leaf with
  `groups.leaf_key(sub, leaf)`.

  Args:
    key: a PRNG key or int (required).
    mask: the subnetwork's mask, or None (dense).
    factor: noise scale, >= 0 (may be a traced per-replica value).
    prunable_only: False also perturbs biases and norm parameters, each
      scaled by its own std.
  """
  if isinstance(factor, (int, float)) and not factor >= 0:
    raise ValueError(f"gaussian_noise: factor must be >= 0, got {factor}")

  return _masked_transform("gaussian_noise", "gaussian_noise", key, mask,
                           prunable_only, factor=factor)
