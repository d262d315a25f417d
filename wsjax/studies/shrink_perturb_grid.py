"""The shrink-and-perturb grid: every (shrink, perturb) cell and seed in ONE program.

Ash & Adams, "On Warm-Starting Neural Network Training", NeurIPS 2020
(PAPERS.md section 1; code github.com/JordanAsh/warm_start, run.py): their
figure of final test accuracy and training time over a grid of shrink and
perturb values, in the two-phase protocol:

1. stage 1: every seed trains from a fresh initialization on a random
   `fraction` of the training set (`wsjax.data.make_schedule("two_phase",
   n, data_seed, fraction)`) until its epoch-mean training accuracy reaches
   `threshold` (99%, as their code) or `max_epochs`; one stored run of the
   S seeds side by side;
2. stage 2: for every cell (s, p) and seed i, replica r = c * S + i starts
   from
       theta_r = s * theta_i + p * theta_fresh_i
   (`wsjax.transforms.shrink_perturb`, every parameter; theta_i seed i's
   stage-1 result, theta_fresh_i a fresh draw of the model's initializer),
   with fresh BatchNorm statistics and a new optimizer, as their
   `shrink_perturb`, which builds a new network and mixes it in, and
   re-creates the optimizer every round. All C * S replicas then train on
   the whole training set as ONE compiled program (`wsjax.core.train`,
   replicas vmapped): the per-replica shrink and perturb are data, the mix
   is one jitted, vmapped function of per-replica scalars and keys, and each
   replica stops on its own at the threshold (`Until.accuracy`; a stopped
   replica rides along under vmap, but its steps are not counted). The
   official code runs one process per cell.

(1, 0) is a warm start with a fresh optimizer and fresh BatchNorm
statistics; (0, 1) is a fresh initialization (a draw of its own, not the
cold start's); (0, 0) is the all-zero network, which cannot learn (every
hidden unit and gradient is zero but the head's bias): it runs to
`max_epochs`, and so does the whole program, whose length is that of its
slowest replica.

Draws. Seed i's fresh draw in every cell is the staged study's
`shrink_perturb` draw for stage 1 (key `seed_keys([i], 1, SP_KEY_SALT)`,
split inside the transform), and the rest of the start (BatchNorm
statistics, the replica's own key) is the stage's fresh state
`fresh_states(1, 0)`; stage 2 sees the staged order of batches (seed i,
`salt=(1,)`). So cell (s, p) is exactly the staged study's
`--methods=shrink_perturb --shrink=s --perturb=p` up to float rounding (a
replica inside a larger group sums in another order), and cells share
their fresh draw per seed (common random numbers across the grid).

Runs (`wsjax.core.store`): stage 1 is a stored run of the S seeds, stage 2
a stored run of the whole grid (a hash covers the group), whose spec names
stage 1's run and the cells; a finished study is loaded, not retrained,
and a killed one resumes.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from wsjax import config as config_lib
from wsjax import parallel
from wsjax import results as results_lib
from wsjax import transforms as T
from wsjax.core import store as store_lib
from wsjax.core.data import TrainData
from wsjax.core.hooks import Progress
from wsjax.core.loop import Until
from wsjax.core.optim import OptimizerConfig, make_optimizer
from wsjax.core.runner import train_run
from wsjax.core.state import seed_keys
from wsjax.data import make_schedule
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig, Setting, _f

# The key salt of the staged study's shrink_perturb draw (wsjax.studies.methods:
# `seed_keys(seeds, stage, 13)`); a test pins the equality of the two.
SP_KEY_SALT = 13
STAGES = 2


@dataclasses.dataclass(frozen=True)
class GridConfig:
  """The two-phase protocol with a grid of shrink-and-perturb starts."""
  experiment: str = dataclasses.field(default="shrink_perturb_grid", metadata={"flag": False})
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig(lr=3e-3)
  shrinks: tuple[float, ...] = _f((0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                                  "shrink factors of the grid (each in [0, 1])")
  perturbs: tuple[float, ...] = _f((0.0, 0.01, 0.1, 1.0),
                                   "perturb factors of the grid (each in [0, 1])")
  fraction: float = _f(0.5, "fraction of the training set in stage 1")
  data_seed: int = _f(0, "seed of the data arrival order")
  seeds: int = _f(3, "number of seeds (every cell x seed is a replica of one program)")
  seed_offset: int = _f(0, "first seed")
  threshold: float = _f(0.99, "stop a replica at this epoch-mean train accuracy; 0: fixed "
                        "--max_epochs")
  max_epochs: int = _f(200, "epoch cap per stage")

  def validate(self) -> None:
    self.optimizer.validate()
    self.data.validate()
    for name, values in (("shrinks", self.shrinks), ("perturbs", self.perturbs)):
      if not values:
        raise ValueError(f"--{name} is empty: the grid needs at least one value, e.g. "
                         f"--{name}=0,0.5,1")
      bad = [v for v in values if not 0 <= v <= 1]
      if bad:
        raise ValueError(f"--{name}: {bad[0]} is outside [0, 1]; shrink and perturb factors "
                         "are in [0, 1]")
      if len(set(values)) != len(values):
        raise ValueError(f"--{name} repeats a value: {', '.join(map(str, values))}")
    if not 0 < self.fraction < 1:
      raise ValueError(f"--fraction must be in (0, 1) (stage 1 trains on part of the data), "
                       f"got {self.fraction}")
    if self.data_seed < 0:
      raise ValueError(f"--data_seed must be >= 0, got {self.data_seed}")
    if self.seeds < 1:
      raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
    if self.seed_offset < 0:
      raise ValueError(f"--seed_offset must be >= 0, got {self.seed_offset}")
    if not 0 <= self.threshold <= 1:
      raise ValueError(f"stopping threshold must be in (0, 1] (or 0 for fixed epochs), "
                       f"got {self.threshold}")
    if self.max_epochs < 1:
      raise ValueError(f"--max_epochs must be >= 1, got {self.max_epochs}")

  @property
  def seed_list(self) -> tuple[int, ...]:
    return tuple(range(self.seed_offset, self.seed_offset + self.seeds))

  @property
  def cells(self) -> list[tuple[float, float]]:
    """(shrink, perturb) of every cell, perturb-major: row = perturb, column = shrink."""
    return [(float(s), float(p)) for p in self.perturbs for s in self.shrinks]

  @property
  def replicas(self) -> int:
    """Replicas of the stage-2 program: cells x seeds."""
    return len(self.cells) * self.seeds

  def until(self) -> Until:
    return Until.accuracy(self.threshold or None, self.max_epochs)


def replica_values(cells, n_seeds: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-replica (shrink, perturb), float32 (R,), replica r = cell * n_seeds + seed."""
  shrink = np.repeat(np.asarray([c[0] for c in cells], np.float32), n_seeds)
  perturb = np.repeat(np.asarray([c[1] for c in cells], np.float32), n_seeds)
  return shrink, perturb


