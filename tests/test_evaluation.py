"""Evaluation over replicas and BatchNorm recomputation against brute force."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax import tree
from wsjax.analysis import batchnorm
from wsjax.analysis import evaluation
from wsjax.models import get_model, make_init_fn


class OneBN(nn.Module):
  """Dense(8) -> BatchNorm -> ReLU -> Dense(3): the BN input is x @ W + b."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(8, name="dense")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return nn.Dense(3, name="head")(nn.relu(x))


class TwoBNConv(nn.Module):
  """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> mean pool -> Dense, NHWC.

  `momentum=0` makes Flax's running statistics after one train-mode call
  equal that batch's statistics: the brute-force reference."""
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name="bn1")(x)
    x = nn.Conv(5, (3, 3), strides=2, name="conv2")(nn.relu(x))
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name="bn2")(x)
    return nn.Dense(3, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def _stack_init(model, input_shape, n, seed=0):
  """n random networks stacked on a leading axis, drawn with numpy (shapes
  from an abstract init; compiling the models' initializers costs seconds):
  kernels N(0, 1/fan_in), biases and BN offsets N(0, 0.1^2), BN scales
  around 1, running means 0 and vars 1."""
  shapes = jax.eval_shape(make_init_fn(model, input_shape), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(name, s):
    shape = (n, *s.shape)
    if name.startswith("batch_stats/"):
      return np.full(shape, 1.0 if name.endswith("var") else 0.0, np.float32)
    if name.endswith("kernel"):
      return (rng.normal(size=shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    offset = 1.0 if name.endswith("scale") else 0.0
    return (offset + 0.1 * rng.normal(size=shape)).astype(np.float32)
  return tree.map_named(draw, shapes)


def _replica(tree_, r):
  return jax.tree.map(lambda leaf: leaf[r], tree_)


def _randomize_stats(variables, seed):
  """Non-trivial running statistics (var > 0) so eval mode depends on them."""
  rng = np.random.default_rng(seed)
  def draw(name, leaf):
    values = rng.normal(size=leaf.shape).astype(np.float32)
    return np.exp(values) if name.endswith("var") else values
  return dict(variables, batch_stats=tree.map_named(draw, variables["batch_stats"]))


def _brute_force_metrics(model, variables, x, y):
  """Per replica: model.apply on the whole set, numpy cross-entropy."""
  accs, losses = [], []
  for r in range(evaluation.replica_count(variables)):
    logits = np.asarray(model.apply(_replica(variables, r), x, train=False), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    losses.append(-logp[np.arange(len(y)), y].mean())
    accs.append(np.mean(logits.argmax(-1) == y))
  return np.array(accs), np.array(losses)


@pytest.mark.parametrize("batch_size", [10, 37, 1000])
def test_evaluate_equals_per_replica_loop_mlp(batch_size):
  model = get_model("mlp", 10, widths=(16,))
  variables = _stack_init(model, (6,), 3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(37, 6)).astype(np.float32)  # 37: the last batch of 10 is partial
  y = rng.integers(0, 10, size=37).astype(np.int32)
  out = evaluation.evaluate(model, variables, x, y, batch_size=batch_size)
  acc, loss = _brute_force_metrics(model, variables, x, y)
  assert out["acc"].shape == (3,) and out["acc"].dtype == jnp.float32
  assert out["loss"].shape == (3,) and out["loss"].dtype == jnp.float32
  np.testing.assert_allclose(out["acc"], acc, rtol=0, atol=1e-7)
  np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
  assert len(set(np.round(np.asarray(out["loss"]), 6))) == 3  # the replicas differ


def test_evaluate_uses_running_stats_of_each_replica():
  model = OneBN()
  variables = _randomize_stats(_stack_init(model, (5,), 2, seed=1), seed=2)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(23, 5)).astype(np.float32)
  y = rng.integers(0, 3, size=23).astype(np.int32)
  out = evaluation.evaluate(model, variables, jnp.asarray(x), jnp.asarray(y), batch_size=8)
  acc, loss = _brute_force_metrics(model, variables, x, y)
  np.testing.assert_allclose(out["acc"], acc, atol=1e-7)
  np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)


def test_evaluate_rejects_bad_inputs():
  model = get_model("mlp", 10, widths=(16,))
  variables = _stack_init(model, (6,), 2)
  x, y = np.zeros((4, 6), np.float32), np.zeros(4, np.int32)
  bad = dict(variables, params=dict(variables["params"]))
  bad["params"]["head"] = jax.tree.map(lambda leaf: leaf[:1], bad["params"]["head"])
  with pytest.raises(ValueError, match="leading replica axis"):
    evaluation.evaluate(model, bad, x, y)
  with pytest.raises(ValueError, match="labels"):
    evaluation.evaluate(model, variables, x, y[:3])
  with pytest.raises(ValueError, match="'params'"):
    evaluation.evaluate(model, variables["params"], x, y)


def _hand_one_bn(params, x, batch_size, weighting):
  """Per-batch mean and biased var of x @ W + b (float64), averaged."""
  w = np.asarray(params["dense"]["kernel"], np.float64)
  b = np.asarray(params["dense"]["bias"], np.float64)
  means, variances, sizes = [], [], []
  for start in range(0, len(x), batch_size):
    h = x[start:start + batch_size].astype(np.float64) @ w + b
    means.append(h.mean(0))
    variances.append(h.var(0))  # ddof=0: biased
    sizes.append(len(h))
  weights = (np.full(len(sizes), 1 / len(sizes)) if weighting == "batches"
             else np.array(sizes) / len(x))
  return weights @ np.array(means), weights @ np.array(variances)


@pytest.mark.parametrize("weighting", ["batches", "examples"])
def test_recompute_one_bn_layer_by_hand(weighting):
  model = OneBN()
  variables = _stack_init(model, (5,), 2, seed=4)
  x = (np.random.default_rng(5).normal(size=(23, 5)) * 2 + 1).astype(np.float32)
  stats = batchnorm.recompute_batch_stats(model, variables["params"], x, batch_size=10,
                                          weighting=weighting)
  assert tree.names(stats) == ["bn/mean", "bn/var"]
  for r in range(2):
    mean, var = _hand_one_bn(_replica(variables["params"], r), x, 10, weighting)
    np.testing.assert_allclose(stats["bn"]["mean"][r], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn"]["var"][r], var, rtol=1e-5, atol=1e-6)
  # The last batch (3 of 23 examples) matters: the two weightings differ.
  other = "examples" if weighting == "batches" else "batches"
  mean_other, _ = _hand_one_bn(_replica(variables["params"], 0), x, 10, other)
  assert np.max(np.abs(np.asarray(stats["bn"]["mean"][0]) - mean_other)) > 1e-3


def test_recompute_two_bn_conv_layers_matches_train_mode_loop():
  """Brute force: Flax in train mode on each real (unpadded) batch, momentum
  0 so the updated running statistics are the batch's, averaged."""
  model, reference = TwoBNConv(), TwoBNConv(momentum=0.0)
  variables = _stack_init(model, (6, 6, 2), 3, seed=6)
  x = np.random.default_rng(7).normal(size=(19, 6, 6, 2)).astype(np.float32)
  stats = batchnorm.recompute_batch_stats(model, variables["params"], x, batch_size=8)
  assert tree.names(stats) == ["bn1/mean", "bn1/var", "bn2/mean", "bn2/var"]
  train_mode = jax.jit(lambda v, xb: reference.apply(v, xb, train=True, mutable=["batch_stats"])[1])
  for r in range(3):
    per_batch = [tree.to_dict(train_mode(_replica(variables, r), x[s:s + 8])["batch_stats"])
                 for s in range(0, 19, 8)]  # batches of 8, 8, 3
    got = tree.to_dict(_replica(stats, r))
    for name in got:
      expected = np.mean([np.asarray(b[name], np.float64) for b in per_batch], axis=0)
      np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_recompute_resnet20_matches_train_mode_loop():
  """A wsjax model (momentum 0.9 fixed): each batch's statistics recovered
  from a train-mode call that starts from zero running statistics."""
  model = get_model("resnet20", 10, width=4)
  variables = _stack_init(model, (8, 8, 3), 1, seed=8)
  x = np.random.default_rng(9).normal(size=(13, 8, 8, 3)).astype(np.float32)
  stats = batchnorm.recompute_batch_stats(model, variables["params"], x, batch_size=5)
  assert tree.names(stats) == tree.names(variables["batch_stats"])
  params = _replica(variables["params"], 0)
  zeros = jax.tree.map(lambda leaf: jnp.zeros_like(leaf[0]), variables["batch_stats"])
  apply = jax.jit(lambda xb: model.apply({"params": params, "batch_stats": zeros}, xb,
                                         train=True, mutable=["batch_stats"])[1])
  per_batch = [tree.to_dict(apply(x[s:s + 5])["batch_stats"]) for s in range(0, 13, 5)]
  got = tree.to_dict(_replica(stats, 0))
  for name in got:
    expected = np.mean([np.asarray(b[name], np.float64) / 0.1 for b in per_batch], axis=0)
    np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_recompute_without_batch_norm_is_empty():
  model = get_model("mlp", 10, widths=(16,))
  variables = _stack_init(model, (6,), 2)
  x = np.zeros((7, 6), np.float32)
  assert batchnorm.recompute_batch_stats(model, variables["params"], x) == {}
  assert not batchnorm.has_batch_norm(model, _replica(variables["params"], 0), (6,))
  assert batchnorm.has_batch_norm(OneBN(), _replica(_stack_init(OneBN(), (6,), 1)["params"], 0),
                                  (6,))


def test_recompute_rejects_unknown_weighting():
  model = OneBN()
  variables = _stack_init(model, (5,), 1)
  with pytest.raises(ValueError, match="weighting"):
    batchnorm.recompute_batch_stats(model, variables["params"], np.zeros((4, 5), np.float32),
                                    weighting="momentum")
