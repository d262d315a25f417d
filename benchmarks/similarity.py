"""Representation similarity workload: wsjax batched vs NumPy one pair at a time.

The heuristics study (Gotmare et al., 2019) compares every layer x snapshot
pair of every replica. Here: 4 layers of 32, 64, 128 and 256 neurons, 4
snapshots (all 6 pairs), 3 replicas, 2,000 datapoints: 72 pairs per measure
(quick: 3 layers of 32-128 neurons, 2 replicas, 1,000 datapoints, 36 pairs).
The activations are synthetic ReLU layers of a shared latent code (each
snapshot drifts from the previous), so the similarities are neither 0 nor
1; the cost depends on the shapes only.

Measures: mean CCA (epsilon 1e-6), SVCCA (99% of the variance), PWCCA and
linear CKA, at float32 and float64.

* wsjax: `batched_similarity` per layer and measure, every (replica, snapshot
  pair) of the layer in one jitted call (on CPU a loop over the pairs for the
  CCA family, vmapped for CKA: see `batched_similarity`).
* NumPy: the same math one pair at a time in the style of google/svcca
  (`cca_core.get_cca_similarity`, `pwcca.compute_pwcca`, the tutorials'
  SVD-then-CCA): the joint covariance of both sides (as `np.cov(acts1,
  acts2)`), each block rescaled by its largest entry, near-zero neurons dropped, `epsilon` on the diagonal,
  `pinv` then an eigendecomposition square root for Sxx^-1/2, SVD of the
  whitened cross-covariance; SVCCA through the SVD of each side's centred
  activations; PWCCA with a QR of the canonical variates (the paper's
  variates: svcca's own `compute_pwcca` omits Sxx^-1/2). Computed at the
  benchmark's dtype (svcca's `np.cov` would always use float64).

Each side runs in its own process with `OPENBLAS_NUM_THREADS=1` (NumPy's
BLAS/LAPACK and, behind jaxlib's CPU eigh/svd, SciPy's OpenBLAS): on a busy
2-core machine OpenBLAS's own threads made every LAPACK call of both sides
30-70x slower (measured: 12 CCAs of 128 neurons, wsjax 18.0 s -> 0.27 s,
NumPy 23.5 s -> 0.54 s). After warm-up (compilation reported apart) the
sides alternate and the median seconds of a whole workload are reported,
with the largest difference between the two sides' values.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks import common

MEASURES = ("cca", "svcca", "pwcca", "cka")
DTYPES = ("float32", "float64")
EPSILON = 1e-6
KEEP = 0.99
LATENT = 48
SNAPSHOTS = 4
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1"}


def sizes(quick: bool) -> dict:
  if quick:
    return {"widths": (32, 64, 128), "replicas": 2, "datapoints": 1000}
  return {"widths": (32, 64, 128, 256), "replicas": 3, "datapoints": 2000}


def snapshot_pairs() -> list[tuple[int, int]]:
  return [(a, b) for a in range(SNAPSHOTS) for b in range(a + 1, SNAPSHOTS)]


def workload(quick: bool, seed: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """`{width: (xs, ys)}`, each `(replicas, pairs, datapoints, width)` float64:
  the two snapshots' activations of every pair."""
  cfg = sizes(quick)
  rng = np.random.default_rng(seed)
  n, replicas = cfg["datapoints"], cfg["replicas"]
  latent = rng.normal(size=(n, LATENT))
  pairs = snapshot_pairs()
  out = {}
  for width in cfg["widths"]:
    acts = np.empty((replicas, SNAPSHOTS, n, width))
    for r in range(replicas):
      weights = rng.normal(size=(LATENT, width)) / np.sqrt(LATENT)
      for s in range(SNAPSHOTS):
        weights = weights + 0.3 * rng.normal(size=weights.shape) / np.sqrt(LATENT)
        pre = latent @ weights + 0.3 * rng.normal(size=(n, width)) - 0.2
        acts[r, s] = np.maximum(pre, 0.0)
    xs = acts[:, [a for a, _ in pairs]]
    ys = acts[:, [b for _, b in pairs]]
    out[width] = (xs, ys)
  return out


