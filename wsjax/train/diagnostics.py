"""Per-stage plasticity diagnostics of a staged study (DASH, Shin et al. 2024, §4;
Ash & Adams 2020, §5), per seed:

* `dead_relu`: fraction of ReLU units that are <= 0 on every example of the
  training buffer (and every position), per sown layer and overall;
* `param_norm`: ||theta||_2 at the end of the stage;
* `dist_from_stage_start`: ||theta_end - theta_start||_2 within the stage;
* `dash_cosine_hist`: per layer, the histogram (over seeds and groups) of
  DASH's cosines cos(W_group, -g) between the final weights and the EMA of
  the buffer's chunk gradients: what DASH would shrink by at this point.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wsjax import transforms as T
from wsjax.analysis import plasticity
from wsjax.train import methods

COSINE_BINS = 20


def _chunks_of(n: int, size: int, rows: int) -> np.ndarray:
  """`rows` x `size` buffer positions covering all n, padded with repeats
  (repeats do not change a max)."""
  pos = np.arange(rows * size) % n
  return pos.reshape(rows, size)


def activation_max(model, states, x, buffer: np.ndarray, batch: int = 1024,
                   max_examples: int | None = None):
  """Per seed, each sown ReLU unit's max activation over the buffer.

  `max_examples` (the largest buffer of the study) fixes the number of
  batches, so every stage reuses one compiled program.
  """
  batch = min(batch, len(buffer))
  rows = _chunks_of(len(buffer), batch, -(-max(len(buffer), max_examples or 0) // batch))
  idx = jnp.asarray(np.asarray(buffer)[rows], jnp.int32)
  return _activation_max(model, states.params, states.batch_stats, x, idx)


def _act_max_impl(model, params, batch_stats, x, idx):
  def one(params, batch_stats):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}

    def acts(rows):
      _, state = model.apply(variables, x[rows], train=False, mutable=["activations"])
      return jax.tree.map(lambda a: jnp.max(a.reshape(-1, a.shape[-1]), 0),
                          state["activations"])

    first = acts(idx[0])
    out, _ = jax.lax.scan(lambda m, rows: (jax.tree.map(jnp.maximum, m, acts(rows)), None),
                          first, idx[1:])
    return out
  return jax.vmap(one)(params, batch_stats)


_activation_max = jax.jit(_act_max_impl, static_argnums=0)


def dead_relu(model, states, x, buffer, max_examples=None) -> dict:
  maxima = activation_max(model, states, x, buffer, max_examples=max_examples)
  n_seeds = jax.tree.leaves(states.params)[0].shape[0]
  per_seed = []
  for i in range(n_seeds):
    tree = jax.tree.map(lambda m: m[i][None], maxima)  # (1, units): dead iff max <= 0
    per_seed.append({k: float(v) for k, v in plasticity.dead_relu_fraction(tree).items()})
  return {k: [d[k] for d in per_seed] for k in per_seed[0]} if per_seed else {}


@jax.jit
def _norms(params, start):
  norm = jax.vmap(plasticity.param_norm)(params)
  dist = jax.vmap(plasticity.param_distance)(params, start)
  return norm, dist


def cosine_histograms(params, grads, granularity: str) -> dict:
  cos = jax.vmap(lambda p, g: T.dash_cosines(p, g, granularity))(params, grads)
  hists = plasticity.cosine_histograms(cos, COSINE_BINS)
  return {name: [int(c) for c in np.asarray(counts)] for name, (counts, _) in hists.items()}


def stage_diagnostics(study, states, start, buffer, ctx, hp) -> dict:
  """All diagnostics for the end of one stage (see the module docstring)."""
  out = {}
  if jax.tree.leaves(start):
    norm, dist = _norms(states.params, start)
    out["param_norm"] = [float(x) for x in np.asarray(norm)]
    out["dist_from_stage_start"] = [float(x) for x in np.asarray(dist)]
  out["dead_relu"] = dead_relu(study.model, states, study.data_x, buffer,
                              max_examples=max(len(b) for b in study.schedule.stages))
  grads = methods.dash_signal(states, ctx, hp)
  out["dash_cosine_hist"] = cosine_histograms(states.params, grads, hp.dash_granularity)
  out["dash_cosine_bins"] = [float(e) for e in np.linspace(-1, 1, COSINE_BINS + 1)]
  return out
