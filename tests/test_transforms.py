"""Warm-start transforms against hand computations on tiny trees."""
import zlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from wsjax import transforms as T

LENGTH, IN, CH, OUT = 5, 2, 3, 4  # toy: Conv1D(2->3, k=3), BN, Dense(15->4)


class LinenToy(nn.Module):
  """Conv -> BatchNorm -> ReLU -> Dense, named like the NNX twin below."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(CH, (3,), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(OUT, name="lin")(x)


class NNXToy(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(IN, CH, (3,), rngs=rngs)
    self.bn = nnx.BatchNorm(CH, rngs=rngs)
    self.lin = nnx.Linear(LENGTH * CH, OUT, rngs=rngs)


def _randomize(tree, seed):
  """Same structure, random non-trivial values (non-zero biases, scales)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def linen_init(key):
  return LinenToy().init(key, jnp.ones((2, LENGTH, IN)))["params"]


@pytest.fixture(scope="module")
def params():
  return _randomize(linen_init(jax.random.PRNGKey(0)), 1)


@pytest.fixture(scope="module")
def grads(params):
  return _randomize(params, 2)


def to_nnx(pure, batch_stats=True):
  """An NNX state of the toy's layers holding the values of a Linen tree."""
  state = nnx.state(NNXToy(nnx.Rngs(0)))
  if not batch_stats:
    state = nnx.state(NNXToy(nnx.Rngs(0)), nnx.Param)
  full = nnx.to_pure_dict(state)
  for layer, leaves in pure.items():
    full[layer].update(leaves)
  nnx.replace_by_pure_dict(state, full)
  return state


def np_cos(a, b, eps=1e-8):
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  return a @ b / (max(np.linalg.norm(a), eps) * max(np.linalg.norm(b), eps))


# ---------------------------------------------------------------- groups


def test_classify_linen_and_nnx(params):
  expected = {"conv/kernel": "kernel", "conv/bias": "bias",
              "lin/kernel": "kernel", "lin/bias": "bias",
              "bn/scale": "norm_scale", "bn/bias": "norm_bias"}
  assert T.classify(params) == expected
  assert T.classify({"params": params}) == expected
  nnx_roles = T.classify(to_nnx(params))
  assert nnx_roles == dict(expected, **{"bn/mean": "frozen",
                                        "bn/var": "frozen"})
  linen_vars = {"params": params,
                "batch_stats": {"bn": {"mean": jnp.zeros(CH),
                                       "var": jnp.ones(CH)}}}
  roles = T.classify(linen_vars)
  assert roles["batch_stats/bn/mean"] == roles["batch_stats/bn/var"] == "frozen"


# ---------------------------------------------------------------- DASH


def test_dash_conv_kernel_slice_matches_hand(params, grads):
  lam = 0.3
  new = T.apply_transform(T.dash(lam), params, grads=grads)
  k = np.asarray(params["conv"]["kernel"])
  g = np.asarray(grads["conv"]["kernel"])
  expected = k.copy()
  for i in range(IN):
    for o in range(CH):
      c = np_cos(k[:, i, o], -g[:, i, o])
      expected[:, i, o] = k[:, i, o] * min(max(c, lam), 1.0)
  chex.assert_trees_all_close(new["conv"]["kernel"], expected, atol=1e-6)
  # The random draw spans both sides of the clip.
  cos = T.dash_cosines(params, grads)["conv/kernel"]
  assert cos.shape == (IN, CH)
  assert (cos < lam).any() and (cos > lam).any()


def test_dash_conv_unit_granularity(params, grads):
  new = T.apply_transform(T.dash(0.3, granularity="unit"), params, grads=grads)
  k = np.asarray(params["conv"]["kernel"])
  g = np.asarray(grads["conv"]["kernel"])
  expected = k.copy()
  for o in range(CH):
    c = np_cos(k[..., o], -g[..., o])  # over (spatial, in)
    expected[..., o] *= min(max(c, 0.3), 1.0)
  chex.assert_trees_all_close(new["conv"]["kernel"], expected, atol=1e-6)
  assert T.dash_cosines(params, grads, "unit")["conv/kernel"].shape == (CH,)
  with pytest.raises(ValueError, match="granularity"):
    T.dash(granularity="filter")


