"""IMP with rewinding, its controls, and perturbations at the rewind point.

Frankle, Schwab & Morcos, "The Early Phase of Neural Network Training", ICLR
2020 (PAPERS.md section 3), inside the lottery-ticket framework of open_lth
(facebookresearch/open_lth, `lottery/runner.py` and `lottery/branch/*`).

One LINEAGE per (pre-training kind, rewind step k) (`wsjax.studies.pretrain`
makes theta_k, the network at k):

* level 0 trains the dense network k -> T from theta_k (weights AND
  BatchNorm statistics) with a FRESH optimizer, the learning-rate schedule at
  k (it reads the global step) and the data order of one continuous run
  (step t is batch t % E of epoch t // E of the seed's order: the batches
  before k in k's epoch are skipped), as open_lth's `_train_level`; k = 0 is
  the original lottery ticket (level 0 is then the ordinary dense run);
* level L >= 1 prunes: m_L = global magnitude pruning of `prune_fraction` of
  the weights still kept by m_{L-1}, ranked by |w| of level L-1's FINAL
  weights (IMP replicas, per seed; `wsjax.pruning.global_magnitude_prune`,
  open_lth's `sparse_global` with its ceil count), so the density of the
  prunable weights is (1 - f)^L up to rounding. Then every variant trains
  k -> T from theta_k as level 0 does, under its mask (pruned weights held at
  exactly zero after every update: `Classification(masked=True)`):

  - `imp`: theta_k * m_L (IMP with rewinding);
  - `random_pruning`: theta_k * m', m' the IMP mask's kept positions
    shuffled within each layer (same per-layer sparsity; open_lth's
    `randomly_prune` branch, `layerwise`);
  - `random_reinit`: a FRESH initialization of the whole network (every
    parameter and the BatchNorm statistics, open_lth's
    `randomly_reinitialize` branch) times m_L, trained from k;
  - `sign_preserving`: fresh magnitudes with theta_k's signs, on the pruned
    network's kernels (`wsjax.transforms.sign_preserving_reinit`);
  - `shuffle` / `shuffle_keep_signs`: theta_k's kept weights permuted among
    each layer's kept positions (optionally each position keeping its sign,
    `wsjax.transforms.shuffle_weights`);
  - `noise`: theta_k + N(0, (noise_factor * std_l)^2) on each layer's kept
    weights, std_l that layer's std (`wsjax.transforms.gaussian_noise`).

  The perturbations (sign_preserving, shuffle*, noise) are not in open_lth's
  public code; they follow the paper. They touch the conv/dense kernels the
  mask prunes (the paper perturbs weights); biases, norm parameters, the
  dense classifier of models that keep it and the BatchNorm statistics stay
  theta_k's.

All variants x seeds of one level are ONE stored run, a stack of replicas
trained side by side, each with its own start state and mask (the mask is an
argument of the compiled program); replicas of a seed share its data order.
Level 0 is the dense network alone. Level L+1 needs level L's IMP weights,
so the levels of a lineage run one after the other; each level's run is
content-addressed (`wsjax.core.store`): model, data, optimizer, T, seeds,
pre-training, k, level, prune fraction, the variants, and the run its mask
came from. A finished level is loaded, not retrained, and its masks are
kept as the run's snapshot `mask` (the instability study reads IMP masks
from there). Draws are keyed by (seed, variant, level, k): `seed_keys(seeds,
SALT_VARIANT, code, level, k)`, code = the variant's index in `VARIANTS`.

A subnetwork MATCHES the dense network when its mean test accuracy over
seeds is at least the dense mean minus one standard deviation over seeds
(ddof 0), the dense network being the unpruned network trained normally,
0 -> T (the paper's gray band; the level 0 of plain rewinding to k = 0, a
run of its own when k = 0 is not a rewind step). Each lineage's level 0
(the dense network trained from theta_k with a fresh optimizer, open_lth's
level 0) is reported beside it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from wsjax import config as config_lib
from wsjax import parallel
from wsjax import pruning
from wsjax import results as results_lib
from wsjax import transforms as T
from wsjax.core import store as store_lib
from wsjax.core.hooks import Progress
from wsjax.core.loop import Until
from wsjax.core.runner import train_run
from wsjax.core.state import seed_keys, unstack
from wsjax.core.task import Classification
from wsjax.studies.common import _f
from wsjax.studies.pretrain import EarlyPhase, EarlyPhaseConfig, RewindPoints, rows, stack_rows

VARIANTS = ("imp", "random_pruning", "random_reinit", "sign_preserving", "shuffle",
            "shuffle_keep_signs", "noise")  # append only: a variant's index keys its draws
CONTROLS = ("random_pruning", "random_reinit")
DEFAULT_VARIANTS = ("imp", "random_pruning", "random_reinit")
SALT_VARIANT = 11
MASKED = Classification(masked=True)


@dataclasses.dataclass(frozen=True)
class LotteryConfig(EarlyPhaseConfig):
  """IMP with rewinding over levels, per rewind step and pre-training kind."""
  experiment: str = dataclasses.field(default="lottery", metadata={"flag": False})
  levels: int = _f(8, "pruning levels after the dense level 0 (density (1 - f)^L at level L)")
  prune_fraction: float = _f(0.2, "fraction f of the remaining weights pruned per level")
  variants: tuple[str, ...] = _f(DEFAULT_VARIANTS, "what trains at each pruned level: "
                                 + ", ".join(VARIANTS) + " (imp is required)")
  noise_factor: float = _f(1.0, "noise: std of the noise in units of each layer's weight std")

  def validate(self) -> None:
    super().validate()
    if self.levels < 0:
      raise ValueError(f"--levels must be >= 0 (0 trains the dense network only), got "
                       f"{self.levels}")
    if not 0 < self.prune_fraction < 1:
      raise ValueError(f"--prune_fraction must be in (0, 1) (0.2 prunes 20% of the remaining "
                       f"weights per level), got {self.prune_fraction}")
    unknown = [v for v in self.variants if v not in VARIANTS]
    if unknown:
      raise ValueError(f"unknown variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if len(set(self.variants)) != len(self.variants):
      raise ValueError(f"--variants repeats: {', '.join(self.variants)}")
    if "imp" not in self.variants:
      raise ValueError("--variants must include imp: its final weights give the next level's "
                       "mask")
    if not self.noise_factor >= 0:
      raise ValueError(f"--noise_factor must be >= 0, got {self.noise_factor}")


def level_variants(variants: Sequence[str], level: int) -> tuple[str, ...]:
  """What trains at `level`: the dense network alone at level 0, IMP first
  then the others in the given order at pruned levels."""
  if level == 0:
    return ("imp",)
  return ("imp", *[v for v in variants if v != "imp"])


def summarize(values: Sequence[float]) -> dict:
  """mean, std (ddof 0) and the values, over seeds."""
  return results_lib.summary(values)


def matches(acc: dict, dense: dict) -> bool:
  """Frankle et al.'s "matching": mean >= dense mean - dense std (over seeds)."""
  return bool(acc["mean"] >= dense["mean"] - dense["std"])


