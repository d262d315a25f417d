"""The staged study: data arrives in stages, each method trains through them.

This is the engine of the warm-start experiments (Ash & Adams 2020's
two-phase and online protocols, DASH's chunked stationary framework; see
PAPERS.md §1-2). For every method, for every stage of the arrival schedule:

1. the method's policy prepares the stage's starting state from the previous
   stage's final state (cold, warm, shrink-and-perturb, DASH, ...);
2. every seed trains on the whole buffer until its stopping rule holds; the
   seeds run side by side (`jax.vmap`), spread over device groups, and the
   batch is sharded over the devices of a group (`wsjax.parallel`);
3. test accuracy, training accuracy and steps are recorded per seed.

A first stage that a later method would train exactly as an earlier one did
(bit-equal starting state, same step program: e.g. cold, warm, shrink-and-
perturb and DASH all start from the fresh initialization) is trained once and
reused (`MethodRun._reuse_first_stage`); the results are the same.

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
               log: Callable[[str], None] = print, seed_devices: Optional[int] = None):
    """`seed_devices`: over how many device groups the seeds are spread (see
    `wsjax.parallel`); None picks `parallel.default_seed_devices`. A layout
    choice, not part of the config: results agree to float rounding."""
    config.validate()
    self.cfg = config
    self.seed_devices = seed_devices or parallel.default_seed_devices(config.seeds)
    n_data = parallel.seed_data_mesh(self.seed_devices).shape[parallel.DATA_AXIS]  # checks it
    if config.batch_size % n_data:
      raise ValueError(f"batch size {config.batch_size} is not divisible by the "
                       f"{n_data} devices that share a seed "
                       f"({jax.device_count()} devices, seed_devices={self.seed_devices})")
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
    self._first_stages: list[_FirstStage] = []  # trained first stages, for reuse
    self.source = self._warm_start_source()  # checked before any file is written

  # ---- pieces ---------------------------------------------------------------
  def fresh_states(self, stage: int, salt: int = 0) -> TrainState:
    return self._fresh(seed_keys(self.seeds, stage, salt))

  def stepper(self, penalty) -> Stepper:
    if penalty not in self._steppers:
      self._steppers[penalty] = Stepper(
          self.model, self.tx, batch_size=self.cfg.batch_size,
          block_steps=self.cfg.block_steps, augment_fn=self._augment_fn, penalty=penalty,
          seed_devices=self.seed_devices)
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
           "environment": {**results_lib.environment(), "seed_devices": self.seed_devices},
           "methods": {}}
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
    run = MethodRun(self, method, source)
    bar.update(len(run.pos["stages"]))
    while run.pos["stage"] < len(self.schedule.stages):
      run.run_stage(bar)
      bar.update(1)
    return run.pos["stages"]


@dataclasses.dataclass
class _FirstStage:
  """A trained first stage that another method may reuse: its starting state
  (host copy, compared bit for bit), penalty, and the finished result."""
  method: str
  penalty: Any
  start: Any        # host numpy tree of the stage's starting TrainState
  states: Any       # device copy of the stage's final states
  pos: dict         # the position after the stage (its record included)


def _same_tree(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
                  for x, y in zip(la, lb)))


def _fresh_position(n_seeds: int) -> dict:
  return {"stage": 0, "started": False, "epoch": 0, "block": 0, "global_step": 0,
          "active": [True] * n_seeds, "epoch_correct": [0] * n_seeds,
          "epoch_seen": [0] * n_seeds, "stage_steps": [0] * n_seeds,
          "stage_wall_s": 0.0, "stages": [], "periodic": []}


class MethodRun:
  """One method of a study, stage after stage, checkpointed as it goes.

  Everything needed to continue lives in `pos` (JSON: the loop position and
  the stage records so far) and in the arrays `states`, `reg` (a penalty's
  reference) and `start` (the stage's starting params, for diagnostics);
  the three are one orbax checkpoint, so a run restored from any checkpoint
  continues exactly as if it had not stopped.
  """

  def __init__(self, study: Study, method: str, source: Optional[TrainState]):
    self.study = study
    self.cfg = cfg = study.cfg
    self.method = method
    self.spec = methods_lib.get_method(method)
    self.stepper = study.stepper(self.spec.penalty)
    self.manager = ckpt.make_manager(os.path.join(study.workdir, "checkpoints", method))
    self.n_stages = len(study.schedule.stages)
    self.n_seeds = len(study.seeds)
    self.pos = _fresh_position(self.n_seeds)
    # each method gets its own copy of the source: training donates its buffers
    self.states = None if source is None else jax.tree.map(lambda x: x.copy(), source)
    self.reg, self.start = {}, {}
    latest = self.manager.latest_step()
    if latest is not None:
      self._restore(latest)

  # ---- checkpoints ----------------------------------------------------------
  def _restore(self, step: int) -> None:
    cfg, study = self.cfg, self.study
    meta = ckpt.restore_meta(self.manager, step)
    if meta.get("fingerprint") != cfg.fingerprint():
      raise ckpt.CheckpointError(
          f"checkpoints in {self.manager.directory} belong to a different configuration; "
          "use another --workdir or pass --overwrite")
    states = study.fresh_states(0)
    template = {"states": states, "reg": {}, "start": {}}
    if meta.get("has_reg"):
      template["reg"] = self.spec.make_reg(states, cfg.method_params)
    if meta.get("has_start"):
      template["start"] = states.params
    saved, meta = ckpt.restore(self.manager, step, template)
    self.pos = meta["position"]
    self.states, self.reg, self.start = saved["states"], saved["reg"], saved["start"]
    if self.pos["stage"] < self.n_stages:
      study.log(f"[{self.method}] resuming from {self.manager.directory}/{step} "
                f"(stage {self.pos['stage']}, epoch {self.pos['epoch']})")

  def save(self, kind: str) -> None:
    """Checkpoints at the current step: "periodic" (mid-stage) or "stage_end"."""
    pos, manager = self.pos, self.manager
    if pos["global_step"] in manager.all_steps():  # a preemption save at this step
      manager.delete(pos["global_step"])
    if kind == "periodic":
      pos["periodic"].append(pos["global_step"])
    meta = {"fingerprint": self.cfg.fingerprint(), "method": self.method, "kind": kind,
            "has_reg": bool(jax.tree.leaves(self.reg)),
            "has_start": bool(jax.tree.leaves(self.start)), "position": pos}
    ckpt.save(manager, pos["global_step"],
              {"states": self.states, "reg": self.reg, "start": self.start}, meta)
    if kind == "stage_end":  # mid-stage checkpoints are superseded by a stage's end
      for step in pos["periodic"]:
        if step != pos["global_step"] and step in manager.all_steps():
          manager.delete(step)
      pos["periodic"] = []

  # ---- one stage ------------------------------------------------------------
  def _context(self, s: int) -> StageContext:
    study = self.study
    return StageContext(stage=s, seeds=study.seeds, tx=study.tx,
                        fresh=lambda: study.fresh_states(s), data_x=study.data_x,
                        data_y=study.data_y, arrivals=study.schedule.new[:s + 1],
                        n_stages=self.n_stages, model=study.model, stepper=self.stepper)

  def run_stage(self, bar) -> None:
    """Prepares (unless resumed mid-stage), trains and records stage `pos["stage"]`."""
    cfg, pos, n_seeds = self.cfg, self.pos, self.n_seeds
    s = pos["stage"]
    ctx = self._context(s)
    t0 = time.perf_counter()
    first_start = None
    if not pos["started"]:
      self.states = methods_lib.prepare_stage(self.spec, self.states, ctx, cfg.method_params)
      if self.spec.make_reg is not None and not jax.tree.leaves(self.reg):
        self.reg = self.spec.make_reg(self.states, cfg.method_params)
      if s == 0 and not jax.tree.leaves(self.reg):
        first_start = parallel.to_host(self.states)
        if self._reuse_first_stage(first_start):
          return
      if cfg.diagnostics:  # a copy: the training state's buffers are donated
        self.start = jax.tree.map(lambda x: x.copy(), self.states.params)
      pos.update(started=True, epoch=0, block=0, active=[True] * n_seeds,
                 epoch_correct=[0] * n_seeds, epoch_seen=[0] * n_seeds,
                 stage_steps=[0] * n_seeds, stage_wall_s=0.0)
    t0 = self._train_until_stopped(s, t0, bar)
    self._finish_stage(s, ctx, t0)
    if first_start is not None:
      self.study._first_stages.append(_FirstStage(
          self.method, self.spec.penalty, first_start,
          jax.tree.map(lambda x: x.copy(), self.states), json.loads(json.dumps(self.pos))))

  def _reuse_first_stage(self, start) -> bool:
    """Adopts another method's trained first stage when this one would train
    exactly the same: same starting state (bit for bit), same step program
    (penalty) and no penalty reference. E.g. cold, warm, shrink-and-perturb
    and DASH all start from the fresh initialization, so in a study of those
    the first stage is trained once. Results are unchanged: the training is
    deterministic, so the reused stage is the stage this method would train."""
    for first in self.study._first_stages:
      if first.penalty is self.spec.penalty and _same_tree(first.start, start):
        self.states = jax.tree.map(lambda x: x.copy(), first.states)
        self.pos = json.loads(json.dumps(first.pos))
        self.start = {}
        self.study.log(f"[{self.method}] stage 1 starts and trains as {first.method}'s: "
                       "reusing its result")
        self.save("stage_end")
        return True
    return False

  def _train_until_stopped(self, s: int, t0: float, bar) -> float:
    """Epochs of K-step blocks until every seed meets the stopping rule."""
    cfg, pos, study = self.cfg, self.pos, self.study
    buffer = study.schedule.stages[s]
    k = cfg.block_steps
    active = np.asarray(pos["active"], bool)
    while active.any():
      e = pos["epoch"]
      order = np.stack([epoch_batches(buffer, cfg.batch_size, seed, s, e) for seed in study.seeds], 1)
      n_steps = order.shape[0]
      n_blocks = -(-n_steps // k)
      order = np.concatenate([order, np.zeros((n_blocks * k - n_steps, *order.shape[1:]), order.dtype)])
      valid = np.arange(n_blocks * k) < n_steps
      while pos["block"] < n_blocks:
        b = pos["block"]
        sl = slice(b * k, (b + 1) * k)
        self.states, steps, correct, loss_sum = self.stepper.train_block(
            self.states, active, study.data_x, study.data_y, order[sl], valid[sl], self.reg)
        prev_step = pos["global_step"]
        pos["global_step"] += int(valid[sl].sum())
        if not np.all(np.isfinite(loss_sum[active])):
          bad = [study.seeds[i] for i in np.flatnonzero(active & ~np.isfinite(loss_sum))]
          raise TrainingDivergedError(
              f"[{self.method}] non-finite loss at stage {s}, step {pos['global_step']} "
              f"(seeds {bad}); the last good checkpoint is kept in {self.manager.directory}; "
              "lower the learning rate")
        pos["block"] = b + 1
        pos["epoch_correct"] = (np.asarray(pos["epoch_correct"]) + correct).tolist()
        pos["epoch_seen"] = (np.asarray(pos["epoch_seen"]) + steps * cfg.batch_size).tolist()
        pos["stage_steps"] = (np.asarray(pos["stage_steps"]) + steps).tolist()
        stop = _STOP.is_set()
        every = cfg.checkpoint_every
        if stop or every and pos["global_step"] // every > prev_step // every:
          pos["stage_wall_s"] += time.perf_counter() - t0
          t0 = time.perf_counter()
          self.save("periodic")
        if stop:
          raise Preempted(f"[{self.method}] stopped at stage {s}, step {pos['global_step']}; "
                          f"checkpoint saved in {self.manager.directory}")
      # end of an epoch: the stopping rule, per seed
      seen = np.asarray(pos["epoch_seen"])
      epoch_acc = np.asarray(pos["epoch_correct"]) / np.maximum(seen, 1)
      active = cfg.stopping.still_active(active, epoch_acc, e + 1)
      pos["last_epoch_acc"] = np.where(seen > 0, epoch_acc,
                                       pos.get("last_epoch_acc", epoch_acc)).tolist()
      pos.update(epoch=e + 1, block=0, active=active.tolist(),
                 epoch_correct=[0] * self.n_seeds, epoch_seen=[0] * self.n_seeds)
      if study.progress:
        bar.set_postfix_str(f"{self.method} stage {s + 1}/{self.n_stages} epoch {e + 1} "
                            f"train acc {np.mean(pos['last_epoch_acc']):.3f}", refresh=False)
    return t0

  def _finish_stage(self, s: int, ctx: StageContext, t0: float) -> None:
    """Test accuracy, the stage's record and diagnostics, a stage-end checkpoint."""
    cfg, pos, study = self.cfg, self.pos, self.study
    buffer = study.schedule.stages[s]
    test_acc, _ = self.stepper.evaluate(self.states, study.test_x, study.test_y)
    record = {"n_train": int(len(buffer)),
              "train_acc": [float(a) for a in pos["last_epoch_acc"]],
              "test_acc": [float(a) for a in test_acc],
              "steps": [int(x) for x in pos["stage_steps"]],
              "epochs": int(pos["epoch"]),
              "wall_s": float(pos["stage_wall_s"] + time.perf_counter() - t0)}
    if cfg.diagnostics:
      record.update(diagnostics.stage_diagnostics(study, self.states, self.start, buffer, ctx,
                                                  cfg.method_params))
    pos["stages"].append(record)
    pos.update(stage=s + 1, started=False)
    self.start = {}
    self.save("stage_end")