def test_dash_dense_bias_and_norm_by_hand():
  # Dense kernel (in=2, out=3); columns are units.
  w = jnp.array([[1.0, 1.0, 2.0],
                 [0.0, 1.0, 0.0]])
  neg_g = jnp.array([[3.0, 1.0, -1.0],
                     [0.0, 0.0, 0.0]])
  # Column cosines: 1 (kept), 1/sqrt(2) (scaled), -1 (clipped to lam).
  b = jnp.array([1.0, 2.0, 2.0])
  neg_gb = jnp.array([2.0, 0.0, 0.0])  # cos = 2 / (3 * 2) = 1/3
  params = {"dense": {"kernel": w, "bias": b},
            "norm": {"scale": jnp.array([2.0, 3.0]),
                     "bias": jnp.array([1.0, -1.0])}}
  grads = {"dense": {"kernel": -neg_g, "bias": -neg_gb},
           "norm": {"scale": jnp.array([5.0, 5.0]),
                    "bias": jnp.array([5.0, 5.0])}}
  new = T.apply_transform(T.dash(lam=0.3), params, grads=grads)
  s = np.array([1.0, 1 / np.sqrt(2), 0.3])
  chex.assert_trees_all_close(new["dense"]["kernel"], w * s[None, :],
                              atol=1e-6)
  chex.assert_trees_all_close(new["dense"]["bias"], b / 3, atol=1e-6)
  chex.assert_trees_all_equal(new["norm"], params["norm"])
  cos = T.dash_cosines(params, grads)
  chex.assert_trees_all_close(cos["dense/kernel"], np.array([1, 2**-.5, -1]),
                              atol=1e-6)
  chex.assert_trees_all_close(cos["dense/bias"], 1 / 3, atol=1e-6)
  assert set(cos) == {"dense/kernel", "dense/bias"}
  # A zero gradient has cosine 0 (PyTorch's eps-clamped norms): lam * W.
  zero = jax.tree.map(jnp.zeros_like, params)
  new = T.apply_transform(T.dash(lam=0.3), params, grads=zero)
  chex.assert_trees_all_close(new["dense"]["kernel"], 0.3 * w, atol=1e-7)


# ---------------------------------------------------------------- S&P


def test_shrink_perturb_with_known_fresh_init(params):
  fresh = _randomize(params, 7)
  tx = T.shrink_perturb(0.4, 0.1, init_fn=lambda key: fresh, key=0)
  new = T.apply_transform(tx, params)
  expected = jax.tree.map(lambda p, f: 0.4 * p + 0.1 * f, params, fresh)
  chex.assert_trees_all_close(new, expected, atol=1e-6)  # BN params too
  with pytest.raises(ValueError, match="init_fn"):
    T.shrink_perturb(key=0)
  # random transforms take their key explicitly: no silent seed
  for make in (lambda: T.shrink_perturb(init_fn=linen_init), lambda: T.gaussian_shrink_perturb(),
               lambda: T.reset_layers("lin", linen_init)):
    with pytest.raises(ValueError, match="PRNG key explicitly"):
      make()


def test_shrink_perturb_draws_from_split_key(params):
  tx = T.shrink_perturb(0.4, 0.1, init_fn=linen_init, key=3)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  d1, state1 = tx.update(zeros, state, params)
  _, sub = jax.random.split(jax.random.PRNGKey(3))
  expected = jax.tree.map(lambda p, f: 0.4 * p + 0.1 * f, params,
                          linen_init(sub))
  chex.assert_trees_all_close(optax.apply_updates(params, d1), expected,
                              atol=1e-6)
  d2, _ = tx.update(zeros, state1, params)  # fresh draw on the next update
  assert not np.allclose(d1["lin"]["kernel"], d2["lin"]["kernel"])
  same, _ = T.shrink_perturb(0.4, 0.1, init_fn=linen_init, key=3).update(
      zeros, state, params)
  chex.assert_trees_all_equal(same, d1)