class Lineage:
  """IMP with rewinding to one step k after one pre-training: levels
  0, 1, ... (see the module docstring). `run_level(L)` loads or trains
  level L (levels in order); `imp_masks` holds the IMP masks of the last
  level prepared (per seed, host)."""

  def __init__(self, ctx: EarlyPhase, points: RewindPoints, k: int, variants: Sequence[str],
               fraction: float, noise_factor: float = 1.0, label: str = ""):
    self.ctx, self.points, self.k = ctx, points, int(k)
    self.variants = tuple(variants)
    self.fraction = float(fraction)
    self.noise_factor = float(noise_factor)
    self.label = label or f"{points.kind} k={k}"
    s = ctx.setting
    one = unstack(s.template().params, 0)
    self.model_name = ctx.cfg.model.name
    dense = pruning.ones_mask(one, self.model_name)
    self.imp_masks = jax.tree.map(lambda m: np.broadcast_to(np.asarray(m), (len(s.seeds),
                                                                            *np.shape(m))).copy(),
                                  dense)
    self.level = -1
    self.prev_run: Optional[store_lib.Run] = None
    self.prev_final = None

  # ---- specs ----------------------------------------------------------------
  def lineage_spec(self) -> dict:
    """What every level of this lineage shares."""
    return {"protocol": "lottery", **self.ctx.base, "pretrain": self.points.spec_kind,
            "rewind_step": self.k, "origin": self.points.origin(self.k)}

  def level_spec(self, level: int) -> dict:
    spec = {**self.lineage_spec(), "level": level,
            "variants": list(level_variants(self.variants, level))}
    if level > 0:
      spec.update(prune_fraction=self.fraction, mask_from=f"run_{self.prev_run.hash}")
      if "noise" in self.variants:
        spec["noise_factor"] = self.noise_factor
    return spec

  # ---- masks ----------------------------------------------------------------
  def next_masks(self):
    """m_{L+1} from the last level's IMP final weights (per seed, host);
    becomes `imp_masks`."""
    n = len(self.ctx.setting.seeds)
    params = rows(parallel.to_host(self.prev_final.params), 0, n)
    self.imp_masks = parallel.to_host(_prune(self.fraction)(params, self.imp_masks))
    return self.imp_masks

  def group_masks(self, level: int) -> dict:
    """Host masks of every replica of `level`'s group (variant-major)."""
    parts = []
    for v in level_variants(self.variants, level):
      if v == "random_pruning":
        parts.append(parallel.to_host(_random_prune(self.imp_masks, self._keys(v, level))))
      else:
        parts.append(self.imp_masks)
    return stack_rows(parts)

  def _keys(self, variant: str, level: int):
    return seed_keys(self.ctx.setting.seeds, SALT_VARIANT, VARIANTS.index(variant), level,
                     self.k)

  # ---- start states ---------------------------------------------------------
  def start_states(self, level: int, masks: dict):
    """The group's start: per variant, theta_k transformed under its mask."""
    ctx = self.ctx
    s = ctx.setting
    n = len(s.seeds)
    base = parallel.to_host(self.points.states(self.k))
    parts = []
    for i, v in enumerate(level_variants(self.variants, level)):
      m = rows(masks, i * n, (i + 1) * n)
      params, stats = base.params, base.batch_stats
      if v == "random_reinit":
        fresh = parallel.to_host(s.fresh_states(SALT_VARIANT, VARIANTS.index(v), level, self.k))
        params, stats = fresh.params, fresh.batch_stats
      elif v in ("sign_preserving", "shuffle", "shuffle_keep_signs", "noise"):
        perturb = _perturbation(v, s.init_variables)
        params = parallel.to_host(perturb(params, m, self._keys(v, level),
                                          jnp.float32(self.noise_factor)))
      params = parallel.to_host(mask_params(params, m))
      parts.append(base.replace(params=params, batch_stats=stats))
    states = stack_rows(parts)
    states = parallel.put_replicated(states)
    return states.replace(opt_state=ctx.init_opt(states.params))

  # ---- levels ---------------------------------------------------------------
  def run_level(self, level: int, *, hooks: Sequence = (), on_start: Optional[Callable] = None
                ) -> dict:
    """Loads or trains `level` (the next one); returns its record."""
    if level != self.level + 1:
      raise ValueError(f"levels run in order: level {level} after {self.level}")
    ctx = self.ctx
    s = ctx.setting
    if level > 0:
      self.next_masks()
    variants = level_variants(self.variants, level)
    n = len(s.seeds)
    masks = self.group_masks(level)
    run = ctx.store.run(self.level_spec(level),
                        label=f"{ctx.cfg.experiment}/{self.points.kind}/k{self.k}/level{level}")
    program = s.program(MASKED)

    def start():
      if on_start is not None:
        on_start()
      run.save_snapshot("mask", masks)
      return self.start_states(level, masks)

    label = f"[{self.label} level {level}] "
    states, result = train_run(
        run, start_states=start, template=ctx.template(len(variants) * n), program=program,
        data=ctx.train_data(), until=Until.steps(ctx.total_steps),
        data_seeds=list(s.seeds) * len(variants), start=self.k,
        inputs=lambda: {"mask": parallel.put_replicated(masks)}, hooks=hooks,
        checkpoint_every=ctx.runner.checkpoint_every, label=label, log=ctx.log,
        extra_result=lambda st: {**ctx.test_accuracy(program, st),
                                 "density": [float(d) for d in _densities(masks)]})
    if result["reused"]:
      ctx.log(f"{label}reusing finished run run_{run.hash}")
    self.level, self.prev_run = level, run
    self.prev_final = states
    return self._record(level, variants, result, masks)

  def _record(self, level: int, variants, result: dict, masks) -> dict:
    n = len(self.ctx.setting.seeds)
    report = [pruning.sparsity_report(unstack(self.imp_masks, i)) for i in range(n)]
    out = {"level": level, "density": float(np.mean([r["overall"]["density"] for r in report])),
           "kept": [r["overall"]["kept"] for r in report],
           "layers": {name: [r["layers"][name]["density"] for r in report]
                      for name in report[0]["layers"]},
           "run": result["run"], "wall_s": float(result.get("wall_s", 0.0)), "variants": {}}
    for i, v in enumerate(variants):
      mine = slice(i * n, (i + 1) * n)
      out["variants"][v] = {**summarize(result["test_acc"][mine]),
                            "test_acc": result["test_acc"][mine],
                            "train_acc": result["last_epoch_acc"][mine],
                            "steps": [int(x) for x in result["steps"][mine]],
                            "density": result["density"][mine]}
    return out


