"""Per-layer representation similarity between stored models, for the
heuristics study (Gotmare et al., ICLR 2019; PAPERS.md section 4).

A `Probe` fixes what is compared: a model, a fixed set of inputs (the first
`examples` unaugmented training examples), the layers (post-ReLU outputs the
models sow, `wsjax.analysis.activations`; all of them by default), how conv
activations become a (datapoints, neurons) matrix (every spatial position a
datapoint, or averaged over space) and the measure
(`wsjax.analysis.similarity`: mean CCA, SVCCA, PWCCA, linear CKA or its
debiased form; float32 or float64). `Probe.collect(variables)` gives every
layer's matrices for every replica at once; `similarities(probe, xs, ys)`
compares many pairs of one layer in one compiled call (every snapshot pair
of every replica), per layer.

Users' mistakes are one line, before any training: an unknown layer (the
available ones listed), more SVCCA directions than a layer has neurons or
datapoints.

Layers of two models of one family with different widths (a distillation
student and its wider teacher) are paired by depth (`pair_by_depth`): the
i-th sown layer of each, or, when the depths differ, each student layer
with the teacher layer at the same relative depth.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wsjax.analysis import activations as activations_lib
from wsjax.analysis import similarity as similarity_lib
from wsjax.studies.common import _f


@dataclasses.dataclass(frozen=True)
class SimilarityConfig:
  """What a per-layer comparison measures, on which layers and inputs."""
  measure: str = _f("cca", "representation similarity: cca (mean canonical correlation), "
                    "svcca, pwcca, cka or cka_debiased", flag="similarity",
                    choices=similarity_lib.MEASURES)
  layers: tuple[str, ...] = _f((), "sown layers to compare, e.g. relu1,relu3 (default: all)",
                               flag="cca_layers")
  examples: int = _f(500, "the first N training examples the activations are collected on",
                     flag="cca_examples")
  spatial: str = _f("positions", "conv activations: positions (every position a datapoint) or "
                    "pool (averaged over space)", flag="cca_spatial",
                    choices=similarity_lib.SPATIAL_MODES)
  svcca_directions: int = _f(0, "svcca: keep this many top directions per side (0: those "
                             "explaining --svcca_variance of the variance)")
  svcca_variance: float = _f(similarity_lib.KEEP, "svcca: variance fraction the kept top "
                             "directions explain")
  epsilon: float = _f(similarity_lib.EPSILON, "cca/svcca/pwcca: whitening regularizer "
                      "relative to the largest variance", flag="cca_epsilon")
  dtype: str = _f("float32", "similarity arithmetic: float32 or float64 (scoped x64)",
                  flag="cca_dtype", choices=similarity_lib.DTYPES)

  def validate(self) -> None:
    if self.measure not in similarity_lib.MEASURES:
      raise ValueError(f"unknown similarity measure {self.measure!r}; choose from "
                       f"{', '.join(similarity_lib.MEASURES)}")
    if self.examples < 4:
      raise ValueError(f"--cca_examples must be >= 4, got {self.examples}")
    if self.svcca_directions < 0:
      raise ValueError(f"--svcca_directions must be >= 0 (0: by variance), got "
                       f"{self.svcca_directions}")
    if not 0 < self.svcca_variance <= 1:
      raise ValueError(f"--svcca_variance must be in (0, 1], got {self.svcca_variance}")
    if not 0 <= self.epsilon < 1:
      raise ValueError(f"--cca_epsilon must be in [0, 1), got {self.epsilon}")
    if len(set(self.layers)) != len(self.layers):
      raise ValueError(f"--cca_layers repeats: {', '.join(self.layers)}")

  def options(self) -> dict:
    """The measure's keyword options for `wsjax.analysis.similarity`."""
    if self.measure == "svcca":
      keep = self.svcca_directions or self.svcca_variance
      return {"keep": keep, "epsilon": self.epsilon}
    if self.measure in ("cca", "pwcca"):
      return {"epsilon": self.epsilon}
    return {}


