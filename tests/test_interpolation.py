"""Linear interpolation, paths and barriers against hand computations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax import tree
from wsjax.analysis import batchnorm
from wsjax.analysis import evaluation
from wsjax.analysis import interpolation as I
from wsjax.data import load_dataset
from wsjax.models import get_model, make_init_fn


class SmallBNConv(nn.Module):
  """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> mean pool -> Dense, NHWC."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
    x = nn.Conv(5, (3, 3), strides=2, name="conv2")(nn.relu(x))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn2")(x)
    return nn.Dense(3, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def _random_variables(model, input_shape, n, seed=0):
  """n random networks stacked on a leading axis, drawn with numpy (shapes
  from an abstract init): kernels N(0, 1/fan_in), other params near their
  init values, running statistics mean 0 / var 1."""
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


def _replica(stacked, r):
  """Replica r (an int: no leading axis; an index array: stacked)."""
  return jax.tree.map(lambda leaf: leaf[r], stacked)


# ---- interpolate ------------------------------------------------------------

def test_interpolate_endpoints_exact_and_midpoint_by_hand():
  rng = np.random.default_rng(0)
  a = {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                 "bias": rng.normal(size=4).astype(np.float32)}}
  b = jax.tree.map(lambda x: (x * 3 + 1).astype(np.float32), a)
  points = I.interpolate(a, b, I.alphas(5))
  assert tree.names(points) == ["dense/bias", "dense/kernel"]
  for name, leaf in tree.named_leaves(points):
    assert leaf.shape == (5, *tree.to_dict(a)[name].shape) and leaf.dtype == jnp.float32
    np.testing.assert_array_equal(leaf[0], tree.to_dict(a)[name])
    np.testing.assert_array_equal(leaf[-1], tree.to_dict(b)[name])
    # alpha = 0.25: 0.75 a + 0.25 b
    np.testing.assert_allclose(leaf[1], 0.75 * tree.to_dict(a)[name] + 0.25 * tree.to_dict(b)[name],
                               rtol=1e-6)


def test_interpolate_rejects_mismatched_trees():
  a = {"w": np.zeros((2, 3), np.float32)}
  with pytest.raises(ValueError, match="w: second network"):
    I.interpolate(a, {"w": np.zeros((3, 3), np.float32)}, I.alphas(3))
  with pytest.raises(ValueError, match="missing"):
    I.interpolate(a, {"v": np.zeros((2, 3), np.float32)}, I.alphas(3))
  with pytest.raises(ValueError, match="dtype"):
    I.interpolate({"n": np.zeros(2, np.int32)}, {"n": np.ones(2, np.int32)}, I.alphas(3))


def test_alphas():
  np.testing.assert_allclose(I.alphas(5), [0, 0.25, 0.5, 0.75, 1])
  assert I.alphas(I.INSTABILITY_POINTS)[[0, -1]].tolist() == [0.0, 1.0]
  assert len(I.alphas(I.INSTABILITY_POINTS)) == 30 and len(I.alphas(I.REBASIN_POINTS)) == 25
  with pytest.raises(ValueError, match="n_points"):
    I.alphas(1)


# ---- barrier ----------------------------------------------------------------

def test_barrier_on_hand_arrays():
  assert float(I.barrier(np.array([0.1, 0.5, 0.3]))) == pytest.approx(0.5 - 0.2)
  values = np.array([[0.1, 0.5, 0.3],      # bump: 0.5 - (0.1 + 0.3) / 2
                     [0.2, 0.2, 0.2],      # flat: 0
                     [0.0, 0.25, 1.0],     # monotone: 1 - 0.5
                     [0.4, 0.1, 0.2]])     # dip: the max is an endpoint, 0.4 - 0.3
  expected = np.array([0.3, 0.0, 0.5, 0.1])
  np.testing.assert_allclose(I.barrier(values), expected, atol=1e-7)
  np.testing.assert_allclose(I.barrier(values.T, axis=0), expected, atol=1e-7)
  batched = np.stack([values, values[::-1]])  # (2, 4, 3)
  np.testing.assert_allclose(I.barrier(batched), np.stack([expected, expected[::-1]]), atol=1e-7)
  with pytest.raises(ValueError, match="at least 2"):
    I.barrier(np.array([1.0]))


# ---- paths and barriers ----------------------------------------------------

# A toy whose path is known in closed form: 2-class logistic regression on two
# 1-D examples, both of class 0, x = +1 and x = -1. With kernel [[w, 0]] and
# bias [c, 0] the margins (logit 0 - logit 1) are m1 = w + c and m2 = -w + c,
# linear in the parameters, hence linear along the line:
#   a: w = -5, c = -1.5 -> m1 = -6.5, m2 = 3.5
#   b: w = +5, c = -1.5 -> m1 = 3.5,  m2 = -6.5
#   m1(alpha) = -6.5 + 10 alpha (right for alpha > 0.65),
#   m2(alpha) = 3.5 - 10 alpha (right for alpha < 0.35).
# Error: 1/2 at both ends, 1 for alpha in (0.35, 0.65): error barrier 1/2.
# Loss: mean of softplus(-m1), softplus(-m2), convex along the line and equal
# at both ends: loss barrier 0.
TOY_X = np.array([[1.0], [-1.0]], np.float32)
TOY_Y = np.array([0, 0], np.int32)
TOY_A = {"head": {"kernel": np.array([[-5.0, 0.0]], np.float32),
                  "bias": np.array([-1.5, 0.0], np.float32)}}
TOY_B = {"head": {"kernel": np.array([[5.0, 0.0]], np.float32),
                  "bias": np.array([-1.5, 0.0], np.float32)}}


