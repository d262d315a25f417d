"""Weight matching: wsjax's matcher vs the Git Re-Basin way, same work.

The reference side is written the way samuela/git-re-basin's
``weight_matching`` (and dchiji-ntt/learning-transfer's port) works: for
each permutation a Python loop over its (leaf, axis) pairs, unjitted jnp ops
per leaf (``take`` for every other permutation, ``moveaxis``, ``reshape``,
a matmul added into ``A``), ``linear_sum_assignment`` on the host, the old
and new objective as ``vdot(A, eye(n)[perm])``. wsjax's side builds each
cost matrix with one jitted function per permutation
(``wsjax.transfer.weight_matching``), tracks the objective by each
assignment's gain and evaluates it in full before and after the search. Both visit the permutations in the same seeded order, so they run the
same sweeps and must find the same permutations (checked).

Networks (random weights, two independent He-scaled draws, float32):
the MLP 784-512-512-10 and Conv8 (Chijiwa 2024; width 16 quick, 64 full).
Each side runs in its own process; the first call (compilation included) is
reported apart, then the sides alternate and medians are reported, with the
time split into cost building (device work and the copy to the host),
assignment (SciPy) and, for wsjax, the full objective evaluations.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks import common

SEED = 0


def network(name: str, width: int):
  """(registry name, spec'd variables of random weights: a and b)."""
  import jax
  import jax.numpy as jnp
  from wsjax import models, tree
  if name == "mlp":
    model, shape = models.get_model("mlp", 10, widths=(512, 512)), (784,)
  else:
    model, shape = models.get_model("conv8", 10, width=width), (32, 32, 3)
  shapes = jax.eval_shape(models.make_init_fn(model, shape), jax.random.key(0))
  rng = np.random.default_rng(SEED)

  def draw(leaf_name, s):
    scale = np.sqrt(2.0 / np.prod(s.shape[:-1])) if leaf_name.endswith("kernel") else 0.1
    return jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32)
  a = tree.map_named(draw, shapes)
  b = tree.map_named(draw, shapes)
  return name, a, b


class _Side:
  def __init__(self, network_name: str, width: int):
    import jax
    from wsjax.transfer import PermutationSpec
    name, self.a, self.b = network(network_name, width)
    registry = "mlp" if name == "mlp" else "conv8"
    self.spec = PermutationSpec.for_model(registry, self.a)
    self.key = jax.random.key(SEED)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.a))
    self.info = {"params": n_params, "perms": len(self.spec.sizes)}


class WsjaxSide(_Side):
  """``wsjax.transfer.weight_matching`` (jitted cost matrices)."""

  def match(self) -> dict:
    from wsjax.transfer import weight_matching
    t0 = time.perf_counter()
    perms, info = weight_matching(self.spec, self.a, self.b, key=self.key)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "sweeps": info.sweeps, "cost_s": info.cost_s,
            "assign_s": info.assign_s, "objective_s": info.objective_s,
            "objective": info.objective[-1], "perms": _digest(perms)}


class ReferenceSide(_Side):
  """The Git Re-Basin way: per-leaf unjitted jnp ops in a Python loop."""

  def match(self) -> dict:
    import jax
    import jax.numpy as jnp
    from scipy.optimize import linear_sum_assignment
    from wsjax import tree
    params_a, params_b = tree.to_dict(self.a["params"]), tree.to_dict(self.b["params"])
    axes_to_perm, perm_to_axes = self.spec.axes, self.spec.perms
    perm = {p: jnp.arange(n) for p, n in self.spec.sizes.items()}
    names = sorted(perm)
    cost_s = assign_s = 0.0
    t_start = time.perf_counter()

    def permuted(k, except_axis):
      w = params_b[k]
      for axis, p in enumerate(axes_to_perm[k]):
        if axis != except_axis and p is not None:
          w = jnp.take(w, perm[p], axis=axis)
      return w

    sweeps = 0
    for iteration in range(100):
      sweeps += 1
      progress = False
      order = jax.random.permutation(jax.random.fold_in(self.key, iteration), len(names))
      for i in np.asarray(order):
        p = names[i]
        n = self.spec.sizes[p]
        t0 = time.perf_counter()
        big_a = jnp.zeros((n, n))
        for k, axis in perm_to_axes[p]:
          if k not in params_a:  # batch statistics: not matched
            continue
          w_a = jnp.moveaxis(params_a[k], axis, 0).reshape((n, -1))
          w_b = jnp.moveaxis(permuted(k, axis), axis, 0).reshape((n, -1))
          big_a += w_a @ w_b.T
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
    seconds = time.perf_counter() - t_start
    objective = sum(float(jnp.vdot(params_a[k], permuted(k, None))) for k in params_a)
    return {"seconds": seconds, "sweeps": sweeps, "cost_s": cost_s, "assign_s": assign_s,
            "objective_s": 0.0, "objective": objective, "perms": _digest(perm)}


def _digest(perms) -> str:
  import hashlib
  h = hashlib.sha1()
  for name in sorted(perms):
    h.update(name.encode())
    h.update(np.asarray(perms[name], np.int64).tobytes())
  return h.hexdigest()[:12]


SIDES = {"reference": "benchmarks.weight_matching:ReferenceSide",
         "wsjax": "benchmarks.weight_matching:WsjaxSide"}


def run(quick: bool = False) -> dict:
  networks = {"mlp_784-512-512-10": ("mlp", 0),
              f"conv8_w{16 if quick else 64}": ("conv8", 16 if quick else 64)}
  rounds = 2 if quick else 3
  result = {"benchmark": "weight_matching", "environment": common.environment(),
            "quick": quick, "rounds": rounds, "networks": {}}
  for label, (name, width) in networks.items():
    common.log(f"weight_matching: {label} ...")
    sides = {side: common.Worker(target, network_name=name, width=width)
             for side, target in SIDES.items()}
    with common.closing_all(sides):
      first = {side: w.call("match") for side, w in sides.items()}
      runs = common.alternate(sides, "match", rounds)
      out = {}
      for side, calls in runs.items():
        med = {k: common.median([c[k] for c in calls])
               for k in ("seconds", "cost_s", "assign_s", "objective_s")}
        out[side] = {**med, "seconds_all": [c["seconds"] for c in calls],
                     "first_call_s": first[side]["seconds"], "sweeps": calls[0]["sweeps"],
                     "objective": calls[0]["objective"], "perms": calls[0]["perms"],
                     "peak_rss_mb": sides[side].peak_rss_mb()}
      ref, ours = out["reference"], out["wsjax"]
      result["networks"][label] = {
          **sides["wsjax"].info, "sides": out,
          "same_perms": ref["perms"] == ours["perms"],
          "speedup": ref["seconds"] / ours["seconds"],
          "cost_speedup": ref["cost_s"] / ours["cost_s"],
          "first_call_speedup": ref["first_call_s"] / ours["first_call_s"]}
  return result


def report(result: dict) -> str:
  rows = []
  for label, m in result["networks"].items():
    for side in ("reference", "wsjax"):
      s = m["sides"][side]
      rows.append([label, side, s["sweeps"], s["first_call_s"], s["seconds"], s["cost_s"],
                   s["assign_s"], s["objective_s"],
                   f"{m['speedup']:.2f}x" if side == "wsjax" else "",
                   f"{m['cost_speedup']:.2f}x" if side == "wsjax" else "",
                   str(m["same_perms"]) if side == "wsjax" else ""])
  return common.table(rows, ["network", "side", "sweeps", "first call s", "warm s", "cost s",
                             "assign s", "objective s", "speedup", "cost speedup",
                             "same perms"])
