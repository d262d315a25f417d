"""Pruning masks and global magnitude pruning against hand computations."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax import models
from wsjax import pruning as P
from wsjax import tree


def tiny_params():
  """conv (2x1x1x4 = 8 weights), bn, dense (3x2), head (2x2); distinct |w|."""
  conv = np.array([0.9, -0.1, 0.5, -0.7, 0.3, 0.05, -0.8, 0.6],
                  np.float32).reshape(2, 1, 1, 4)
  dense = np.array([[0.2, -0.4], [1.0, -0.15], [0.35, 0.02]], np.float32)
  head = np.array([[0.01, 0.03], [-0.04, 0.02]], np.float32)  # smallest of all
  return {"conv": {"kernel": jnp.asarray(conv), "bias": jnp.full((4,), 0.001)},
          "bn": {"scale": jnp.full((4,), 0.001), "bias": jnp.zeros(4)},
          "dense": {"kernel": jnp.asarray(dense), "bias": jnp.zeros(2)},
          "head": {"kernel": jnp.asarray(head), "bias": jnp.zeros(2)}}


# Jitted once per shape and option: eager dispatch of the ranking's ops is
# slower than one compile on a busy CPU.
prune = jax.jit(P.global_magnitude_prune,
                static_argnames=("fraction", "model_name", "open_lth_threshold"))


def resnet20_shapes():
  """The structure of resnet20's variables, without computing values."""
  model = models.get_model("resnet20", 10, width=2)
  return jax.eval_shape(models.make_init_fn(model, (8, 8, 3)),
                        jax.random.PRNGKey(0))


# ---------------------------------------------------------------- prunable


def test_prunable_per_model():
  params = tiny_params()
  assert P.prunable(params, "mlp") == ("conv/kernel", "dense/kernel")
  assert P.prunable(params, "vgg11") == ("conv/kernel", "dense/kernel")
  assert P.prunable(params, "conv8") == ("conv/kernel", "dense/kernel")
  assert P.prunable(params, "no_such_model") == ("conv/kernel", "dense/kernel")
  assert P.prunable(params, "resnet20") == ("conv/kernel", "dense/kernel",
                                            "head/kernel")
  assert P.prunable({"params": params}, "resnet18")[-1] == "head/kernel"
  with pytest.raises(ValueError, match="model_name"):
    P.prunable(params, None)


def test_prunable_resnet20_structure():
  variables = resnet20_shapes()
  names = P.prunable(variables, "resnet20")
  kernels = [n for n in tree.names(variables) if n.endswith("/kernel")]
  assert list(names) == kernels  # every conv/dense kernel, nothing else
  assert "head/kernel" in names
  assert any(n.endswith("shortcut_conv/kernel") for n in names)
  assert not any("batch_stats" in n or "bn" in n for n in names)
  # A VGG keeps its classifier dense; structure only (eval_shape, no values).
  vgg = models.get_model("vgg11", 10)
  shapes = jax.eval_shape(models.make_init_fn(vgg, (32, 32, 3)),
                          jax.random.PRNGKey(0))
  vgg_names = P.prunable(shapes, "vgg11")
  assert "head/kernel" not in vgg_names and len(vgg_names) == 8


# ---------------------------------------------------------------- masks


def test_ones_mask_apply_and_report():
  params = tiny_params()
  mask = P.ones_mask(params, "mlp")
  assert mask["conv"]["kernel"].shape == (2, 1, 1, 4)
  assert mask["conv"]["kernel"].dtype == jnp.bool_
  assert mask["head"]["kernel"].shape == () and bool(mask["head"]["kernel"])
  assert mask["bn"]["scale"].shape == ()
  chex.assert_trees_all_equal(P.apply_mask(params, mask), params)
  report = P.sparsity_report(mask)
  assert report["overall"] == {"kept": 14, "total": 14, "density": 1.0}
  assert set(report["layers"]) == {"conv/kernel", "dense/kernel"}

  # A hand-made mask: prune conv positions 1, 5 and dense (2, 1).
  conv_m = np.ones(8, bool)
  conv_m[[1, 5]] = False
  dense_m = np.ones((3, 2), bool)
  dense_m[2, 1] = False
  mask = {**mask, "conv": {**mask["conv"], "kernel": conv_m.reshape(2, 1, 1, 4)},
          "dense": {**mask["dense"], "kernel": dense_m}}
  out = P.apply_mask(params, mask)
  expected_conv = np.asarray(params["conv"]["kernel"]).ravel().copy()
  expected_conv[[1, 5]] = 0
  np.testing.assert_array_equal(np.asarray(out["conv"]["kernel"]).ravel(),
                                expected_conv)
  assert not np.signbit(np.asarray(out["conv"]["kernel"])).ravel()[1]  # +0.0
  assert float(out["dense"]["kernel"][2, 1]) == 0.0
  chex.assert_trees_all_equal(out["bn"], params["bn"])
  chex.assert_trees_all_equal(out["head"], params["head"])
  report = P.sparsity_report(mask)
  assert report["layers"]["conv/kernel"] == {"kept": 6, "total": 8,
                                             "density": 0.75}
  assert report["layers"]["dense/kernel"]["kept"] == 5
  assert report["overall"]["kept"] == 11 and report["overall"]["total"] == 14
  assert np.isclose(float(P.density(mask)), 11 / 14)
  # A 0/1 float mask is read the same way.
  float_mask = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), mask)
  chex.assert_trees_all_equal(P.apply_mask(params, float_mask), out)