# ---------------------------------------------------------------------------
# NumPy, svcca style, one pair at a time.

def _np_inv_sqrt(cov):
  """svcca's `positivedef_matrix_sqrt(pinv(cov))`."""
  w, v = np.linalg.eigh(np.linalg.pinv(cov))
  return (v * np.sqrt(np.maximum(w, 0))) @ v.T


def np_cca(x, y, epsilon=EPSILON, weights=False):
  """`get_cca_similarity` (activations as (datapoints, neurons) here): the
  joint covariance of both sides as `np.cov(acts1, acts2)` computes it."""
  p = x.shape[1]
  z = np.concatenate([x, y], axis=1)
  z = z - z.mean(0)
  cov = z.T @ z / (z.shape[0] - 1)
  sxx, syy, sxy = cov[:p, :p], cov[p:, p:], cov[:p, p:]
  xc = z[:, :p]
  xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
  sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
  keep_x, keep_y = np.diag(sxx) >= epsilon, np.diag(syy) >= epsilon  # remove_small
  sxx, syy, sxy = sxx[keep_x][:, keep_x], syy[keep_y][:, keep_y], sxy[keep_x][:, keep_y]
  ix = _np_inv_sqrt(sxx + epsilon * np.eye(len(sxx), dtype=sxx.dtype))
  iy = _np_inv_sqrt(syy + epsilon * np.eye(len(syy), dtype=syy.dtype))
  u, s, _ = np.linalg.svd(ix @ sxy @ iy)
  s = np.abs(s)
  if not weights:
    return s
  return s, xc[:, keep_x] @ ix @ u[:, :len(s)]


def np_svcca(x, y, keep=KEEP):
  def top(a):
    ac = a - a.mean(0)
    _, sv, vt = np.linalg.svd(ac, full_matrices=False)
    frac = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    d = int(np.searchsorted(frac, keep)) + 1
    return ac @ vt[:d].T
  return np.mean(np_cca(top(x), top(y)))


def np_pwcca(x, y):
  s, variates = np_cca(x, y, weights=True)
  q, _ = np.linalg.qr(variates)
  alpha = np.sum(np.abs(q.T @ (x - x.mean(0))), axis=1)
  return np.sum(alpha / alpha.sum() * s)


def np_cka(x, y):
  xc, yc = x - x.mean(0), y - y.mean(0)
  return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


NUMPY_MEASURES = {"cca": lambda x, y: np.mean(np_cca(x, y)), "svcca": np_svcca,
                  "pwcca": np_pwcca, "cka": np_cka}


class NumpySide:
  """The svcca-style NumPy loop over pairs."""

  def __init__(self, quick: bool):
    self.data = workload(quick)
    self.info = {"numpy": np.__version__}

  def run(self, dtype: str, measure: str) -> dict:
    data = {w: (xs.astype(dtype), ys.astype(dtype)) for w, (xs, ys) in self.data.items()}
    fn = NUMPY_MEASURES[measure]
    t0 = time.perf_counter()
    values = []
    for xs, ys in data.values():
      values.extend(float(fn(x, y)) for x, y in zip(xs.reshape(-1, *xs.shape[2:]),
                                                     ys.reshape(-1, *ys.shape[2:])))
    return {"seconds": time.perf_counter() - t0, "values": values}


# ---------------------------------------------------------------------------
# wsjax: one batched call per layer and measure.

