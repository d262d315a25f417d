"""The staged study: data arrives in stages, each method trains through them.

This is the engine of the warm-start experiments (Ash & Adams 2020's
two-phase and online protocols, DASH's chunked stationary framework; see
PAPERS.md §1-2). For every method, for every stage of the arrival schedule:

1. the method's policy prepares the stage's starting state from the previous
   stage's final state (cold, warm, shrink-and-perturb, DASH, ...);
2. every seed trains on the whole buffer until its stopping rule holds; the
   seeds run side by side (`jax.vmap`), the batch is sharded over devices;
3. test accuracy, training accuracy and steps are recorded per seed.

Checkpoints (see `wsjax.checkpoint`) are written at every stage end and every
`checkpoint_every` steps; running the same study again in the same workdir
resumes from the latest complete one and gives the same results.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import tqdm

from wsjax import checkpoint as ckpt
from wsjax import parallel
from wsjax import results as results_lib
from wsjax.data import epoch_batches, load_dataset, make_schedule
from wsjax.models import get_model
from wsjax.train import diagnostics
from wsjax.train import methods as methods_lib
from wsjax.train.optim import OptimizerConfig, make_optimizer
from wsjax.train.policies import StageContext
from wsjax.train.state import TrainState, create_state, make_variables_init, seed_keys
from wsjax.train.steps import Stepper
from wsjax.train.stopping import StoppingRule


class TrainingDivergedError(RuntimeError):
  """The loss became non-finite; the last good checkpoint is kept."""


class Preempted(Exception):
  """A stop was requested (SIGTERM); a checkpoint was saved first."""


_STOP = threading.Event()


def request_stop(*_) -> None:
  """Signal handler: finish the current block, checkpoint, raise `Preempted`."""
  _STOP.set()


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  experiment: str = "warm_start"
  dataset: str = "mnist1d"
  data_dir: Optional[str] = None
  model: str = "conv1d"
  model_kwargs: tuple = ()                 # (("widths", (100, 100)),) etc.
  optimizer: OptimizerConfig = OptimizerConfig()
  batch_size: int = 128
  schedule: str = "two_phase"
  schedule_kwargs: tuple = (("fraction", 0.5),)
  methods: tuple = ("cold", "warm")
  method_params: methods_lib.MethodParams = methods_lib.MethodParams()
  seeds: int = 5
  seed_offset: int = 0
  data_seed: int = 0                       # the arrival order of the data
  stopping: StoppingRule = StoppingRule()
  augment: bool = False
  block_steps: int = 32
  checkpoint_every: int = 0                # steps; 0: only at stage ends
  warm_start_from: Optional[str] = None
  warm_start_opt_state: bool = False
  diagnostics: bool = True

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["model_kwargs"] = dict(self.model_kwargs)
    d["schedule_kwargs"] = dict(self.schedule_kwargs)
    return json.loads(json.dumps(d, default=list))

  def fingerprint(self) -> str:
    """Identifies the results a config produces (ignores where data lives)."""
    d = self.to_dict()
    d.pop("data_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

  def validate(self) -> None:
    self.optimizer.validate()
    self.stopping.validate()
    self.method_params.validate()
    for m in self.methods:
      methods_lib.get_method(m)
    if not self.methods:
      raise ValueError("no methods given; pass e.g. --methods=cold,warm")
    if len(set(self.methods)) != len(self.methods):
      raise ValueError(f"methods repeat: {', '.join(self.methods)}")
    if self.seeds < 1:
      raise ValueError(f"seeds must be >= 1, got {self.seeds}")
    if self.batch_size < 1:
      raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
    if self.block_steps < 1:
      raise ValueError(f"block steps must be >= 1, got {self.block_steps}")
    if self.checkpoint_every < 0:
      raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")


class Study:
  """Runs a `StudyConfig` in `workdir`, resuming from its checkpoints."""

  def __init__(self, config: StudyConfig, workdir: str, *, progress: bool = True,
               log: Callable[[str], None] = print):
    config.validate()
    self.cfg = config
    self.workdir = os.path.abspath(workdir)
    self.progress = progress and jax.process_index() == 0
    self.log = log if jax.process_index() == 0 else (lambda s: None)

    self.dataset = load_dataset(config.dataset, config.data_dir)
    n_train = len(self.dataset.y_train)
    if config.batch_size > n_train:
      raise ValueError(f"batch size {config.batch_size} is larger than the {n_train} "
                       f"training examples of {config.dataset}")
    self.schedule = make_schedule(config.schedule, n_train, config.data_seed,
                                  **dict(config.schedule_kwargs))
    smallest = min(len(b) for b in self.schedule.stages)
    if config.batch_size > smallest:
      raise ValueError(f"batch size {config.batch_size} is larger than the first stage's "
                       f"{smallest} examples; lower --batch_size or enlarge the first stage")
    self.model = get_model(config.model, self.dataset.num_classes, **dict(config.model_kwargs))
    self.tx = make_optimizer(config.optimizer)
    self.seeds = tuple(range(config.seed_offset, config.seed_offset + config.seeds))
    self.init_variables = make_variables_init(self.model, self.dataset.input_shape)
    rep = parallel.replicated()
    self._fresh = jax.jit(jax.vmap(lambda k: create_state(self.init_variables, self.tx, k)),
                          out_shardings=rep)
    self.data_x = parallel.put_replicated(self.dataset.x_train)
    self.data_y = parallel.put_replicated(self.dataset.y_train.astype(np.int32))
    self.test_x = parallel.put_replicated(self.dataset.x_test)
    self.test_y = parallel.put_replicated(self.dataset.y_test.astype(np.int32))
    augment_fn = None
    if config.augment:
      from wsjax.data import augment_images
      augment_fn = augment_images
    self._augment_fn = augment_fn
    self._steppers: dict[Any, Stepper] = {}
    self.source = self._warm_start_source()  # checked before any file is written

  # ---- pieces ---------------------------------------------------------------
  def fresh_states(self, stage: int, salt: int = 0) -> TrainState:
    return self._fresh(seed_keys(self.seeds, stage, salt))

  def stepper(self, penalty) -> Stepper:
    if penalty not in self._steppers:
      self._steppers[penalty] = Stepper(
          self.model, self.tx, batch_size=self.cfg.batch_size,
          block_steps=self.cfg.block_steps, augment_fn=self._augment_fn, penalty=penalty)
    return self._steppers[penalty]

  def one_model_template(self) -> dict:
    """params / batch_stats / opt_state of one model, for source checks."""
    states = jax.eval_shape(lambda: self.fresh_states(0))
    one = jax.tree.map(lambda s: np.zeros(s.shape[1:], s.dtype), states)
    return {"params": one.params, "batch_stats": one.batch_stats, "opt_state": one.opt_state}

  def _warm_start_source(self) -> Optional[TrainState]:
    if not self.cfg.warm_start_from:
      return None
    expected = self.one_model_template()
    if not self.cfg.warm_start_opt_state:
      expected.pop("opt_state")
    src, meta = ckpt.load_warm_start_source(self.cfg.warm_start_from, expected, len(self.seeds))
    self.log(f"warm-starting every method from {meta['source']}")
    states = self.fresh_states(0, salt=1)
    replace = {"params": parallel.put_replicated(src["params"]),
               "batch_stats": parallel.put_replicated(src["batch_stats"])}
    if "opt_state" in src:
      replace["opt_state"] = parallel.put_replicated(src["opt_state"])
    return states.replace(**replace)

  # ---- the study ------------------------------------------------------------
  def run(self) -> dict:
    cfg = self.cfg
    source = self.source
    out = {"experiment": cfg.experiment, "config": cfg.to_dict(),
           "environment": results_lib.environment(), "methods": {}}
    n_stages = len(self.schedule.stages)
    bar = tqdm.tqdm(total=len(cfg.methods) * n_stages, desc="stages", unit="stage",
                    disable=not self.progress, dynamic_ncols=True)
    try:
      for method in cfg.methods:
        stages = self._run_method(method, source, bar)
        out["methods"][method] = {"stages": stages, **results_lib.summarize_method(stages)}
    finally:
      bar.close()
    return out

  def _run_method(self, method: str, source: Optional[TrainState], bar) -> list[dict]:
    cfg = self.cfg
    spec = methods_lib.get_method(method)
    penalty = spec.penalty
    stepper = self.stepper(penalty)
    manager = ckpt.make_manager(os.path.join(self.workdir, "checkpoints", method))
    n_stages = len(self.schedule.stages)
    template = {"states": self.fresh_states(0), "reg": {}, "start": {}}

    # -- resume position
    pos = {"stage": 0, "started": False, "epoch": 0, "block": 0, "global_step": 0,
           "active": [True] * len(self.seeds), "epoch_correct": [0] * len(self.seeds),
           "epoch_seen": [0] * len(self.seeds), "stage_steps": [0] * len(self.seeds),
           "stage_wall_s": 0.0, "stages": [], "periodic": []}
    # each method gets its own copy of the source: training donates its buffers
    states = None if source is None else jax.tree.map(lambda x: x.copy(), source)
    reg, start = {}, {}
    latest = manager.latest_step()
    if latest is not None:
      meta = ckpt.restore_meta(manager, latest)
      if meta.get("fingerprint") != cfg.fingerprint():
        raise ckpt.CheckpointError(
            f"checkpoints in {manager.directory} belong to a different configuration; "
            "use another --workdir or pass --overwrite")
      if meta.get("has_reg"):
        template["reg"] = spec.make_reg(template["states"], cfg.method_params)
      if meta.get("has_start"):
        template["start"] = template["states"].params
      saved, meta = ckpt.restore(manager, latest, template)
      pos = meta["position"]
      states, reg, start = saved["states"], saved["reg"], saved["start"]
      bar.update(len(pos["stages"]))
      if pos["stage"] >= n_stages:
        return pos["stages"]
      self.log(f"[{method}] resuming from {manager.directory}/{latest} "
               f"(stage {pos['stage']}, epoch {pos['epoch']})")

    def save(kind: str):
      if pos["global_step"] in manager.all_steps():  # a preemption save at this step
        manager.delete(pos["global_step"])
      meta = {"fingerprint": cfg.fingerprint(), "method": method, "kind": kind,
              "has_reg": bool(jax.tree.leaves(reg)), "has_start": bool(jax.tree.leaves(start)),
              "position": pos}
      ckpt.save(manager, pos["global_step"], {"states": states, "reg": reg, "start": start}, meta)
      if kind == "stage_end":  # mid-stage checkpoints are superseded
        for step in pos["periodic"]:
          if step != pos["global_step"] and step in manager.all_steps():
            manager.delete(step)
        pos["periodic"] = []

    rule = cfg.stopping
    n_seeds = len(self.seeds)
    k_steps = cfg.block_steps
    while pos["stage"] < n_stages:
      s = pos["stage"]
      buffer = self.schedule.stages[s]
      t0 = time.perf_counter()
      ctx = StageContext(stage=s, seeds=self.seeds, tx=self.tx,
                         fresh=lambda s=s: self.fresh_states(s), data_x=self.data_x,
                         data_y=self.data_y, arrivals=self.schedule.new[:s + 1], n_stages=n_stages,
                         model=self.model, stepper=stepper)
      if not pos["started"]:
        states = spec.prepare(states, ctx, cfg.method_params)
        if spec.make_reg is not None and not jax.tree.leaves(reg):
          reg = spec.make_reg(states, cfg.method_params)
        if cfg.diagnostics:  # a copy: the training state's buffers are donated
          start = jax.tree.map(lambda x: x.copy(), states.params)
        pos.update(started=True, epoch=0, block=0, active=[True] * n_seeds,
                   epoch_correct=[0] * n_seeds, epoch_seen=[0] * n_seeds,
                   stage_steps=[0] * n_seeds, stage_wall_s=0.0)
      active = np.asarray(pos["active"], bool)
      while active.any():
        e = pos["epoch"]
        order = np.stack([epoch_batches(buffer, cfg.batch_size, seed, s, e) for seed in self.seeds], 1)
        n_steps = order.shape[0]
        n_blocks = -(-n_steps // k_steps)
        pad = n_blocks * k_steps - n_steps
        order = np.concatenate([order, np.zeros((pad, *order.shape[1:]), order.dtype)])
        valid = np.arange(n_blocks * k_steps) < n_steps
        while pos["block"] < n_blocks:
          b = pos["block"]
          sl = slice(b * k_steps, (b + 1) * k_steps)
          states, steps, correct, loss_sum = stepper.train_block(
              states, active, self.data_x, self.data_y, order[sl], valid[sl], reg)
          if not np.all(np.isfinite(loss_sum[active])):
            bad = [self.seeds[i] for i in np.flatnonzero(active & ~np.isfinite(loss_sum))]
            raise TrainingDivergedError(
                f"[{method}] non-finite loss at stage {s}, step {pos['global_step'] + int(valid[sl].sum())} "
                f"(seeds {bad}); the last good checkpoint is kept in {manager.directory}; "
                "lower the learning rate")
          prev_step = pos["global_step"]
          pos["global_step"] += int(valid[sl].sum())
          pos["block"] = b + 1
          pos["epoch_correct"] = (np.asarray(pos["epoch_correct"]) + correct).tolist()
          pos["epoch_seen"] = (np.asarray(pos["epoch_seen"]) + steps * cfg.batch_size).tolist()
          pos["stage_steps"] = (np.asarray(pos["stage_steps"]) + steps).tolist()
          stop = _STOP.is_set()
          if stop or cfg.checkpoint_every and (
              pos["global_step"] // cfg.checkpoint_every > prev_step // cfg.checkpoint_every):
            pos["stage_wall_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            pos["periodic"].append(pos["global_step"])
            save("periodic")
          if stop:
            raise Preempted(f"[{method}] stopped at stage {s}, step {pos['global_step']}; "
                            f"checkpoint saved in {manager.directory}")
        # end of epoch: stopping rule
        seen = np.maximum(np.asarray(pos["epoch_seen"]), 1)
        epoch_acc = np.asarray(pos["epoch_correct"]) / seen
        active = rule.still_active(active, epoch_acc, e + 1)
        pos["last_epoch_acc"] = np.where(np.asarray(pos["epoch_seen"]) > 0, epoch_acc,
                                         pos.get("last_epoch_acc", epoch_acc)).tolist()
        pos.update(epoch=e + 1, block=0, active=active.tolist(),
                   epoch_correct=[0] * n_seeds, epoch_seen=[0] * n_seeds)
        if self.progress:
          bar.set_postfix_str(f"{method} stage {s + 1}/{n_stages} epoch {e + 1} "
                              f"train acc {np.mean(pos['last_epoch_acc']):.3f}", refresh=False)
      # end of stage
      test_acc, _ = stepper.evaluate(states, self.test_x, self.test_y)
      record = {"n_train": int(len(buffer)),
                "train_acc": [float(a) for a in pos["last_epoch_acc"]],
                "test_acc": [float(a) for a in test_acc],
                "steps": [int(x) for x in pos["stage_steps"]],
                "epochs": int(pos["epoch"]),
                "wall_s": float(pos["stage_wall_s"] + time.perf_counter() - t0)}
      if cfg.diagnostics:
        record.update(diagnostics.stage_diagnostics(self, states, start, buffer, ctx,
                                                    cfg.method_params))
      pos["stages"].append(record)
      pos.update(stage=s + 1, started=False)
      start = {}
      save("stage_end")
      bar.update(1)
    return pos["stages"]