def test_mask_matched_by_name_and_checked():
  params = tiny_params()
  mask = P.ones_mask(params, "mlp")
  variables = {"params": params, "batch_stats": {"bn": {"mean": jnp.ones(4)}}}
  out = P.apply_mask(variables, mask)  # mask of the params subtree
  chex.assert_trees_all_equal(out, variables)
  with pytest.raises(ValueError, match="lack.*extra/kernel"):
    P.apply_mask(params, {**mask, "extra": {"kernel": jnp.ones(3, bool)}})
  bad = {**mask, "dense": {**mask["dense"], "kernel": jnp.ones((2, 3), bool)}}
  with pytest.raises(ValueError, match=r"dense/kernel \(2, 3\) vs \(3, 2\)"):
    P.apply_mask(params, bad)


# ---------------------------------------------------------------- IMP


def test_prune_count_is_open_lth_ceil():
  for fraction in (0.2, 0.1, 0.3, 0.15, 0.9, 0.123456789):
    for remaining in (0, 1, 4, 5, 11, 14, 999, 272474, 10**7 + 3):
      expected = int(np.ceil(fraction * remaining))
      assert int(P.prune_count(remaining, fraction)) == expected, (
          fraction, remaining)
  for bad in (0, 1, 1.5, -0.2, "0.2", True):
    with pytest.raises(ValueError, match="fraction"):
      P.prune_count(10, bad)


def test_global_prune_by_hand_two_rounds():
  params = tiny_params()
  mask = P.ones_mask(params, "mlp")
  # Round 1: 14 prunable weights (head excluded), ceil(0.2 * 14) = 3 pruned:
  # the three smallest |w| over conv and dense: 0.02 (dense), 0.05 (conv),
  # 0.1 (conv). The head's even smaller weights are not prunable.
  m1 = P.global_magnitude_prune(params, mask, 0.2, model_name="mlp")
  conv = np.ones(8, bool)
  conv[[1, 5]] = False
  dense = np.ones((3, 2), bool)
  dense[2, 1] = False
  np.testing.assert_array_equal(np.asarray(m1["conv"]["kernel"]).ravel(), conv)
  np.testing.assert_array_equal(m1["dense"]["kernel"], dense)
  for name in ("head/kernel", "head/bias", "conv/bias", "bn/scale", "bn/bias"):
    leaf = tree.to_dict(m1)[name]
    assert leaf.shape == () and bool(leaf), name
  assert P.sparsity_report(m1)["overall"]["kept"] == 11
  # Round 2 on new weights: 20% of the REMAINING 11 -> ceil(2.2) = 3. The
  # pruned positions now hold large values; they stay pruned and are not
  # counted. Remaining |w|: conv 0.9 0.5 0.7 0.3 0.8 0.6, dense 0.2 0.4 1.0
  # 0.15 0.35 -> prune 0.15, 0.2, 0.3.
  params2 = dict(params)
  k = np.asarray(params["conv"]["kernel"]).ravel().copy()
  k[[1, 5]] = 5.0
  params2["conv"] = {**params["conv"], "kernel": jnp.asarray(k.reshape(2, 1, 1, 4))}
  d = np.asarray(params["dense"]["kernel"]).copy()
  d[2, 1] = 7.0
  params2["dense"] = {**params["dense"], "kernel": jnp.asarray(d)}
  m2 = P.global_magnitude_prune(params2, m1, 0.2)  # prunable read off the mask
  conv[4] = False
  dense[0, 0] = dense[1, 1] = False
  np.testing.assert_array_equal(np.asarray(m2["conv"]["kernel"]).ravel(), conv)
  np.testing.assert_array_equal(m2["dense"]["kernel"], dense)
  assert P.sparsity_report(m2)["overall"]["kept"] == 8
  # The same with model_name and from a dense start (mask=None).
  chex.assert_trees_all_equal(
      P.global_magnitude_prune(params, None, 0.2, model_name="mlp"), m1)
  # ResNet rules prune the head too: 18 weights, ceil(3.6) = 4 pruned: the
  # head's 0.01, 0.02, 0.03 and dense's 0.02.
  m_res = P.global_magnitude_prune(params, None, 0.2, model_name="resnet20")
  np.testing.assert_array_equal(m_res["head"]["kernel"],
                                [[False, False], [True, False]])
  assert not m_res["dense"]["kernel"][2, 1]
  assert P.sparsity_report(m_res)["overall"] == {
      "kept": 14, "total": 18, "density": 14 / 18}


