"""The staged study: data arrives in stages, each method trains through them.

The protocol of the warm-start studies (Ash & Adams 2020's two-phase and
online protocols, DASH's chunked stationary framework; PAPERS.md §1-2),
composed from the training core. For every method, for every stage of the
arrival schedule:

1. the method's policy prepares the stage's starting state from the previous
   stage's final state (`wsjax.studies.methods`: cold, warm, shrink-and-
   perturb, DASH, ...);
2. `wsjax.core.train_run` trains every replica (seed) on the whole buffer
   until its epoch-mean training accuracy reaches the threshold (or the epoch
   cap), batches in the order `(seed, stage, epoch)`, the learning-rate
   schedule restarting at each stage;
3. test accuracy, training accuracy, steps and (optionally) plasticity
   diagnostics are recorded per seed.

Each stage of each method is a content-addressed run (`wsjax.core.store`)
named by what decides it: the model, data, optimizer, task, the stage's
buffer, the start state's origin (the fresh initialization of the stage, or
the previous stage's run and the method's transform of it), the stopping
rule and the seeds. So a stage that two methods would train identically is
trained once (cold, warm, shrink-and-perturb and DASH all start from the
fresh initialization: their first stage is one run), adding a method to a
finished study trains only the new method's runs, an interrupted study
resumes where it stopped, and a changed configuration writes new runs beside
the old ones.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
import tqdm

from wsjax import config as config_lib
from wsjax import parallel
from wsjax import results as results_lib
from wsjax.core import store as store_lib
from wsjax.core.data import TrainData
from wsjax.core.hooks import EvaluateEvery, Progress
from wsjax.core.loop import Until
from wsjax.core.optim import OptimizerConfig, make_optimizer
from wsjax.core.runner import train_run
from wsjax.data import make_schedule
from wsjax.studies import methods as methods_lib
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig, Setting, _f
from wsjax.studies.methods import (Dash, L2Init, Reset, ShrinkPerturb, SP, StageContext,
                                   prepare_stage)

SCHEDULE_KINDS = ("two_phase", "online", "chunks")


@dataclasses.dataclass(frozen=True)
class ArrivalConfig:
  """How the training data arrives: the stages' buffers."""
  schedule: str = _f("two_phase", "arrival schedule: two_phase, online or chunks",
                     choices=SCHEDULE_KINDS)
  fraction: float = _f(0.5, "two_phase: fraction of the data in the first phase")
  chunk_size: int = _f(1000, "online: examples added per round")
  chunks: int = _f(10, "chunks: number of equal chunks")
  data_seed: int = _f(0, "seed of the data arrival order")

  def kwargs(self) -> dict:
    if self.schedule not in SCHEDULE_KINDS:
      raise ValueError(f"unknown schedule {self.schedule!r}; choose two_phase, online or chunks")
    return {"two_phase": {"fraction": self.fraction},
            "online": {"chunk_size": self.chunk_size},
            "chunks": {"n_chunks": self.chunks}}[self.schedule]

  def spec(self) -> dict:
    return {"schedule": self.schedule, **self.kwargs(), "data_seed": self.data_seed}

  def make(self, n_train: int):
    return make_schedule(self.schedule, n_train, self.data_seed, **self.kwargs())