def _densities(masks):
  return np.asarray(jax.vmap(pruning.density)(masks))


@functools.lru_cache(maxsize=None)
def _prune(fraction: float):
  """The next level's masks of a stack of replicas (jitted, vmapped)."""
  return jax.jit(jax.vmap(lambda p, m: pruning.global_magnitude_prune(p, m, fraction)))


@jax.jit
def _random_prune(masks, keys):
  return jax.vmap(pruning.random_prune_like)(masks, keys)


@jax.jit
def mask_params(params, masks):
  """`apply_mask` of a stack of replicas (each its own mask)."""
  return jax.vmap(pruning.apply_mask)(params, masks)


@functools.lru_cache(maxsize=None)
def _perturbation(variant: str, init_fn):
  """`(params, masks, keys, factor) -> params` of a stack of replicas, the
  perturbation `variant` under each replica's mask (jitted, vmapped)."""
  return jax.jit(jax.vmap(functools.partial(_perturb_one, variant, init_fn),
                          in_axes=(0, 0, 0, None)))


def _perturb_one(variant: str, init_fn, params, mask, key, factor):
  """theta_k of one replica perturbed by `variant` under `mask`."""
  if variant == "sign_preserving":
    tx = T.sign_preserving_reinit(init_fn, key, mask)
  elif variant == "shuffle":
    tx = T.shuffle_weights(key, mask)
  elif variant == "shuffle_keep_signs":
    tx = T.shuffle_weights(key, mask, keep_signs=True)
  elif variant == "noise":
    tx = T.gaussian_noise(key, mask, factor)
  else:
    raise ValueError(f"no perturbation {variant!r}")
  return T.apply_transform(tx, params)


