"""wsjax.analysis.curves: coefficients, bends, phi(t), the curve loss and its gradients."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from wsjax import losses
from wsjax import models
from wsjax.analysis import curves
from wsjax.models import layers

TS = np.linspace(0.0, 1.0, 37)


class TinyBN(nn.Module):
  """Dense -> BatchNorm -> ReLU -> Dense(head): a curve over BatchNorm affine too."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6, name="dense1")(x)
    x = layers.batch_norm(train, "torch", name="bn1")(x)
    x = nn.relu(x)
    return nn.Dense(3, name=layers.HEAD)(x)


@pytest.fixture(scope="module")
def tiny_bn():
  """(model, variables at one end, at the other, x, y)."""
  model = TinyBN()
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 4))))
  variables = [init(jax.random.key(s)) for s in (0, 1)]
  # Distinct BatchNorm affine parameters at the two ends (init gives 1 / 0 for both).
  for i, v in enumerate(variables):
    bn = v["params"]["bn1"]
    v["params"]["bn1"] = {"scale": bn["scale"] + 0.5 * (i + 1), "bias": bn["bias"] - 0.25 * (i + 1)}
  x = jax.random.normal(jax.random.key(7), (16, 4))
  y = jnp.arange(16) % 3
  return model, variables[0], variables[1], x, y


def _random_bends(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"a": {"kernel": jnp.asarray(rng.normal(size=(n, 3, 2)), jnp.float32)},
          "b": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)}