@dataclasses.dataclass(frozen=True)
class StagedConfig:
  """A staged study: the model, data, optimizer, arrivals, methods, seeds, stopping rule."""
  experiment: str = dataclasses.field(default="warm_start", metadata={"flag": False})
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  arrivals: ArrivalConfig = ArrivalConfig()
  methods: tuple[str, ...] = _f(("cold", "warm"), "methods to compare: "
                                + ", ".join(methods_lib.known_methods()))
  opt_state: str = _f("default", "optimizer state when a stage continues a model (default: the "
                      "method's own)", choices=("default", "keep", "reset"))
  bn_stats: str = _f("default", "BatchNorm statistics when a stage continues a model (default: "
                     "the method's own)", choices=("default", "keep", "reset"))
  shrink_perturb: ShrinkPerturb = ShrinkPerturb()
  sp: SP = SP()
  dash: Dash = Dash()
  reset: Reset = Reset()
  l2_init: L2Init = L2Init()
  seeds: int = _f(5, "number of seeds (run side by side, vmapped)")
  seed_offset: int = _f(0, "first seed")
  threshold: float = _f(0.99, "stop a stage at this epoch-mean train accuracy; 0: fixed "
                        "--max_epochs")
  max_epochs: int = _f(100, "epoch cap per stage")
  warm_start_from: Optional[str] = _f(None, "start every method from a stored run's snapshot "
                                      "RUN[@SNAPSHOT] (default snapshot: final)")
  warm_start_opt_state: bool = _f(False, "with --warm_start_from: also restore the optimizer "
                                  "state")
  diagnostics: bool = _f(True, "record plasticity diagnostics per stage", operational=True)

  def method(self, name: str) -> methods_lib.Method:
    cls = methods_lib.check_method(name)
    field = {"shrink_perturb": "shrink_perturb", "sp": "sp", "dash": "dash", "reset": "reset",
             "l2_init": "l2_init"}.get(name)
    return getattr(self, field) if field else cls()

  def validate(self) -> None:
    self.optimizer.validate()
    self.data.validate()
    self.arrivals.kwargs()
    if not self.methods:
      raise ValueError("no methods given; pass e.g. --methods=cold,warm")
    if len(set(self.methods)) != len(self.methods):
      raise ValueError(f"methods repeat: {', '.join(self.methods)}")
    for name in self.methods:
      self.method(name).validate()
    if self.seeds < 1:
      raise ValueError(f"seeds must be >= 1, got {self.seeds}")
    if self.seed_offset < 0:
      raise ValueError(f"seed offset must be >= 0, got {self.seed_offset}")
    if not 0 <= self.threshold <= 1:
      raise ValueError(f"stopping threshold must be in (0, 1] (or 0 for fixed epochs), "
                       f"got {self.threshold}")
    if self.max_epochs < 1:
      raise ValueError(f"max epochs must be >= 1, got {self.max_epochs}")

  @property
  def seed_list(self) -> tuple[int, ...]:
    return tuple(range(self.seed_offset, self.seed_offset + self.seeds))

  def until(self) -> Until:
    return Until.accuracy(self.threshold or None, self.max_epochs)


