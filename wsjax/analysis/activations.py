"""Activations of named layers on a fixed input set, for every replica at once.

wsjax models `sow` each ReLU output into the `activations` collection
(`wsjax.models`); `model.apply(variables, x, train=False,
mutable=["activations"])` returns them. This module runs that over a whole
input set (e.g. a few thousand unaugmented training examples, the inputs of
a CCA/CKA comparison: Raghu et al. 2017, Gotmare et al. 2019) for every
replica of a vmapped run, keeping only the layers asked for:

    acts = collect_activations(model, variables, x, ["relu1", "relu2"])
    acts["relu1"]                       # (replicas, N, ..., units)

Layers are named as `wsjax.tree` names the sown collection: "relu1",
"layer1_0/relu2" (a module's path, then the sown name). A layer sown more
than once in one call gets one entry per call, "relu1/0", "relu1/1".
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wsjax import tree

COLLECTION = "activations"


def named_activations(collection) -> dict[str, jax.Array]:
  """A sown `activations` collection as `{layer name: array}`.

  Takes the collection (`{'relu1': (array,), ...}`) or the whole mutable
  state (`{'activations': {...}}`). A sown value is a tuple with one array
  per `sow` call: a single call is named by its path ("layer1_0/relu2"),
  several by path and call index ("relu1/0").
  """
  if isinstance(collection, Mapping) and set(collection) == {COLLECTION}:
    collection = collection[COLLECTION]
  out = {}
  for name, value in tree.named_leaves(collection, is_leaf=lambda v: isinstance(v, tuple)):
    values = value if isinstance(value, tuple) else (value,)
    if len(values) == 1:
      out[name] = values[0]
    else:
      out.update({f"{name}/{i}": a for i, a in enumerate(values)})
  return out


def _sown(model, variables, x) -> dict[str, jax.Array]:
  _, state = model.apply(variables, x, train=False, mutable=[COLLECTION])
  return named_activations(state.get(COLLECTION, {}))


def _replica_count(variables) -> int:
  sizes = {np.shape(v)[0] if np.ndim(v) else None for v in jax.tree.leaves(variables)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError("variables must have one leading replica axis of the same size on every leaf, "
                     f"got leading sizes {sorted(map(str, sizes))}; pass replicated=False for one model")
  return sizes.pop()


def layer_shapes(model, variables, inputs, *, replicated: bool = True) -> dict[str, tuple]:
  """`{layer name: per-example shape}` of every activation `model` sows,
  found by tracing one example (`jax.eval_shape`; nothing is computed).

  Args:
    model: a Flax Linen module whose `__call__(x, train)` sows into
      `activations` (every wsjax model).
    variables: its variables, with a leading replica axis if `replicated`.
    inputs: `(N, ...)` inputs (only the per-example shape and dtype are used).
    replicated: whether `variables` has a leading replica axis.
  """
  if replicated:
    _replica_count(variables)
    one = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v)[1:], v.dtype), variables)
  else:
    one = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), variables)
  dtype = inputs.dtype if hasattr(inputs, "dtype") else np.asarray(inputs).dtype
  example = jax.ShapeDtypeStruct((1, *np.shape(inputs)[1:]), dtype)
  shapes = jax.eval_shape(functools.partial(_sown, model), one, example)
  return {name: tuple(s.shape[1:]) for name, s in shapes.items()}


def _check_layers(layers, available: Sequence[str]) -> tuple[str, ...]:
  if not available:
    raise ValueError("the model sows no activations (nothing in its 'activations' collection)")
  if layers is None:
    return tuple(available)
  names = (layers,) if isinstance(layers, str) else tuple(layers)
  if not names:
    raise ValueError(f"no layers asked for; available: {', '.join(available)}")
  unknown = [n for n in names if n not in available]
  if unknown:
    raise ValueError(f"unknown layer {', '.join(map(repr, unknown))}; available: {', '.join(available)}")
  if len(set(names)) != len(names):
    raise ValueError(f"layers listed twice: {', '.join(names)}")
  return names


@functools.partial(jax.jit, static_argnames=("model", "layers", "replicated", "n"))
def _collect(model, variables, batches, layers, replicated, n):
  """Scans the batches `(num_batches, batch, ...)`; per batch, every replica
  (vmapped). Returns `{layer: (replicas, n, ..., units)}`."""
  def one(v, x):
    named = _sown(model, v, x)
    return tuple(named[name] for name in layers)

  per_batch = jax.vmap(one, in_axes=(0, None)) if replicated else one

  def body(carry, x):
    return carry, per_batch(variables, x)

  _, outs = jax.lax.scan(body, None, batches)
  result = {}
  for name, a in zip(layers, outs):
    if replicated:  # (num_batches, R, batch, ...) -> (R, num_batches * batch, ...)
      a = jnp.moveaxis(a, 1, 0)
      a = a.reshape(a.shape[0], -1, *a.shape[3:])[:, :n]
    else:           # (num_batches, batch, ...) -> (num_batches * batch, ...)
      a = a.reshape(-1, *a.shape[2:])[:n]
    result[name] = a
  return result


def collect_activations(model, variables, inputs, layers: str | Iterable[str] | None = None, *,
                        batch_size: int = 256, replicated: bool = True) -> dict[str, jax.Array]:
  """The sown activations of `layers` on `inputs`, for every replica.

  The inputs are cut into batches of `batch_size` (the last one padded with
  zeros, whose outputs are dropped) and scanned, so one program is compiled
  whatever N is; within a batch the replicas are vmapped. The model runs in
  eval mode (`train=False`: BatchNorm with its running statistics), where
  examples do not interact, so batching and padding change nothing.

  Args:
    model: a Flax Linen module sowing ReLU outputs into `activations`.
    variables: `{'params': ..., ['batch_stats': ...]}` with a leading replica
      axis on every leaf (e.g. `jax.vmap(make_init_fn(model, shape))(keys)`),
      or one model's variables with `replicated=False`.
    inputs: `(N, ...)` examples, the same for every replica.
    layers: a layer name, several, or None for every sown layer; names as
      `named_activations` gives them ("relu1", "layer1_0/relu2").
    batch_size: examples per step of the scan (capped at N).
    replicated: whether `variables` has a leading replica axis.

  Returns:
    `{layer: (replicas, N, ..., units)}` (no replica axis if not
    `replicated`), in the order of `layers`.

  Raises:
    ValueError: an unknown layer name (the message lists the available
      ones), a bad `batch_size`, or variables without a common replica axis.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  inputs = jnp.asarray(inputs)
  if inputs.ndim < 1 or inputs.shape[0] < 1:
    raise ValueError(f"inputs must be (N, ...) with N >= 1, got shape {inputs.shape}")
  names = _check_layers(layers, list(layer_shapes(model, variables, inputs, replicated=replicated)))
  n = inputs.shape[0]
  batch = min(batch_size, n)
  num_batches = math.ceil(n / batch)
  pad = num_batches * batch - n
  padded = jnp.pad(inputs, [(0, pad)] + [(0, 0)] * (inputs.ndim - 1)) if pad else inputs
  batches = padded.reshape(num_batches, batch, *inputs.shape[1:])
  out = _collect(model, variables, batches, layers=names, replicated=replicated, n=n)
  return {name: out[name] for name in names}  # in the order asked (jit sorts dict keys)
