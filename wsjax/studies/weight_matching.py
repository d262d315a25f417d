"""Linear mode connectivity after weight matching, over widths (Git Re-Basin).

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023 (samuela/git-re-basin; PAPERS.md
section 5): two networks trained independently (other initialization, other
data order) are separated by a loss barrier on the straight line between
them; permuting one network's hidden units to match the other's weights
(`wsjax.transfer.weight_matching`) removes most of it, the more so the wider
the network.

For every width w of `--sweep_widths` (mlp: every hidden layer w units,
conv1d: w channels, resnet/conv8: base width w):

1. 2 x `seeds` networks are trained side by side (one stored run; pair i is
   replicas 2i and 2i + 1, seeds `seed_offset + 2i`, `+ 2i + 1`, each its
   own initialization and data order);
2. for each pair (a, b): the path (1 - alpha) a + alpha b at `points`
   alphas (25, git-re-basin's plots), loss and error on a training subset
   and the test set, BatchNorm statistics recomputed at every point
   (`wsjax.analysis.interpolation.line_barriers`); then b is permuted to
   match a (weight matching on the parameters, seeded by the pair) and the
   path from a to pi(b) is measured the same way (pi(b) computes exactly
   b's function);
3. barrier = max along the path - mean of the endpoints; mean +- std over
   pairs per width. The matching of a width is a stored result (its
   permuted networks as the `final` snapshot, barriers and matcher
   statistics in result.json).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from wsjax import config as config_lib
from wsjax import parallel
from wsjax import results as results_lib
from wsjax.analysis import interpolation
from wsjax.core import store as store_lib
from wsjax.core.data import TrainData
from wsjax.core.loop import Until
from wsjax.core.optim import OptimizerConfig
from wsjax.core.runner import train_run
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig, Setting, _f
from wsjax.transfer import PermutationSpec, apply_permutation, weight_matching
from wsjax.transfer.gmt import match_info_summary

WIDTH_MODELS = ("mlp", "conv1d", "resnet18", "resnet20", "conv8")
SALT_MATCH = 31  # the matcher's visiting order: key(seed of a) folded with this
BARRIER_SEED = 0  # the training subset the barriers are measured on


def width_options(model: ModelConfig, width: int) -> ModelConfig:
  """`model` at width `width`: mlp every hidden layer (the depth of
  `--widths`, default 2), conv1d its channels, resnets and conv8 their base
  width (`--widths`, the MLP's, is dropped)."""
  if model.name == "mlp":
    depth = len(model.widths) if model.widths else 2
    return dataclasses.replace(model, widths=(int(width),) * depth)
  if model.name == "conv1d":
    return dataclasses.replace(model, channels=int(width), widths=None)
  if model.name in WIDTH_MODELS:
    return dataclasses.replace(model, width=int(width), widths=None)
  raise ValueError(f"model {model.name!r} has no width option; the width sweep supports "
                   f"{', '.join(WIDTH_MODELS)}")


@dataclasses.dataclass(frozen=True)
class WeightMatchingConfig:
  """Barrier before and after weight matching, for several widths."""
  experiment: str = dataclasses.field(default="weight_matching", metadata={"flag": False})
  model: ModelConfig = ModelConfig(name="mlp", widths=(512, 512))
  data: DataConfig = DataConfig(dataset="fashion_mnist")
  optimizer: OptimizerConfig = OptimizerConfig()
  widths: tuple[int, ...] = _f((8, 32, 128, 512), "widths compared (mlp: every hidden layer, "
                               "conv1d: channels, resnet/conv8: base width)", flag="sweep_widths")
  epochs: int = _f(3, "training epochs of every network")
  points: int = _f(interpolation.REBASIN_POINTS, "alphas along each line, endpoints included "
                   "(git-re-basin: 25)")
  barrier_train_examples: int = _f(5000, "training examples the barriers are measured on "
                                   "(0: all)")
  seeds: int = _f(3, "pairs of independently trained networks")
  seed_offset: int = _f(0, "pair i: seeds seed_offset + 2i and + 2i + 1")
  max_sweeps: int = _f(100, "weight matching: at most this many sweeps")
  tol: float = _f(1e-12, "weight matching: stop after a sweep gaining at most this "
                  "(git-re-basin: 1e-12)")

  def validate(self) -> None:
    self.optimizer.validate()
    self.data.validate()
    if not self.widths:
      raise ValueError("--sweep_widths is empty; give widths, e.g. 8,32,128,512")
    if any(w < 1 for w in self.widths) or len(set(self.widths)) != len(self.widths):
      raise ValueError(f"--sweep_widths must be distinct positive ints, got "
                       f"{','.join(map(str, self.widths))}")
    width_options(self.model, self.widths[0])
    if self.epochs < 1:
      raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
    if self.points < 2:
      raise ValueError(f"--points must be >= 2 (the two endpoints), got {self.points}")
    if self.barrier_train_examples < 0:
      raise ValueError(f"--barrier_train_examples must be >= 0, got "
                       f"{self.barrier_train_examples}")
    if self.seeds < 1 or self.seed_offset < 0:
      raise ValueError(f"--seeds must be >= 1 and --seed_offset >= 0, got {self.seeds}, "
                       f"{self.seed_offset}")
    if self.max_sweeps < 1 or self.tol < 0:
      raise ValueError(f"--max_sweeps must be >= 1 and --tol >= 0, got {self.max_sweeps}, "
                       f"{self.tol}")

  @property
  def seed_list(self) -> tuple[int, ...]:
    return tuple(range(self.seed_offset, self.seed_offset + 2 * self.seeds))


class WeightMatchingStudy:
  """Runs a `WeightMatchingConfig` in `workdir`; checks everything first
  (every width's model and permutation spec) before anything is written."""

  def __init__(self, cfg: WeightMatchingConfig, workdir: str,
               runner: Optional[RunnerConfig] = None, *, log: Callable[[str], None] = print):
    cfg.validate()
    self.cfg = cfg
    runner = runner or RunnerConfig()
    if not runner.seed_devices:
      runner = dataclasses.replace(
          runner, seed_devices=parallel.default_seed_devices(2 * cfg.seeds))
    self.runner = runner
    self.log = log if jax.process_index() == 0 else (lambda s: None)
    self.dataset = cfg.data.load()
    self.store = store_lib.RunStore(os.path.join(os.path.abspath(workdir), "runs"))
    self.settings = {}
    for w in cfg.widths:
      model = width_options(cfg.model, w)
      s = Setting(model, cfg.data, cfg.optimizer, cfg.seed_list, runner, dataset=self.dataset)
      params = s.one_model_template()["params"]
      PermutationSpec.for_model(model.name, params)  # a one-line error for models without one
      self.settings[w] = s
    n = len(self.dataset.y_train)
    k = cfg.barrier_train_examples or n
    idx = np.sort(np.random.default_rng(BARRIER_SEED).permutation(n)[:min(k, n)])
    self.barrier_data = tuple(parallel.put_replicated(a) for a in (
        np.asarray(self.dataset.x_train)[idx], np.asarray(self.dataset.y_train)[idx].astype(np.int32),
        np.asarray(self.dataset.x_test), np.asarray(self.dataset.y_test).astype(np.int32)))

  def _base(self, model: ModelConfig) -> dict:
    cfg = self.cfg
    return {"protocol": "weight_matching",
            "model": {"name": model.name, **config_lib.nondefault(model)},
            "data": {"dataset": cfg.data.dataset, **config_lib.nondefault(cfg.data)},
            "optimizer": {"name": cfg.optimizer.name, **config_lib.nondefault(cfg.optimizer)},
            "epochs": cfg.epochs, "seeds": list(cfg.seed_list)}

  def _train(self, width: int):
    cfg, s = self.cfg, self.settings[width]
    data = TrainData(s.x_train, s.y_train, np.arange(len(self.dataset.y_train)),
                     cfg.data.batch_size)
    total = cfg.epochs * data.steps_per_epoch
    from wsjax.core.optim import make_optimizer
    tx = make_optimizer(cfg.optimizer, total)
    run = self.store.run({**self._base(s.model_cfg), "run": "train"},
                         label=f"{cfg.experiment}/width{width}/train")
    states, result = train_run(
        run, start_states=s.fresh_states, template=s.template(), program=s.program(tx=tx),
        data=data, until=Until.steps(total), data_seeds=s.seeds, start=0,
        checkpoint_every=self.runner.checkpoint_every, label=f"[width {width}] ", log=self.log,
        extra_result=lambda st: {"test_acc": [float(a) for a in s.program(tx=tx).evaluate(
            st, s.x_test, s.y_test)[0]]})
    self.log(f"[width {width}] {'reusing finished' if result['reused'] else 'trained'} run "
             f"run_{run.hash} ({len(s.seeds)} networks, {total} steps, test acc "
             f"{100 * np.mean(result['test_acc']):.1f}%)")
    return run, parallel.to_host(states), result

  def _variables(self, states, i: int) -> dict:
    out = {"params": jax.tree.map(lambda x: jnp.asarray(x[i]), states.params)}
    if states.batch_stats:
      out["batch_stats"] = jax.tree.map(lambda x: jnp.asarray(x[i]), states.batch_stats)
    return out

  def _match(self, width: int, train_run_: store_lib.Run, states) -> dict:
    cfg, s = self.cfg, self.settings[width]
    spec_run = {**self._base(s.model_cfg), "run": "match", "train": f"run_{train_run_.hash}",
                "points": cfg.points, "barrier_train_examples": cfg.barrier_train_examples,
                "max_sweeps": cfg.max_sweeps, "tol": cfg.tol}
    run = self.store.run(spec_run, label=f"{cfg.experiment}/width{width}/match")
    if run.done:
      self.log(f"[width {width}] reusing finished matching run_{run.hash}")
      return {**run.result(), "run": f"run_{run.hash}"}
    with run.lock():
      out = {"naive": {}, "matched": {}, "match": [], "matched_equal_b": []}
      matched = []
      variables = {"params": states.params}
      if states.batch_stats:
        variables["batch_stats"] = states.batch_stats
      full_spec = PermutationSpec.for_model(s.model_cfg.name, self._variables(states, 0))
      for i in range(cfg.seeds):
        a, b = self._variables(states, 2 * i), self._variables(states, 2 * i + 1)
        key = jax.random.fold_in(jax.random.key(cfg.seed_list[2 * i]), SALT_MATCH)
        perms, info = weight_matching(full_spec, a, b, key=key, max_sweeps=cfg.max_sweeps,
                                      tol=cfg.tol)
        b_matched = apply_permutation(full_spec, perms, b)
        out["match"].append(match_info_summary(info))
        out["matched_equal_b"].append(self._same_function(s, b, b_matched))
        matched.append(b_matched)
        for name, other in (("naive", b), ("matched", b_matched)):
          path = interpolation.line_barriers(s.model, a, other, self.barrier_data,
                                             n_points=cfg.points)
          for m in interpolation.METRICS:
            rec = out[name].setdefault(m, {"path": [], "barrier": []})
            rec["path"].append([float(v) for v in path[m]])
            rec["barrier"].append(float(path["barriers"][m]))
        self.log(f"[width {width}] pair {i + 1}/{cfg.seeds}: test loss barrier "
                 f"{out['naive']['test_loss']['barrier'][-1]:.3f} -> "
                 f"{out['matched']['test_loss']['barrier'][-1]:.3f} after matching "
                 f"({info.sweeps} sweeps)")
      out["alphas"] = [float(v) for v in interpolation.alphas(cfg.points)]
      stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *matched)
      final = {"params": stacked["params"], "batch_stats": stacked.get("batch_stats", {})}
      run.finish(final, out)
    return {**out, "run": f"run_{run.hash}"}

  def _same_function(self, s: Setting, b, b_matched) -> float:
    """Largest |logit difference| of b and pi(b) on the first 1000 test
    examples (eval mode): rounding only."""
    x = s.x_test[:1000]
    return float(jnp.max(jnp.abs(s.model.apply(b, x) - s.model.apply(b_matched, x))))

  def run(self) -> dict:
    cfg = self.cfg
    out = {"experiment": cfg.experiment, "config": config_lib.to_dict(cfg),
           "environment": {**results_lib.environment(),
                           "seed_devices": next(iter(self.settings.values())).replica_devices},
           "pairs": [[cfg.seed_list[2 * i], cfg.seed_list[2 * i + 1]] for i in range(cfg.seeds)],
           "widths": {}}
    for w in cfg.widths:
      run, states, result = self._train(w)
      match = self._match(w, run, states)
      s = self.settings[w]
      record = {"train_run": f"run_{run.hash}", "match_run": match["run"],
                "params": int(sum(np.prod(x.shape) for x in
                                  jax.tree.leaves(s.one_model_template()["params"]))),
                "test_acc": results_lib.summary(result["test_acc"]),
                "alphas": match["alphas"], "match": match["match"],
                "matched_equal_b": match["matched_equal_b"], "barriers": {}, "paths": {}}
      for name in ("naive", "matched"):
        record["barriers"][name] = {m: results_lib.summary(match[name][m]["barrier"])
                                    for m in interpolation.METRICS}
        record["paths"][name] = {m: match[name][m]["path"] for m in interpolation.METRICS}
      out["widths"][str(w)] = record
    return out


def study_hash(cfg: WeightMatchingConfig) -> str:
  return store_lib.spec_hash({"study": "weight_matching", **config_lib.nondefault(cfg),
                              "experiment": cfg.experiment})


__all__ = ["WIDTH_MODELS", "WeightMatchingConfig", "WeightMatchingStudy", "study_hash",
           "width_options"]
