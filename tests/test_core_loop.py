"""The training core's loop: start at k, masks, per-replica hyperparameters,
divergence, hooks, stopping rules (in-process, small)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wsjax import parallel
from wsjax.core import hooks as hooks_lib
from wsjax.core.data import TrainData
from wsjax.core.loop import Hook, TrainingDivergedError, Until, train
from wsjax.core.optim import OptimizerConfig
from wsjax.core.task import Classification

from conftest import toy_setting

N = 640  # training examples the toy uses: 10 steps per epoch at batch 64


def _data(s, salt=()):
  return TrainData(s.x_train, s.y_train, np.arange(N), s.data_cfg.batch_size, salt=salt)


def _host(states):
  return jax.device_get(parallel.to_host(states))


class _Keep(Hook):
  """Keeps host copies of the states at given steps (a test's snapshots)."""

  def __init__(self, steps):
    self.steps, self.saved = set(steps), {}

  def boundaries(self, start, end):
    return sorted(self.steps)

  def on_block(self, loop):
    if loop.step in self.steps:
      self.saved[loop.step] = _host(loop.states)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_a_run_started_at_k_from_the_state_at_k_equals_the_uninterrupted_run(data_dir, momentum):
  """Restart at k = 17 (mid-epoch, not a block boundary) from the states saved
  at k with their optimizer state: bit-identical on the CPU. A step schedule
  (x0.1 at step 25) checks that the schedule reads the global step."""
  opt = OptimizerConfig(name="sgd", lr=0.05, momentum=momentum, schedule="step",
                        decay_boundaries=(25,))
  s = toy_setting(data_dir, optimizer=opt)
  keep = _Keep([17])
  whole, pos = train(s.fresh_states(0), s.program(), _data(s), Until.steps(40),
                     data_seeds=s.seeds, hooks=[keep])
  assert pos["step"] == 40 and pos["steps"] == [40, 40]
  at_k = parallel.put_replicated(keep.saved[17])
  assert np.asarray(keep.saved[17].step).tolist() == [17, 17]
  resumed, pos2 = train(at_k, s.program(), _data(s), Until.steps(40), data_seeds=s.seeds,
                        start=17)
  assert pos2["steps"] == [23, 23]
  _assert_trees_equal(_host(whole), _host(resumed))
  if momentum == 0.0:
    # plain SGD has no optimizer state: a FRESH optimizer at k equals the
    # uninterrupted run only if the schedule reads the global step (17..39),
    # not the fresh optimizer's count (0..22, which would miss the decay at 25)
    at_k = parallel.put_replicated(keep.saved[17])  # the first restart donated its buffers
    fresh_opt = at_k.replace(opt_state=jax.vmap(s.tx.init)(at_k.params))
    rewound, _ = train(fresh_opt, s.program(), _data(s), Until.steps(40), data_seeds=s.seeds,
                       start=17)
    _assert_trees_equal(_host(whole).params, _host(rewound).params)


def test_masked_run_keeps_pruned_weights_at_zero_and_equals_a_hand_masked_loop(data_dir):
  s = toy_setting(data_dir, seeds=(3,), optimizer=OptimizerConfig(name="sgd", lr=0.1,
                                                                   momentum=0.9))
  states = s.fresh_states(0)
  rng = np.random.default_rng(0)
  mask = jax.tree.map(lambda p: (rng.random(p.shape) > 0.5).astype(np.float32),
                      _host(states.params))
  states = states.replace(params=jax.tree.map(lambda p, m: p * m, states.params, mask))
  start = _host(states)
  program = s.program(Classification(masked=True))
  out, _ = train(states, program, _data(s), Until.steps(25), data_seeds=s.seeds,
                 inputs={"mask": parallel.put_replicated(mask)})
  out = _host(out)
  for p, m in zip(jax.tree.leaves(out.params), jax.tree.leaves(mask)):
    assert np.all(np.asarray(p)[np.asarray(m) == 0] == 0.0)
    assert np.any(np.asarray(p)[np.asarray(m) == 1] != 0.0)
  # the reference: an eager loop over the same batches, masking after each update
  one = jax.tree.map(lambda x: x[0], start)
  mask1 = jax.tree.map(lambda m: jnp.asarray(m[0]), mask)
  params, opt_state = one.params, one.opt_state
  order = _data(s).epoch(s.seeds, 0)[:, 0]
  order = np.concatenate([order, _data(s).epoch(s.seeds, 1)[:, 0], _data(s).epoch(s.seeds, 2)[:, 0]])
  x, y = np.asarray(s.dataset.x_train), np.asarray(s.dataset.y_train)

  def loss(p, xb, yb):
    logits = s.model.apply({"params": p}, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
  for t in range(25):
    g = jax.grad(loss)(params, x[order[t]], y[order[t]])
    upd, opt_state = s.tx.update(g, opt_state, params, step=t)
    params = jax.tree.map(lambda p, m: p * m, optax.apply_updates(params, upd), mask1)
  for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b), rtol=1e-4, atol=1e-6)