def _one_replica(variables):
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v)[1:], v.dtype), variables)


class Probe:
  """A model's layers on a fixed input set, compared with one measure.

  Args:
    cfg: the `SimilarityConfig`.
    model: a Linen module sowing ReLU outputs into `activations`.
    variables: a replica-stacked `{"params", ["batch_stats"]}` tree (arrays
      or shapes: only the structure of one replica is used here).
    x: the training inputs; the first `cfg.examples` are the probe set.
    layers: the layers to compare (default `cfg.layers`, or every sown layer).
    what: how the model is named in errors ("the student", ...).
  """

  def __init__(self, cfg: SimilarityConfig, model, variables, x, *,
               layers: Optional[Sequence[str]] = None, what: str = "the model"):
    cfg.validate()
    self.cfg = cfg
    self.model = model
    n = int(np.shape(x)[0])
    if cfg.examples > n:
      raise ValueError(f"--cca_examples={cfg.examples} is more than the {n} training examples")
    self.x = jnp.asarray(np.asarray(x)[:cfg.examples])
    one = _one_replica(variables)
    shapes = activations_lib.layer_shapes(model, one, self.x, replicated=False)
    available = sown_in_order(model, one, self.x[:1])
    asked = tuple(layers) if layers is not None else (cfg.layers or tuple(available))
    unknown = [name for name in asked if name not in shapes]
    if unknown:
      raise ValueError(f"unknown layer {', '.join(map(repr, unknown))} for CCA in {what}; "
                       f"available: {', '.join(available)}")
    self.layers = tuple(asked)
    self.shapes = {name: shapes[name] for name in self.layers}
    self.datapoints = {name: self._datapoints(shapes[name]) for name in self.layers}
    self.neurons = {name: int(shapes[name][-1]) for name in self.layers}
    if cfg.measure == "svcca" and cfg.svcca_directions:
      for name in self.layers:
        most = min(self.neurons[name], self.datapoints[name])
        if cfg.svcca_directions > most:
          raise ValueError(
              f"--svcca_directions={cfg.svcca_directions} is more than layer {name} of {what} "
              f"has: {self.neurons[name]} neurons, {self.datapoints[name]} datapoints; keep at "
              f"most {most}")
    if cfg.measure == "cka_debiased" and min(self.datapoints.values()) < 4:
      raise ValueError("cka_debiased needs at least 4 datapoints per layer; raise --cca_examples")

  def _datapoints(self, shape) -> int:
    positions = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return self.cfg.examples * (positions if self.cfg.spatial == "positions" else 1)

  def collect(self, variables) -> dict[str, np.ndarray]:
    """`{layer: (R, datapoints, neurons)}` float32 host arrays for every
    replica of `variables` (eval mode: BatchNorm with running statistics)."""
    acts = activations_lib.collect_activations(self.model, variables, self.x, self.layers)
    out = {}
    for name, a in acts.items():
      r = a.shape[0]
      if a.ndim > 3 and self.cfg.spatial == "pool":
        a = jnp.mean(a, axis=tuple(range(2, a.ndim - 1)))
      out[name] = np.asarray(jax.device_get(a), np.float32).reshape(r, -1, a.shape[-1])
    return out

  def compare(self, xs: np.ndarray, ys: np.ndarray, chunk: int = 1) -> np.ndarray:
    """The measure on every pair `(xs[b], ys[b])`: `(*batch, n, p)` and
    `(*batch, n, q)` -> `(*batch,)` float64, one compiled call.

    The pairs run `chunk` at a time in one compiled loop
    (`batched_similarity(chunk_size=...)`). The default 1 is a workaround:
    on a 2-core CPU (jax 0.10.2) a batch of 4 or more pairs deadlocks inside
    LAPACK's batched eigh, whose `ParallelBatchMap` waits for workers of the
    intra-op pool that are all blocked the same way; one pair per iteration
    never batches the LAPACK calls."""
    batch = np.shape(xs)[:-2]
    size = int(np.prod(batch, dtype=np.int64))
    opts = self.cfg.options()
    out = similarity_lib.batched_similarity(
        self.cfg.measure, np.reshape(xs, (size, *np.shape(xs)[-2:])),
        np.reshape(ys, (size, *np.shape(ys)[-2:])), dtype=self.cfg.dtype,
        chunk_size=min(chunk, size), **opts)
    return np.asarray(out, np.float64).reshape(batch)