def test_gaussian_shrink_perturb_exact_draws(params):
  tx = T.gaussian_shrink_perturb(shrink=0.3, sigma=0.01, key=5)
  new = T.apply_transform(tx, params)
  _, sub = jax.random.split(jax.random.PRNGKey(5))

  def noise(name, x):
    key = jax.random.fold_in(sub, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return 0.01 * jax.random.normal(key, x.shape, x.dtype)

  for layer in ("conv", "lin"):
    for leaf in ("kernel", "bias"):
      p = params[layer][leaf]
      chex.assert_trees_all_close(
          new[layer][leaf], 0.3 * p + noise(f"{layer}/{leaf}", p), atol=1e-6)
  chex.assert_trees_all_equal(new["bn"], params["bn"])  # norm untouched
  # Same draws whether given {'params': ...} or the params subtree.
  new_vars = T.apply_transform(tx, {"params": params})
  chex.assert_trees_all_close(new_vars["params"], new, atol=1e-7)


def test_gaussian_shrink_perturb_statistics_and_seeds():
  params = {"big": {"kernel": jnp.ones((200, 300)), "bias": jnp.zeros(300)}}
  new = T.apply_transform(T.gaussian_shrink_perturb(0.3, 0.01, key=0), params)
  noise = np.asarray(new["big"]["kernel"]) - 0.3
  assert abs(noise.mean()) < 3 * 0.01 / np.sqrt(noise.size)
  assert abs(noise.std() - 0.01) < 0.0005
  assert np.asarray(new["big"]["bias"]).std() > 0.005
  # Kernel and bias draws are independent.
  assert not np.allclose(noise[0], np.asarray(new["big"]["bias"]))
  again = T.apply_transform(T.gaussian_shrink_perturb(0.3, 0.01, key=0), params)
  other = T.apply_transform(T.gaussian_shrink_perturb(0.3, 0.01, key=1), params)
  chex.assert_trees_all_equal(again, new)
  assert not np.allclose(other["big"]["kernel"], new["big"]["kernel"])
  # Repeated updates draw fresh noise from the split key.
  tx = T.gaussian_shrink_perturb(0.3, 0.01, key=0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  d1, s1 = tx.update(zeros, tx.init(params), params)
  d2, _ = tx.update(zeros, s1, params)
  assert not np.allclose(d1["big"]["kernel"], d2["big"]["kernel"])


# ---------------------------------------------------------------- baselines


def test_reset_layers(params):
  fresh = _randomize(params, 9)
  tx = T.reset_layers("lin", init_fn=lambda key: fresh, key=0)
  new = T.apply_transform(tx, params)
  chex.assert_trees_all_close(new["lin"], fresh["lin"], atol=1e-6)
  chex.assert_trees_all_equal(new["conv"], params["conv"])
  chex.assert_trees_all_equal(new["bn"], params["bn"])
  # Whole path components only; a nested name matches its sub-path.
  tree = {"Dense_0": {"kernel": jnp.ones((2, 2))},
          "Dense_01": {"kernel": jnp.ones((2, 2))},
          "head": {"Dense_0": {"kernel": jnp.ones((2, 2))}}}
  zeros = jax.tree.map(jnp.zeros_like, tree)
  new = T.apply_transform(T.reset_layers("Dense_0", lambda k: zeros, key=0), tree)
  assert float(new["Dense_01"]["kernel"].sum()) == 4.0
  assert float(new["Dense_0"]["kernel"].sum()) == 0.0
  assert float(new["head"]["Dense_0"]["kernel"].sum()) == 0.0
  new = T.apply_transform(T.reset_layers("head/Dense_0", lambda k: zeros, key=0),
                          tree)
  assert float(new["Dense_0"]["kernel"].sum()) == 4.0
  assert float(new["head"]["Dense_0"]["kernel"].sum()) == 0.0
  with pytest.raises(ValueError, match="Dense_9"):
    T.apply_transform(T.reset_layers("Dense_9", lambda k: zeros, key=0), tree)


def test_l2_init_penalty_matches_official_form(params):
  init = _randomize(params, 11)
  norm = lambda layer, leaf: np.linalg.norm(
      np.asarray(params[layer][leaf]) - np.asarray(init[layer][leaf]))
  # Official: coef * (sum of ||W - W0|| over kernels and norm scales)^2.
  official = 1e-2 * (norm("conv", "kernel") + norm("lin", "kernel")
                     + norm("bn", "scale")) ** 2
  np.testing.assert_allclose(T.l2_init_penalty(params, init), official,
                             rtol=1e-5)
  # Text form over conv/dense kernels and biases.
  text = 0.5 * sum(norm(l, k) ** 2 for l in ("conv", "lin")
                   for k in ("kernel", "bias"))
  np.testing.assert_allclose(
      T.l2_init_penalty(params, init, 0.5, roles=("kernel", "bias"),
                        square_of_sum=False), text, rtol=1e-5)
  # Gradient: zero (not NaN) at W == W0, and only on the chosen leaves.
  g0 = jax.grad(T.l2_init_penalty)(params, params)
  chex.assert_tree_all_finite(g0)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g0))
  g = jax.grad(T.l2_init_penalty)(params, init)
  assert float(jnp.abs(g["conv"]["bias"]).max()) == 0.0
  assert float(jnp.abs(g["bn"]["scale"]).max()) > 0.0
  with pytest.raises(ValueError, match="roles"):
    T.l2_init_penalty(params, init, roles=("weights",))


