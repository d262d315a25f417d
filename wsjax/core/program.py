"""The compiled block: up to K steps of R replicas, vmapped, sharded, donated.

Three levels, each a pure function:

* `train_step(state, x, y, inputs)`: one optimizer step for one replica:
  the task's loss (`wsjax.core.task`), its gradient, the optimizer update
  (which reads the learning rate at `state.step`, the global iteration, and
  the replica's `state.hparams`), the task's projection (a pruning mask).
* `Program.train_block`: up to K consecutive steps for every replica as one
  compiled loop; the replica axis is `jax.vmap`-ed, so five seeds (or twenty
  sweep cells) cost one program. The loop's trip count is an argument (the
  steps until the next boundary), and replicas that have stopped are handed
  back their block-start state. One program serves every block, stage,
  buffer size, start step, mask or penalty reference.
* `Program.evaluate`: accuracy and loss of every replica on an array of
  inputs, scanned in fixed-size batches (padded and masked): one program.

Parallelism, over a `(replicas, data)` mesh (`wsjax.parallel.seed_data_mesh`):
the dataset sits replicated on every device; inside each program the stacked
states are spread over the `seeds` (replica) axis (`replica_devices` groups of
devices, each training its own replicas), and the index array of a block is
sharded along its example axis over the `data` axis, so each device of a group
gathers and processes its slice of every batch; XLA's partitioner
all-reduces gradients and computes BatchNorm statistics over the global
batch. Between programs the states are replicated. `replica_devices=1` is
plain data parallelism.

Replicas sharing a device: on CPU, a wide `vmap` of a small model costs more
per replica than a narrow one (the 1-D ConvNet's step: 1.15x at 72 replicas
a core, 1.05x at 24, against 8; caches and XLA:CPU's batched kernels), so a
device's replicas are stepped `replica_chunk` at a time under `vmap`, the
chunks in sequence (`lax.map`) inside the same step; on GPU/TPU all of them
at once (see `default_replica_chunk`).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsjax import parallel
from wsjax.core.state import TrainState
from wsjax.core.task import Task, apply_model


def _with_extra_args(tx) -> optax.GradientTransformationExtraArgs:
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return tx
  return optax.with_extra_args_support(tx)


def make_train_step(model, tx: optax.GradientTransformation, task: Task, *,
                    augment_fn: Optional[Callable] = None):
  """`train_step(state, x, y, inputs) -> (state, (loss, correct))` for one replica.

  `augment_fn(key, x)` runs inside the step on the gathered batch (e.g. crop
  and flip). `correct` counts the batch's correct predictions, `loss` is its
  mean cross-entropy (without a penalty)."""
  tx = _with_extra_args(tx)

  def train_step(state: TrainState, x, y, inputs):
    rng, aug_key, task_key = jax.random.split(state.rng, 3)
    if augment_fn is not None:
      x = augment_fn(aug_key, x)

    def loss_fn(params):
      return task.loss(model, params, state.batch_stats, x, y, inputs, task_key)

    grads, (loss, logits, new_stats, labels) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, step=state.step,
                                   hparams=state.hparams)
    params = task.after_update(optax.apply_updates(state.params, updates), inputs)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    new_state = state.replace(params=params, batch_stats=new_stats, opt_state=opt_state,
                              step=state.step + 1, rng=rng)
    return new_state, (loss, correct)
  return train_step


def default_replica_chunk() -> int:
  """Replicas per device vmapped together by default: 2 on CPU (measured
  best with 1 for the 1-D ConvNet, equal for the MLP: BENCHMARKS.md,
  section 11), 0 (all) on GPU/TPU, where a wide `vmap` is what fills the
  device."""
  return 2 if jax.default_backend() == "cpu" else 0


def chunk_layout(n: int, devices: int, chunk: int) -> Optional[tuple[int, int]]:
  """(c, g): `in_chunks`' groups of c replicas, g of them a device, for n
  replicas over `devices`; None when all are stepped at once (chunk 0, or
  a device's share fits one chunk)."""
  local = -(-n // devices)
  if not chunk or local <= chunk:
    return None
  c = min(range(1, chunk + 1), key=lambda k: (-(-local // k) * k, -k))
  return c, -(-local // c)


def in_chunks(vstep: Callable, n: int, chunk: int, mesh) -> Callable:
  """`vstep` (vmapped over a leading replica axis of n on every argument and
  output) as the same map done `chunk` replicas per device at a time.

  Each device's ceil(n / d) replicas (d = the mesh's `seeds` size) go in
  g groups of c (the c <= `chunk` that pads least, largest on a tie): the
  arguments are padded with zeros to d*g*c replicas (what XLA's own uneven
  sharding pads to when c divides a device's share), laid out
  (g, d*c) so that each group keeps its device, mapped with `lax.map` over
  g, and cut back to n. Identity when one group holds them all."""
  d = mesh.shape[parallel.SEEDS_AXIS]
  layout = chunk_layout(n, d, chunk)
  if layout is None:
    return vstep
  c, g = layout
  padded = d * g * c
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.SEEDS_AXIS))

  def split(x):
    x = jnp.pad(x, [(0, padded - n)] + [(0, 0)] * (x.ndim - 1))
    x = jnp.moveaxis(x.reshape(d, g, c, *x.shape[1:]), 1, 0).reshape(g, d * c, *x.shape[1:])
    return jax.lax.with_sharding_constraint(x, spec) if d > 1 else x

  def join(x):
    return jnp.moveaxis(x.reshape(g, d, c, *x.shape[2:]), 0, 1).reshape(padded, *x.shape[2:])[:n]

  def stepped(*args):
    return jax.tree.map(join, jax.lax.map(lambda a: vstep(*a), jax.tree.map(split, args)))
  return stepped


def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class Program:
  """Compiled multi-replica, multi-device training and evaluation for one
  (model, optimizer, task, batch size, block length, augmentation, layout).

  Its jitted programs are reused across every call with the same shapes
  (`block_steps` steps of `batch_size` examples; the trip count, the data
  indices, the inputs and the states are arguments)."""

  def __init__(self, model, tx: optax.GradientTransformation, task: Optional[Task] = None, *,
               batch_size: int, block_steps: int, eval_batch_size: int = 1000,
               augment_fn: Optional[Callable] = None, replica_devices: int = 1,
               replica_chunk: Optional[int] = None):
    self.model = model
    self.tx = tx
    self.task = task = task if task is not None else Task()
    self.batch_size = batch_size
    self.block_steps = block_steps
    self.eval_batch_size = eval_batch_size
    self.mesh = parallel.seed_data_mesh(replica_devices)
    self.replica_chunk = default_replica_chunk() if replica_chunk is None else replica_chunk
    if self.replica_chunk < 0:
      raise ValueError(f"replica_chunk must be >= 0 (0: all at once), got {self.replica_chunk}")
    n_data = self.mesh.shape[parallel.DATA_AXIS]
    if batch_size % n_data:
      raise ValueError(f"batch size {batch_size} is not divisible by the {n_data} devices "
                       f"that share a replica")
    self._train_step = make_train_step(model, tx, task, augment_fn=augment_fn)
    self._batch_sharding = jax.sharding.NamedSharding(  # (replicas, batch)
        self.mesh, jax.sharding.PartitionSpec(parallel.SEEDS_AXIS, parallel.DATA_AXIS))
    # Shardings come from the inputs (state and data replicated, indices
    # sharded). Note: passing `out_shardings` here made XLA:CPU's program ~10x
    # slower on one device (jax 0.10.2), so outputs follow propagation.
    self.run_block = jax.jit(self._run_block, donate_argnums=(0,))
    self._eval = jax.jit(self._evaluate)
    self._batch_cache: dict = {}

  # ---- training -----------------------------------------------------------
  def _run_block(self, states: TrainState, active, data_x, data_y, idx, n_valid, inputs):
    """The first `n_valid` of K steps for all replicas.

    idx: (K, R, B) dataset indices; n_valid: int32 scalar (<= K); active:
    (R,) bool. Returns (states, (steps_taken, correct, loss_sum)), each (R,).
    A replica with `active` False runs along (vmap has no per-replica skip)
    and is handed back its block-start state: one select per block, not per
    step, since `active` only changes between blocks. The loop runs exactly
    `n_valid` steps (a dynamic trip count, no per-step `cond`).
    """
    vstep = in_chunks(jax.vmap(self._train_step), active.shape[0], self.replica_chunk,
                      self.mesh)

    def body(k, carry):
      states, correct, loss_sum = carry
      idx_k = idx[k]
      if self.mesh.size > 1:
        idx_k = jax.lax.with_sharding_constraint(idx_k, self._batch_sharding)
      states, (loss, corr) = vstep(states, data_x[idx_k], data_y[idx_k], inputs)
      return states, correct + corr, loss_sum + loss

    n = active.shape[0]
    init = (states, jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32))
    init, active = parallel.over_seeds((init, active), self.mesh)
    final, correct, loss_sum = jax.lax.fori_loop(0, n_valid, body, init)
    states = jax.vmap(_select)(active, final, init[0])
    act = active.astype(jnp.int32)
    counters = (n_valid * act, correct * act, jnp.where(active, loss_sum, 0.0))
    return parallel.gathered((states, counters), self.mesh)

  def train_block(self, states, active, data_x, data_y, idx, n_valid: int, inputs=None):
    """Runs `n_valid` steps (<= K) of every active replica.

    idx: host int array (K, R, B), rows past `n_valid` are padding. Returns
    (states, steps (R,), correct (R,), loss_sum (R,)), the counters as host
    numpy arrays."""
    if not 0 <= n_valid <= self.block_steps:
      raise ValueError(f"a block runs 0..{self.block_steps} steps, got {n_valid}")
    idx = parallel.put(np.asarray(idx, np.int32), parallel.sharded_along(2, self.mesh))
    active = parallel.put_replicated(np.asarray(active, bool), self.mesh)
    states, counters = self.run_block(states, active, data_x, data_y, idx,
                                      np.int32(n_valid), {} if inputs is None else inputs)
    steps, correct, loss_sum = parallel.to_host(counters)
    return states, steps, correct, loss_sum

  # ---- evaluation ---------------------------------------------------------
  def _evaluate(self, params, batch_stats, x, y, mask):
    """x: (nb, E, ...) batches; returns per replica (correct, loss_sum) over masked examples."""
    def one(params, batch_stats):
      def body(acc, batch):
        xb, yb, mb = batch
        logits, _ = apply_model(self.model, params, batch_stats, xb, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        correct = jnp.sum((jnp.argmax(logits, -1) == yb) * mb)
        return (acc[0] + correct, acc[1] + jnp.sum(losses * mb)), None

      (correct, loss), _ = jax.lax.scan(body, (0.0, 0.0), (x, y, mask))
      return correct, loss
    params, batch_stats = parallel.over_seeds((params, batch_stats), self.mesh)
    return parallel.gathered(jax.vmap(one)(params, batch_stats), self.mesh)

  def evaluate(self, states: TrainState, x: jax.Array, y: jax.Array):
    """Accuracy and mean loss of every replica on (x, y), host arrays (R,)."""
    batches = self._eval_batches(x, y)
    correct, loss = self._eval(states.params, states.batch_stats, *batches)
    correct, loss = parallel.to_host((correct, loss))
    n = x.shape[0]
    return correct / n, loss / n

  def _eval_batches(self, x, y):
    """Pads (x, y) to a multiple of the eval batch and shards every batch."""
    key = (id(x), id(y))
    if key in self._batch_cache:
      return self._batch_cache[key][1]
    n = x.shape[0]
    e = self.eval_batch_size
    n_data = self.mesh.shape[parallel.DATA_AXIS]
    e = -(-e // n_data) * n_data
    nb = -(-n // e)
    pad = nb * e - n
    xh = np.asarray(parallel.to_host(x))
    yh = np.asarray(parallel.to_host(y))
    xp = np.concatenate([xh, np.zeros((pad, *xh.shape[1:]), xh.dtype)]).reshape(nb, e, *xh.shape[1:])
    yp = np.concatenate([yh, np.zeros((pad,), yh.dtype)]).reshape(nb, e)
    mp = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]).reshape(nb, e)
    shard = parallel.sharded_along(1, self.mesh)
    batches = parallel.put((xp, yp, mp), shard)
    self._batch_cache[key] = ((x, y), batches)  # keep x, y alive so their ids stay unique
    return batches