class JaxSide:
  """`batched_similarity` over all pairs of a layer; compiled in set-up."""

  def __init__(self, quick: bool):
    import jax
    self.data = workload(quick)
    self.info = {"jax": jax.__version__, "compile_s": {}}
    for dtype in DTYPES:
      for measure in MEASURES:
        t0 = time.perf_counter()
        self.run(dtype, measure)
        self.info["compile_s"][f"{dtype}/{measure}"] = time.perf_counter() - t0

  def run(self, dtype: str, measure: str) -> dict:
    import jax
    from wsjax.analysis import similarity
    options = {"keep": KEEP} if measure == "svcca" else {}
    if measure in ("cca", "svcca", "pwcca"):
      options["epsilon"] = EPSILON
    data = {w: (xs.astype(dtype), ys.astype(dtype)) for w, (xs, ys) in self.data.items()}
    t0 = time.perf_counter()
    values = []
    for xs, ys in data.values():
      out = jax.block_until_ready(similarity.batched_similarity(measure, xs, ys, dtype=dtype, **options))
      values.extend(np.asarray(out, np.float64).ravel().tolist())
    return {"seconds": time.perf_counter() - t0, "values": values}


# ---------------------------------------------------------------------------
# Driver.

def run(quick: bool = False) -> dict:
  rounds = 3 if quick else 5
  cfg = sizes(quick)
  pairs = cfg["replicas"] * len(snapshot_pairs()) * len(cfg["widths"])
  result = {"benchmark": "similarity", "environment": {**common.environment(), **WORKER_ENV},
            "quick": quick,
            "sizes": {**cfg, "widths": list(cfg["widths"]), "snapshots": SNAPSHOTS,
                      "pairs_per_measure": pairs},
            "rounds": rounds, "cells": {}}
  common.log(f"similarity: {pairs} pairs per measure, set-up and compilation ...")
  sides = {"numpy": common.Worker("benchmarks.similarity:NumpySide", env=WORKER_ENV, quick=quick),
           "wsjax": common.Worker("benchmarks.similarity:JaxSide", env=WORKER_ENV, quick=quick)}
  result["compile_s"] = sides["wsjax"].info["compile_s"]
  with common.closing_all(sides):
    for dtype in DTYPES:
      for measure in MEASURES:
        common.log(f"similarity: {dtype} {measure} ...")
        runs = common.alternate(sides, "run", rounds, dtype, measure)
        secs = {s: [r["seconds"] for r in runs[s]] for s in sides}
        med = {s: common.median(v) for s, v in secs.items()}
        diff = float(np.max(np.abs(np.subtract(runs["numpy"][0]["values"],
                                               runs["wsjax"][0]["values"]))))
        result["cells"][f"{dtype}/{measure}"] = {
            "numpy_s": med["numpy"], "wsjax_s": med["wsjax"], "seconds_all": secs,
            "speedup": med["numpy"] / med["wsjax"], "max_abs_diff": diff}
    result["peak_rss_mb"] = {s: w.peak_rss_mb() for s, w in sides.items()}
  for dtype in DTYPES:
    cells = [result["cells"][f"{dtype}/{m}"] for m in MEASURES]
    result[f"speedup_{dtype}"] = sum(c["numpy_s"] for c in cells) / sum(c["wsjax_s"] for c in cells)
  return result


def report(result: dict) -> str:
  rows = []
  for key, c in result["cells"].items():
    dtype, measure = key.split("/")
    rows.append([dtype, measure, c["numpy_s"], c["wsjax_s"], f"{c['speedup']:.2f}x",
                 f"{c['max_abs_diff']:.1e}", result["compile_s"][key]])
  for dtype in DTYPES:
    cells = [c for k, c in result["cells"].items() if k.startswith(dtype)]
    rows.append([dtype, "all", sum(c["numpy_s"] for c in cells), sum(c["wsjax_s"] for c in cells),
                 f"{result[f'speedup_{dtype}']:.2f}x", "", None])
  s = result["sizes"]
  head = (f"{s['pairs_per_measure']} pairs per measure: widths {s['widths']}, {s['replicas']} replicas "
          f"x {s['snapshots']} snapshots (all pairs), {s['datapoints']} datapoints\n")
  return head + common.table(rows, ["dtype", "measure", "numpy s", "wsjax s", "speedup",
                                    "max |diff|", "compile s"])
