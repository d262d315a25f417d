"""Instability analysis: linear mode connectivity of copies trained from step k.

Frankle, Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the Lottery
Ticket Hypothesis", ICML 2020, as used by Frankle, Schwab & Morcos, ICLR 2020
(PAPERS.md section 3; neither is in open_lth's public code). For the
network at step k (`wsjax.studies.pretrain`: the dense network after plain
or altered pre-training 0 -> k), and optionally the IMP subnetwork at
pruning level L rewound to k (its mask m_L found by IMP with rewinding to
k, `wsjax.studies.lottery`):

1. `copies` copies of theta_k (times m_L) per seed are trained k -> T with
   DIFFERENT data orders, everything else equal: a fresh optimizer, the
   learning-rate schedule at k, the mask held at zero. Copy c of seed s
   draws epoch e's order from `default_rng([s * MAX_COPIES + c, COPY_SALT,
   e])`, a stream of its own (the pre-training 0 -> k used `[s, e]`).
   All seeds x copies are one stored run, replicas side by side.
2. For every pair of copies of one seed, the error (and loss) along the
   straight line between their final weights, at `points` evenly spaced
   alphas in [0, 1] (30 in the paper), on the training and the test set,
   BatchNorm statistics recomputed at every point
   (`wsjax.analysis.interpolation.pairwise_barriers`);
3. the instability of theta_k is the error barrier
   max_alpha err(alpha) - (err(0) + err(1)) / 2, averaged over the seed's
   pairs, then mean +- std over seeds. The network is "stable" at k when
   it is near 0 (the paper's cut: 2%).

Barrier vs k answers "from what k is SGD's noise unable to pull the copies
into different basins?" (dense ResNet-20 on CIFAR-10: stable within the
first few thousand iterations; IMP subnetworks match the dense network from
the k at which they become stable).

IMP masks of level L are read from a finished lottery run of the same
lineage in the study's store when one exists (the lottery program run in
the same workdir with the same model, data, optimizer, T, seeds,
pre-training, k and prune fraction; `lottery.find_stored_masks`), else
computed: levels 0 .. L-1 of IMP with rewinding to k (IMP alone), then
pruning level L-1's final weights.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np
import tqdm

from wsjax import config as config_lib
from wsjax import parallel
from wsjax import results as results_lib
from wsjax.analysis import interpolation
from wsjax.core import store as store_lib
from wsjax.core.hooks import Progress
from wsjax.core.loop import Until
from wsjax.core.runner import train_run
from wsjax.core.task import Classification, Task
from wsjax.studies import lottery
from wsjax.studies.common import _f
from wsjax.studies.pretrain import EarlyPhase, EarlyPhaseConfig, rows

MAX_COPIES = 1000
COPY_SALT = 1  # the copies' data stream: TrainData(salt=(COPY_SALT,))
METRICS = interpolation.METRICS


@dataclasses.dataclass(frozen=True)
class InstabilityConfig(EarlyPhaseConfig):
  """Barrier vs rewind step k for the dense network and IMP subnetworks."""
  experiment: str = dataclasses.field(default="instability", metadata={"flag": False})
  copies: int = _f(2, "copies trained from each state at k with different data orders (every "
                   "pair of copies of a seed is compared)")
  points: int = _f(interpolation.INSTABILITY_POINTS, "alphas along each line, both endpoints "
                   "included")
  imp_levels: tuple[int, ...] = _f((), "also the IMP subnetworks at these pruning levels L >= 1 "
                                   "(density (1 - f)^L), masks from a stored lottery run or "
                                   "computed")
  prune_fraction: float = _f(0.2, "fraction f of the remaining weights pruned per IMP level")

  def validate(self) -> None:
    super().validate()
    if not 2 <= self.copies <= MAX_COPIES:
      raise ValueError(f"--copies must be in [2, {MAX_COPIES}] (a barrier needs a pair), got "
                       f"{self.copies}")
    if self.points < 2:
      raise ValueError(f"--points must be >= 2 (the two endpoints), got {self.points}")
    bad = [level for level in self.imp_levels if level < 1]
    if bad:
      raise ValueError(f"--imp_levels must be >= 1 (level 0 is the dense network, always "
                       f"measured), got {bad[0]}")
    if len(set(self.imp_levels)) != len(self.imp_levels):
      raise ValueError(f"--imp_levels repeats: {', '.join(map(str, self.imp_levels))}")
    if not 0 < self.prune_fraction < 1:
      raise ValueError(f"--prune_fraction must be in (0, 1), got {self.prune_fraction}")


def copy_data_seeds(seeds, copies: int) -> list[int]:
  """Data seed of copy c of seed s (seed-major): s * MAX_COPIES + c."""
  return [int(s) * MAX_COPIES + c for s in seeds for c in range(copies)]


class InstabilityStudy:
  """Runs an `InstabilityConfig` in `workdir` (runs stored in `workdir/runs`)."""

  def __init__(self, cfg: InstabilityConfig, workdir: str, runner, *,
               log: Callable[[str], None] = print):
    cfg.validate()
    self.cfg = cfg
    self.ctx = EarlyPhase(cfg, workdir, runner, log=log, replicas=cfg.seeds * cfg.copies)

  # ---- masks ----------------------------------------------------------------
  def imp_masks(self, kind: str, k: int, level: int):
    """(IMP masks of `level` at k, per seed, host; their provenance)."""
    ctx, cfg = self.ctx, self.cfg
    points = ctx.points[kind]
    found = lottery.find_stored_masks(ctx, points, k, level, cfg.prune_fraction)
    if found is not None:
      masks, run = found
      ctx.log(f"[{kind} k={k}] IMP masks of level {level} from the stored lottery run "
              f"run_{run.hash}")
      return masks, {"mask_from": run.spec["mask_from"], "found_in": f"run_{run.hash}"}
    chain = lottery.Lineage(ctx, points, k, ("imp",), cfg.prune_fraction,
                            label=f"imp {kind} k={k}")
    for lv in range(level):
      chain.run_level(lv)
    masks = chain.next_masks()
    return masks, {"mask_from": f"run_{chain.prev_run.hash}"}

  # ---- one state at k -------------------------------------------------------
  def _spec(self, kind: str, k: int, level: int, mask_origin: Optional[dict]) -> dict:
    points = self.ctx.points[kind]
    spec = {"protocol": "instability", **self.ctx.base, "pretrain": points.spec_kind,
            "rewind_step": int(k), "origin": points.origin(k), "copies": self.cfg.copies,
            "copy_stream": COPY_SALT, "level": int(level)}
    if level:
      spec.update(prune_fraction=self.cfg.prune_fraction, mask=mask_origin)
    return spec

  def measure(self, kind: str, k: int, level: int, bar=None) -> dict:
    """Trains (or loads) the copies from theta_k (IMP level `level`, 0 =
    dense) and returns the barriers between them."""
    ctx, cfg = self.ctx, self.cfg
    s = ctx.setting
    n = cfg.copies
    masks, mask_origin = (None, None) if level == 0 else self.imp_masks(kind, k, level)
    if masks is not None:
      masks = jax.tree.map(lambda m: np.repeat(np.asarray(m), n, axis=0), masks)
    run = ctx.store.run(self._spec(kind, k, level, mask_origin),
                        label=f"{cfg.experiment}/{kind}/level{level}/k{k}")
    program = s.program(Classification(masked=True) if level else Task())

    def start():
      base = parallel.to_host(ctx.points[kind].states(k))
      states = jax.tree.map(lambda x: np.repeat(np.asarray(x), n, axis=0), base)
      if masks is not None:
        states = states.replace(params=parallel.to_host(lottery.mask_params(states.params, masks)))
      states = parallel.put_replicated(states)
      return states.replace(opt_state=ctx.init_opt(states.params))

    label = f"[{kind} level {level} k={k}] "
    inputs = None if masks is None else (lambda: {"mask": parallel.put_replicated(masks)})
    _, result = train_run(
        run, start_states=start, template=ctx.template(cfg.seeds * n), program=program,
        data=ctx.train_data(salt=(COPY_SALT,)), until=Until.steps(ctx.total_steps),
        data_seeds=copy_data_seeds(s.seeds, n), start=k, inputs=inputs,
        hooks=[Progress(bar, f"{kind} level {level} k={k}")],
        checkpoint_every=ctx.runner.checkpoint_every, label=label, log=ctx.log,
        extra_result=lambda st: {**ctx.test_accuracy(program, st), **self._barriers(st)})
    if result["reused"]:
      ctx.log(f"{label}reusing finished run run_{run.hash}")
    return self._record(k, result)

  def _barriers(self, states) -> dict:
    """Paths and barriers between every pair of copies of each seed."""
    ctx, cfg = self.ctx, self.cfg
    s = ctx.setting
    host = parallel.to_host(states)
    variables = {"params": host.params}
    if host.batch_stats:
      variables["batch_stats"] = host.batch_stats
    d = s.dataset
    per_seed = []
    for i in range(len(s.seeds)):
      finals = rows(variables, i * cfg.copies, (i + 1) * cfg.copies)
      r = interpolation.pairwise_barriers(s.model, finals,
                                          (d.x_train, d.y_train, d.x_test, d.y_test),
                                          n_points=cfg.points)
      per_seed.append(r)
    return {"alphas": [float(a) for a in per_seed[0]["alphas"]],
            "pairs": [list(p) for p in per_seed[0]["pairs"]],
            "paths": {m: [np.asarray(r[m]).tolist() for r in per_seed] for m in METRICS},
            "barriers": {m: [np.asarray(r["barriers"][m]).tolist() for r in per_seed]
                         for m in METRICS}}

  def _record(self, k: int, result: dict) -> dict:
    out = {"rewind_step": int(k), "rewind": self.ctx.step_names[k],
           "run": result["run"], "wall_s": float(result.get("wall_s", 0.0)),
           "test_acc": result["test_acc"], "steps": [int(x) for x in result["steps"]],
           "alphas": result["alphas"], "barrier": {}, "path": {}}
    for m in METRICS:
      seed_means = [float(np.mean(b)) for b in result["barriers"][m]]  # over a seed's pairs
      out["barrier"][m] = results_lib.summary(seed_means)
      paths = np.asarray(result["paths"][m], np.float64)               # (seeds, pairs, points)
      out["path"][m] = paths.reshape(-1, paths.shape[-1]).mean(0).tolist()
    return out

  # ---- the study ------------------------------------------------------------
  def curves(self) -> list[tuple[str, int]]:
    """(pre-training kind, level) of every barrier-vs-k curve."""
    return [(kind, level) for kind in self.cfg.pretrain.kinds
            for level in (0, *self.cfg.imp_levels)]

  def run(self) -> dict:
    cfg, ctx = self.cfg, self.ctx
    out = {"experiment": cfg.experiment, "config": config_lib.to_dict(cfg),
           "environment": {**results_lib.environment(),
                           "seed_devices": ctx.setting.replica_devices},
           "total_steps": ctx.total_steps,
           "iterations_per_epoch": ctx.train_data().steps_per_epoch, "curves": []}
    total = sum(len(ctx.rewind_points(kind)) for kind, _ in self.curves())
    bar = tqdm.tqdm(total=total, desc="states at k", unit="run", disable=not ctx.progress,
                    dynamic_ncols=True)
    try:
      for kind, level in self.curves():
        points = []
        for k in ctx.rewind_points(kind):
          points.append(self.measure(kind, k, level, bar if ctx.progress else None))
          bar.update(1)
        out["curves"].append({"pretrain": kind, "level": level,
                              "nominal_density": (1 - cfg.prune_fraction) ** level,
                              "points": points})
    finally:
      bar.close()
    return out


def study_hash(cfg: InstabilityConfig) -> str:
  """Names a study's results (every result-determining field)."""
  return store_lib.spec_hash({"study": "instability", **config_lib.nondefault(cfg)})


__all__ = ["COPY_SALT", "InstabilityConfig", "InstabilityStudy", "MAX_COPIES",
           "copy_data_seeds", "study_hash"]