def test_line_barriers_on_a_toy_with_known_path():
  model = get_model("logreg", 2)
  data = (TOY_X, TOY_Y, TOY_X, TOY_Y)
  out = I.line_barriers(model, TOY_A, TOY_B, data, n_points=11, chunk_size=4)
  alpha = np.linspace(0, 1, 11)
  m1, m2 = -6.5 + 10 * alpha, 3.5 - 10 * alpha
  loss = (np.logaddexp(0, -m1) + np.logaddexp(0, -m2)) / 2
  error = ((m1 <= 0).astype(float) + (m2 <= 0)) / 2
  np.testing.assert_allclose(out["alphas"], alpha, atol=1e-7)
  for split in ("train", "test"):
    np.testing.assert_allclose(out[f"{split}_loss"], loss, rtol=1e-5)
    np.testing.assert_array_equal(out[f"{split}_error"], error)
    assert out["barriers"][f"{split}_error"] == pytest.approx(0.5)
    assert abs(out["barriers"][f"{split}_loss"]) < 1e-5
  assert error.max() == 1.0 and error[0] == error[-1] == 0.5  # the toy is what it claims


def _bn_data(seed, n_train=11, n_test=6):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n_train, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, n_train),
          rng.normal(size=(n_test, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, n_test))


def test_identical_endpoints_have_zero_barriers_with_batch_norm():
  model = SmallBNConv()
  net = _replica(_random_variables(model, (6, 6, 2), 1, seed=1), 0)
  out = I.line_barriers(model, net, net, _bn_data(2), n_points=3, chunk_size=2, bn_batch_size=4)
  for metric in I.METRICS:
    # Identical points; replicas of one vmapped program may round differently.
    assert abs(out["barriers"][metric]) < 1e-6
    np.testing.assert_allclose(out[metric], out[metric][0], rtol=1e-6)
  assert out["train_loss"][0] > 0


def test_evaluate_path_recomputes_batch_norm_at_every_point():
  """Against the pieces run on all points at once (each tested against brute
  force in test_evaluation.py): chunked 2 per program, the last one padded."""
  model = SmallBNConv()
  ends = _random_variables(model, (6, 6, 2), 2, seed=3)
  points = I.interpolate(_replica(ends, 0)["params"], _replica(ends, 1)["params"], I.alphas(3))
  x_train, y_train, x_test, y_test = _bn_data(4)
  out = I.evaluate_path(model, points, x_train, y_train, x_test, y_test, chunk_size=2,
                        bn_batch_size=4, batch_size=5)
  stats = batchnorm.recompute_batch_stats(model, points, x_train, batch_size=4)
  variables = {"params": points, "batch_stats": stats}
  for split, (x, y) in {"train": (x_train, y_train), "test": (x_test, y_test)}.items():
    ref = evaluation.evaluate(model, variables, x, y, batch_size=5)
    np.testing.assert_allclose(out[f"{split}_loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(out[f"{split}_error"], 1 - ref["acc"], atol=1e-6)
  # The middle point's statistics are its own, not the endpoints' mixed.
  ends_stats = batchnorm.recompute_batch_stats(model, ends["params"], x_train, batch_size=4)
  mixed = jax.tree.map(lambda s: 0.5 * (s[0] + s[1]), ends_stats)
  assert not np.allclose(stats["bn2"]["var"][1], mixed["bn2"]["var"], rtol=1e-3)
  # Without the recompute the (interpolated) running statistics are used
  # as they are: mean 0 and var 1 here, a different network.
  stale = I.interpolate(_replica(ends, 0), _replica(ends, 1), I.alphas(3))
  naive = I.evaluate_path(model, stale, x_train, y_train, x_test, y_test, recompute_bn=False,
                          chunk_size=2, batch_size=5)
  assert not np.allclose(naive["train_loss"], out["train_loss"], rtol=1e-3)
  with pytest.raises(ValueError, match="batch_stats"):
    I.evaluate_path(model, points, x_train, y_train, x_test, y_test, recompute_bn=False)


def test_pairwise_barriers_over_three_replicas(data_dir):
  ds = load_dataset("mnist1d", data_dir)
  model = get_model("mlp", ds.num_classes, widths=(16,))
  finals = _random_variables(model, ds.input_shape, 3, seed=5)
  out = I.pairwise_barriers(model, finals, ds, n_points=4, chunk_size=4)
  assert out["pairs"] == [(0, 1), (0, 2), (1, 2)]
  assert out["train_error"].shape == (3, 4) and out["barriers"]["test_error"].shape == (3,)
  for k, (i, j) in enumerate(out["pairs"]):
    path = I.evaluate_path(model, I.interpolate(_replica(finals, i), _replica(finals, j),
                                                I.alphas(4)),
                           ds.x_train, ds.y_train, ds.x_test, ds.y_test, chunk_size=4)
    for metric in I.METRICS:
      np.testing.assert_allclose(out[metric][k], path[metric], rtol=1e-5, atol=1e-6)
      assert out["barriers"][metric][k] == pytest.approx(float(I.barrier(path[metric])), abs=1e-5)
    # The endpoints are the networks themselves.
    ends = evaluation.evaluate(model, _replica(finals, np.array([i, j])),
                               ds.x_test, ds.y_test)
    np.testing.assert_allclose(out["test_loss"][k][[0, -1]], ends["loss"], rtol=1e-5)
  for metric in I.METRICS:
    assert out["mean_barriers"][metric] == pytest.approx(np.mean(out["barriers"][metric]))
  with pytest.raises(ValueError, match="at least 2"):
    I.pairwise_barriers(model, _random_variables(model, ds.input_shape, 1), ds, n_points=3)
