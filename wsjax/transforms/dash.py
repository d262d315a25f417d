"""DASH: Direction-Aware SHrinking.

Shin, Lee, Kim, Yun, Lee & Yun, "DASH: Warm-Starting Neural Network Training
in Stationary Settings without Loss of Plasticity", NeurIPS 2024. Official
code: baekrok/DASH-Direction-Aware-SHrinking, utils/train_utils.py (`dash`,
`perform_dash`) and main.py.

Before training on a grown buffer, each weight group is shrunk in proportion
to how well it aligns with the negative loss gradient:

    W_group <- W_group * clip(cos(W_group, -grad_group), lam, 1)

so groups that point along the descent direction (features) are kept and the
others (memorized noise) shrink by up to `lam`. The gradient is an EMA of
per-chunk gradients over the buffer in arrival order (`dash_gradient`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from wsjax.transforms import base
from wsjax.transforms import groups

GRANULARITIES = ("kernel_slice", "unit")
EPS = 1e-8  # torch.nn.functional.cosine_similarity's default, as in the code


def _check_granularity(granularity: str):
  if granularity not in GRANULARITIES:
    raise ValueError(
        f"dash: unknown granularity {granularity!r}; use 'kernel_slice' "
        "(one cosine per (in, out) conv slice, the official code) or 'unit' "
        "(one per output unit, the paper's text).")


def _group_cosine(role: str, w, neg_g, granularity: str, eps: float):
  """Cosines of one leaf's groups, shaped to broadcast against the leaf."""
  if role == groups.KERNEL and w.ndim >= 2:
    if w.ndim >= 3 and granularity == "kernel_slice":
      axes = tuple(range(w.ndim - 2))  # spatial taps of each (in, out) slice
    else:
      axes = tuple(range(w.ndim - 1))  # all incoming weights of an out unit
    return groups.cosine(w, neg_g, axis=axes, eps=eps, keepdims=True)
  # A layer's bias (or a 0/1-d kernel): one cosine for the whole vector.
  return groups.cosine(w, neg_g, axis=None, eps=eps, keepdims=True)


def dash(lam: float = 0.3, granularity: str = "kernel_slice",
         eps: float = EPS) -> optax.GradientTransformation:
  """DASH shrinking (Shin et al., 2024), with the loss gradient as an extra argument.

  `update(updates, state, params, *, grads)`: `updates` are the deltas so far
  (zeros when applied alone), `grads` the loss gradient (e.g. from
  `dash_gradient`). With W = params + updates (the current weights) and
  g = -grads (the descent direction), for each group of a conv/dense layer:

      W_group <- W_group * clip(cos(W_group, g_group), lam, 1)
      cos(a, b) = <a, b> / (max(||a||, eps) * max(||b||, eps)),  eps = 1e-8

  (PyTorch's `cosine_similarity`, which the official code calls; a zero
  vector has cosine 0, so it is scaled by `lam`). Groups:

  - conv kernels `(*spatial, in, out)`: `granularity="kernel_slice"` (default,
    the official code's `rearrange(w, 'o i h w -> o i (h w)')`): one cosine per
    (in, out) slice over its spatial taps; `granularity="unit"` (the paper's
    per-neuron text): one cosine per output unit over `(*spatial, in)`;
  - dense kernels `(in, out)`: one cosine per output unit (its column of
    incoming weights), as `cosine_similarity(grad, weight, dim=-1)` on
    PyTorch's `(out, in)` weight;
  - a layer's bias: one cosine for the whole bias vector;
  - norm-layer scales/offsets, running statistics, other leaves: untouched.

  The optimizer state is not part of this transform (the official code keeps
  it). Use `dash_gradient` for the official gradient signal.

  Args:
    lam: lower clip of the shrink factor (the code's `dash_lambda`), 0.3.
    granularity: "kernel_slice" or "unit", for conv kernels.
    eps: the cosine's norm floor.

  Returns:
    A stateless `optax.GradientTransformationExtraArgs`; `update(updates,
    state, params, grads=g)` returns the deltas `W (clip(cos, lam, 1) - 1) +
    updates` (the incoming delta for untouched leaves), so in `optax.chain`
    it composes with any other transform in either order.
  """
  _check_granularity(granularity)

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, grads=None, **extra):
    del extra
    base.require_params(params, "dash")
    if grads is None:
      raise ValueError("dash: update() needs the loss gradient as an extra argument: "
                       "tx.update(updates, state, params, grads=g)")

    def f(info, p, u, grad):
      if info.role not in groups.LAYER_WEIGHTS:
        return u
      w = p + u
      c = _group_cosine(info.role, w, -grad, granularity, eps)
      scale = jnp.clip(c, lam, 1.0)
      return (w * (scale - 1.0) + u).astype(p.dtype)

    return groups.map_leaves(f, params, updates, grads), state

  return optax.GradientTransformationExtraArgs(init, update)


