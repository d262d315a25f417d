"""Pure, jitted train and eval steps, vmapped over seeds and sharded over devices.

Three levels, each a pure function:

* `train_step(state, x, y, reg)`: one SGD step for one model (cross-entropy
  plus an optional regularizer `penalty(params, reg)`, e.g. DASH's `l2_init`).
* `Stepper.run_block`: up to `K` consecutive steps for every seed as one
  compiled loop; the seed axis is `jax.vmap`-ed, so five seeds cost one
  program. The loop's trip count is an argument (the steps of the epoch
  left), and seeds that have met their stopping rule are handed back their
  block-start state. One program serves every stage and every buffer size.
* `Stepper.evaluate`: accuracy and loss of every seed on an array of inputs,
  scanned in fixed-size batches (padded and masked) so it also compiles once.

Parallelism, over a `(seeds, data)` mesh (`wsjax.parallel.seed_data_mesh`):
the dataset sits replicated on every device; inside each program the stacked
states are spread over the `seeds` axis (`seed_devices` groups of devices,
each training its own seeds), and the index array of a block is sharded along
its example axis over the `data` axis, so each device of a group gathers and
processes its slice of every batch; XLA's partitioner all-reduces gradients
and computes BatchNorm statistics over the global batch. Between programs
the states are replicated. `seed_devices=1` is plain data parallelism.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsjax import parallel
from wsjax.train.state import TrainState

Penalty = Callable[[Any, Any], jax.Array]


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(model, tx: optax.GradientTransformation, *,
                    augment_fn: Optional[Callable] = None,
                    penalty: Optional[Penalty] = None):
  """`train_step(state, x, y, reg) -> (state, (loss, correct))` for one model.

  `augment_fn(key, x)` runs inside the step on the gathered batch (e.g. crop
  and flip); `penalty(params, reg)` is added to the mean cross-entropy.
  `correct` is the number of correctly classified examples in the batch.
  """
  def train_step(state: TrainState, x, y, reg):
    rng, aug_key, drop_key = jax.random.split(state.rng, 3)
    if augment_fn is not None:
      x = augment_fn(aug_key, x)
    has_bn = bool(state.batch_stats)

    def loss_fn(params):
      variables = {"params": params}
      if has_bn:
        variables["batch_stats"] = state.batch_stats
        logits, new_vars = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": drop_key})
        new_stats = new_vars["batch_stats"]
      else:
        logits = model.apply(variables, x, train=True, rngs={"dropout": drop_key})
        new_stats = state.batch_stats
      loss = cross_entropy(logits, y)
      total = loss if penalty is None else loss + penalty(params, reg)
      return total, (loss, logits, new_stats)

    grads, (loss, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    new_state = state.replace(params=params, batch_stats=new_stats, opt_state=opt_state,
                              step=state.step + 1, rng=rng)
    return new_state, (loss, correct)
  return train_step


def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class Stepper:
  """Compiled multi-seed, multi-device training and evaluation for one model.

  Built once per (model, optimizer, penalty); its jitted programs are reused
  across stages, methods and resumptions (shapes are fixed: `block_steps`
  steps of `batch_size` examples per call).
  """

  def __init__(self, model, tx: optax.GradientTransformation, *, batch_size: int,
               block_steps: int, eval_batch_size: int = 1000,
               augment_fn: Optional[Callable] = None,
               penalty: Optional[Penalty] = None, seed_devices: int = 1):
    self.model = model
    self.tx = tx
    self.batch_size = batch_size
    self.block_steps = block_steps
    self.eval_batch_size = eval_batch_size
    self.mesh = parallel.seed_data_mesh(seed_devices)
    n_data = self.mesh.shape[parallel.DATA_AXIS]
    if batch_size % n_data:
      raise ValueError(f"batch size {batch_size} is not divisible by the {n_data} devices "
                       f"that share a seed")
    self._train_step = make_train_step(model, tx, augment_fn=augment_fn, penalty=penalty)
    self._batch_sharding = jax.sharding.NamedSharding(  # (seeds, batch)
        self.mesh, jax.sharding.PartitionSpec(parallel.SEEDS_AXIS, parallel.DATA_AXIS))
    # Shardings come from the inputs (state and data replicated, indices
    # sharded). Note: passing `out_shardings` here made XLA:CPU's program ~10x
    # slower on one device (jax 0.10.2), so outputs follow propagation.
    self.run_block = jax.jit(self._run_block, donate_argnums=(0,))
    self._eval = jax.jit(self._evaluate)

  # ---- training -----------------------------------------------------------
  def _run_block(self, states: TrainState, active, data_x, data_y, idx, n_valid, reg):
    """The first `n_valid` of K steps for all seeds.

    idx: (K, S, B) dataset indices; n_valid: int32 scalar (<= K); active:
    (S,) bool. Returns (states, (steps_taken, correct, loss_sum)), each (S,).
    A seed with `active` False runs along (vmap has no per-seed skip) and is
    handed back its block-start state: one select per block, not per step,
    since `active` only changes between blocks. The loop runs exactly
    `n_valid` steps (a dynamic trip count, no per-step `cond`).
    """
    vstep = jax.vmap(self._train_step, in_axes=(0, 0, 0, 0))

    def body(k, carry):
      states, correct, loss_sum = carry
      idx_k = idx[k]
      if self.mesh.size > 1:
        idx_k = jax.lax.with_sharding_constraint(idx_k, self._batch_sharding)
      states, (loss, corr) = vstep(states, data_x[idx_k], data_y[idx_k], reg)
      return states, correct + corr, loss_sum + loss

    n_seeds = active.shape[0]
    init = (states, jnp.zeros((n_seeds,), jnp.int32), jnp.zeros((n_seeds,), jnp.float32))
    init, active = parallel.over_seeds((init, active), self.mesh)
    final, correct, loss_sum = jax.lax.fori_loop(0, n_valid, body, init)
    states = jax.vmap(_select)(active, final, init[0])
    act = active.astype(jnp.int32)
    counters = (n_valid * act, correct * act, jnp.where(active, loss_sum, 0.0))
    return parallel.gathered((states, counters), self.mesh)

  def train_block(self, states, active, data_x, data_y, idx, valid, reg=None):
    """Runs one block. idx: host int array (K, S, B); valid: (K,) bool, a
    prefix of True (the steps of the epoch left; the rest is padding).

    Returns (states, steps (S,), correct (S,), loss_sum (S,)) with the
    counters as host numpy arrays.
    """
    valid = np.asarray(valid, bool)
    n_valid = int(valid.sum())
    if not valid[:n_valid].all():
      raise ValueError("valid must be a prefix of True steps followed by padding")
    idx = parallel.put(np.asarray(idx, np.int32), parallel.sharded_along(2, self.mesh))
    active = parallel.put_replicated(np.asarray(active, bool), self.mesh)
    states, counters = self.run_block(states, active, data_x, data_y, idx,
                                      np.int32(n_valid), reg)
    steps, correct, loss_sum = parallel.to_host(counters)
    return states, steps, correct, loss_sum

  # ---- evaluation ---------------------------------------------------------
  def _evaluate(self, params, batch_stats, x, y, mask):
    """x: (nb, E, ...) batches; returns per seed (correct, loss_sum) over masked examples."""
    def one_seed(params, batch_stats):
      variables = {"params": params}
      if batch_stats:
        variables["batch_stats"] = batch_stats

      def body(acc, batch):
        xb, yb, mb = batch
        logits = self.model.apply(variables, xb, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        correct = jnp.sum((jnp.argmax(logits, -1) == yb) * mb)
        return (acc[0] + correct, acc[1] + jnp.sum(losses * mb)), None

      (correct, loss), _ = jax.lax.scan(body, (0.0, 0.0), (x, y, mask))
      return correct, loss
    params, batch_stats = parallel.over_seeds((params, batch_stats), self.mesh)
    return parallel.gathered(jax.vmap(one_seed)(params, batch_stats), self.mesh)

  def evaluate(self, states: TrainState, x: jax.Array, y: jax.Array):
    """Accuracy and mean loss of every seed on (x, y), host arrays (S,)."""
    batches = self._eval_batches(x, y)
    correct, loss = self._eval(states.params, states.batch_stats, *batches)
    correct, loss = parallel.to_host((correct, loss))
    n = x.shape[0]
    return correct / n, loss / n

  def _eval_batches(self, x, y):
    """Pads (x, y) to a multiple of the eval batch and shards every batch."""
    cache = getattr(self, "_batch_cache", None)
    if cache is None:
      cache = self._batch_cache = {}
    key = (id(x), id(y))
    if key in cache:
      return cache[key][1]
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
    cache[key] = ((x, y), batches)  # keep x, y alive so their ids stay unique
    return batches
