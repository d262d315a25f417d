"""Perturbations at the rewind point against hand computations."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wsjax import pruning as P
from wsjax.transforms import base
from wsjax.transforms import rewind as R

# Few distinct leaf shapes: applied eagerly, each op compiles once per shape.
SHAPES = {"conv": (3, 3, 4, 8), "dense": (72, 8), "head": (8, 8)}
KERNELS = ("conv", "dense")  # prunable under the "mlp" rule; head stays dense


def _tree(rng):
  out = {name: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=s[-1]), jnp.float32)}
         for name, s in SHAPES.items()}
  out["bn"] = {"scale": jnp.asarray(rng.uniform(size=8), jnp.float32),
               "bias": jnp.asarray(rng.normal(size=8), jnp.float32)}
  return out


@jax.jit
def init_fn(key):
  """A fresh draw: full Linen variables (matched to params by name)."""
  shapes = {f"{n}/{leaf}": (s if leaf == "kernel" else (s[-1],))
            for n, s in SHAPES.items() for leaf in ("kernel", "bias")}
  shapes.update({"bn/scale": (8,), "bn/bias": (8,)})
  params = {}
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    layer, leaf = name.split("/")
    params.setdefault(layer, {})[leaf] = 0.1 * jax.random.normal(
        jax.random.fold_in(key, i), shape)
  return {"params": params, "batch_stats": {"bn": {"mean": jnp.zeros(8)}}}


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  mask = P.ones_mask(_tree(rng), "mlp")
  for name in KERNELS:  # prune about half of each prunable layer at random
    mask[name] = {**mask[name],
                  "kernel": jnp.asarray(rng.uniform(size=SHAPES[name]) < 0.5)}
  params = P.apply_mask(_tree(rng), mask)  # rewound weights, pruned = 0
  return params, mask


def fresh_draw(seed):
  _, sub = jax.random.split(jax.random.PRNGKey(seed))
  return init_fn(sub)["params"]


def _np(x):
  return np.asarray(x)


def check_untouched(out, params, names=("head", "bn")):
  for name in names:
    for leaf in out[name]:
      np.testing.assert_array_equal(out[name][leaf], params[name][leaf])
  for name in KERNELS:
    np.testing.assert_array_equal(out[name]["bias"], params[name]["bias"])


def check_pruned_zero(out, mask):
  for name in KERNELS:
    pruned = ~_np(mask[name]["kernel"])
    assert (_np(out[name]["kernel"])[pruned] == 0).all()


# ---------------------------------------------------------------- reinit


def test_random_reinit_by_hand(setup):
  params, mask = setup
  out = base.apply_transform(R.random_reinit(init_fn, 3, mask), params)
  fresh = fresh_draw(3)
  for name in KERNELS:
    m = _np(mask[name]["kernel"])
    np.testing.assert_allclose(out[name]["kernel"],
                               np.where(m, fresh[name]["kernel"], 0), atol=1e-6)
  check_untouched(out, params)
  check_pruned_zero(out, mask)
  # prunable_only=False: the whole fresh network, under the mask.
  out = base.apply_transform(
      R.random_reinit(init_fn, 3, mask, prunable_only=False), params)
  for name in ("head", "bn", *KERNELS):
    for leaf in out[name]:
      m = _np(mask[name][leaf])
      np.testing.assert_allclose(out[name][leaf],
                                 np.where(m, fresh[name][leaf], 0), atol=1e-6)
  check_pruned_zero(out, mask)


def test_sign_preserving_reinit_by_hand(setup):
  params, mask = setup
  out = base.apply_transform(R.sign_preserving_reinit(init_fn, 4, mask), params)
  fresh = fresh_draw(4)
  for name in KERNELS:
    m = _np(mask[name]["kernel"])
    w = _np(params[name]["kernel"])
    o = _np(out[name]["kernel"])
    np.testing.assert_allclose(
        o, np.where(m, np.abs(_np(fresh[name]["kernel"])) * np.sign(w), 0),
        atol=1e-6)
    assert (np.sign(o[m]) == np.sign(w[m])).all()  # every kept sign kept
    assert not np.allclose(np.abs(o[m]), np.abs(w[m]))  # magnitudes redrawn
  check_untouched(out, params)
  check_pruned_zero(out, mask)


# ---------------------------------------------------------------- shuffle


@pytest.mark.parametrize("keep_signs", [False, True])
def test_shuffle_is_a_permutation_within_each_layer(setup, keep_signs):
  params, mask = setup
  rng = np.random.default_rng(5)
  updates = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape),
                                               x.dtype), params)
  tx = R.shuffle_weights(7, mask, keep_signs=keep_signs)
  deltas, _ = tx.update(updates, tx.init(params), params)
  out = optax.apply_updates(params, deltas)
  for name in KERNELS:
    m = _np(mask[name]["kernel"])
    w = _np(params[name]["kernel"]) + _np(updates[name]["kernel"])  # acts on p+u
    o = _np(out[name]["kernel"])
    if keep_signs:
      np.testing.assert_allclose(np.sort(np.abs(o[m])), np.sort(np.abs(w[m])),
                                 rtol=1e-6, atol=1e-6)
      assert (np.sign(o[m]) == np.sign(w[m])).all()
    else:
      np.testing.assert_allclose(np.sort(o[m]), np.sort(w[m]),
                                 rtol=1e-6, atol=1e-6)
    assert np.mean(np.isclose(o[m], w[m])) < 0.05  # actually moved
    assert (o[~m] == 0).all()
  # Leaves it does not perturb keep their incoming delta.
  np.testing.assert_allclose(out["head"]["kernel"],
                             params["head"]["kernel"] + updates["head"]["kernel"],
                             atol=1e-6)


def test_shuffle_permutations_are_uniform():
  # 3 kept values among 5 positions: each of the 3! arrangements ~ 1/6.
  w = jnp.array([[1.0, 0.0, 2.0, 0.0, 3.0]])
  params = {"lin": {"kernel": w}}
  mask = {"lin": {"kernel": jnp.array([[True, False, True, False, True]])}}

  def one(key):
    return base.apply_transform(R.shuffle_weights(key, mask), params)

  outs = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(0), 1200))
  kernels = np.asarray(outs["lin"]["kernel"])[:, 0]
  assert (kernels[:, [1, 3]] == 0).all()
  seen = {}
  for row in kernels[:, [0, 2, 4]]:
    seen[tuple(row)] = seen.get(tuple(row), 0) + 1
  assert set(seen) == set(itertools.permutations((1.0, 2.0, 3.0)))
  assert all(140 <= c <= 260 for c in seen.values()), seen  # 200 +- 4.4 sd


# ---------------------------------------------------------------- noise


def test_gaussian_noise_scaled_to_layer_std(setup):
  params, mask = setup
  factor = 0.5
  out = base.apply_transform(R.gaussian_noise(11, mask, factor), params)
  check_untouched(out, params)
  check_pruned_zero(out, mask)
  for name in KERNELS:  # noise only where kept
    m = _np(mask[name]["kernel"])
    assert (_np(out[name]["kernel"]) != _np(params[name]["kernel"]))[m].all()
  # The scale, on a large layer: 2 * 10^4 kept draws, std within 3%.
  rng = np.random.default_rng(1)
  keep = rng.uniform(size=(200, 200)) < 0.5
  w = np.where(keep, rng.normal(1.0, 2.0, size=(200, 200)), 0).astype(np.float32)
  big = base.apply_transform(
      R.gaussian_noise(12, {"big": {"kernel": keep}}, factor),
      {"big": {"kernel": jnp.asarray(w)}})["big"]["kernel"]
  noise = (_np(big) - w)[keep]
  layer_std = w[keep].std()  # std of the UNPRUNED weights only
  assert abs(layer_std - 2.0) < 0.05  # the pruned zeros would make it ~1.6
  assert abs(noise.std() / (factor * layer_std) - 1) < 0.03
  assert abs(noise.mean()) < 4 * factor * layer_std / np.sqrt(keep.sum())
  assert (_np(big)[~keep] == 0).all()
  zero = base.apply_transform(R.gaussian_noise(11, mask, 0.0), params)
  np.testing.assert_allclose(zero["dense"]["kernel"], params["dense"]["kernel"])
  with pytest.raises(ValueError, match="factor"):
    R.gaussian_noise(0, mask, -1.0)
  # factor as per-replica data (traced under vmap): 0 leaves the weights.
  many = jax.vmap(lambda f: base.apply_transform(
      R.gaussian_noise(11, mask, f), params))(jnp.array([0.0, factor]))
  np.testing.assert_allclose(many["dense"]["kernel"][0], params["dense"]["kernel"])
  np.testing.assert_allclose(many["dense"]["kernel"][1], out["dense"]["kernel"],
                             atol=1e-6)


# ---------------------------------------------------------------- common


def _all(key, mask, **kw):
  return {"reinit": R.random_reinit(init_fn, key, mask, **kw),
          "signs": R.sign_preserving_reinit(init_fn, key, mask, **kw),
          "shuffle": R.shuffle_weights(key, mask, **kw),
          "shuffle_signs": R.shuffle_weights(key, mask, keep_signs=True, **kw),
          "noise": R.gaussian_noise(key, mask, 1.0, **kw)}


def test_keys_determine_the_draw(setup):
  params, mask = setup
  a = _all(jax.random.PRNGKey(1), mask)
  b = _all(jax.random.PRNGKey(1), mask)
  c = _all(jax.random.PRNGKey(2), mask)
  for name in a:
    out_a = base.apply_transform(a[name], params)
    out_b = base.apply_transform(b[name], params)
    out_c = base.apply_transform(c[name], params)
    np.testing.assert_array_equal(out_a["dense"]["kernel"],
                                  out_b["dense"]["kernel"])
    assert not np.allclose(out_a["dense"]["kernel"], out_c["dense"]["kernel"])
    # A second update draws afresh (the state's key is split each time).
    tx = a[name]
    zeros = jax.tree.map(jnp.zeros_like, params)
    d1, state = tx.update(zeros, tx.init(params), params)
    d2, _ = tx.update(zeros, state, params)
    assert not np.allclose(d1["dense"]["kernel"], d2["dense"]["kernel"])


def test_prunable_only_false_and_no_mask(setup):
  params, mask = setup
  for name, tx in _all(3, mask, prunable_only=False).items():
    out = base.apply_transform(tx, params)
    check_pruned_zero(out, mask)
    for layer, leaf in (("bn", "bias"), ("conv", "bias"), ("head", "kernel")):
      assert not np.allclose(out[layer][leaf], params[layer][leaf]), name
  # mask=None: every kernel (the head too), nothing else.
  out = base.apply_transform(R.gaussian_noise(3, None, 1.0), params)
  assert not np.allclose(out["head"]["kernel"], params["head"]["kernel"])
  np.testing.assert_array_equal(out["head"]["bias"], params["head"]["bias"])
  np.testing.assert_array_equal(out["bn"]["scale"], params["bn"]["scale"])


def test_vmapped_over_replica_keys_and_masks(setup):
  params, mask = setup
  keys = jax.random.split(jax.random.PRNGKey(9), 3)
  masks = [P.random_prune_like(mask, k) for k in keys]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *masks)

  def run(key, m):
    return base.apply_transform(R.shuffle_weights(key, m), P.apply_mask(params, m))

  many = jax.vmap(run)(keys, stacked)
  for r in range(3):
    one = run(keys[r], masks[r])
    np.testing.assert_allclose(many["dense"]["kernel"][r], one["dense"]["kernel"],
                               atol=1e-6)


def test_errors(setup):
  params, mask = setup
  with pytest.raises(ValueError, match="init_fn"):
    R.random_reinit(None, 0, mask)
  with pytest.raises(ValueError, match="key"):
    R.shuffle_weights(None, mask)

  def wrong(key):
    fresh = init_fn(key)["params"]
    return {**fresh, "dense": {**fresh["dense"], "kernel": jnp.zeros((2, 2))}}

  with pytest.raises(ValueError, match="dense/kernel"):
    base.apply_transform(R.random_reinit(wrong, 0, mask), params)
  with pytest.raises(ValueError, match="needs params"):
    tx = R.gaussian_noise(0, mask, 1.0)
    tx.update(params, tx.init(params))
