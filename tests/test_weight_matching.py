"""Tests of Git Re-Basin weight matching (wsjax.transfer.weight_matching):
recovery of a known permutation, the assignment step against brute force,
monotone objective, several pairs, seeded sweep order, errors.

Trees here are plain dicts of random arrays shaped like small models'
variables (the matcher only reads names and shapes), built with numpy.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax import models, tree
from wsjax.transfer import (PermutationSpec, apply_permutation, cost_matrix, identity_perms,
                            invert, matching_objective, random_perms, stack_pairs,
                            weight_matching)


def random_like(shapes, seed):
  """A tree of standard normal arrays with the structure of `shapes`."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


def model_shapes(name, shape, classes=10, **options):
  model = models.get_model(name, classes, **options)
  return jax.eval_shape(models.make_init_fn(model, shape), jax.random.key(0))


def mlp(widths, inputs=10, classes=4):
  shapes = model_shapes("mlp", (inputs,), classes, widths=tuple(widths))
  return PermutationSpec.for_model("mlp", shapes), shapes


def same(p, q):
  return set(p) == set(q) and all(np.array_equal(p[k], q[k]) for k in p)


def objective_by_hand(a, b):
  return sum(float(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_recovers_a_known_permutation_exactly():
  """b = q(a): matching b to a finds invert(q), and L = ||a||^2."""
  spec, shapes = mlp((24, 16, 12), inputs=20)
  a = random_like(shapes, 0)
  q = random_perms(spec, jax.random.key(1))
  b = apply_permutation(spec, q, a)
  perms, info = weight_matching(spec, a, b, key=jax.random.key(2))
  assert same(perms, invert(q))
  assert info.converged and info.sweeps >= 2 and len(info.objective) == info.sweeps + 1
  np.testing.assert_allclose(info.objective[-1], objective_by_hand(a, a), rtol=1e-5)
  assert info.objective[0] < 0.5 * info.objective[-1]
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
               apply_permutation(spec, perms, b), a)
  assert info.cost_s > 0 and info.assign_s > 0


def test_assignment_against_brute_force():
  """One hidden layer of 5 units: a single permutation, so one assignment
  is the global optimum over all 120; and C is L's linear part: L(pi) -
  sum_j C[j, pi[j]] is the same constant for every pi."""
  spec, shapes = mlp((5,), inputs=3, classes=2)
  a, b = random_like(shapes, 3), random_like(shapes, 4)
  objective = jax.jit(functools.partial(matching_objective, spec))
  all_perms = [np.array(p) for p in itertools.permutations(range(5))]
  values = np.array([float(objective({"dense1": jnp.asarray(p)}, a, b)) for p in all_perms])
  perms, info = weight_matching(spec, a, b, key=jax.random.key(0))
  best = all_perms[int(np.argmax(values))]
  np.testing.assert_array_equal(perms["dense1"], best)
  np.testing.assert_allclose(info.objective[-1], values.max(), rtol=1e-6)
  c = np.asarray(cost_matrix(spec, "dense1", identity_perms(spec), a, b), np.float64)
  linear = np.array([c[np.arange(5), p].sum() for p in all_perms])
  np.testing.assert_allclose(values - linear, (values - linear)[0], atol=1e-5)
  assert np.ptp(linear) > 1.0  # not a constant


def test_two_permutations_end_coordinatewise_optimal():
  """Widths (4, 3): at the result no change of one permutation (the other
  held) improves L (brute force over 24 and 6), and L >= L(identity)."""
  spec, shapes = mlp((4, 3), inputs=3, classes=2)
  a, b = random_like(shapes, 5), random_like(shapes, 6)
  objective = jax.jit(functools.partial(matching_objective, spec))
  perms, info = weight_matching(spec, a, b, key=jax.random.key(1))
  found = float(objective(perms, a, b))
  assert found >= float(objective(identity_perms(spec), a, b)) - 1e-6
  for name, n in spec.sizes.items():
    for p in itertools.permutations(range(n)):
      other = {**perms, name: jnp.asarray(p, jnp.int32)}
      assert float(objective(other, a, b)) <= found + 1e-5
  np.testing.assert_allclose(info.objective[-1], found, rtol=1e-6)


def test_flattened_cost_matrix_is_the_linear_part():
  """conv1d's head reads the conv3 units through a flattened axis: C of
  conv3 is still L's linear part (brute force over 4! permutations)."""
  shapes = model_shapes("conv1d", (40, 1), channels=4)
  spec = PermutationSpec.for_model("conv1d", shapes)
  a, b = random_like(shapes, 7), random_like(shapes, 8)
  others = random_perms(spec, jax.random.key(3))
  c = np.asarray(cost_matrix(spec, "conv3", others, a, b), np.float64)
  objective = jax.jit(functools.partial(matching_objective, spec))
  diffs = []
  for p in itertools.permutations(range(4)):
    value = float(objective({**others, "conv3": jnp.asarray(p, jnp.int32)}, a, b))
    diffs.append(value - c[np.arange(4), list(p)].sum())
  np.testing.assert_allclose(diffs, diffs[0], atol=1e-4)


@pytest.mark.parametrize("name,options,shape", [
    ("resnet20", {"width": 4}, (32, 32, 3)),
    ("conv8", {"width": 2, "last_pool": 2}, (32, 32, 3)),
])
def test_objective_never_decreases(name, options, shape):
  shapes = model_shapes(name, shape, **options)
  spec = PermutationSpec.for_model(name, shapes)
  a, b = random_like(shapes, 9), random_like(shapes, 10)
  perms, info = weight_matching(spec, a, b, key=jax.random.key(4), max_sweeps=20)
  history = np.array(info.objective)
  assert history[-1] > history[0]
  scale = np.abs(history).max()
  assert np.all(np.diff(history) >= -1e-6 * scale)
  # Only parameters enter L by default: L is the inner product over params.
  params_only = {"params": a["params"]}, {"params": apply_permutation(spec, perms, b)["params"]}
  np.testing.assert_allclose(history[-1], objective_by_hand(*params_only), rtol=1e-5)


def test_batch_stats_enter_only_when_included():
  shapes = model_shapes("vgg11_bn", (32, 32, 3))
  spec = PermutationSpec.for_model("vgg11_bn", shapes)
  a, b = random_like(shapes, 11), random_like(shapes, 12)
  ident = identity_perms(spec)
  default = float(matching_objective(spec, ident, a, b))
  everything = float(matching_objective(spec, ident, a, b, include=lambda name: True))
  np.testing.assert_allclose(default, objective_by_hand(a["params"], b["params"]), rtol=1e-5)
  np.testing.assert_allclose(everything - default,
                             objective_by_hand(a["batch_stats"], b["batch_stats"]), rtol=1e-4)


def test_several_pairs_sum():
  """Stacked pairs: L and C are sums of the single-pair ones; matching two
  copies of one pair finds the same permutations; matching pairs (a_i,
  q(a_i)) recovers invert(q); zero pairs (padding) change nothing."""
  spec, shapes = mlp((8, 6), inputs=5)
  pairs = [(random_like(shapes, 20 + i), random_like(shapes, 30 + i)) for i in range(3)]
  a, b = stack_pairs(pairs)
  perms = random_perms(spec, jax.random.key(5))
  single = [float(matching_objective(spec, perms, x, y)) for x, y in pairs]
  np.testing.assert_allclose(float(matching_objective(spec, perms, a, b, stacked=True)),
                             sum(single), rtol=1e-5)
  for name in spec.sizes:
    want = sum(np.asarray(cost_matrix(spec, name, perms, x, y)) for x, y in pairs)
    np.testing.assert_allclose(cost_matrix(spec, name, perms, a, b, stacked=True), want,
                               rtol=1e-5, atol=1e-5)

  one, _ = weight_matching(spec, *pairs[0], key=jax.random.key(6))
  twice, _ = weight_matching(spec, *stack_pairs([pairs[0], pairs[0]]), stacked=True,
                             key=jax.random.key(6))
  assert same(one, twice)

  q = random_perms(spec, jax.random.key(7))
  targets = [random_like(shapes, 40 + i) for i in range(2)]
  copies = [(t, apply_permutation(spec, q, t)) for t in targets]
  zero = jax.tree.map(jnp.zeros_like, targets[0])
  found, info = weight_matching(spec, *stack_pairs(copies), stacked=True, key=jax.random.key(8))
  padded, info_padded = weight_matching(spec, *stack_pairs(copies + [(zero, zero)]),
                                        stacked=True, key=jax.random.key(8))
  assert same(found, invert(q)) and same(padded, found)
  np.testing.assert_allclose(info.objective[-1], sum(objective_by_hand(t, t) for t in targets),
                             rtol=1e-5)
  np.testing.assert_allclose(info_padded.objective, info.objective, rtol=1e-6)


def test_sweep_order_is_seeded():
  spec, shapes = mlp((5, 5, 5, 5, 5, 5), inputs=4)
  a, b = random_like(shapes, 13), random_like(shapes, 14)
  first, info1 = weight_matching(spec, a, b, key=jax.random.key(0), max_sweeps=3)
  again, info2 = weight_matching(spec, a, b, key=jax.random.key(0), max_sweeps=3)
  _, info3 = weight_matching(spec, a, b, key=jax.random.key(1), max_sweeps=3)
  assert info1.order == info2.order and same(first, again)
  assert info1.objective == info2.objective
  assert info1.order[0] != info3.order[0]
  for order in info1.order + info3.order:
    assert sorted(order) == sorted(spec.sizes)
  want = [sorted(spec.sizes)[i] for i in
          np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(1), 0), 6))]
  assert list(info3.order[0]) == want


