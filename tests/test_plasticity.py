"""Plasticity diagnostics on hand-made trees."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wsjax.analysis import plasticity as P


def test_dead_relu_fraction_by_hand():
  # conv: (N=2, L=2, units=3): unit 0 fires once, unit 1 never (<= 0
  # everywhere), unit 2 only at one spatial position of one example.
  conv = jnp.array([[[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]],
                    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.5]]])
  # dense: (N=2, units=4): units 1 and 3 dead.
  dense = jnp.array([[0.0, 0.0, 2.0, -3.0],
                     [1.0, 0.0, 0.0, 0.0]])
  sown = {"activations": {"block": {"conv_out": (conv,)},
                          "dense_out": (dense,)}}
  out = P.dead_relu_fraction(sown)
  assert set(out) == {"block/conv_out", "dense_out", "overall"}
  np.testing.assert_allclose(out["block/conv_out"], 1 / 3)
  np.testing.assert_allclose(out["dense_out"], 2 / 4)
  np.testing.assert_allclose(out["overall"], 3 / 7)  # unit-weighted
  # The inner dict works too, and under jit.
  jitted = jax.jit(P.dead_relu_fraction)(sown["activations"])
  chex.assert_trees_all_close(jitted, out)
  # A layer sown twice: one entry per call.
  twice = P.dead_relu_fraction({"d": (dense, jnp.ones((2, 4)))})
  np.testing.assert_allclose(twice["d/0"], 0.5)
  np.testing.assert_allclose(twice["d/1"], 0.0)


def test_dead_relu_fraction_on_sown_linen_activations():

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      h = nn.relu(nn.Dense(5)(x))
      self.sow("activations", "relu_0", h)
      return nn.Dense(2)(h)

  net = Net()
  x = jnp.ones((3, 4))
  variables = net.init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  # Kill units 0 and 3: zero incoming weights, negative bias.
  k = params["Dense_0"]["kernel"].at[:, jnp.array([0, 3])].set(0.0)
  b = params["Dense_0"]["bias"].at[jnp.array([0, 3])].set(-1.0)
  b = b.at[jnp.array([1, 2, 4])].set(100.0)  # the others are alive
  params = {**params, "Dense_0": {"kernel": k, "bias": b}}
  _, state = net.apply({"params": params}, x, train=False,
                       mutable=["activations"])
  out = P.dead_relu_fraction(state)
  np.testing.assert_allclose(out["relu_0"], 2 / 5)
  np.testing.assert_allclose(out["overall"], 2 / 5)


def test_param_norm_and_distance():
  a = {"l": {"kernel": jnp.array([[3.0, 0.0], [0.0, 0.0]]),
             "bias": jnp.array([4.0, 0.0])},
       "step": jnp.array(7, jnp.int32)}  # integer leaves are ignored
  b = {"l": {"kernel": jnp.zeros((2, 2)), "bias": jnp.array([4.0, 1.0])},
       "step": jnp.array(0, jnp.int32)}
  np.testing.assert_allclose(P.param_norm(a), 5.0)
  np.testing.assert_allclose(P.param_distance(a, b), np.sqrt(9.0 + 1.0))
  np.testing.assert_allclose(jax.jit(P.param_distance)(a, a), 0.0)


def test_cosine_histograms():
  cos = {"conv/kernel": jnp.array([[-1.0, -0.4], [0.1, 0.6]]),
         "lin/bias": jnp.array(0.9)}
  out = P.cosine_histograms(cos, bins=4)  # edges -1, -.5, 0, .5, 1
  counts, edges = out["conv/kernel"]
  np.testing.assert_allclose(edges, [-1.0, -0.5, 0.0, 0.5, 1.0])
  np.testing.assert_array_equal(counts, [1, 1, 1, 1])
  np.testing.assert_array_equal(out["lin/bias"][0], [0, 0, 0, 1])
  np.testing.assert_array_equal(out["overall"][0], [1, 1, 1, 2])
  custom = P.cosine_histograms(cos, bins=jnp.array([-1.0, 0.0, 1.0]))
  np.testing.assert_array_equal(custom["overall"][0], [2, 3])
