"""Device mesh and sharding helpers: one code path for 1 CPU, N simulated CPU
devices, a GPU or a TPU pod.

wsjax is data-parallel with sharded `jax.jit` (the modern form of `pmap`): a
`jax.sharding.Mesh` whose `data` axis spans every device of every process;
batches are sharded along their example axis, the training state is
replicated. XLA's SPMD partitioner inserts the collectives (gradient
all-reduce, global BatchNorm statistics), so model code stays per-example.

Seeds can also be spread over devices: `seed_data_mesh(k)` folds the same
devices into a 2-D `(seeds, data)` mesh, and inside a jitted program
`over_seeds` places the leading (seed) axis of the stacked states on the
`seeds` axis, so each group of devices trains its own seeds. This is what a
multi-core CPU wants (one host device per core; a gradient all-reduce
between host devices costs more than a small model's whole step, measured in
BENCHMARKS.md). XLA pads a seed count that does not divide `k`; arrays stay
replicated between programs, so checkpoints and host code do not change.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SEEDS_AXIS = "seeds"


def cpu_cores() -> int:
  """Cores this process may run on (the affinity mask, not the host's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - not Linux
    return os.cpu_count() or 1


def use_cpu_devices(n: int = 0, at_most: Optional[int] = None) -> Optional[int]:
  """Call before JAX's backends start: run the CPU backend as `n` devices
  (0: one per core, at most `at_most`, e.g. the number of seeds).

  XLA:CPU runs a small model's step on about one core; with one device per
  core, seeds spread over devices use them all (see `seed_data_mesh`). A
  device count already set in XLA_FLAGS wins. Only the CPU backend reads it.
  Returns the count set, or None.
  """
  if n < 0:
    raise ValueError(f"host devices must be >= 0, got {n}")
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  n = n or max(1, min(cpu_cores(), at_most or cpu_cores()))
  jax.config.update("jax_num_cpu_devices", n)
  return n


@functools.lru_cache(maxsize=None)
def data_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes, axis name `data`."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


@functools.lru_cache(maxsize=None)
def seed_data_mesh(seed_devices: int = 1) -> Mesh:
  """The devices of `data_mesh()` (same order) as a `(seeds, data)` mesh."""
  devices = np.asarray(jax.devices())
  if seed_devices < 1 or devices.size % seed_devices:
    raise ValueError(f"seed_devices={seed_devices} does not divide the {devices.size} devices")
  return Mesh(devices.reshape(seed_devices, -1), (SEEDS_AXIS, DATA_AXIS))


def default_seed_devices(n_seeds: int) -> int:
  """How many devices to spread `n_seeds` over by default.

  On CPU (host devices, one per core) the largest divisor of the device
  count that is at most `n_seeds`: whole seeds per core beat splitting a
  small batch. On GPU/TPU 1: seeds share a device under `vmap`, the batch is
  split over devices.
  """
  n = jax.device_count()
  if jax.default_backend() != "cpu":
    return 1
  return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(n_seeds, 1))


def over_seeds(tree, mesh: Mesh):
  """Inside jit: shards the leading (seed) axis of every leaf over `seeds`."""
  if mesh.shape.get(SEEDS_AXIS, 1) == 1:
    return tree
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P(SEEDS_AXIS)))


def gathered(tree, mesh: Mesh):
  """Inside jit: replicates every leaf again (the end of a seed-sharded
  program), on `data_mesh()`, the mesh the inputs come on: outputs fed back
  as inputs then hit the same compiled program (another mesh object over
  the same devices would be a cache miss and a recompilation)."""
  if mesh.shape.get(SEEDS_AXIS, 1) == 1:
    return tree
  return jax.lax.with_sharding_constraint(tree, replicated())


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