def tile_replicas(tree, n_cells: int):
  """A seed-stacked tree (S, ...) repeated for every cell: (n_cells * S, ...),
  replica r = c * S + i holding seed i."""
  return jax.tree.map(lambda x: jnp.tile(x, (n_cells,) + (1,) * (x.ndim - 1)), tree)


def mix_params(params, keys, shrink, perturb, init_variables):
  """Ash & Adams' shrink-and-perturb of every replica at once:

      theta_r <- shrink_r * theta_r + perturb_r * init_variables(k_r)["params"]

  with `T.shrink_perturb(shrink_r, perturb_r, key=keys[r])` (the fresh draw
  from a split of `keys[r]`), vmapped over the leading replica axis of
  `params`, `keys` (R, 2), `shrink` and `perturb` (R,): per-replica
  factors are traced values, one compiled function for any grid."""
  def one(p, key, s, q):
    tx = T.shrink_perturb(s, q, init_fn=lambda k: init_variables(k)["params"], key=key)
    return T.apply_transform(tx, p)
  return jax.vmap(one)(params, keys, shrink, perturb)


def grid_start(prev_params, fresh, keys, shrink, perturb, *, init_variables, tx, n_cells: int):
  """The stage-2 start of every replica: the seeds' stage-1 parameters
  (S, ...) mixed per cell, the stage's fresh state (S, ...) for BatchNorm
  statistics, key and step, a new optimizer state; (n_cells * S, ...),
  replicated. One jitted program per (initializer, optimizer, grid size)."""
  return _grid_start_program(init_variables, tx, n_cells)(prev_params, fresh, keys, shrink,
                                                          perturb)


