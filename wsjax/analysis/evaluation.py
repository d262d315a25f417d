"""Accuracy and loss of a stack of replicas on a whole split, in one program.

`evaluate(model, variables, x, y)` evaluates R networks of one architecture
(seeds, copies, points along an interpolation path: any leading "replica"
axis on every leaf of `variables`) on every example of `(x, y)`:

    acc_r  = (1/n) sum_i [argmax_c f_r(x_i)_c == y_i]
    loss_r = (1/n) sum_i -log softmax(f_r(x_i))_{y_i}

with `f_r = model.apply(variables_r, ., train=False)` (eval mode: BatchNorm
normalizes with its running statistics). The replicas are `jax.vmap`-ed and
the examples scanned in fixed-size batches, the last one padded and masked
(as `wsjax.core.program.Program.evaluate` does), so one compiled program
serves a given (model, batch size, replica count, split shape) whatever
the values. The jitted program is cached by JAX per model (Linen modules
hash by their fields, so two equal `get_model(...)` calls share it). It runs
on JAX's default device: replicas are not spread over a `wsjax.parallel`
mesh here.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from wsjax import tree as wtree

DEFAULT_BATCH_SIZE = 1000


def replica_count(tree, what: str = "variables") -> int:
  """The size of the leading (replica) axis shared by every leaf of `tree`.

  Raises ValueError (naming the offending leaves) when a leaf is a scalar,
  the leaves disagree, or the tree has no leaves."""
  named = wtree.named_leaves(tree)
  if not named:
    raise ValueError(f"{what} has no arrays; pass a tree with a leading replica axis on every leaf")
  sizes = {}
  for name, leaf in named:
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(f"{what} leaf {name!r} is a scalar; every leaf needs a leading replica "
                       f"axis (stack single networks with x[None])")
    sizes.setdefault(shape[0], []).append(name)
  if len(sizes) > 1:
    detail = "; ".join(f"{size}: {', '.join(names[:3])}" for size, names in sorted(sizes.items()))
    raise ValueError(f"{what} leaves disagree on the leading replica axis ({detail}); "
                     f"stack every leaf over the same replicas")
  return next(iter(sizes))


def check_split(x, y, what: str = "split") -> int:
  """The number of examples of a non-empty (x, y) pair; ValueError otherwise."""
  n = jnp.shape(x)[0] if jnp.ndim(x) else 0
  if jnp.ndim(y) != 1 or jnp.shape(y)[0] != n:
    raise ValueError(f"{what}: x has {n} examples but y has shape {jnp.shape(y)}; "
                     f"pass labels of shape ({n},)")
  if n == 0:
    raise ValueError(f"{what} is empty; pass at least one example")
  return n


def padded_batches(x, batch_size: int):
  """Inside jit: `(n, ...)` -> `(nb, b, ...)` zero-padded batches and a
  `(nb, b)` float mask of the real examples, `b = min(batch_size, n)`,
  `nb = ceil(n / b)`. Batch k holds examples `k*b .. k*b + b - 1` in order."""
  n = x.shape[0]
  b = min(batch_size, n)
  nb = -(-n // b)
  pad = nb * b - n
  xp = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(nb, b, *x.shape[1:])
  mask = (jnp.arange(nb * b) < n).astype(jnp.float32).reshape(nb, b)
  return xp, mask


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def _evaluate(model, variables, x, y, *, batch_size: int):
  n = x.shape[0]
  xb, mask = padded_batches(x, batch_size)
  yb, _ = padded_batches(y, batch_size)

  def one_replica(replica_vars):
    def body(carry, batch):
      correct, loss_sum = carry
      x_k, y_k, m_k = batch
      logits = model.apply(replica_vars, x_k, train=False)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y_k)
      hits = (jnp.argmax(logits, -1) == y_k) & (m_k > 0)
      return (correct + jnp.sum(hits, dtype=jnp.int32), loss_sum + jnp.sum(losses * m_k)), None

    init = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
    (correct, loss_sum), _ = jax.lax.scan(body, init, (xb, yb, mask))
    return correct.astype(jnp.float32) / n, loss_sum / n

  acc, loss = jax.vmap(one_replica)(variables)
  return {"acc": acc, "loss": loss}


def evaluate(model, variables: Mapping[str, Any], x, y, *,
             batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, jax.Array]:
  """Accuracy and mean cross-entropy of every replica on the whole of (x, y).

  Args:
    model: a Flax Linen module called as `model.apply(vars, x, train=False)`.
    variables: `{"params": ..., ["batch_stats": ...]}` with a leading replica
      axis of size R on every leaf (e.g. `jax.vmap(init_fn)(keys)`).
    x, y: a whole split, host or device arrays; y int labels of shape (n,).
    batch_size: examples per scanned batch (the last is padded and masked).

  Returns:
    `{"acc": (R,), "loss": (R,)}`, float32 device arrays: the fraction of
    examples classified correctly and the cross-entropy averaged over the
    examples.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be a dict with a 'params' entry "
                     "({'params': ..., 'batch_stats': ...}), each leaf with a leading replica axis")
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  replica_count(variables)
  check_split(x, y)
  return _evaluate(model, dict(variables), x, y, batch_size=int(batch_size))