def test_global_prune_ties_broken_by_leaf_order():
  params = {"a": {"kernel": jnp.array([[0.5, 0.1], [0.3, 0.1]])},
            "b": {"kernel": jnp.array([[0.1, 0.9]])}}
  mask = P.ones_mask(params, "resnet20")
  # 6 weights -> ceil(1.2) = 2 pruned among three ties at 0.1: the first two
  # in leaf order ("a" before "b"), row-major.
  m = P.global_magnitude_prune(params, mask, 0.2)
  np.testing.assert_array_equal(m["a"]["kernel"], [[True, False], [True, False]])
  np.testing.assert_array_equal(m["b"]["kernel"], [[True, True]])


def _random_tree(seed, shapes):
  rng = np.random.default_rng(seed)
  return {name: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
                 "bias": jnp.zeros(s[-1])}
          for name, s in shapes.items()}


SHAPES = {"c1": (3, 3, 2, 8), "c2": (3, 3, 8, 8), "d": (40, 16)}


def test_global_prune_matches_brute_force_and_open_lth():
  params = _random_tree(0, SHAPES)
  mask = P.ones_mask(params, "resnet20")
  for level in range(3):
    names = list(SHAPES)
    w = np.concatenate([np.abs(np.asarray(params[n]["kernel"])).ravel()
                        for n in names])
    keep = np.concatenate([np.asarray(mask[n]["kernel"]).ravel() for n in names])
    count = int(np.ceil(0.2 * keep.sum()))
    # Brute force: the `count` smallest kept |w| (no ties in random floats).
    order = [i for i in np.argsort(w, kind="stable") if keep[i]]
    expected = keep.copy()
    expected[order[:count]] = False
    # open_lth's rule, transcribed: threshold = sorted(kept |w|)[count].
    threshold = np.sort(w[keep])[count]
    expected_lth = keep & (w > threshold)
    new = prune(params, mask, fraction=0.2)
    new_lth = prune(params, mask, fraction=0.2, open_lth_threshold=True)
    got = np.concatenate([np.asarray(new[n]["kernel"]).ravel() for n in names])
    got_lth = np.concatenate([np.asarray(new_lth[n]["kernel"]).ravel()
                              for n in names])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_lth, expected_lth)
    assert keep.sum() - got.sum() == count
    assert keep.sum() - got_lth.sum() == count + 1
    mask = new
    params = _random_tree(level + 1, SHAPES)  # the next level's final weights


def test_global_prune_jit_and_vmap_over_replicas():
  trees = [_random_tree(s, SHAPES) for s in range(3)]
  mask = P.ones_mask(trees[0], "resnet20")
  one_by_one = [prune(t, mask, fraction=0.2) for t in trees]  # jitted
  chex.assert_trees_all_equal(P.global_magnitude_prune(trees[1], mask, 0.2),
                              one_by_one[1])  # eager = jitted
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *trees)
  masks = jax.vmap(lambda p: P.global_magnitude_prune(p, mask, 0.2))(stacked)
  for r in range(3):
    chex.assert_trees_all_equal(jax.tree.map(lambda x, r=r: x[r], masks),
                                one_by_one[r])
  densities = jax.vmap(P.density)(masks)
  np.testing.assert_allclose(densities, [P.density(m) for m in one_by_one])


def test_global_prune_errors():
  params = tiny_params()
  with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
    P.global_magnitude_prune(params, None, 1.0, model_name="mlp")
  with pytest.raises(ValueError, match="model_name"):
    P.global_magnitude_prune(params, None, 0.2)
  only_head = {"head": params["head"]}
  with pytest.raises(ValueError, match="no prunable weights"):
    P.global_magnitude_prune(only_head, None, 0.2, model_name="mlp")


# ---------------------------------------------------------------- random


def test_random_prune_keeps_per_layer_counts():
  params = _random_tree(0, SHAPES)
  mask = P.ones_mask(params, "mlp")  # "d" is not the head: all prunable
  for _ in range(2):
    mask = prune(params, mask, fraction=0.2)
  rand = P.random_prune_like(mask, jax.random.PRNGKey(1))
  imp = P.sparsity_report(mask)["layers"]
  rnd = P.sparsity_report(rand)["layers"]
  assert rnd == imp  # per-layer kept counts identical
  assert imp["c1/kernel"]["kept"] < imp["c1/kernel"]["total"]
  for name in SHAPES:
    assert not np.array_equal(rand[name]["kernel"], mask[name]["kernel"])
    assert rand[name]["bias"].shape == () and bool(rand[name]["bias"])
  chex.assert_trees_all_equal(P.random_prune_like(mask, jax.random.PRNGKey(1)),
                              rand)
  other = P.random_prune_like(mask, jax.random.PRNGKey(2))
  assert not np.array_equal(other["d"]["kernel"], rand["d"]["kernel"])
  # vmapped over keys: each replica keeps the counts.
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  many = jax.vmap(lambda k: P.random_prune_like(mask, k))(keys)
  np.testing.assert_array_equal(
      np.asarray(many["c2"]["kernel"]).reshape(4, -1).sum(1),
      imp["c2/kernel"]["kept"])
