"""Collecting sown activations for every replica against per-replica model.apply."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax.analysis import activations as A
from wsjax.models import get_model, make_init_fn


def replicas(model, input_shape, count, seed=0):
  """`count` different variable sets with a leading replica axis: the model's
  variable shapes (traced, not compiled: compiling the initializers costs
  seconds) filled with NumPy normals."""
  shapes = jax.eval_shape(make_init_fn(model, input_shape), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.5 * rng.normal(size=(count, *s.shape))).astype(s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def sown_by_apply(model, variables, x):
  """The reference: one model.apply on all of x, the collection read by hand."""
  _, state = model.apply(variables, x, train=False, mutable=["activations"])
  return state["activations"]


def test_mlp_activations_equal_model_apply_per_replica():
  model = get_model("mlp", 10, widths=(8, 6))
  variables = replicas(model, (5,), 3)
  x = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
  out = A.collect_activations(model, variables, x, ["relu2", "relu1"], batch_size=4)  # 3 batches, padded
  assert list(out) == ["relu2", "relu1"]
  assert out["relu1"].shape == (3, 10, 8) and out["relu2"].shape == (3, 10, 6)
  for r in range(3):
    one = jax.tree.map(lambda v, r=r: v[r], variables)
    ref = sown_by_apply(model, one, x)
    np.testing.assert_allclose(out["relu1"][r], ref["relu1"][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["relu2"][r], ref["relu2"][0], rtol=1e-6, atol=1e-6)
  # The replicas really differ, and ReLU outputs are non-negative.
  assert float(jnp.max(jnp.abs(out["relu1"][0] - out["relu1"][1]))) > 1e-3
  assert float(jnp.min(out["relu1"])) >= 0.0
  # A single model, and every layer by default.
  one = jax.tree.map(lambda v: v[1], variables)
  single = A.collect_activations(model, one, x, batch_size=16, replicated=False)
  assert list(single) == ["relu1", "relu2"] and single["relu1"].shape == (10, 8)
  np.testing.assert_allclose(single["relu2"], out["relu2"][1], rtol=1e-6, atol=1e-6)


def test_conv1d_activations_keep_positions_and_channels():
  model = get_model("conv1d", 10, channels=4)
  variables = replicas(model, (40, 1), 2, seed=1)
  x = np.random.default_rng(1).normal(size=(7, 40, 1)).astype(np.float32)
  out = A.collect_activations(model, variables, x, "relu2", batch_size=3)
  assert list(out) == ["relu2"] and out["relu2"].shape == (2, 7, 10, 4)
  for r in range(2):
    ref = sown_by_apply(model, jax.tree.map(lambda v, r=r: v[r], variables), x)
    np.testing.assert_allclose(out["relu2"][r], ref["relu2"][0], rtol=1e-5, atol=1e-6)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Dense(3)(x))
    self.sow("activations", "relu", h)
    return h


class Nested(nn.Module):
  """A submodule's sown output, a BatchNorm in eval mode, a layer sown twice."""
  @nn.compact
  def __call__(self, x, train=False):
    h = Block(name="block")(x, train)
    h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
    dense = nn.Dense(2, name="shared")
    for _ in range(2):
      h = nn.relu(dense(jnp.concatenate([h, h[:, :1]], axis=-1)[:, :3]))
      self.sow("activations", "twice", h)
    return h


def test_nested_names_batch_norm_and_repeated_sows():
  model = Nested()
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 4))), jax.random.PRNGKey(0))
  rng = np.random.default_rng(2)
  variables = {k: jax.tree.map(lambda s: rng.normal(size=(2, *s.shape)).astype(np.float32), v)
               for k, v in shapes.items() if k != "activations"}
  # Running statistics different per replica (variances positive): eval mode must use them.
  variables["batch_stats"]["bn"]["var"] = np.exp(variables["batch_stats"]["bn"]["var"])
  x = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
  shapes = A.layer_shapes(model, variables, x)
  assert shapes == {"block/relu": (3,), "twice/0": (2,), "twice/1": (2,)}
  out = A.collect_activations(model, variables, x, batch_size=2)
  for r in range(2):
    ref = sown_by_apply(model, jax.tree.map(lambda v, r=r: v[r], variables), x)
    np.testing.assert_allclose(out["block/relu"][r], ref["block"]["relu"][0], rtol=1e-6)
    np.testing.assert_allclose(out["twice/0"][r], ref["twice"][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["twice/1"][r], ref["twice"][1], rtol=1e-6, atol=1e-7)
  assert set(A.named_activations({"activations": ref})) == set(shapes)


def test_bad_requests_raise_one_line_value_errors():
  model = get_model("mlp", 10, widths=(8, 6))
  variables = replicas(model, (5,), 2)
  x = np.zeros((4, 5), np.float32)
  with pytest.raises(ValueError, match="unknown layer 'relu3'; available: relu1, relu2") as info:
    A.collect_activations(model, variables, x, ["relu1", "relu3"])
  assert "\n" not in str(info.value)
  with pytest.raises(ValueError, match="batch_size"):
    A.collect_activations(model, variables, x, batch_size=0)
  with pytest.raises(ValueError, match="listed twice"):
    A.collect_activations(model, variables, x, ["relu1", "relu1"])
  uneven = {"params": {**variables["params"],
                       "head": jax.tree.map(lambda v: v[:1], variables["params"]["head"])}}
  with pytest.raises(ValueError, match="replica axis"):
    A.collect_activations(model, uneven, x)
  with pytest.raises(ValueError, match="sows no activations"):
    logreg = get_model("logreg", 3)
    A.collect_activations(logreg, replicas(logreg, (5,), 2), x)