def dash_cosines(params, grads, granularity: str = "kernel_slice",
                 eps: float = EPS) -> dict[str, jax.Array]:
  """The cosines DASH would use, per conv/dense kernel and bias.

  `grads` are loss gradients (as given to `dash`); the cosines are taken with
  their negation. Returns `{leaf name: cosines}`, e.g. `'Conv_0/kernel'`:
  `(in, out)` for "kernel_slice" conv kernels, `(out,)` for dense kernels and
  "unit" conv kernels, `()` for biases. Unclipped; for histograms.
  """
  _check_granularity(granularity)
  leaves, infos, treedef = groups.flatten(params)
  grad_leaves = treedef.flatten_up_to(grads)
  out = {}
  for info, w, g in zip(infos, leaves, grad_leaves):
    if info.role in groups.LAYER_WEIGHTS:
      c = _group_cosine(info.role, w, -g, granularity, eps)
      if info.role == groups.KERNEL and w.ndim >= 2:
        keep = 2 if (w.ndim >= 3 and granularity == "kernel_slice") else 1
        c = c.reshape(w.shape[w.ndim - keep:])
      else:
        c = c.reshape(())
      out[info.name] = c
  return out


def dash_gradient(loss_fn: Callable[..., jax.Array], params, x, y,
                  chunk_indices, alpha: float = 0.3,
                  max_batch: int | None = None, chunk_mask=None):
  """DASH's gradient signal: an EMA of per-chunk gradients in arrival order.

  For chunks c = 1..n (rows of `chunk_indices`, oldest first):

      m_0 = 0,   m_c = (1 - alpha) * m_{c-1} + alpha * grad L(params; chunk_c)

  where L is `loss_fn`'s mean loss over the whole chunk (one batch per chunk,
  as the official code's `DataLoader(ConcatDataset(buffer),
  batch_size=chunk_size, shuffle=False)`). The newest chunk weighs `alpha`,
  chunk c weighs `alpha * (1 - alpha)**(n - c)`. As in the official code the
  EMA starts from ZEROS (not from the first chunk's gradient), so the weights
  sum to `1 - (1 - alpha)**n`; cosines do not depend on that scale. The code
  accumulates the EMA of the NEGATIVE gradients; this returns the gradient
  (its exact negation), to be given to `dash()` as `grads=`.

  Args:
    loss_fn: `(params, xb, yb) -> scalar mean loss`. Close over the model in
      eval mode (BatchNorm on running statistics, as the official code, which
      runs after `model.eval()`) and its batch_stats.
    params: parameters (any pytree; Linen dict or NNX state). A leading seed
      axis is handled by `jax.vmap` over this function.
    x, y: the whole dataset (arrays or pytrees of arrays, examples first),
      replicated across devices.
    chunk_indices: int array `(n_chunks, chunk_size)` of dataset indices,
      rows in arrival order. Its example axis (1) may be sharded over the
      `data` mesh axis.
    alpha: EMA weight of the newest chunk (the code's `dash_alpha`), 0.3.
    max_batch: if set and smaller than the chunk, each chunk's gradient is
      accumulated over sub-batches of at most `max_batch` examples, weighted
      by their share of the chunk: `sum_j (n_j / chunk_size) * grad_j`. Equal
      to the one-batch gradient whenever the loss is a per-example mean
      (eval mode), up to float rounding.
    chunk_mask: optional bool `(n_chunks,)`; rows marked False are skipped
      (the EMA is left unchanged). Lets a caller pad the chunk axis to a
      fixed length, so one compiled program serves every stage; put the
      padding rows first.

  Returns:
    A gradient tree with the structure of `params`. One `lax.scan` over
    chunks; jit-, vmap- and sharding-friendly.
  """
  chunk_indices = jnp.asarray(chunk_indices)
  if chunk_indices.ndim != 2:
    raise ValueError(
        "dash_gradient: chunk_indices must be (n_chunks, chunk_size), got "
        f"shape {chunk_indices.shape}.")
  chunk_size = chunk_indices.shape[1]
  x = jax.tree.map(jnp.asarray, x)
  y = jax.tree.map(jnp.asarray, y)
  grad_fn = jax.grad(loss_fn)

  def batch_grad(idx):
    take = lambda a: a[idx]
    return grad_fn(params, jax.tree.map(take, x), jax.tree.map(take, y))

  def axpy(a, g, acc):
    return jax.tree.map(lambda s, t: s + a * t, acc, g)

  def chunk_grad(idx):
    if max_batch is None or max_batch >= chunk_size:
      return batch_grad(idx)
    n_full, rest = divmod(chunk_size, max_batch)
    full = idx[:n_full * max_batch].reshape(n_full, max_batch)

    def body(acc, sub_idx):
      return axpy(max_batch / chunk_size, batch_grad(sub_idx), acc), None

    acc, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), full)
    if rest:
      acc = axpy(rest / chunk_size, batch_grad(idx[n_full * max_batch:]), acc)
    return acc

  def step(m, inputs):
    idx, keep = inputs

    def update(m):
      g = chunk_grad(idx)
      return jax.tree.map(lambda a, b: (1.0 - alpha) * a + alpha * b, m, g)
    return jax.lax.cond(keep, update, lambda m: m, m), None

  if chunk_mask is None:
    chunk_mask = jnp.ones(chunk_indices.shape[:1], bool)
  m0 = jax.tree.map(jnp.zeros_like, params)
  m, _ = jax.lax.scan(step, m0, (chunk_indices, jnp.asarray(chunk_mask, bool)))
  return m