def find_stored_masks(ctx: EarlyPhase, points: RewindPoints, k: int, level: int,
                      fraction: float):
  """IMP masks of `level` from a finished lottery run of this lineage in the
  store (any variants), as (host masks per seed, run), or None."""
  want = {"protocol": "lottery", **ctx.base, "pretrain": points.spec_kind, "rewind_step": int(k),
          "origin": points.origin(k), "level": int(level), "prune_fraction": float(fraction)}
  n = len(ctx.setting.seeds)
  for info in ctx.store.runs():
    spec = info.get("spec", {})
    if info["status"] != "done" or "mask" not in info["snapshots"]:
      continue
    if any(spec.get(key) != value for key, value in want.items()):
      continue
    variants = spec.get("variants", [])
    if "imp" not in variants:
      continue
    run = store_lib.load_run(info["dir"])
    template = _mask_template(ctx, n * len(variants))
    masks = parallel.to_host(run.load_snapshot("mask", template))
    i = variants.index("imp")
    return rows(masks, i * n, (i + 1) * n), run
  return None


def _mask_template(ctx: EarlyPhase, replicas: int):
  one = unstack(ctx.setting.template().params, 0)
  dense = pruning.ones_mask(one, ctx.cfg.model.name)
  return jax.tree.map(lambda m: np.zeros((replicas, *np.shape(m)), bool), dense)