def test_init_perms_and_stopping():
  spec, shapes = mlp((6, 5))
  a = random_like(shapes, 15)
  q = random_perms(spec, jax.random.key(9))
  b = apply_permutation(spec, q, a)
  perms, info = weight_matching(spec, a, b, key=jax.random.key(0), init_perms=invert(q))
  assert same(perms, invert(q)) and info.sweeps == 1 and info.converged
  _, info = weight_matching(spec, a, b, key=jax.random.key(0), max_sweeps=1, tol=0.0)
  assert info.sweeps == 1 and not info.converged
  perms, info = weight_matching(spec, a, b, key=jax.random.key(0), max_sweeps=0)
  assert same(perms, identity_perms(spec)) and info.sweeps == 0 and len(info.objective) == 1


def test_errors():
  spec, shapes = mlp((6, 5))
  a, b = random_like(shapes, 16), random_like(shapes, 17)
  with pytest.raises(ValueError, match="is not a permutation of 0..5"):
    weight_matching(spec, a, b, key=jax.random.key(0),
                    init_perms={"dense1": jnp.zeros(6, jnp.int32), "dense2": jnp.arange(5)})
  with pytest.raises(ValueError, match="perms do not match the spec"):
    weight_matching(spec, a, b, key=jax.random.key(0), init_perms={"dense1": jnp.arange(6)})
  other = tree.map_named(lambda n, w: w[:3] if n == "dense1/bias" else w, b)
  with pytest.raises(ValueError, match="tree does not fit the permutation spec: dense1/bias "
                     "axis 0: size 3"):
    weight_matching(spec, a, other, key=jax.random.key(0))
  other = tree.map_named(lambda n, w: w[:3] if n == "head/bias" else w, b)
  with pytest.raises(ValueError, match=r"differ in shape at \['head/bias'\]"):
    weight_matching(spec, a, other, key=jax.random.key(0))
  headless = {"params": {k: v for k, v in b["params"].items() if k != "head"}}
  with pytest.raises(ValueError, match="different leaves"):
    weight_matching(spec, a, headless, key=jax.random.key(0))
  with pytest.raises(ValueError, match="stack_pairs needs at least one"):
    stack_pairs([])