# ---------------------------------------------------------------- composition


def test_jit_matches_eager(params, grads):
  zeros = jax.tree.map(jnp.zeros_like, params)
  for tx in (T.dash(), T.gaussian_shrink_perturb(key=2),
             T.shrink_perturb(init_fn=linen_init, key=2),
             T.reset_layers("lin", linen_init, key=2)):
    tx = optax.with_extra_args_support(tx)  # the others ignore `grads`
    state = tx.init(params)
    eager, s_eager = tx.update(zeros, state, params, grads=grads)
    jitted, s_jit = jax.jit(tx.update)(zeros, state, params, grads=grads)
    chex.assert_trees_all_close(jitted, eager, atol=1e-6)
    chex.assert_trees_all_equal(s_jit, s_eager)


def test_chain_applies_in_sequence_in_either_order(params, grads):
  """`updates` means the deltas so far for every transform, DASH included (its
  gradient is an extra argument): a chain equals applying its members one
  after the other, in BOTH orders."""
  fresh = _randomize(params, 13)
  reset = T.reset_layers("lin", lambda key: fresh, key=0)
  sp = T.gaussian_shrink_perturb(key=4)
  dash = T.dash(0.3)
  for first, second, name in ((dash, sp, "dash then sp"), (sp, dash, "sp then dash")):
    chained = optax.chain(first, second)
    zeros = jax.tree.map(jnp.zeros_like, params)
    deltas, _ = chained.update(zeros, chained.init(params), params, grads=grads)
    sequential = T.apply_transform(second, T.apply_transform(first, params, grads=grads),
                                   grads=grads)
    chex.assert_trees_all_close(optax.apply_updates(params, deltas), sequential, atol=1e-6,
                                custom_message=name)
  # the two orders differ: DASH's cosines see S&P's noise in one, not the other
  a = T.apply_transform(optax.chain(dash, sp), params, grads=grads)
  b = T.apply_transform(optax.chain(sp, dash), params, grads=grads)
  assert not np.allclose(a["conv"]["kernel"], b["conv"]["kernel"])
  # S&P then a reset of the classifier: the reset wins on 'lin'.
  both = T.apply_transform(optax.chain(sp, reset), params)
  chex.assert_trees_all_close(both["lin"], fresh["lin"], atol=1e-6)
  chex.assert_trees_all_close(both["conv"], T.apply_transform(sp,
                                                              params)["conv"],
                              atol=1e-6)
  with pytest.raises(ValueError, match="needs the loss gradient"):
    T.apply_transform(dash, params)


