"""Optimizers whose schedule reads the global step; per-replica learning rates."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wsjax.core.optim import OptimizerConfig, learning_rate, make_optimizer


def test_validation():
  with pytest.raises(ValueError, match="learning rate"):
    make_optimizer(OptimizerConfig(lr=-1.0))
  with pytest.raises(ValueError, match="unknown optimizer"):
    make_optimizer(OptimizerConfig(name="lion"))
  with pytest.raises(ValueError, match="needs a horizon"):
    make_optimizer(OptimizerConfig(schedule="cosine"))
  with pytest.raises(ValueError, match="first cycle"):
    make_optimizer(OptimizerConfig(schedule="sgdr"))


def test_sgd_momentum_is_pytorchs():
  sgd = make_optimizer(OptimizerConfig(name="sgd", lr=0.1, momentum=0.9))
  params = {"w": jnp.ones(3)}
  state = sgd.init(params)
  upd, state = sgd.update({"w": jnp.ones(3)}, state, params)
  upd, state = sgd.update({"w": jnp.ones(3)}, state, params)
  # PyTorch SGD momentum: buf = 0.9*buf + g -> second step -0.1 * 1.9
  np.testing.assert_allclose(upd["w"], -0.19 * np.ones(3), rtol=1e-6)


@pytest.mark.parametrize("name,reference", [("adam", optax.adam(3e-3)),
                                            ("sgd", optax.sgd(0.05, momentum=0.9))])
def test_constant_schedule_is_optax_bit_for_bit(name, reference):
  """The default path equals optax's own optimizers exactly, under jit."""
  tx = make_optimizer(OptimizerConfig(name=name, lr=3e-3 if name == "adam" else 0.05))
  params = {"w": jnp.linspace(-1, 1, 7)}
  grads = [{"w": jnp.sin(jnp.arange(7.0) * (i + 1))} for i in range(5)]

  @jax.jit
  def run(tx_state, ref_state, p, q):
    for g in grads:
      u, tx_state = tx.update(g, tx_state, p, step=jnp.int32(3))
      v, ref_state = reference.update(g, ref_state, q)
      p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    return p, q
  p, q = run(tx.init(params), reference.init(params), params, params)
  np.testing.assert_array_equal(np.asarray(p["w"]), np.asarray(q["w"]))


def test_schedule_reads_the_step_argument_not_its_own_count():
  tx = make_optimizer(OptimizerConfig(name="sgd", lr=1.0, momentum=0.0, schedule="step",
                                      decay_boundaries=(10,)))
  params = {"w": jnp.zeros(())}
  g = {"w": jnp.ones(())}
  state = tx.init(params)
  before, _ = tx.update(g, state, params, step=jnp.int32(9))
  after, _ = tx.update(g, state, params, step=jnp.int32(10))
  own, _ = tx.update(g, state, params)  # no step: its own count (0)
  assert float(before["w"]) == pytest.approx(-1.0)
  assert float(after["w"]) == pytest.approx(-0.1)
  assert float(own["w"]) == pytest.approx(-1.0)


def test_per_replica_learning_rate_as_data():
  tx = make_optimizer(OptimizerConfig(name="sgd", lr=1.0, momentum=0.0, schedule="cosine",
                                      total_steps=100))
  lrs = jnp.asarray([0.1, 0.5, 2.0])
  params = {"w": jnp.zeros((3,))}

  def one(lr, p):
    u, _ = tx.update({"w": jnp.ones(())}, tx.init(p), p, step=jnp.int32(50),
                     hparams={"lr": lr})
    return u["w"]
  out = jax.vmap(one)(lrs, {"w": jnp.zeros(3)})
  np.testing.assert_allclose(np.asarray(out), -np.asarray(lrs) * 0.5, rtol=1e-6)
  del params


def test_cosine_horizon_follows_the_run_and_warmup_cosine_differs():
  cfg = OptimizerConfig(name="sgd", lr=1.0, schedule="cosine")
  steps = np.arange(0, 101, 25)
  np.testing.assert_allclose(learning_rate(cfg, steps, horizon=100),
                             [1.0, 0.8535534, 0.5, 0.1464466, 0.0], atol=1e-6)
  np.testing.assert_allclose(learning_rate(cfg, [50], horizon=200), [0.8535534], atol=1e-6)
  warm = OptimizerConfig(name="sgd", lr=1.0, schedule="warmup_cosine", warmup_steps=10)
  lr = np.asarray(learning_rate(warm, np.arange(100), horizon=100))
  assert lr[0] < 0.2 and lr[10] == pytest.approx(1.0) and lr[99] < 0.01
  assert not np.allclose(lr, np.asarray(learning_rate(cfg, np.arange(100), horizon=100)))