class StagedStudy:
  """Runs a `StagedConfig` in `workdir` (runs stored in `workdir/runs`)."""

  def __init__(self, cfg: StagedConfig, workdir: str, runner: Optional[RunnerConfig] = None,
               *, log: Callable[[str], None] = print):
    cfg.validate()
    self.cfg = cfg
    self.runner = runner = runner or RunnerConfig()
    self.workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    self.log = log if primary else (lambda s: None)
    self.progress = runner.progress and primary
    self.setting = Setting(cfg.model, cfg.data, cfg.optimizer, cfg.seed_list, runner)
    s = self.setting
    n_train = len(s.dataset.y_train)
    self.schedule = cfg.arrivals.make(n_train)
    smallest = min(len(b) for b in self.schedule.stages)
    if cfg.data.batch_size > smallest:
      raise ValueError(f"batch size {cfg.data.batch_size} is larger than the first stage's "
                       f"{smallest} examples; lower --batch_size or enlarge the first stage")
    self.store = store_lib.RunStore(os.path.join(self.workdir, "runs"))
    self._txs: dict = {}
    self.source, self.source_spec = self._warm_start_source()  # checked before any write

  # ---- pieces ---------------------------------------------------------------
  def _tx(self, stage: int):
    """The optimizer of a stage: a decaying schedule's horizon is the stage's
    step cap (max_epochs epochs of its buffer); a constant one is shared."""
    opt = self.cfg.optimizer
    if opt.schedule == "constant" or opt.total_steps:
      return self.setting.tx
    bs = self.cfg.data.batch_size
    horizon = self.cfg.max_epochs * -(-len(self.schedule.stages[stage]) // bs)
    if horizon not in self._txs:
      self._txs[horizon] = make_optimizer(opt, horizon)
    return self._txs[horizon]

  def context(self, stage: int) -> StageContext:
    s = self.setting
    return StageContext(stage=stage, seeds=s.seeds, tx=s.tx,
                        fresh=lambda: s.fresh_states(stage, 0), data_x=s.x_train,
                        data_y=s.y_train, arrivals=self.schedule.new[:stage + 1],
                        n_stages=len(self.schedule.stages), model=s.model,
                        init_variables=s.init_variables, mesh=s.mesh)

  def _warm_start_source(self):
    ref = self.cfg.warm_start_from
    if not ref:
      return None, None
    from wsjax.studies import sources
    expected = self.setting.one_model_template()
    if not self.cfg.warm_start_opt_state:
      expected.pop("opt_state")
    src, spec = sources.load_source(ref, expected, len(self.setting.seeds),
                                    default_store=self.store)
    self.log(f"warm-starting every method from {spec['source']}")
    states = self.setting.fresh_states(0, 1)
    replace = {k: parallel.put_replicated(v) for k, v in src.items()}
    return states.replace(**replace), {**spec, "opt_state": self.cfg.warm_start_opt_state}

  def _base_spec(self) -> dict:
    cfg = self.cfg
    return {"protocol": "staged",
            "model": {"name": cfg.model.name, **config_lib.nondefault(cfg.model)},
            "data": {"dataset": cfg.data.dataset, **config_lib.nondefault(cfg.data)},
            "optimizer": config_lib.nondefault(cfg.optimizer),
            "arrivals": cfg.arrivals.spec(),
            "until": {"threshold": cfg.threshold or None, "max_epochs": cfg.max_epochs},
            "seeds": list(cfg.seed_list)}

  def _transform_spec(self, method: methods_lib.Method, stage: int) -> dict:
    spec = {"method": method.name, "stage": stage, **config_lib.nondefault(method)}
    if self.cfg.opt_state != "default":
      spec["opt_state"] = self.cfg.opt_state
    if self.cfg.bn_stats != "default":
      spec["bn_stats"] = self.cfg.bn_stats
    return spec

  def stage_spec(self, method: methods_lib.Method, stage: int, parent: Optional[str],
                 task: dict) -> dict:
    """What decides the stage's result (see the module docstring)."""
    if stage == 0 and self.source_spec is None:
      origin = {"init": [0, 0]}
    elif stage == 0:
      origin = {"source": self.source_spec, "transform": self._transform_spec(method, 0)}
    elif not method.continues:
      origin = {"init": [stage, 0]}
    else:
      origin = {"parent": parent, "snapshot": "final",
                "transform": self._transform_spec(method, stage)}
    return {**self._base_spec(), "stage": stage, "origin": origin, "task": task}

  # ---- the study ------------------------------------------------------------
  def run(self) -> dict:
    cfg = self.cfg
    out = {"experiment": cfg.experiment, "config": config_lib.to_dict(cfg),
           "environment": {**results_lib.environment(),
                           "seed_devices": self.setting.replica_devices},
           "methods": {}}
    n_stages = len(self.schedule.stages)
    bar = tqdm.tqdm(total=len(cfg.methods) * n_stages, desc="stages", unit="stage",
                    disable=not self.progress, dynamic_ncols=True)
    try:
      for name in cfg.methods:
        stages = self._run_method(name, bar)
        out["methods"][name] = {"stages": stages, **results_lib.summarize_method(stages)}
    finally:
      bar.close()
    return out

  def _run_method(self, name: str, bar) -> list[dict]:
    cfg, s = self.cfg, self.setting
    method = cfg.method(name)
    task = method.task()
    template = s.template()
    records = []
    prev_states, prev_run, first_run = None, None, None
    for stage in range(len(self.schedule.stages)):
      task_spec = {}
      if isinstance(method, L2Init):
        task_spec = {"penalty": "l2_init", "coef": method.coef,
                     "reference": None if first_run is None else f"run_{first_run.hash}"}
      run = self.store.run(self.stage_spec(method, stage, prev_run and f"run_{prev_run.hash}",
                                           task_spec),
                           label=f"{cfg.experiment}/{name}/stage{stage}")
      first_run = first_run or run
      ctx = self.context(stage)
      tx = self._tx(stage)
      program = s.program(task, tx)
      label = f"[{name}] stage {stage}: "

      def start_states(prev=prev_states, ctx=ctx, stage=stage):
        if prev is None and stage == 0 and self.source is not None:
          prev = jax.tree.map(lambda x: x.copy(), self.source)
        return prepare_stage(method, prev, ctx, opt_state=cfg.opt_state, bn_stats=cfg.bn_stats)

      if prev_states is None and stage > 0 and method.continues and not run.done:
        prev_states = prev_run.load_snapshot("final", template)
      inputs = None
      if isinstance(method, L2Init):
        ref_run = first_run
        inputs = lambda ref_run=ref_run: method.make_reference(  # noqa: E731
            ref_run.load_snapshot("init", template))
      data = TrainData(s.x_train, s.y_train, self.schedule.stages[stage], cfg.data.batch_size,
                       salt=(stage,))
      hooks = [Progress(bar if self.progress else None, f"{name} stage {stage + 1}"),
               EvaluateEvery(0, {"test": (s.x_test, s.y_test)})]
      if cfg.diagnostics:
        hooks.append(self._diagnostics_hook(run, ctx))
      states, result = train_run(
          run, start_states=start_states, template=template, program=program, data=data,
          until=cfg.until(), data_seeds=s.seeds, start=0, inputs=inputs, hooks=hooks,
          checkpoint_every=self.runner.checkpoint_every, label=label, log=self.log)
      if result["reused"]:
        self.log(f"[{name}] stage {stage + 1}: reusing finished run run_{run.hash} "
                 f"({_label_of(run)})")
      if cfg.diagnostics and "diagnostics" not in result["records"]:
        # a run trained without diagnostics: compute them from its snapshots now
        hook = self._diagnostics_hook(run, ctx)
        result["records"]["diagnostics"] = hook.compute(states)
        run.update_result(records=result["records"])
      records.append(self._record(result, stage))
      prev_states, prev_run = (states if method.continues else None), run
      bar.update(1)
    return records

  def _diagnostics_hook(self, run, ctx):
    from wsjax.studies.diagnostics import StageDiagnostics
    return StageDiagnostics(
        self.setting.model, lambda: run.load_snapshot("init", self.setting.template()).params,
        self.schedule.stages[ctx.stage], ctx, self.cfg.dash,
        max_examples=max(len(b) for b in self.schedule.stages))

  def _record(self, result: dict, stage: int) -> dict:
    evaluation = result["records"]["eval"][-1]
    record = {"n_train": int(len(self.schedule.stages[stage])),
              "train_acc": [float(a) for a in result["last_epoch_acc"]],
              "test_acc": evaluation["test_acc"],
              "steps": [int(x) for x in result["steps"]],
              "epochs": int(result["epochs_done"]),
              "wall_s": float(result["wall_s"]),
              "run": result["run"]}
    record.update(result["records"].get("diagnostics", {}))
    return record


def _label_of(run) -> str:
  try:
    import json
    with open(os.path.join(run.dir, "spec.json")) as f:
      return json.load(f).get("label", "")
  except (OSError, ValueError):
    return ""


def study_hash(cfg: StagedConfig) -> str:
  """Names a study's results (every result-determining field)."""
  return store_lib.spec_hash({"study": "staged", **config_lib.nondefault(cfg),
                              "experiment": cfg.experiment})