def test_replicas_with_different_learning_rates_equal_runs_one_by_one(data_dir):
  """A sweep over the peak lr as DATA (TrainState.hparams), one program,
  against three runs with the lr in the optimizer config (fixed steps)."""
  lrs = [0.01, 0.05, 0.2]
  s = toy_setting(data_dir, seeds=(7, 7, 7), optimizer=OptimizerConfig(
      name="sgd", lr=0.05, momentum=0.9, schedule="cosine", total_steps=30))
  states = s.fresh_states(0)
  states = states.replace(hparams={"lr": parallel.put_replicated(np.asarray(lrs, np.float32))})
  swept, _ = train(states, s.program(), _data(s), Until.steps(30), data_seeds=s.seeds)
  swept = _host(swept)
  for i, lr in enumerate(lrs):
    alone_s = toy_setting(data_dir, seeds=(7,), optimizer=OptimizerConfig(
        name="sgd", lr=lr, momentum=0.9, schedule="cosine", total_steps=30))
    alone, _ = train(alone_s.fresh_states(0), alone_s.program(), _data(alone_s), Until.steps(30),
                     data_seeds=alone_s.seeds)
    for a, b in zip(jax.tree.leaves(swept.params), jax.tree.leaves(_host(alone).params)):
      np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b)[0], rtol=2e-5, atol=2e-6)


def test_a_diverging_replica_is_frozen_and_marked_while_the_others_finish(data_dir):
  s = toy_setting(data_dir, seeds=(1, 1), optimizer=OptimizerConfig(name="sgd", lr=0.05,
                                                                     momentum=0.9))
  states = s.fresh_states(0).replace(
      hparams={"lr": parallel.put_replicated(np.asarray([0.05, 1e7], np.float32))})
  with pytest.raises(TrainingDivergedError, match="non-finite loss at step"):
    train(states, s.program(), _data(s), Until.steps(30), data_seeds=s.seeds)
  states = s.fresh_states(0).replace(
      hparams={"lr": parallel.put_replicated(np.asarray([0.05, 1e7], np.float32))})
  out, pos = train(states, s.program(), _data(s), Until.steps(30), data_seeds=s.seeds,
                   on_divergence="freeze")
  assert pos["diverged"] == [False, True]
  assert pos["steps"][0] == 30 and pos["steps"][1] < 30
  alone_s = toy_setting(data_dir, seeds=(1,))
  alone, _ = train(alone_s.fresh_states(0), alone_s.program(), _data(alone_s), Until.steps(30),
                   data_seeds=alone_s.seeds)
  for a, b in zip(jax.tree.leaves(_host(out).params), jax.tree.leaves(_host(alone).params)):
    np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[0], rtol=2e-5, atol=2e-6)


def test_accuracy_threshold_stops_each_replica_on_its_own(data_dir):
  s = toy_setting(data_dir, seeds=(0, 1), optimizer=OptimizerConfig(name="sgd", lr=0.05,
                                                                     momentum=0.9))
  out, pos = train(s.fresh_states(0), s.program(), _data(s, salt=(0,)),
                   Until.accuracy(0.35, max_epochs=6), data_seeds=s.seeds)
  spe = 10
  for steps, acc in zip(pos["steps"], pos["last_epoch_acc"]):
    assert steps % spe == 0 and 0 < steps <= 6 * spe
    assert acc >= 0.35 or steps == 6 * spe
  assert pos["epochs_done"] == max(pos["steps"]) // spe


def test_hooks_see_exact_steps_and_evaluation_is_recorded(data_dir):
  s = toy_setting(data_dir, block_steps=8)
  seen = []

  class Watch(Hook):
    def boundaries(self, start, end):
      return [13]

    def on_block(self, loop):
      seen.append(loop.step)

  ev = hooks_lib.EvaluateEvery(10, {"test": (s.x_test, s.y_test)})
  timing = hooks_lib.Timing()
  _, pos = train(s.fresh_states(0), s.program(), _data(s), Until.steps(25), data_seeds=s.seeds,
                 hooks=[Watch(), ev, timing])
  # a block runs at most K=8 steps and ends at epoch ends (10, 20), at hook
  # steps (13), at evaluation steps (10, 20) and at the end (25)
  assert seen == [8, 10, 13, 20, 25]
  assert [r["step"] for r in pos["records"]["eval"]] == [0, 10, 20, 25]
  assert all(len(r["test_acc"]) == 2 for r in pos["records"]["eval"])
  assert [n for n, _ in pos["records"]["timing"]] == [8, 2, 3, 7, 5]


def test_bad_stopping_rules_are_refused(data_dir):
  s = toy_setting(data_dir)
  with pytest.raises(ValueError, match="before its start"):
    train(s.fresh_states(0), s.program(), _data(s), Until.steps(5), data_seeds=s.seeds, start=9)
  with pytest.raises(ValueError, match="end step or an epoch cap"):
    train(s.fresh_states(0), s.program(), _data(s), Until(), data_seeds=s.seeds)