def _first_eqn(jaxpr, variables, produced: bool) -> dict:
  """Per jaxpr variable, the index of the first equation that produces
  (`produced`) or reads it."""
  from jax.extend import core as jcore
  index = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for var in (eqn.outvars if produced else eqn.invars):
      if isinstance(var, jcore.Var) and var not in index:
        index[var] = i
  return index


def sown_in_order(model, variables, x) -> list[str]:
  """The names of the activations `model` sows, in the order the forward
  pass computes them (depth order; `wsjax.tree` names sort "relu10" before
  "relu2" and a ResNet's stem "relu" last). Traced abstractly: `variables`
  is one replica's tree (arrays or shapes), `x` a batch."""
  def sown(v, inputs):
    _, state = model.apply(v, inputs, train=False, mutable=[activations_lib.COLLECTION])
    return activations_lib.named_activations(state.get(activations_lib.COLLECTION, {}))
  names = list(jax.eval_shape(sown, variables, x))

  def as_tuple(v, inputs):
    acts = sown(v, inputs)
    return tuple(acts[n] for n in names)
  closed = jax.make_jaxpr(as_tuple)(variables, x)
  made = _first_eqn(closed.jaxpr, None, produced=True)
  order = sorted(range(len(names)), key=lambda j: made.get(closed.jaxpr.outvars[j], -1))
  return [names[j] for j in order]


def layers_in_order(model, variables, x) -> list[str]:
  """The parameter-owning layers of `model` (a leaf's name without its last
  component: "conv1", "layer1_0/bn2", "head") in the order the forward pass
  first reads them (depth order). Traced abstractly, as `sown_in_order`."""
  from wsjax import tree as wtree
  params = variables["params"]
  leaf_names = wtree.names(params)
  rest = {k: v for k, v in variables.items() if k != "params"}

  def forward(p, others, inputs):
    return model.apply({**others, "params": p}, inputs, train=False)
  closed = jax.make_jaxpr(forward)(params, rest, x)
  read = _first_eqn(closed.jaxpr, None, produced=False)
  first = [read.get(var, len(closed.jaxpr.eqns)) for var in closed.jaxpr.invars[:len(leaf_names)]]
  layers: list[str] = []
  for j in sorted(range(len(leaf_names)), key=lambda j: first[j]):
    layer = leaf_names[j].rpartition("/")[0] or leaf_names[j]
    if layer not in layers:
      layers.append(layer)
  return layers


def pair_by_depth(student: Sequence[str], teacher: Sequence[str]) -> list[tuple[str, str]]:
  """(student layer, teacher layer) pairs: the i-th with the i-th when the
  depths agree, else the teacher layer at the same relative depth
  `round(i (T - 1) / (S - 1))`."""
  s, t = len(student), len(teacher)
  if not s or not t:
    raise ValueError("no layers to pair")
  if s == t:
    return list(zip(student, teacher))
  if s == 1:
    return [(student[0], teacher[-1])]
  return [(name, teacher[int(round(i * (t - 1) / (s - 1)))]) for i, name in enumerate(student)]


def summary_by_layer(values: dict[str, Any]) -> dict[str, dict]:
  """`{layer: {"mean", "std", "per_seed"}}` of `{layer: (R,)}` (per-seed values)."""
  from wsjax import results
  return {name: results.summary(np.asarray(v, np.float64)) for name, v in values.items()}


__all__ = ["Probe", "SimilarityConfig", "layers_in_order", "pair_by_depth", "sown_in_order",
           "summary_by_layer"]
