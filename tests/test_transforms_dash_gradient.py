"""dash_gradient: equals a per-chunk Python loop, under jit, vmap, sub-batching
and on 8 simulated devices."""
import json
import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsjax import transforms as T

N_CHUNKS, CHUNK, LENGTH, IN, CLASSES = 4, 12, 6, 2, 3


class Toy(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3,))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(CLASSES)(x)


def make_problem(seed=0):
  kx, ky, kp, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
  n = N_CHUNKS * CHUNK + 5  # a few examples that belong to no chunk
  x = jax.random.normal(kx, (n, LENGTH, IN))
  y = jax.random.randint(ky, (n,), 0, CLASSES)
  model = Toy()
  variables = model.init(kp, x[:2])
  variables = {"params": variables["params"],
               "batch_stats": {"BatchNorm_0": {
                   "mean": 0.1 * jnp.ones(4), "var": 2.0 * jnp.ones(4)}}}
  chunks = jax.random.permutation(kc, n)[:N_CHUNKS * CHUNK].reshape(
      N_CHUNKS, CHUNK)

  def loss_fn(params, xb, yb):  # eval mode: BN on running statistics
    logits = model.apply({"params": params,
                          "batch_stats": variables["batch_stats"]}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  return loss_fn, variables["params"], x, y, chunks


def loop_reference(loss_fn, params, x, y, chunks, alpha):
  """The official code's loop: zero-initialized EMA over chunks in order."""
  m = jax.tree.map(jnp.zeros_like, params)
  grad_fn = jax.jit(jax.grad(loss_fn))
  for idx in np.asarray(chunks):
    g = grad_fn(params, x[idx], y[idx])
    m = jax.tree.map(lambda a, b: (1 - alpha) * a + alpha * b, m, g)
  return m


def test_dash_gradient_equals_python_loop():
  loss_fn, params, x, y, chunks = make_problem()
  ref = loop_reference(loss_fn, params, x, y, chunks, 0.3)
  got = jax.jit(lambda p, c: T.dash_gradient(loss_fn, p, x, y, c, 0.3))(
      params, chunks)
  chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-7)
  # Newest chunk weighs alpha, the oldest alpha * (1 - alpha)**(n - 1).
  grad_fn = jax.jit(jax.grad(loss_fn))
  grads = [grad_fn(params, x[i], y[i]) for i in np.asarray(chunks)]
  w = [0.3 * 0.7 ** (N_CHUNKS - 1 - c) for c in range(N_CHUNKS)]
  manual = jax.tree.map(lambda *gs: sum(wc * g for wc, g in zip(w, gs)),
                        *grads)
  chex.assert_trees_all_close(got, manual, rtol=1e-5, atol=1e-7)
  # Sub-batches of at most 5 (12 = 5 + 5 + 2) give the same gradient.
  sub = T.dash_gradient(loss_fn, params, x, y, chunks, 0.3, max_batch=5)
  chex.assert_trees_all_close(sub, ref, rtol=1e-5, atol=1e-7)
  sub = T.dash_gradient(loss_fn, params, x, y, chunks, 0.3, max_batch=4)
  chex.assert_trees_all_close(sub, ref, rtol=1e-5, atol=1e-7)


def test_dash_gradient_vmaps_over_seeds_and_feeds_dash():
  loss_fn, params, x, y, chunks = make_problem()
  other = make_problem(seed=1)[1]
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other)
  got = jax.jit(jax.vmap(
      lambda p: T.dash_gradient(loss_fn, p, x, y, chunks)))(stacked)
  for i, p in enumerate((params, other)):
    ref = loop_reference(loss_fn, p, x, y, chunks, 0.3)
    chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], got), ref,
                                rtol=1e-5, atol=1e-7)
  # The result is a gradient: DASH shrinks with the descent direction.
  g = T.dash_gradient(loss_fn, params, x, y, chunks)
  new = T.apply_transform(T.dash(), params, grads=g)
  cos = T.dash_cosines(params, g)
  scale = np.clip(np.asarray(cos["Dense_0/kernel"]), 0.3, 1.0)
  np.testing.assert_allclose(new["Dense_0"]["kernel"],
                             params["Dense_0"]["kernel"] * scale, rtol=1e-5,
                             atol=1e-7)


_MULTI_DEVICE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {tests!r})
    from test_transforms_dash_gradient import make_problem, loop_reference
    from wsjax import parallel
    from wsjax.transforms import dash_gradient

    loss_fn, params, x, y, chunks = make_problem()
    chunks = jnp.concatenate([chunks, chunks[:, :4]], axis=1)  # 16 = 8 * 2
    ref = loop_reference(loss_fn, params, x, y, chunks, 0.3)
    one = jax.jit(lambda p, x, y, c: dash_gradient(loss_fn, p, x, y, c))(
        params, x, y, chunks)
    rep = parallel.replicated()
    xs, ys, ps = (parallel.put(t, rep) for t in (x, y, params))
    cs = parallel.put(chunks, parallel.sharded_along(1))
    fn = jax.jit(lambda p, x, y, c: dash_gradient(loss_fn, p, x, y, c))
    many = fn(ps, xs, ys, cs)
    sub = jax.jit(lambda p, x, y, c: dash_gradient(
        loss_fn, p, x, y, c, max_batch=8))(ps, xs, ys, cs)
    diff = lambda a, b: max(float(jnp.abs(u - v).max()) for u, v in zip(
        jax.tree.leaves(a), jax.tree.leaves(b)))
    print(json.dumps({{
        "devices": jax.device_count(),
        "chunk_shards": len(cs.sharding.device_set),
        "chunk_spec": str(cs.sharding.spec),
        "one_vs_loop": diff(one, ref),
        "many_vs_one": diff(many, parallel.to_host(one)),
        "sub_vs_one": diff(sub, one),
        "scale": max(float(jnp.abs(u).max()) for u in jax.tree.leaves(one)),
    }}))
    """)


def test_dash_gradient_on_8_simulated_devices_equals_1():
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-c", _MULTI_DEVICE.format(tests=tests)],
      env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert out["chunk_shards"] == 8
  assert "data" in out["chunk_spec"]
  tol = 1e-5 * out["scale"] + 1e-7
  assert out["one_vs_loop"] <= tol, out
  assert out["many_vs_one"] <= tol, out
  assert out["sub_vs_one"] <= tol, out


def test_dash_gradient_skips_masked_padding_rows():
  """Leading padding rows with mask False leave the EMA as without them."""
  loss_fn, params, x, y, chunks = make_problem()
  want = loop_reference(loss_fn, params, x, y, chunks[:2], 0.3)
  padded = jnp.concatenate([jnp.zeros((2, CHUNK), chunks.dtype), chunks[:2]])
  mask = jnp.asarray([False, False, True, True])
  got = jax.jit(lambda p: T.dash_gradient(loss_fn, p, x, y, padded, 0.3, chunk_mask=mask))(params)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  unmasked = T.dash_gradient(loss_fn, params, x, y, padded, 0.3)
  assert not np.allclose(jax.tree.leaves(unmasked)[0], jax.tree.leaves(want)[0])
