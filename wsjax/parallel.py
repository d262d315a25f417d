"""Device mesh and sharding helpers: one code path for 1 CPU, N simulated CPU
devices, a GPU or a TPU pod.

wsjax is data-parallel with sharded `jax.jit` (the modern form of `pmap`): a
`jax.sharding.Mesh` whose single `data` axis spans every device of every
process; batches are sharded along their example axis, the training state is
replicated. XLA's SPMD partitioner inserts the collectives (gradient
all-reduce, global BatchNorm statistics), so model code stays per-example.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


@functools.lru_cache(maxsize=None)
def data_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes, axis name `data`."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh | None = None) -> NamedSharding:
  return NamedSharding(mesh or data_mesh(), P())


def sharded_along(axis: int, mesh: Mesh | None = None) -> NamedSharding:
  """Shards dimension `axis` of an array over the `data` mesh axis."""
  spec = [None] * axis + [DATA_AXIS]
  return NamedSharding(mesh or data_mesh(), P(*spec))


def num_devices() -> int:
  return data_mesh().size


def put(x, sharding: NamedSharding):
  """Places a host value (identical on every process) as a global array.

  Works with several processes: each process fills only the shards of its
  addressable devices, from its own (identical) copy of `x`.
  """
  def place(leaf):
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda idx: leaf[idx])
  return jax.tree.map(place, x)


def put_replicated(x, mesh: Mesh | None = None):
  return put(x, replicated(mesh))


def to_host(x):
  """Fetches a (replicated or sharded) global array tree to host numpy."""
  def fetch(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if leaf.sharding.is_fully_replicated:
        return np.asarray(leaf.addressable_data(0))
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)
  return jax.tree.map(fetch, x)