class LotteryStudy:
  """Runs a `LotteryConfig` in `workdir` (runs stored in `workdir/runs`)."""

  def __init__(self, cfg: LotteryConfig, workdir: str, runner, *,
               log: Callable[[str], None] = print):
    cfg.validate()
    self.cfg = cfg
    self.ctx = EarlyPhase(cfg, workdir, runner, log=log,
                          replicas=len(level_variants(cfg.variants, 1)) * cfg.seeds)

  def lineages(self) -> list[Lineage]:
    ctx, cfg = self.ctx, self.cfg
    return [Lineage(ctx, ctx.points[kind], k, cfg.variants, cfg.prune_fraction,
                    cfg.noise_factor)
            for kind in cfg.pretrain.kinds for k in ctx.rewind_points(kind)]

  def dense_reference(self) -> dict:
    """The dense network trained 0 -> T (plain training, k = 0, level 0),
    the reference every subnetwork is compared with: trained here unless
    a k = 0 lineage trains it (the same run)."""
    ctx = self.ctx
    points = ctx.points.get("none") or RewindPoints(ctx, "none", ())
    rec = Lineage(ctx, points, 0, ("imp",), self.cfg.prune_fraction).run_level(0)
    return {**summarize(rec["variants"]["imp"]["test_acc"]), "run": rec["run"]}

  def run(self) -> dict:
    cfg, ctx = self.cfg, self.ctx
    out = {"experiment": cfg.experiment, "config": config_lib.to_dict(cfg),
           "environment": {**results_lib.environment(),
                           "seed_devices": ctx.setting.replica_devices},
           "total_steps": ctx.total_steps,
           "iterations_per_epoch": ctx.train_data().steps_per_epoch, "lineages": []}
    lineages = self.lineages()
    ctx.bar = tqdm.tqdm(total=len(lineages) * (cfg.levels + 1), desc="levels", unit="run",
                        disable=not ctx.progress, dynamic_ncols=True)
    try:
      out["dense"] = self.dense_reference()
      for lineage in lineages:
        out["lineages"].append(self._run_lineage(lineage, out["dense"]))
    finally:
      ctx.bar.close()
    return out

  def _run_lineage(self, lineage: Lineage, dense: dict) -> dict:
    cfg, ctx = self.cfg, self.ctx
    levels = []
    for level in range(cfg.levels + 1):
      hooks = [Progress(ctx.bar if ctx.progress else None, f"{lineage.label} level {level}")]
      levels.append(lineage.run_level(level, hooks=hooks))
      ctx.bar.update(1)
    for rec in levels:
      for acc in rec["variants"].values():
        acc["matches"] = matches(acc, dense)
    return {"pretrain": lineage.points.kind, "rewind_step": lineage.k,
            "rewind": ctx.step_names[lineage.k],
            "dense_from_k": summarize(levels[0]["variants"]["imp"]["test_acc"]),
            "matching": matching_summary(levels, lineage.variants), "levels": levels}


def matching_summary(levels: Sequence[dict], variants: Sequence[str]) -> dict:
  """Per variant: the deepest level L such that the variant matches the
  dense network at every pruned level 1..L (0: not even at level 1), and
  that level's density."""
  out = {}
  for v in variants:
    deepest = 0
    for rec in levels[1:]:
      if v in rec["variants"] and rec["variants"][v]["matches"]:
        deepest = rec["level"]
      else:
        break
    out[v] = {"level": deepest, "density": levels[deepest]["density"]}
  return out


def study_hash(cfg: LotteryConfig) -> str:
  """Names a study's results (every result-determining field)."""
  return store_lib.spec_hash({"study": "lottery", **config_lib.nondefault(cfg)})


__all__ = ["CONTROLS", "DEFAULT_VARIANTS", "LotteryConfig", "LotteryStudy", "Lineage",
           "VARIANTS", "find_stored_masks", "level_variants", "mask_params", "matches",
           "matching_summary", "study_hash"]