def test_masked_leaves_unchanged(params, grads):
  mask = {"conv": {"kernel": True, "bias": True},
          "bn": {"scale": True, "bias": True},
          "lin": {"kernel": False, "bias": False}}
  sp = T.gaussian_shrink_perturb(key=6)
  new = T.apply_transform(optax.masked(sp, mask), params)
  chex.assert_trees_all_equal(new["lin"], params["lin"])
  # Noise is keyed by leaf name: unmasked leaves get the same draw.
  chex.assert_trees_all_close(new["conv"], T.apply_transform(sp,
                                                             params)["conv"],
                              atol=1e-7)
  fresh = _randomize(params, 8)
  new = T.apply_transform(
      optax.masked(T.shrink_perturb(init_fn=lambda k: fresh, key=0), mask), params)
  chex.assert_trees_all_equal(new["lin"], params["lin"])
  chex.assert_trees_all_close(new["bn"]["scale"],
                              0.4 * params["bn"]["scale"]
                              + 0.1 * fresh["bn"]["scale"], atol=1e-6)
  # Masking only a kernel keeps its bias classified as a layer bias.
  kmask = jax.tree.map(lambda _: True, params)
  kmask["conv"]["kernel"] = False
  new = T.apply_transform(optax.masked(sp, kmask), params)
  chex.assert_trees_all_equal(new["conv"]["kernel"], params["conv"]["kernel"])
  assert not np.allclose(new["conv"]["bias"], params["conv"]["bias"])
  chex.assert_trees_all_equal(new["bn"], params["bn"])
  # DASH masks like any other transform (its gradient is an extra argument).
  new = T.apply_transform(optax.masked(T.dash(), mask), params, grads=grads)
  chex.assert_trees_all_equal(new["lin"], params["lin"])
  chex.assert_trees_all_close(
      new["conv"], T.apply_transform(T.dash(), params, grads=grads)["conv"],
      atol=1e-7)


# ---------------------------------------------------------------- Linen == NNX


def test_linen_and_nnx_give_the_same_result(params, grads):
  state = to_nnx(params)  # with BatchStat mean/var
  assert isinstance(state, nnx.State)
  stats = {"mean": state["bn"]["mean"][...], "var": state["bn"]["var"][...]}
  nnx_grads = to_nnx(grads)
  fresh = _randomize(params, 21)
  fresh_nnx = to_nnx(fresh)
  # (Linen transform, NNX transform, uses gradients)
  cases = [
      (T.dash(), T.dash(), True),
      (T.dash(granularity="unit"), T.dash(granularity="unit"), True),
      (T.gaussian_shrink_perturb(key=3), T.gaussian_shrink_perturb(key=3),
       False),
      (T.shrink_perturb(init_fn=lambda k: fresh, key=0),
       T.shrink_perturb(init_fn=lambda k: fresh_nnx, key=0), False),
      (T.reset_layers("lin", lambda k: fresh, key=0),
       T.reset_layers("lin", lambda k: fresh_nnx, key=0), False),
  ]
  for tx, ntx, use_grads in cases:
    g, ng = ({"grads": grads}, {"grads": nnx_grads}) if use_grads else ({}, {})
    out_linen = T.apply_transform(tx, params, **g)
    out_nnx = T.apply_transform(ntx, state, **ng)
    assert isinstance(out_nnx, nnx.State)
    assert isinstance(out_nnx["bn"]["mean"], nnx.BatchStat)
    pure = nnx.to_pure_dict(out_nnx)
    chex.assert_trees_all_equal(pure["bn"]["mean"], stats["mean"])
    chex.assert_trees_all_equal(pure["bn"]["var"], stats["var"])
    for layer in ("conv", "lin"):
      chex.assert_trees_all_close(pure[layer], out_linen[layer], atol=1e-6)
    chex.assert_trees_all_close(pure["bn"]["scale"],
                                out_linen["bn"]["scale"], atol=1e-6)
  np.testing.assert_allclose(
      T.l2_init_penalty(state, fresh_nnx), T.l2_init_penalty(params, fresh),
      rtol=1e-6)
  chex.assert_trees_all_close(
      T.dash_cosines(state, nnx_grads), T.dash_cosines(params, grads),
      atol=1e-6)


def test_nnx_state_roundtrips_into_the_module(params, grads):
  model = NNXToy(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, nnx.to_pure_dict(to_nnx(params)))
  new_state = T.apply_transform(T.dash(), state, grads=to_nnx(grads))
  nnx.update(model, new_state)
  expected = T.apply_transform(T.dash(), params, grads=grads)
  np.testing.assert_allclose(model.lin.kernel[...], expected["lin"]["kernel"],
                             atol=1e-6)
