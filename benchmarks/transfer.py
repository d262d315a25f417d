"""FGMT: wsjax's against the same algorithm written the learning-transfer way.

The reference side is written the way dchiji-ntt/learning-transfer's
``get_transferred_params_faster`` (``fast_perm_optim``) with its
``WeightMatching`` (a port of samuela/git-re-basin's matcher) works, in JAX:
for s = 1..T, the transferred network theta'_{s-1} = theta'_0 + pi(theta_{s-1}
- theta_0) built leaf by leaf with unjitted ``take``; its gradient and the
source's computed ONE BY ONE (a jitted per-network gradient, as a framework's
backward pass, called once per network and minibatch, summed on the host
side); the pair appended to Python lists; then the solve: for every
permutation a Python loop over the cached pairs and over the permutation's
(leaf, axis) pairs, unjitted per-leaf ops (``take`` for every other
permutation, ``moveaxis``, ``reshape``, a matmul added into ``A``),
``linear_sum_assignment`` on the host, the old and new objective as
``vdot(A, eye(n)[perm])``. wsjax's side is ``wsjax.transfer.gmt.gmt(...,
fast=True)``: the new pair's two gradients in one jitted program written into
an on-device buffer of pairs, each cost matrix one jitted function over all
cached pairs (``weight_matching(..., stacked=True)``). Both visit the
permutations in the same seeded order and use the same minibatches, so they
run the same sweeps and find the same permutations up to ties (checked: the
permutations, and the final objective; the gradients of units a random
network never activates are zero, so Conv8's assignments have exact ties).

Networks (float32, synthetic data: standard normal inputs, random labels;
theta_0, theta_T and theta'_0 three independent He-scaled draws, the line
between theta_0 and theta_T with cosine spacing): the MLP 784-512-10 (T = 10,
the paper's MNIST setting at width 512) and Conv8 (width 16, T = 5; quick:
width 8, T = 3; batch 128, 1 gradient batch per point). Each side runs in its own
process; the first call (compilation included) is reported apart, then the
sides alternate and medians are reported, with the time split into
gradients (device work included), cost matrices, assignments and (wsjax)
the objective's full evaluations (before and after each search).
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks import common

SEED = 0
BATCH = 128


def setup(name: str, width: int, points: int):
  """(model, spec, points theta_0..theta_T, theta'_0, x, y, batch index, key)."""
  import jax
  import jax.numpy as jnp
  from wsjax import models, tree
  from wsjax.transfer import PermutationSpec
  from wsjax.transfer import gmt
  if name == "mlp":
    model, shape = models.get_model("mlp", 10, widths=(width,)), (784,)
  else:
    model, shape = models.get_model("conv8", 10, width=width), (32, 32, 3)
  shapes = jax.eval_shape(models.make_init_fn(model, shape), jax.random.key(0))["params"]
  rng = np.random.default_rng(SEED)

  def draw(leaf_name, s):
    scale = np.sqrt(2.0 / np.prod(s.shape[:-1])) if leaf_name.endswith("kernel") else 0.1
    return jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32)
  start, end, target = (tree.map_named(draw, shapes) for _ in range(3))
  spec = PermutationSpec.for_model(name, start)
  pts = gmt.linear_points(start, end, gmt.spacing(points))
  n = 4 * BATCH
  x = jnp.asarray(rng.normal(size=(n, *shape)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
  idx = gmt.gradient_batches(np.arange(n), points, 1, BATCH, seed=SEED)
  return model, spec, pts, target, x, y, idx, jax.random.key(SEED)


class _Side:
  def __init__(self, network: str, width: int, points: int):
    import jax
    (self.model, self.spec, self.points, self.target, self.x, self.y, self.idx,
     self.key) = setup(network, width, points)
    self.T = points
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(self.target))
    self.info = {"params": n_params, "perms": len(self.spec.sizes), "T": points}


class WsjaxSide(_Side):
  """``wsjax.transfer.gmt.gmt(..., fast=True)``."""

  def fgmt(self) -> dict:
    from wsjax.transfer import gmt
    t0 = time.perf_counter()
    res = gmt.gmt(self.spec, self.model, self.points, self.target, self.x, self.y, self.idx,
                  key=self.key, fast=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "grad_s": res.grad_s, "cost_s": res.cost_s,
            "assign_s": res.assign_s, "objective_s": res.objective_s,
            "sweeps": list(res.sweeps), "perms": _digest(res.perms[-1]),
            "objective": float(res.objective[-1][1])}


class ReferenceSide(_Side):
  """The learning-transfer way: one pair at a time, per-leaf loops."""

  def __init__(self, network: str, width: int, points: int):
    super().__init__(network, width, points)
    import jax
    import optax

    def loss(params, x, y):
      logits = self.model.apply({"params": params}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    self.grad = jax.jit(jax.grad(loss))  # one network's backward pass, like torch's

  def fgmt(self) -> dict:
    import jax
    import jax.numpy as jnp
    from scipy.optimize import linear_sum_assignment
    from wsjax import tree
    spec = self.spec
    axes_to_perm, perm_to_axes = spec.axes, spec.perms
    names = sorted(spec.sizes)
    points = [tree.to_dict(jax.tree.map(lambda p, i=i: p[i], self.points))
              for i in range(self.T + 1)]
    start = points[0]
    target = tree.to_dict(self.target)
    unflatten = lambda d: tree.map_named(lambda n, _: d[n], self.target)  # noqa: E731

    def permute(w, k, perm, except_axis=None):
      for axis, p in enumerate(axes_to_perm[k]):
        if axis != except_axis and p is not None:
          w = jnp.take(w, perm[p], axis=axis)
      return w

    perm = {p: jnp.arange(n) for p, n in spec.sizes.items()}
    targets, sources = [], []
    grad_s = cost_s = assign_s = 0.0
    sweeps, last = [], None
    t_start = time.perf_counter()
    for s in range(1, self.T + 1):
      t0 = time.perf_counter()
      src = points[s - 1]
      tr = {k: target[k] + permute(src[k] - start[k], k, perm) for k in target}
      g_tr = {k: jnp.zeros_like(v) for k, v in tr.items()}
      g_src = {k: jnp.zeros_like(v) for k, v in src.items()}
      for b in range(self.idx.shape[1]):
        xb, yb = self.x[self.idx[s - 1, b]], self.y[self.idx[s - 1, b]]
        g1 = tree.to_dict(self.grad(unflatten(tr), xb, yb))
        g2 = tree.to_dict(self.grad(unflatten(src), xb, yb))
        g_tr = {k: g_tr[k] + g1[k] for k in g_tr}
        g_src = {k: g_src[k] + g2[k] for k in g_src}
      n_b = self.idx.shape[1]
      targets.append({k: v / n_b for k, v in g_tr.items()})
      sources.append({k: v / n_b for k, v in g_src.items()})
      jax.block_until_ready((targets[-1], sources[-1]))
      grad_s += time.perf_counter() - t0
      # WeightMatching.solve from the identity
      perm = {p: jnp.arange(n) for p, n in spec.sizes.items()}
      key = jax.random.fold_in(self.key, s)
      n_sweeps = 0
      for iteration in range(100):
        n_sweeps += 1
        progress = False
        order = jax.random.permutation(jax.random.fold_in(key, iteration), len(names))
        for i in np.asarray(order):
          p = names[i]
          n = spec.sizes[p]
          t0 = time.perf_counter()
          big_a = jnp.zeros((n, n))
          for w_t_all, w_s_all in zip(targets, sources):
            for k, axis in perm_to_axes[p]:
              w_t = jnp.moveaxis(w_t_all[k], axis, 0).reshape((n, -1))
              w_s = jnp.moveaxis(permute(w_s_all[k], k, perm, axis), axis, 0).reshape((n, -1))
              big_a += w_t @ w_s.T
          host_a = np.asarray(big_a)
          t1 = time.perf_counter()
          ri, ci = linear_sum_assignment(host_a, maximize=True)
          t2 = time.perf_counter()
          old = jnp.vdot(big_a, jnp.eye(n)[perm[p]])
          new = jnp.vdot(big_a, jnp.eye(n)[ci, :])
          progress = progress or bool(new > old + 1e-7)
          perm[p] = jnp.array(ci)
          cost_s += (t1 - t0) + (time.perf_counter() - t2)
          assign_s += t2 - t1
        if not progress:
          break
      sweeps.append(n_sweeps)
      last = perm
    seconds = time.perf_counter() - t_start
    objective = sum(float(jnp.vdot(t[k], permute(s_[k], k, last)))
                    for t, s_ in zip(targets, sources) for k in t)
    return {"seconds": seconds, "grad_s": grad_s, "cost_s": cost_s, "assign_s": assign_s,
            "objective_s": 0.0, "sweeps": sweeps, "perms": _digest(last),
            "objective": objective}


def _digest(perms) -> str:
  import hashlib
  h = hashlib.sha1()
  for name in sorted(perms):
    h.update(name.encode())
    h.update(np.asarray(perms[name], np.int64).tobytes())
  return h.hexdigest()[:12]


SIDES = {"reference": "benchmarks.transfer:ReferenceSide", "wsjax": "benchmarks.transfer:WsjaxSide"}
KEYS = ("seconds", "grad_s", "cost_s", "assign_s", "objective_s")


def run(quick: bool = False) -> dict:
  networks = {"mlp_784-512-10_T10": ("mlp", 512, 10),
              "conv8_w8_T3" if quick else "conv8_w16_T5": ("conv8", 8, 3) if quick else
              ("conv8", 16, 5)}
  rounds = 2 if quick else 3
  result = {"benchmark": "transfer", "environment": common.environment(), "quick": quick,
            "rounds": rounds, "networks": {}}
  for label, (name, width, points) in networks.items():
    common.log(f"transfer: FGMT on {label} ...")
    sides = {side: common.Worker(target, network=name, width=width, points=points)
             for side, target in SIDES.items()}
    with common.closing_all(sides):
      first = {side: w.call("fgmt") for side, w in sides.items()}
      runs = common.alternate(sides, "fgmt", rounds)
      out = {}
      for side, calls in runs.items():
        med = {k: common.median([c[k] for c in calls]) for k in KEYS}
        out[side] = {**med, "seconds_all": [c["seconds"] for c in calls],
                     "first_call_s": first[side]["seconds"], "sweeps": calls[0]["sweeps"],
                     "perms": calls[0]["perms"], "objective": calls[0]["objective"],
                     "peak_rss_mb": sides[side].peak_rss_mb()}
      ref, ours = out["reference"], out["wsjax"]
      result["networks"][label] = {
          **sides["wsjax"].info, "sides": out,
          "same_perms": ref["perms"] == ours["perms"],
          # gradients of units a random network never activates are zero: tied
          # assignments, so equal objectives (not equal perms) are what must agree
          "objective_rel_diff": abs(ref["objective"] - ours["objective"])
          / max(abs(ref["objective"]), 1e-30),
          "speedup": ref["seconds"] / ours["seconds"],
          "grad_speedup": ref["grad_s"] / ours["grad_s"],
          "matching_speedup": (ref["cost_s"] + ref["assign_s"])
          / (ours["cost_s"] + ours["assign_s"] + ours["objective_s"]),
          "first_call_speedup": ref["first_call_s"] / ours["first_call_s"]}
  return result


def report(result: dict) -> str:
  rows = []
  for label, m in result["networks"].items():
    for side in ("reference", "wsjax"):
      s = m["sides"][side]
      ours = side == "wsjax"
      rows.append([label, side, sum(s["sweeps"]), s["first_call_s"], s["seconds"], s["grad_s"],
                   s["cost_s"], s["assign_s"], s["objective_s"],
                   f"{m['speedup']:.2f}x" if ours else "",
                   f"{m['grad_speedup']:.2f}x" if ours else "",
                   f"{m['matching_speedup']:.2f}x" if ours else "",
                   str(m["same_perms"]) if ours else "",
                   f"{m['objective_rel_diff']:.1e}" if ours else ""])
  return common.table(rows, ["network", "side", "sweeps", "first call s", "warm s", "grad s",
                             "cost s", "assign s", "objective s", "speedup", "grad speedup",
                             "matching speedup", "same perms", "objective rel diff"])