def _pairs(a, b):
  """Corresponding leaves of two trees of one structure."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _bernstein64(t, n):
  return np.array([math.comb(n - 1, k) * t ** k * (1 - t) ** (n - 1 - k) for k in range(n)])


def _hat64(t, n):
  """The piecewise-linear interpolation weights of bends 0..n-1 at t, by hand."""
  c = np.zeros(n)
  position = t * (n - 1)
  left = min(int(np.floor(position)), n - 2)
  frac = position - left
  c[left], c[left + 1] = 1 - frac, frac
  return c


# ---- coefficients --------------------------------------------------------------------
@pytest.mark.parametrize("kind", curves.KINDS)
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_coefficients_sum_to_one_and_are_nonnegative(kind, n):
  c = np.asarray(jax.vmap(lambda t: curves.coefficients(kind, t, n))(jnp.asarray(TS)))
  assert c.shape == (len(TS), n)
  np.testing.assert_allclose(c.sum(-1), 1.0, rtol=0, atol=1e-6)
  assert (c >= 0).all()


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_coefficients_against_brute_force(n):
  bez = np.asarray(curves.coefficients("bezier", jnp.asarray(TS), n))
  hat = np.asarray(curves.coefficients("polychain", jnp.asarray(TS), n))
  np.testing.assert_allclose(bez, [_bernstein64(t, n) for t in TS], atol=1e-6)
  np.testing.assert_allclose(hat, [_hat64(t, n) for t in TS], atol=1e-6)
  # a hand value: n=3, t=1/4: Bezier (9/16, 6/16, 1/16), chain (1/2, 1/2, 0)
  if n == 3:
    np.testing.assert_allclose(curves.coefficients("bezier", 0.25, 3), [9 / 16, 6 / 16, 1 / 16], atol=1e-7)
    np.testing.assert_allclose(curves.coefficients("polychain", 0.25, 3), [0.5, 0.5, 0.0], atol=1e-7)


@pytest.mark.parametrize("kind", curves.KINDS)
def test_coefficients_exact_at_the_endpoints_under_jit(kind):
  f = jax.jit(lambda t: curves.coefficients(kind, t, 4))
  np.testing.assert_array_equal(f(0.0), [1, 0, 0, 0])
  np.testing.assert_array_equal(f(1.0), [0, 0, 0, 1])


# ---- bends and phi -------------------------------------------------------------------
@pytest.mark.parametrize("kind", curves.KINDS)
def test_phi_is_exactly_the_endpoints_at_t_0_and_1(kind):
  bends = _random_bends(4)
  for t, k in ((0.0, 0), (1.0, -1)):
    point = jax.jit(lambda b, s: curves.phi(b, s, kind))(bends, t)
    for p, b in _pairs(point, bends):
      np.testing.assert_array_equal(p, b[k])


@pytest.mark.parametrize("kind", curves.KINDS)
@pytest.mark.parametrize("n", [3, 4, 5])
def test_evenly_spaced_bends_give_linear_interpolation(kind, n):
  two = _random_bends(2, seed=3)
  start, end = jax.tree.map(lambda x: x[0], two), jax.tree.map(lambda x: x[1], two)
  bends = curves.init_bends(start, end, n)
  points = curves.phi(bends, jnp.asarray(TS), kind)
  for i, t in enumerate(TS):
    for p, a, b in zip(jax.tree.leaves(points), jax.tree.leaves(start), jax.tree.leaves(end)):
      expected = (1 - t) * np.asarray(a, np.float64) + t * np.asarray(b, np.float64)
      np.testing.assert_allclose(p[i], expected, rtol=0, atol=2e-6)


def test_init_bends_places_the_middle_bends_on_the_segment():
  start = {"w": jnp.array([0.0, 1.0]), "v": jnp.array(2.0)}
  end = {"w": jnp.array([3.0, -5.0]), "v": jnp.array(-1.0)}
  bends = curves.init_bends(start, end, 4)
  np.testing.assert_allclose(bends["w"], [[0, 1], [1, -1], [2, -3], [3, -5]], atol=1e-6)
  np.testing.assert_allclose(bends["v"], [2, 1, 0, -1], atol=1e-6)
  np.testing.assert_array_equal(bends["w"][-1], end["w"])


def test_polychain_passes_through_every_bend_and_bezier_does_not():
  bends = _random_bends(4, seed=5)
  for k in range(4):
    point = curves.phi(bends, k / 3, "polychain")
    for p, b in _pairs(point, bends):
      np.testing.assert_allclose(p, b[k], atol=1e-6)
  middle = curves.phi(bends, 1 / 3, "bezier")
  assert not np.allclose(middle["b"], bends["b"][1], atol=1e-3)


@pytest.mark.parametrize("kind", curves.KINDS)
def test_phi_over_an_array_of_ts_equals_vmap_and_one_by_one(kind):
  bends = _random_bends(3, seed=2)
  ts = jnp.asarray(TS[::4], jnp.float32)
  stacked = curves.phi(bends, ts, kind)
  vmapped = jax.vmap(lambda t: curves.phi(bends, t, kind))(ts)
  phi_one = jax.jit(lambda t: curves.phi(bends, t, kind))
  for i, t in enumerate(ts):
    one = phi_one(t)
    for s, o in _pairs(stacked, one):
      np.testing.assert_allclose(s[i], o, rtol=1e-6, atol=1e-7)
  jax.tree.map(lambda s, v: np.testing.assert_allclose(s, v, rtol=1e-6, atol=1e-7), stacked, vmapped)
  assert stacked["a"]["kernel"].shape == (len(ts), 3, 2)


def test_phi_against_a_hand_sum():
  bends = _random_bends(3, seed=9)
  t = 0.3
  got = curves.phi(bends, t, "bezier")["b"]
  b = np.asarray(bends["b"], np.float64)
  expected = 0.49 * b[0] + 0.42 * b[1] + 0.09 * b[2]
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_split_and_join_are_inverse():
  bends = _random_bends(5)
  middle, endpoints = curves.split_bends(bends)
  assert middle["b"].shape == (3, 5) and endpoints["b"].shape == (2, 5)
  np.testing.assert_array_equal(endpoints["b"][1], bends["b"][4])
  joined = curves.join_bends(middle, endpoints)
  jax.tree.map(np.testing.assert_array_equal, joined, bends)


def test_evaluation_ts():
  ts = np.asarray(curves.evaluation_ts())
  assert ts.shape == (61,) and ts[0] == 0.0 and ts[-1] == 1.0
  np.testing.assert_allclose(np.diff(ts), 1 / 60, rtol=1e-5)
  np.testing.assert_allclose(curves.evaluation_ts(5), [0, 0.25, 0.5, 0.75, 1.0])


# ---- the loss and its gradients ------------------------------------------------------
def test_l2_at_against_a_hand_computation(tiny_bn):
  model, va, vb, _, _ = tiny_bn
  curve = curves.Curve("bezier", 3)
  middle, endpoints = curve.init(va["params"], vb["params"])
  middle = jax.tree.map(lambda m: m + 0.1, middle)  # off the segment
  t, wd = 0.3, 5e-4
  c = _bernstein64(t, 3)
  total = weighted = 0.0
  for name in ("dense1/kernel", "dense1/bias", "bn1/scale", "bn1/bias", "head/kernel", "head/bias"):
    layer, leaf = name.split("/")
    bends = [np.asarray(va["params"][layer][leaf], np.float64),
             np.asarray(middle[layer][leaf][0], np.float64),
             np.asarray(vb["params"][layer][leaf], np.float64)]
    point = sum(ck * b for ck, b in zip(c, bends))
    total += np.sum(point ** 2)
    weighted += sum(ck * np.sum(b ** 2) for ck, b in zip(c, bends))
  expected = 0.5 * wd * total
  params_t = jax.jit(curve.phi)(middle, endpoints, t)
  np.testing.assert_allclose(curves.l2_at(params_t, wd), expected, rtol=1e-5)
  # running statistics are not curve parameters
  with_stats = {"params": params_t, "batch_stats": jax.tree.map(lambda s: s + 3.0, va["batch_stats"])}
  np.testing.assert_allclose(curves.l2_at(with_stats, wd), expected, rtol=1e-5)
  # the norm of the point, not the coefficient-weighted norms of the bends
  assert not np.isclose(float(curves.l2_at(params_t, wd)), 0.5 * wd * weighted, rtol=1e-2)


def test_curve_loss_is_cross_entropy_at_phi_plus_l2_and_updates_batch_stats(tiny_bn):
  model, va, vb, x, y = tiny_bn
  curve = curves.Curve("polychain", 4)
  middle, endpoints = curve.init(va["params"], vb["params"])
  t, wd = 0.6, 1e-3
  loss, aux = jax.jit(lambda m, e, s: curve.loss(model, m, e, s, x, y, t, wd))(
      middle, endpoints, va["batch_stats"])
  params_t = jax.jit(curve.phi)(middle, endpoints, t)
  logits, updated = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      {"params": params_t, "batch_stats": va["batch_stats"]})
  ce = losses.cross_entropy(logits, y)
  np.testing.assert_allclose(aux.cross_entropy, ce, rtol=1e-5)
  np.testing.assert_allclose(aux.l2, curves.l2_at(params_t, wd), rtol=1e-6)
  np.testing.assert_allclose(loss, ce + curves.l2_at(params_t, wd), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               aux.batch_stats, updated["batch_stats"])
  assert not np.allclose(aux.batch_stats["bn1"]["mean"], va["batch_stats"]["bn1"]["mean"])


def test_gradients_reach_the_middle_bends_only_by_the_chain_rule(tiny_bn):
  model, va, vb, x, y = tiny_bn
  curve = curves.Curve("bezier", 3)
  middle, endpoints = curve.init(va["params"], vb["params"])
  t, wd = 0.35, 1e-2

  def loss(m, e):
    return curve.loss(model, m, e, va["batch_stats"], x, y, t, wd)[0]

  g_middle, g_ends = jax.jit(jax.grad(loss, argnums=(0, 1)))(middle, endpoints)
  for g in jax.tree.leaves(g_ends):
    np.testing.assert_array_equal(g, 0.0)
  # dL/dtheta_1 = c_1(t) * dL/dphi at phi(t) (c_1 = 2 t (1 - t))
  params_t = jax.jit(curve.phi)(middle, endpoints, t)

  def loss_at_point(p):
    logits, _ = model.apply({"params": p, "batch_stats": va["batch_stats"]}, x, train=True,
                            mutable=["batch_stats"])
    return losses.cross_entropy(logits, y) + curves.l2_at(p, wd)

  g_point = jax.jit(jax.grad(loss_at_point))(params_t)
  c1 = 2 * t * (1 - t)
  jax.tree.map(lambda gm, gp: np.testing.assert_allclose(gm[0], c1 * gp, rtol=1e-4, atol=1e-7),
               g_middle, g_point)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_middle))


def test_curve_loss_vmaps_over_per_replica_t_and_wd():
  model = models.get_model("mlp", 3, widths=(5,))
  init = jax.jit(models.make_init_fn(model, (4,)))
  pa, pb = (init(jax.random.key(s))["params"] for s in (0, 1))
  curve = curves.Curve("bezier", 3)
  middle, endpoints = jax.jit(curve.init)(pa, pb)
  middle = jax.tree.map(lambda m: m + 0.05, middle)
  x = jax.random.normal(jax.random.key(2), (8, 4))
  y = jnp.arange(8) % 3
  ts = jnp.array([0.1, 0.5, 0.9])
  wds = jnp.array([0.0, 1e-3, 1e-2])

  def loss(t, wd):
    return curve.loss(model, middle, endpoints, {}, x, y, t, wd)[0]

  batched = jax.jit(jax.vmap(loss))(ts, wds)
  one_by_one = [jax.jit(loss)(t, wd) for t, wd in zip(ts, wds)]
  np.testing.assert_allclose(batched, one_by_one, rtol=1e-5)


# ---- errors --------------------------------------------------------------------------
def test_user_errors_are_one_line_value_errors():
  with pytest.raises(ValueError, match="unknown curve kind 'spline'"):
    curves.Curve("spline", 3)
  with pytest.raises(ValueError, match=">= 2"):
    curves.coefficients("bezier", 0.5, 1)
  with pytest.raises(ValueError, match="b: missing in end"):
    curves.init_bends({"a": jnp.zeros(2), "b": jnp.zeros(3)}, {"a": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"a: end \(3,\) vs start \(2,\)"):
    curves.init_bends({"a": jnp.zeros(2)}, {"a": jnp.zeros(3)})
  middle, endpoints = curves.Curve("bezier", 4).init({"a": jnp.zeros(2)}, {"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="this curve has 3 bends"):
    curves.Curve("bezier", 3).phi(middle, endpoints, 0.5)
  with pytest.raises(ValueError, match="leading bend axis"):
    curves.phi({"a": jnp.zeros((3, 2)), "b": jnp.zeros((4, 2))}, 0.5)
  with pytest.raises(ValueError, match="n_points"):
    curves.evaluation_ts(1)