@functools.lru_cache(maxsize=None)
def _grid_start_program(init_variables, tx, n_cells: int):
  def start(prev_params, fresh, keys, shrink, perturb):
    params = mix_params(tile_replicas(prev_params, n_cells), tile_replicas(keys, n_cells),
                        shrink, perturb, init_variables)
    fresh = tile_replicas(fresh, n_cells)
    return fresh.replace(params=params, opt_state=jax.vmap(tx.init)(params))
  return jax.jit(start, out_shardings=parallel.replicated())


class GridStudy:
  """Runs a `GridConfig` in `workdir` (runs stored in `workdir/runs`).

  Everything a user can get wrong (flags, dataset, model, batch size) is
  checked in the constructor, before anything is written."""

  def __init__(self, cfg: GridConfig, workdir: str, runner: Optional[RunnerConfig] = None,
               *, log: Callable[[str], None] = print):
    cfg.validate()
    self.cfg = cfg
    runner = runner or RunnerConfig()
    if not runner.seed_devices:  # lay the devices out for the grid, not the seeds
      runner = dataclasses.replace(runner,
                                   seed_devices=parallel.default_seed_devices(cfg.replicas))
    self.runner = runner
    self.workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    self.log = log if primary else (lambda s: None)
    self.progress = runner.progress and primary
    self.setting = s = Setting(cfg.model, cfg.data, cfg.optimizer, cfg.seed_list, runner)
    n_train = len(s.dataset.y_train)
    self.schedule = make_schedule("two_phase", n_train, cfg.data_seed, fraction=cfg.fraction)
    if len(self.schedule.stages) != STAGES:
      raise ValueError(f"--fraction={cfg.fraction} of {n_train} examples leaves no second "
                       "stage; choose a smaller fraction")
    first = len(self.schedule.stages[0])
    if cfg.data.batch_size > first:
      raise ValueError(f"batch size {cfg.data.batch_size} is larger than stage 1's {first} "
                       "examples; lower --batch_size or raise --fraction")
    self.store = store_lib.RunStore(os.path.join(self.workdir, "runs"))
    self._txs: dict = {}

  # ---- pieces ---------------------------------------------------------------
  def tx(self, stage: int):
    """The stage's optimizer: a decaying schedule's horizon is the stage's
    step cap (max_epochs epochs of its buffer), as the staged study."""
    opt = self.cfg.optimizer
    if opt.schedule == "constant" or opt.total_steps:
      return self.setting.tx
    horizon = self.cfg.max_epochs * -(-len(self.schedule.stages[stage]) // self.cfg.data.batch_size)
    if horizon not in self._txs:
      self._txs[horizon] = make_optimizer(opt, horizon)
    return self._txs[horizon]

  def data(self, stage: int) -> TrainData:
    s = self.setting
    return TrainData(s.x_train, s.y_train, self.schedule.stages[stage], self.cfg.data.batch_size,
                     salt=(stage,))

  def grid_template(self):
    """Host zeros shaped like the stage-2 states (cells x seeds replicas)."""
    n = self.cfg.replicas
    return jax.tree.map(lambda x: np.zeros((n, *x.shape[1:]), x.dtype), self.setting.template())

  def start_states(self, prev):
    """The grid's stage-2 start from the seeds' stage-1 states `prev`."""
    cfg, s = self.cfg, self.setting
    shrink, perturb = replica_values(cfg.cells, cfg.seeds)
    keys = seed_keys(s.seeds, 1, SP_KEY_SALT)
    return grid_start(prev.params, s.fresh_states(1, 0), keys, shrink, perturb,
                      init_variables=s.init_variables, tx=self.tx(1), n_cells=len(cfg.cells))

  def _base_spec(self) -> dict:
    cfg = self.cfg
    return {"protocol": "shrink_perturb_grid",
            "model": {"name": cfg.model.name, **config_lib.nondefault(cfg.model)},
            "data": {"dataset": cfg.data.dataset, **config_lib.nondefault(cfg.data)},
            "optimizer": config_lib.nondefault(cfg.optimizer),
            "arrivals": {"schedule": "two_phase", "fraction": cfg.fraction,
                         "data_seed": cfg.data_seed},
            "until": {"threshold": cfg.threshold or None, "max_epochs": cfg.max_epochs},
            "seeds": list(cfg.seed_list)}

  def stage1_spec(self) -> dict:
    return {**self._base_spec(), "stage": 0, "origin": {"init": [0, 0]}}

  def grid_spec(self, parent: str) -> dict:
    return {**self._base_spec(), "stage": 1,
            "origin": {"parent": parent, "snapshot": "final",
                       "transform": {"method": "shrink_perturb", "key": [1, SP_KEY_SALT],
                                     "cells": [list(c) for c in self.cfg.cells],
                                     "fresh": [1, 0]}}}

  def _test_acc(self, program, states) -> list[float]:
    acc, _ = program.evaluate(states, self.setting.x_test, self.setting.y_test)
    return [float(a) for a in acc]

  # ---- the study ------------------------------------------------------------
  def run(self) -> dict:
    cfg, s = self.cfg, self.setting
    out = {"experiment": cfg.experiment, "config": config_lib.to_dict(cfg),
           "environment": {**results_lib.environment(), "seed_devices": s.replica_devices}}
    bar = tqdm.tqdm(total=STAGES, desc="stages", unit="stage", disable=not self.progress,
                    dynamic_ncols=True)
    try:
      prev, first_run, first = self._stage1(bar)
      out["stage1"] = first
      out["grid"] = self._grid(prev, first_run, bar)
    finally:
      bar.close()
    return out

  def _stage1(self, bar):
    cfg, s = self.cfg, self.setting
    run = self.store.run(self.stage1_spec(), label=f"{cfg.experiment}/stage1")
    program = s.program(tx=self.tx(0))
    states, result = train_run(
        run, start_states=lambda: s.fresh_states(0, 0), template=s.template(), program=program,
        data=self.data(0), until=cfg.until(), data_seeds=s.seeds, start=0,
        hooks=[Progress(bar if self.progress else None, "stage 1")],
        checkpoint_every=self.runner.checkpoint_every, label="[grid] stage 1: ", log=self.log,
        extra_result=lambda st: {"test_acc": self._test_acc(program, st)})
    if result["reused"]:
      self.log(f"[grid] stage 1: reusing finished run run_{run.hash}")
    bar.update(1)
    record = {"n_train": int(len(self.schedule.stages[0])), "test_acc": result["test_acc"],
              "train_acc": [float(a) for a in result["last_epoch_acc"]],
              "steps": [int(x) for x in result["steps"]], "epochs": int(result["epochs_done"]),
              "wall_s": float(result["wall_s"]), "run": result["run"]}
    return states, run, record

  def _grid(self, prev, first_run, bar) -> dict:
    cfg, s = self.cfg, self.setting
    run = self.store.run(self.grid_spec(f"run_{first_run.hash}"),
                         label=f"{cfg.experiment}/grid{len(cfg.shrinks)}x{len(cfg.perturbs)}")
    template = self.grid_template()
    program = s.program(tx=self.tx(1))
    seeds = list(s.seeds) * len(cfg.cells)  # replica c * S + i: seed i's data order

    def extra(states):
      start = run.load_snapshot("init", template)
      return {"test_acc": self._test_acc(program, states),
              "start_test_acc": self._test_acc(program, start)}

    states, result = train_run(
        run, start_states=lambda: self.start_states(prev), template=template, program=program,
        data=self.data(1), until=cfg.until(), data_seeds=seeds, start=0,
        hooks=[Progress(bar if self.progress else None, "grid")],
        checkpoint_every=self.runner.checkpoint_every, label="[grid] stage 2: ", log=self.log,
        extra_result=extra)
    del states
    if result["reused"]:
      self.log(f"[grid] stage 2: reusing finished run run_{run.hash}")
    bar.update(1)
    return {"shrinks": [float(v) for v in cfg.shrinks],
            "perturbs": [float(v) for v in cfg.perturbs],
            "n_train": int(len(self.schedule.stages[1])), "epochs": int(result["epochs_done"]),
            "wall_s": float(result["wall_s"]), "run": result["run"],
            "cells": cell_records(cfg, result)}


def cell_records(cfg: GridConfig, result: dict) -> list[dict]:
  """Per cell: per-seed test accuracy (final and at the start), train
  accuracy, steps, whether the threshold was reached; means and stds."""
  n = cfg.seeds
  out = []
  for c, (shrink, perturb) in enumerate(cfg.cells):
    part = slice(c * n, (c + 1) * n)
    train_acc = [float(a) for a in result["last_epoch_acc"][part]]
    steps = [int(x) for x in result["steps"][part]]
    record = {"shrink": shrink, "perturb": perturb,
              "test_acc": result["test_acc"][part],
              "start_test_acc": result["start_test_acc"][part],
              "train_acc": train_acc, "steps": steps,
              "converged": [bool(cfg.threshold) and a >= cfg.threshold for a in train_acc]}
    record["final_test_acc"] = results_lib.summary(record["test_acc"])
    record["total_steps"] = results_lib.summary(steps)
    out.append(record)
  return out


def grid_arrays(grid: dict, key: str) -> np.ndarray:
  """(perturbs, shrinks, seeds) array of a per-seed cell field, e.g. test_acc."""
  cells = {(c["shrink"], c["perturb"]): c[key] for c in grid["cells"]}
  return np.asarray([[cells[(s, p)] for s in grid["shrinks"]] for p in grid["perturbs"]],
                    np.float64)


def grid_tables(results: dict) -> str:
  """Two tables, perturb down, shrink across: final test accuracy % (mean ±
  std over seeds) and training steps of stage 2 (mean); '*' marks a cell
  where some seed did not reach the threshold."""
  grid = results["grid"]
  acc = grid_arrays(grid, "test_acc") * 100
  steps = grid_arrays(grid, "steps")
  conv = grid_arrays(grid, "converged") if results["config"]["threshold"] else None
  headers = ["perturb \\ shrink", *[f"{s:g}" for s in grid["shrinks"]]]

  def rows(cell):
    return [[f"{p:g}", *[cell(i, j) for j in range(len(grid["shrinks"]))]]
            for i, p in enumerate(grid["perturbs"])]

  def mark(i, j):
    return "*" if conv is not None and not conv[i, j].all() else ""

  first = results["stage1"]
  lines = [f"stage 1: {first['n_train']} examples, test acc "
           f"{results_lib.pm(results_lib.summary(first['test_acc']))} %, steps "
           f"{np.mean(first['steps']):.0f}",
           f"stage 2 ({grid['n_train']} examples): final test accuracy % (mean ± std over seeds)",
           results_lib.format_table(headers, rows(
               lambda i, j: f"{acc[i, j].mean():.1f} ± {acc[i, j].std():.1f}{mark(i, j)}")),
           "",
           "stage 2: training steps (mean over seeds)",
           results_lib.format_table(headers, rows(
               lambda i, j: f"{steps[i, j].mean():.0f}{mark(i, j)}"))]
  if conv is not None and not conv.all():
    lines.append(f"* some seed stopped at the {results['config']['max_epochs']}-epoch cap "
                 "below the threshold")
  return "\n".join(lines)


def study_hash(cfg: GridConfig) -> str:
  """Names a study's results (every result-determining field)."""
  return store_lib.spec_hash({"study": "shrink_perturb_grid", **config_lib.nondefault(cfg),
                              "experiment": cfg.experiment})
