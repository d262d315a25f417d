"""Per-stage plasticity diagnostics of a staged study (DASH, Shin et al. 2024,
§4; Ash & Adams 2020, §5), per seed, in one compiled program per model:

* `dead_relu`: fraction of ReLU units that are <= 0 on every example of the
  training buffer (and every position), per sown layer and overall;
* `param_norm`: ||theta||_2 at the end of the stage;
* `dist_from_stage_start`: ||theta_end - theta_start||_2 within the stage;
* `dash_cosine_hist`: per layer, the histogram (over seeds and groups) of
  DASH's cosines cos(W_group, -g) between the final weights and the EMA of
  the buffer's chunk gradients: what DASH would shrink by at this point.

`StageDiagnostics` is the hook that records them at the end of a stage's run.
The buffer is read in `max_examples`-sized padded rows (the largest buffer of
the study), so every stage reuses one program; the DASH signal is the
method's own compiled gradient pass (`wsjax.studies.methods.dash_signal`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from wsjax import transforms as T
from wsjax.analysis import plasticity
from wsjax.core.loop import Hook
from wsjax.studies import methods

COSINE_BINS = 20
# bin edges on [-1, 1], exact in float32 (0 is an edge: a zero cosine counts in [0, 0.1))
EDGES = np.linspace(-1.0, 1.0, COSINE_BINS + 1).astype(np.float32)
_BATCH = 1024


def _rows(buffer: np.ndarray, max_examples: int) -> np.ndarray:
  """Buffer positions in (rows, batch) covering all of it, padded with
  repeats (repeats do not change a max); the row count is fixed by
  `max_examples`."""
  n = len(buffer)
  batch = min(_BATCH, n)
  rows = -(-max(n, max_examples) // batch)
  pos = np.arange(rows * batch) % n
  return np.asarray(buffer)[pos.reshape(rows, batch)].astype(np.int32)


@functools.partial(jax.jit, static_argnames=("model", "granularity", "with_acts"))
def _diagnostics(params, batch_stats, start, grads, x, idx, *, model, granularity, with_acts):
  out = {"param_norm": jax.vmap(plasticity.param_norm)(params),
         "dist_from_stage_start": jax.vmap(plasticity.param_distance)(params, start)}
  if with_acts:
    def one(params, batch_stats):
      variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}

      def acts(rows):
        _, state = model.apply(variables, x[rows], train=False, mutable=["activations"])
        return jax.tree.map(lambda a: jnp.max(a.reshape(-1, a.shape[-1]), 0),
                            state["activations"])
      first = acts(idx[0])
      maxima, _ = jax.lax.scan(lambda m, rows: (jax.tree.map(jnp.maximum, m, acts(rows)), None),
                               first, idx[1:])
      return maxima

    maxima = jax.vmap(one)(params, batch_stats)  # (replicas, units) per layer
    out["dead_relu"] = jax.vmap(plasticity.dead_relu_fraction)(
        jax.tree.map(lambda m: m[:, None], maxima))
  cos = jax.vmap(lambda p, g: T.dash_cosines(p, g, granularity))(params, grads)
  edges = jnp.asarray(EDGES)
  hist = {name: jnp.histogram(jnp.ravel(c), bins=edges)[0] for name, c in cos.items()}
  if cos:
    every = jnp.concatenate([jnp.ravel(c) for c in cos.values()])
    hist[plasticity.OVERALL] = jnp.histogram(every, bins=edges)[0]
  out["dash_cosine_hist"] = hist
  return out


class StageDiagnostics(Hook):
  """The diagnostics of a stage's final states, as a hook: at the end of the
  run, `loop.records["diagnostics"]` (`start_params()` gives the stage's
  starting parameters, e.g. read from the run's `init` snapshot)."""

  def __init__(self, model, start_params: Callable[[], Any], buffer, ctx: methods.StageContext,
               dash: methods.Dash, max_examples: int):
    self.model, self.start_params, self.buffer = model, start_params, buffer
    self.ctx, self.dash, self.max_examples = ctx, dash, max_examples

  def compute(self, states) -> dict:
    return stage_diagnostics(self.model, states, self.start_params(), self.buffer, self.ctx,
                             self.dash, self.max_examples)

  def on_end(self, loop) -> None:
    loop.records["diagnostics"] = self.compute(loop.states)


def stage_diagnostics(model, states, start_params, buffer, ctx: methods.StageContext,
                      dash: methods.Dash, max_examples: int) -> dict:
  """All diagnostics for the end of one stage (see the module docstring)."""
  grads = dash.signal(states, ctx)
  idx = _rows(buffer, max_examples)
  with_acts = bool(jax.eval_shape(  # logreg sows no activations: no dead-ReLU count
      lambda v, x: model.apply(jax.tree.map(lambda a: a[0], v), x[:1], train=False,
                               mutable=["activations"])[1], states.variables, ctx.data_x))
  out = _diagnostics(states.params, states.batch_stats, start_params, grads, ctx.data_x, idx,
                     model=model, granularity=dash.granularity, with_acts=with_acts)
  out = jax.tree.map(np.asarray, out)
  record = {"param_norm": [float(v) for v in out["param_norm"]],
            "dist_from_stage_start": [float(v) for v in out["dist_from_stage_start"]],
            "dash_cosine_hist": {k: [int(c) for c in v] for k, v in out["dash_cosine_hist"].items()},
            "dash_cosine_bins": [float(e) for e in np.linspace(-1, 1, COSINE_BINS + 1)]}
  if "dead_relu" in out:
    record["dead_relu"] = {k: [float(x) for x in v] for k, v in out["dead_relu"].items()}
  return record

