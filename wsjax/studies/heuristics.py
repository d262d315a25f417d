"""Training heuristics through mode connectivity and CCA (Gotmare et al., ICLR 2019).

Gotmare, Keskar, Xiong & Socher, "A Closer Look at Deep Learning Heuristics:
Learning rate restarts, Warmup and Distillation" (PAPERS.md section 4), look
at three heuristics with two tools, mode-connecting curves (Garipov et al.
2018; `wsjax.studies.curves`) and per-layer CCA of representations (Raghu
et al. 2017; `wsjax.studies.representations`). Three studies, one stored run
per group of seeds trained side by side (`wsjax.core.store`), so each resumes
after a kill and reuses whatever is finished:

* `sgdr` (claim a: "SGDR's restarts escape to distinct minima" is not borne
  out): SGD with cosine restarts (SGDR, Loshchilov & Hutter 2017: T0
  epochs, then each cycle Tmult times longer; `wsjax.schedules.sgdr`) and
  step decay (x0.1 at 50% and 75%) from the same initializations, for the
  same budget. SGDR's snapshots are the iterates at the ends of its cycles
  (`sgdr_cycle_ends`, before each restart). Between consecutive iterates of
  one run, and between the final SGDR iterates of independent runs (seed r
  and r + 1), both the straight line and a trained Bezier curve are
  evaluated at 61 t (BatchNorm statistics recomputed at each t): train loss
  and test error along them, their barriers; all curves are replicas of
  one program. Per-layer CCA between the same pairs.
* `warmup` (claim b: warm-up keeps the deeper layers from changing too much
  in large-batch training; freezing them has a similar effect): from the
  same initializations, a small batch at a small rate (the paper: batch 100,
  lr 0.05), a large batch at a large rate with a linear warm-up (the
  paper: batch 5000, the linearly scaled lr 2.5, 200 iterations), the same
  without warm-up, and without warm-up but with the last layers frozen for
  the warm-up's duration (`wsjax.transforms.freeze`). Snapshots every few
  iterations of early training (the small batch at the same numbers of
  examples); per layer, CCA between consecutive snapshots and against the
  final model. A replica whose loss becomes non-finite is frozen there and
  reported as diverged (its seed left out of the similarities), not an
  error: divergence without warm-up is one of the possible outcomes.
* `distillation` (claim c: the teacher's knowledge lands in the deeper
  layers): a wider teacher of the student's family (conv1d channels x4,
  mlp widths x4, ...), then from the same initializations a student trained
  on labels alone and one trained with distillation (Hinton et al. 2015,
  `wsjax.core.task.Distillation`: T = 4, a = 0.9, the teacher's variables a
  per-replica program input), student r with teacher r. Per-layer CCA
  between each student and its teacher, layers paired by depth.

Each study's defaults (`STUDY_DEFAULTS`, applied for every flag not given)
are real runs on the local MNIST-1D data with 3 seeds, sized for a 2-core
CPU; `--dataset=cifar10 --model=vgg16` with the paper's hyperparameters is
one flag away once CIFAR-10 is prepared (`PAPER_SETTINGS`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import tqdm

from wsjax import config as config_lib
from wsjax import parallel
from wsjax import results as results_lib
from wsjax import schedules
from wsjax import tree as wtree
from wsjax.analysis import curves as curve_math
from wsjax.core import store as store_lib
from wsjax.core.data import TrainData
from wsjax.core.hooks import Progress
from wsjax.core.loop import Until
from wsjax.core.optim import OptimizerConfig
from wsjax.core.runner import train_run
from wsjax.core.task import Distillation
from wsjax.studies import curves as curves_lib
from wsjax.studies import representations
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig, Setting, _f
from wsjax.studies.representations import Probe, SimilarityConfig

STUDIES = ("sgdr", "warmup", "distillation")
CONDITIONS = ("small", "large_warmup", "large", "large_frozen")


# ---- configuration -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SgdrConfig:
  """SGDR against step decay (`--study=sgdr`)."""
  t0_epochs: int = _f(10, "SGDR's first cycle in epochs (the paper: 10; --sgdr_t0 in steps "
                      "wins when given); cycles grow by --sgdr_t_mult", flag="sgdr_t0_epochs")
  curves: bool = _f(True, "train and evaluate curves between the iterates (else lines only)",
                    flag="sgdr_curves")


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
  """Large-batch training with and without warm-up (`--study=warmup`)."""
  conditions: tuple[str, ...] = _f(CONDITIONS, "what to train: small (--batch_size, --lr), "
                                   "large_warmup, large (--large_batch, --large_lr) and "
                                   "large_frozen (the last layers frozen instead of warm-up)",
                                   flag="conditions")
  large_batch: int = _f(5000, "the large batch (the paper: 5000 against 100)",
                        flag="large_batch")
  large_lr: float = _f(0.0, "the large batch's learning rate (0: --lr scaled linearly by "
                       "large_batch / batch_size; the paper: 2.5)", flag="large_lr")
  warmup: int = _f(200, "large_warmup: linear warm-up iterations (the paper: 200)",
                   flag="large_warmup_steps")
  freeze_last: int = _f(1, "large_frozen: layers with weights frozen, counted back from the "
                        "classifier (with any normalization between them)", flag="freeze_last")
  freeze_steps: int = _f(0, "large_frozen: iterations frozen (0: the warm-up's)",
                         flag="freeze_steps")
  snapshot_every: int = _f(25, "snapshots every N large-batch iterations of early training "
                           "(the small batch: at the same numbers of examples)",
                           flag="snapshot_every")
  snapshot_until: int = _f(0, "early training ends at this large-batch iteration (0: the "
                           "warm-up's end)", flag="snapshot_until")

  def large_lr_for(self, small_lr: float, small_batch: int) -> float:
    return self.large_lr or small_lr * self.large_batch / small_batch

  @property
  def frozen_steps(self) -> int:
    return self.freeze_steps or self.warmup

  @property
  def early_end(self) -> int:
    return self.snapshot_until or self.warmup


@dataclasses.dataclass(frozen=True)
class DistillationConfig:
  """A student with and without a wider teacher (`--study=distillation`)."""
  teacher: Optional[str] = _f(None, "a stored teacher RUN@SNAPSHOT of the --teacher_scale "
                              "wider model (one replica, or one per seed); default: train it",
                              flag="teacher")
  teacher_scale: int = _f(4, "the teacher's width over the student's (conv1d channels, mlp "
                          "widths, resnet/conv8 width)", flag="teacher_scale")
  teacher_epochs: int = _f(0, "the teacher's training epochs (0: --epochs)",
                           flag="teacher_epochs")
  temperature: float = _f(4.0, "distillation temperature T", flag="temperature")
  alpha: float = _f(0.9, "weight a of the soft term: (1 - a) CE + a T^2 KL", flag="alpha")


@dataclasses.dataclass(frozen=True)
class HeuristicsConfig:
  """One of the three studies (`study`), its setting and its measurements."""
  experiment: str = dataclasses.field(default="heuristics", metadata={"flag": False})
  study: str = _f("sgdr", "sgdr, warmup or distillation", choices=STUDIES)
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9,
                                               weight_decay=5e-4)
  epochs: int = _f(150, "training budget in epochs (sgdr: its cycles end inside it)")
  seeds: int = _f(3, "seeds (run side by side, vmapped)")
  seed_offset: int = _f(0, "first seed")
  similarity: SimilarityConfig = SimilarityConfig()
  curve: curves_lib.CurveConfig = dataclasses.field(default=curves_lib.CurveConfig(lr=0.05),
                                                    metadata={"prefix": "curve_"})
  sgdr: SgdrConfig = SgdrConfig()
  warmup: WarmupConfig = WarmupConfig()
  distillation: DistillationConfig = DistillationConfig()

  @property
  def seed_list(self) -> tuple[int, ...]:
    return tuple(range(self.seed_offset, self.seed_offset + self.seeds))

  def validate(self) -> None:
    if self.study not in STUDIES:
      raise ValueError(f"unknown study {self.study!r}; choose sgdr, warmup or distillation")
    self.optimizer.validate()
    self.data.validate()
    self.similarity.validate()
    if self.epochs < 1:
      raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
    if self.seeds < 1:
      raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
    if self.seed_offset < 0:
      raise ValueError(f"--seed_offset must be >= 0, got {self.seed_offset}")
    if self.study == "sgdr":
      self.curve.validate()
      if self.sgdr.t0_epochs < 1:
        raise ValueError(f"--sgdr_t0_epochs must be >= 1, got {self.sgdr.t0_epochs}")
      if self.optimizer.sgdr_t_mult != int(self.optimizer.sgdr_t_mult):
        raise ValueError(f"--sgdr_t_mult must be an integer, got {self.optimizer.sgdr_t_mult}")
    elif self.study == "warmup":
      w = self.warmup
      unknown = [c for c in w.conditions if c not in CONDITIONS]
      if unknown or not w.conditions:
        raise ValueError(f"unknown condition {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(CONDITIONS)}")
      if len(set(w.conditions)) != len(w.conditions):
        raise ValueError(f"--conditions repeats: {', '.join(w.conditions)}")
      for name in ("large_batch", "warmup", "freeze_last", "snapshot_every"):
        if getattr(w, name) < 1:
          raise ValueError(f"--{_flag(WarmupConfig, name)} must be >= 1, got {getattr(w, name)}")
      if w.large_lr < 0 or w.freeze_steps < 0 or w.snapshot_until < 0:
        raise ValueError("--large_lr, --freeze_steps and --snapshot_until must be >= 0")
      if self.optimizer.warmup_steps:
        raise ValueError("the warmup study sets the warm-up itself; use --large_warmup_steps, "
                         "not --warmup_steps")
    else:
      d = self.distillation
      if d.teacher_scale < 1:
        raise ValueError(f"--teacher_scale must be >= 1, got {d.teacher_scale}")
      if d.teacher_epochs < 0:
        raise ValueError(f"--teacher_epochs must be >= 0, got {d.teacher_epochs}")
      if not d.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {d.temperature}")
      if not 0 <= d.alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {d.alpha}")


def _flag(cls, field: str) -> str:
  for f in dataclasses.fields(cls):
    if f.name == field:
      return f.metadata.get("flag") or field
  return field


# Each study's defaults, as flag values, applied to every flag the user does
# not give (`with_study_defaults`). Measured and chosen in README's results
# section: MNIST-1D's 1-D ConvNet (32 channels), 3 seeds, CPU-sized budgets.
STUDY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgdr": {"dataset": "mnist1d", "model": "conv1d", "batch_size": 128, "optimizer": "sgd",
             "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 150,
             "sgdr_t0_epochs": 10, "sgdr_t_mult": 2.0, "curve_lr": 0.05},
    # the large batch's rate is NOT the linearly scaled 2.5 (0.05 x 5000 /
    # 100): the 1-D ConvNet (no BatchNorm) diverges or stalls at bs 5000 from
    # lr 0.5 on, with or without warm-up; 0.3 is the edge where it trains
    # but is unstable (README lists the rates tried)
    "warmup": {"dataset": "mnist1d_large", "model": "conv1d", "batch_size": 100,
               "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
               "epochs": 20, "large_batch": 5000, "large_lr": 0.3, "large_warmup_steps": 40,
               "snapshot_every": 5},
    "distillation": {"dataset": "mnist1d", "model": "conv1d", "batch_size": 128,
                     "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                     "lr_schedule": "cosine", "epochs": 60, "teacher_scale": 4},
}

# The paper's settings (VGG-16 on CIFAR-10, from third-party summaries: check
# before relying on them), one flag away: --study=S --preset=paper.
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "sgdr": {"dataset": "cifar10", "model": "vgg16", "augment": True, "batch_size": 128,
             "lr": 0.05, "weight_decay": 5e-4, "epochs": 150, "sgdr_t0_epochs": 10,
             "sgdr_t_mult": 2.0, "curve_lr": 0.015},
    "warmup": {"dataset": "cifar10", "model": "vgg16", "augment": True, "batch_size": 100,
               "lr": 0.05, "large_batch": 5000, "large_lr": 2.5, "large_warmup_steps": 200,
               "epochs": 100},
    "distillation": {"dataset": "cifar10", "model": "vgg16", "augment": True,
                     "batch_size": 128, "lr": 0.05, "epochs": 100},
}


def with_study_defaults(cfg: HeuristicsConfig, given: Sequence[str] = (),
                        preset: Optional[str] = None) -> HeuristicsConfig:
  """`cfg` with its study's defaults (and the `preset`'s settings) set for
  every flag not in `given` (the flags the user passed)."""
  values = dict(STUDY_DEFAULTS[cfg.study]) if cfg.study in STUDY_DEFAULTS else {}
  if preset:
    if preset != "paper":
      raise ValueError(f"unknown preset {preset!r}; choose paper")
    values.update(PAPER_SETTINGS[cfg.study])
  for flag, _, _, _, path in config_lib.flag_fields(type(cfg)):
    if flag in values and flag not in given:
      value = values[flag]
      cfg = _replace_path(cfg, path, tuple(value) if isinstance(value, list) else value)
  return cfg


def _replace_path(config, path, value):
  if len(path) == 1:
    return dataclasses.replace(config, **{path[0]: value})
  inner = getattr(config, path[0])
  return dataclasses.replace(config, **{path[0]: _replace_path(inner, path[1:], value)})


def study_config(study: str, **flags) -> HeuristicsConfig:
  """A study's default config with some flags set (`study_config("warmup",
  epochs=2, large_batch=500)`), as the program builds it."""
  cfg = with_study_defaults(HeuristicsConfig(study=study))
  for flag, _, _, _, path in config_lib.flag_fields(HeuristicsConfig):
    if flag in flags:
      value = flags.pop(flag)
      cfg = _replace_path(cfg, path, tuple(value) if isinstance(value, list) else value)
  if flags:
    raise ValueError(f"unknown flags {', '.join(sorted(flags))}")
  return cfg


def wider(model: ModelConfig, built, factor: int) -> ModelConfig:
  """The same family `factor` times wider (the distillation teacher)."""
  name = model.name
  if name == "conv1d":
    return dataclasses.replace(model, channels=built.channels * factor)
  if name == "mlp":
    return dataclasses.replace(model, widths=tuple(w * factor for w in built.widths))
  if name.startswith(("resnet", "conv8")):
    return dataclasses.replace(model, width=built.width * factor)
  raise ValueError(f"no wider teacher for model {name!r}; use conv1d, mlp, a resnet or conv8, "
                   "or pass a stored --teacher")


def frozen_mask(model, variables_one, x, last: int):
  """`{param leaf: frozen?}`: the last `last` layers with a kernel (in depth
  order) and every parameter-owning layer after the first of them."""
  order = representations.layers_in_order(model, variables_one, x)
  names = wtree.to_dict(variables_one["params"])
  kernels = [layer for layer in order if f"{layer}/kernel" in names]
  if last > len(kernels):
    raise ValueError(f"--freeze_last={last} but the model has {len(kernels)} layers with "
                     f"weights ({', '.join(kernels)})")
  frozen = set(order[order.index(kernels[-last]):])
  mask = wtree.map_named(lambda name, _: name.rpartition("/")[0] in frozen,
                         variables_one["params"])
  return mask, sorted(frozen, key=order.index)


# ---- shared machinery -----------------------------------------------------------------
class _Study:
  """What the three studies share: the store, the log, seeds, stored runs."""

  def __init__(self, cfg: HeuristicsConfig, workdir: str, runner: RunnerConfig,
               log: Callable[[str], None]):
    self.cfg = cfg
    self.runner = runner
    self.workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    self.log = log if primary else (lambda s: None)
    self.progress = runner.progress and primary
    self.store = store_lib.RunStore(os.path.join(self.workdir, "runs"))
    self.dataset = cfg.data.load()
    self._templates: dict[str, Any] = {}  # run hash -> its states' template

  def setting(self, model: ModelConfig, optimizer: OptimizerConfig, batch_size: int,
              horizon: int) -> Setting:
    data = dataclasses.replace(self.cfg.data, batch_size=batch_size)
    return Setting(model, data, optimizer, self.cfg.seed_list, self.runner, horizon=horizon,
                   dataset=self.dataset)

  def steps_per_epoch(self, batch_size: int) -> int:
    return -(-len(self.dataset.y_train) // batch_size)

  def spec(self, model: ModelConfig, optimizer: OptimizerConfig, batch_size: int, **more) -> dict:
    cfg = self.cfg
    return {"protocol": "heuristics", "model": {"name": model.name,
                                                **config_lib.nondefault(model)},
            "data": {"dataset": cfg.data.dataset, **config_lib.nondefault(cfg.data),
                     "batch_size": batch_size},
            "optimizer": {"name": optimizer.name, **config_lib.nondefault(optimizer)},
            "seeds": list(cfg.seed_list), **more}

  def train(self, setting: Setting, spec: dict, label: str, *, steps: int, task=None, tx=None,
            inputs=None, snapshot_steps: Sequence[int] = (), on_divergence: str = "raise",
            bar=None):
    """One stored run of every seed from the fresh initialization
    `fresh_states(0)` (the same for every condition of a study); returns
    (final states, result with test accuracy, the run). `on_divergence`:
    "raise" (one line, exit 2) or "freeze" (the replica stops where its loss
    became non-finite and is marked in `result["diverged"]`)."""
    program = setting.program(task, tx)
    run = self.store.run(spec, label=label)
    data = TrainData(setting.x_train, setting.y_train, np.arange(len(self.dataset.y_train)),
                     setting.data_cfg.batch_size)

    def extra(states):
      acc, loss = program.evaluate(states, setting.x_test, setting.y_test)
      return {"test_acc": [float(a) for a in acc], "test_loss": [float(v) for v in loss]}

    fresh, template = (lambda: setting.fresh_states(0)), setting.template()
    if tx is not None:  # another optimizer than the setting's: its own state
      init_opt = jax.jit(jax.vmap(tx.init), out_shardings=parallel.replicated())

      def fresh():
        states = setting.fresh_states(0)
        return states.replace(opt_state=init_opt(states.params))
      template = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), jax.eval_shape(fresh))
    states, result = train_run(
        run, start_states=fresh, template=template,
        program=program, data=data, until=Until.steps(steps), data_seeds=setting.seeds,
        inputs=inputs, hooks=[Progress(bar, label)], checkpoint_every=self.runner.checkpoint_every,
        snapshot_steps=snapshot_steps, on_divergence=on_divergence, label=f"[{label}] ",
        log=self.log, extra_result=extra)
    if result["reused"]:
      self.log(f"[{label}] reusing finished run run_{run.hash}")
    self._templates[run.hash] = template
    return states, result, run

  def load(self, run: store_lib.Run, snapshot: str) -> dict:
    """`{"params", ["batch_stats"]}` of a snapshot of a run this study
    trained (host arrays, a leading replica axis)."""
    return _variables(run.load_snapshot(snapshot, self._templates[run.hash]))

  def header(self) -> dict:
    return {"experiment": self.cfg.experiment, "heuristic": self.cfg.study,
            "config": config_lib.to_dict(self.cfg),
            "environment": results_lib.environment()}

  def bar(self, total: int, desc: str):
    return tqdm.tqdm(total=total, desc=desc, unit="run", disable=not self.progress,
                     dynamic_ncols=True)


def _variables(states) -> dict:
  host = parallel.to_host(states)
  out = {"params": host.params}
  if host.batch_stats:
    out["batch_stats"] = host.batch_stats
  return out


def _probe(cfg: SimilarityConfig, setting: Setting, what: str, layers=None) -> Probe:
  shapes = jax.eval_shape(lambda: setting.fresh_states(0))
  variables = {"params": shapes.params}
  if shapes.batch_stats:
    variables["batch_stats"] = shapes.batch_stats
  return Probe(cfg, setting.model, variables, setting.dataset.x_train, layers=layers, what=what)


# ---- SGDR ----------------------------------------------------------------------------
class SgdrStudy(_Study):
  """SGDR vs step decay; curves, lines and CCA between SGDR's iterates."""

  def __init__(self, cfg, workdir, runner, log):
    super().__init__(cfg, workdir, runner, log)
    bs = cfg.data.batch_size
    self.per_epoch = self.steps_per_epoch(bs)
    self.total = cfg.epochs * self.per_epoch
    opt = cfg.optimizer
    t0 = opt.sgdr_t0 or cfg.sgdr.t0_epochs * self.per_epoch
    t_mult = int(opt.sgdr_t_mult)
    self.cycle_ends = schedules.sgdr_cycle_ends(t0, t_mult, self.total)
    if len(self.cycle_ends) < 2:
      raise ValueError(f"{cfg.epochs} epochs hold {len(self.cycle_ends)} complete SGDR "
                       f"cycle(s) of T0 = {t0} steps, Tmult = {t_mult}; raise --epochs or lower "
                       "--sgdr_t0_epochs (two cycle ends at least)")
    # an int: wsjax.schedules.sgdr takes an integer multiplier, and
    # OptimizerConfig.sgdr_t_mult is a float (2.0 == 2, so the run's name is
    # the same either way)
    self.sgdr_opt = dataclasses.replace(opt, schedule="sgdr", sgdr_t0=t0, sgdr_t_mult=t_mult)
    bounds = opt.decay_boundaries or (self.total // 2, 3 * self.total // 4)
    self.step_opt = dataclasses.replace(opt, schedule="step", decay_boundaries=tuple(bounds),
                                        sgdr_t0=0)
    self.sgdr_setting = self.setting(cfg.model, self.sgdr_opt, bs, self.total)
    self.step_setting = self.setting(cfg.model, self.step_opt, bs, self.total)
    self.probe = _probe(cfg.similarity, self.sgdr_setting, "the model")
    self.iterate_pairs = [(a, b) for a, b in zip(self.cycle_ends, self.cycle_ends[1:])]
    n = cfg.seeds
    self.independent = [(r, (r + 1) % n) for r in range(n)] if n > 2 else (
        [(0, 1)] if n == 2 else [])

  def run(self) -> dict:
    cfg = self.cfg
    bar = self.bar(3 if cfg.sgdr.curves else 2, "sgdr")
    try:
      sgdr_states, sgdr_result, sgdr_run = self.train(
          self.sgdr_setting, self.spec(cfg.model, self.sgdr_opt, cfg.data.batch_size,
                                       steps=self.total),
          "heuristics/sgdr", steps=self.total, snapshot_steps=self.cycle_ends,
          bar=bar if self.progress else None)
      bar.update(1)
      _, step_result, _ = self.train(
          self.step_setting, self.spec(cfg.model, self.step_opt, cfg.data.batch_size,
                                       steps=self.total),
          "heuristics/step_decay", steps=self.total, bar=bar if self.progress else None)
      bar.update(1)
      template = self.sgdr_setting.template()
      iterates = {c: self.load(sgdr_run, f"step_{c}") for c in self.cycle_ends}
      program = self.sgdr_setting.program()
      iterate_acc = {}
      for c in self.cycle_ends:
        states = sgdr_run.load_snapshot(f"step_{c}", template)
        acc, _ = program.evaluate(states, self.sgdr_setting.x_test, self.sgdr_setting.y_test)
        iterate_acc[c] = [float(a) for a in acc]
      start, end, groups = self._endpoints(iterates, sgdr_run)
      paths = self._paths(start, end, bar)
      bar.update(1 if cfg.sgdr.curves else 0)
      similarity = self._similarity(iterates)
    finally:
      bar.close()
    out = self.header()
    out.update({
        "steps_per_epoch": self.per_epoch, "total_steps": self.total,
        "cycle_ends": list(self.cycle_ends),
        "cycle_end_epochs": [c / self.per_epoch for c in self.cycle_ends],
        "runs": {"sgdr": sgdr_result["run"], "step_decay": step_result["run"]},
        "test_acc": {"sgdr": results_lib.summary(sgdr_result["test_acc"]),
                     "step_decay": results_lib.summary(step_result["test_acc"])},
        "iterate_test_acc": {str(c): results_lib.summary(iterate_acc[c])
                             for c in self.cycle_ends},
        "pairs": groups, "paths": paths, "similarity": similarity})
    del sgdr_states
    return out

  def _endpoints(self, iterates, run):
    """Curve endpoints: every seed's consecutive iterates, then the final
    iterates of independent seeds."""
    seeds = self.cfg.seeds
    starts, ends, groups = [], [], []
    origin = lambda c, rows: {"run": f"run_{run.hash}", "snapshot": f"step_{c}",  # noqa: E731
                              "replicas": rows}
    for a, b in self.iterate_pairs:
      rows = list(range(seeds))
      starts.append(curves_lib.Endpoints(iterates[a], None).take(rows, origin(a, rows)))
      ends.append(curves_lib.Endpoints(iterates[b], None).take(rows, origin(b, rows)))
      groups.append({"kind": "iterates", "from_step": a, "to_step": b,
                     "seeds": list(self.cfg.seed_list)})
    if self.independent:
      last = self.cycle_ends[-1]
      first_rows = [i for i, _ in self.independent]
      second_rows = [j for _, j in self.independent]
      starts.append(curves_lib.Endpoints(iterates[last], None).take(
          first_rows, origin(last, first_rows)))
      ends.append(curves_lib.Endpoints(iterates[last], None).take(
          second_rows, origin(last, second_rows)))
      groups.append({"kind": "independent", "from_step": last, "to_step": last,
                     "seed_pairs": [[self.cfg.seed_list[i], self.cfg.seed_list[j]]
                                    for i, j in self.independent]})
    return curves_lib.concat(starts), curves_lib.concat(ends), groups

  def _group_rows(self) -> list[list[int]]:
    seeds = self.cfg.seeds
    rows, i = [], 0
    for _ in self.iterate_pairs:
      rows.append(list(range(i, i + seeds)))
      i += seeds
    if self.independent:
      rows.append(list(range(i, i + len(self.independent))))
    return rows

  def _paths(self, start, end, bar) -> dict:
    cfg = self.cfg
    s = self.sgdr_setting
    rows = self._group_rows()
    if cfg.sgdr.curves:
      trainer = curves_lib.CurveTrainer(
          s, self.store, curves_lib.base_spec(cfg.model, cfg.data), log=self.log,
          progress=self.progress)
      steps = trainer.default_steps(self.total, cfg.curve)
      seeds = [1000 * (cfg.seed_offset + 1) + i for i in range(start.count)]
      result = trainer.train(start, end, cfg.curve, steps, seeds, label="heuristics/curves",
                             bar=bar if self.progress else None)
      summaries = [curves_lib.summarize(result, r) for r in rows]
      return {"curve_run": result["run"], "curve_steps": steps, "ts": result["ts"],
              "groups": summaries,
              "per_curve": {"curve": result["curve"], "line": result["line"],
                            "barriers": result["barriers"]}}
    ts = np.asarray(curve_math.evaluation_ts(cfg.curve.points))
    line = curves_lib.evaluate_lines(s.model, start.variables["params"], end.variables["params"],
                                     (s.x_train, s.y_train, s.x_test, s.y_test), ts,
                                     chunk=cfg.curve.chunk, bn_batch_size=cfg.data.batch_size)
    groups = [{"line": curves_lib.path_summary({m: v[r] for m, v in line.items()}, ts)}
              for r in rows]
    return {"ts": ts.tolist(), "groups": groups}

  def _similarity(self, iterates) -> dict:
    """Per layer: CCA between consecutive iterates (per seed) and between
    independent final iterates."""
    probe = self.probe
    acts = {c: probe.collect(v) for c, v in iterates.items()}
    out = {"layers": list(probe.layers), "iterates": {}, "independent": {}}
    for layer in probe.layers:
      xs = np.stack([acts[a][layer] for a, _ in self.iterate_pairs])   # (pairs, R, n, p)
      ys = np.stack([acts[b][layer] for _, b in self.iterate_pairs])
      values = probe.compare(xs, ys)                                   # (pairs, R)
      out["iterates"][layer] = [results_lib.summary(v) for v in values]
      if self.independent:
        final = acts[self.cycle_ends[-1]][layer]
        xi = final[[i for i, _ in self.independent]]
        yi = final[[j for _, j in self.independent]]
        out["independent"][layer] = results_lib.summary(probe.compare(xi, yi))
    return out


# ---- warm-up ----------------------------------------------------------------------------
class WarmupStudy(_Study):
  """Large batch with/without warm-up, small batch, last layers frozen."""

  def __init__(self, cfg, workdir, runner, log):
    super().__init__(cfg, workdir, runner, log)
    w = cfg.warmup
    small = cfg.data.batch_size
    n_train = len(self.dataset.y_train)
    if w.large_batch > n_train:
      raise ValueError(f"--large_batch={w.large_batch} is larger than the {n_train} training "
                       f"examples of {cfg.data.dataset}")
    self.small, self.large = small, w.large_batch
    self.large_lr = w.large_lr_for(cfg.optimizer.lr, small)
    self.steps = {"small": cfg.epochs * self.steps_per_epoch(small)}
    self.steps["large"] = cfg.epochs * self.steps_per_epoch(self.large)
    if w.early_end > self.steps["large"]:
      raise ValueError(f"early training ends at large-batch iteration {w.early_end}, after the "
                       f"{self.steps['large']} iterations of {cfg.epochs} epochs; raise --epochs "
                       "or lower --snapshot_until / --large_warmup_steps")
    if w.snapshot_every > w.early_end:
      raise ValueError(f"--snapshot_every={w.snapshot_every} is past early training's end "
                       f"({w.early_end} iterations)")
    self.large_snaps = list(range(0, w.early_end + 1, w.snapshot_every))
    ratio = self.large / small
    self.small_snaps = [int(round(k * ratio)) for k in self.large_snaps]
    if self.small_snaps[-1] > self.steps["small"]:
      raise ValueError("the small batch's snapshots run past its training; raise --epochs")
    base = cfg.optimizer
    large_opt = dataclasses.replace(base, lr=self.large_lr)
    self.optimizers = {"small": base,
                       "large_warmup": dataclasses.replace(large_opt, warmup_steps=w.warmup),
                       "large": large_opt, "large_frozen": large_opt}
    self.settings = {}
    for name in w.conditions:
      bs = small if name == "small" else self.large
      self.settings[name] = self.setting(cfg.model, self.optimizers[name], bs,
                                         self.steps["small" if name == "small" else "large"])
    any_setting = next(iter(self.settings.values()))
    self.probe = _probe(cfg.similarity, any_setting, "the model")
    self.frozen_layers = []
    if "large_frozen" in w.conditions:
      s = self.settings["large_frozen"]
      shapes = jax.eval_shape(lambda: s.fresh_states(0))
      one = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                    shapes.params)}
      if shapes.batch_stats:
        one["batch_stats"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                          shapes.batch_stats)
      x = jax.ShapeDtypeStruct((1, *self.dataset.input_shape), np.float32)
      self.mask, self.frozen_layers = frozen_mask(s.model, one, x, w.freeze_last)
      from wsjax.transforms.freeze import frozen_optimizer
      self.frozen_tx = frozen_optimizer(large_opt, self.steps["large"], self.mask,
                                        w.frozen_steps)

  def _condition_spec(self, name: str) -> dict:
    w = self.cfg.warmup
    bs = self.small if name == "small" else self.large
    steps = self.steps["small" if name == "small" else "large"]
    # the snapshots the study reads are part of the run's name: a finished
    # run stored with other snapshot steps is not taken for this one
    more = {"steps": steps,
            "snapshots": list(self.small_snaps if name == "small" else self.large_snaps)}
    if name == "large_frozen":
      more["freeze"] = {"layers": self.frozen_layers, "until": w.frozen_steps}
    return self.spec(self.cfg.model, self.optimizers[name], bs, **more)

  def run(self) -> dict:
    w = self.cfg.warmup
    bar = self.bar(len(w.conditions), "warmup")
    out = self.header()
    out.update({"large_lr": self.large_lr, "steps": self.steps, "frozen_layers": self.frozen_layers,
                "snapshots": {"large": self.large_snaps, "small": self.small_snaps},
                "layers": list(self.probe.layers), "conditions": {}})
    try:
      for name in w.conditions:
        s = self.settings[name]
        snaps = self.small_snaps if name == "small" else self.large_snaps
        steps = self.steps["small" if name == "small" else "large"]
        tx = self.frozen_tx if name == "large_frozen" else None
        _, result, run = self.train(s, self._condition_spec(name), f"heuristics/{name}",
                                    steps=steps, tx=tx, snapshot_steps=snaps,
                                    on_divergence="freeze",
                                    bar=bar if self.progress else None)
        diverged = [bool(d) for d in result.get("diverged", [False] * self.cfg.seeds)]
        out["conditions"][name] = {"run": result["run"],
                                   "test_acc": results_lib.summary(result["test_acc"]),
                                   "diverged": diverged, "steps": steps,
                                   **self._similarity(run, snaps, diverged)}
        bar.update(1)
    finally:
      bar.close()
    return out

  def _similarity(self, run, snaps: Sequence[int], diverged: Sequence[bool]) -> dict:
    """Per layer: CCA between consecutive early snapshots and of every
    early snapshot with the final model, `(K,)` summaries over the seeds
    that did not diverge (a diverged replica's weights are not finite; its
    seed is left out and named in `diverged`)."""
    probe = self.probe
    keep = [r for r, d in enumerate(diverged) if not d]
    consecutive, to_final = {}, {}
    if not keep:
      return {"consecutive": consecutive, "to_final": to_final}
    acts = [probe.collect(self.load(run, f"step_{k}")) for k in snaps]
    final = probe.collect(self.load(run, "final"))
    for layer in probe.layers:
      stack = np.stack([a[layer][keep] for a in acts])             # (K + 1, R', n, p)
      final_layer = final[layer][keep]
      values = probe.compare(stack[:-1], stack[1:])                # (K, R)
      consecutive[layer] = [results_lib.summary(v) for v in values]
      ends = np.broadcast_to(final_layer[None], stack.shape)
      values = probe.compare(stack, ends)                          # (K + 1, R)
      to_final[layer] = [results_lib.summary(v) for v in values]
    return {"consecutive": consecutive, "to_final": to_final}


# ---- distillation ---------------------------------------------------------------------------
class DistillationStudy(_Study):
  """A wider teacher, students with and without it, CCA student-teacher."""

  def __init__(self, cfg, workdir, runner, log):
    super().__init__(cfg, workdir, runner, log)
    d = cfg.distillation
    bs = cfg.data.batch_size
    self.per_epoch = self.steps_per_epoch(bs)
    self.student_steps = cfg.epochs * self.per_epoch
    self.teacher_steps = (d.teacher_epochs or cfg.epochs) * self.per_epoch
    self.student = self.setting(cfg.model, cfg.optimizer, bs, self.student_steps)
    self.teacher_model = wider(cfg.model, self.student.model, d.teacher_scale)
    self.teacher = self.setting(self.teacher_model, cfg.optimizer, bs, self.teacher_steps)
    self.student_probe = _probe(cfg.similarity, self.student, "the student")
    x = jax.ShapeDtypeStruct((1, *self.dataset.input_shape), np.float32)
    pairs = representations.pair_by_depth(
        representations.sown_in_order(self.student.model, _one_shapes(self.student), x),
        representations.sown_in_order(self.teacher.model, _one_shapes(self.teacher), x))
    self.layer_pairs = [(a, b) for a, b in pairs if a in self.student_probe.layers]
    self.teacher_probe = _probe(cfg.similarity, self.teacher, "the teacher",
                                layers=list(dict.fromkeys(t for _, t in self.layer_pairs)))
    self.stored_teacher = self._load_teacher() if d.teacher else None

  def _load_teacher(self):
    one = self.teacher.one_model_template()
    expected = {"params": one["params"]}
    if one["batch_stats"]:
      expected["batch_stats"] = one["batch_stats"]
    teacher, _, _ = curves_lib.load_endpoint(self.cfg.distillation.teacher, expected,
                                             self.store, what="--teacher")
    n = self.cfg.seeds
    if teacher.count not in (1, n):
      raise ValueError(f"--teacher has {teacher.count} replicas; give one, or one per seed ({n})")
    rows = [0] * n if teacher.count == 1 else list(range(n))
    # the origin as a teacher trained here names itself (run, snapshot,
    # replicas): a stored teacher is the same teacher whichever way it is
    # named, and the distilled students' run is then the same run
    return teacher.take(rows, {"run": teacher.origin["run"], "snapshot": teacher.origin["snapshot"],
                               "replicas": [teacher.origin["replicas"][r] for r in rows]})

  def run(self) -> dict:
    cfg, d = self.cfg, self.cfg.distillation
    bar = self.bar(3 if self.stored_teacher is None else 2, "distillation")
    try:
      if self.stored_teacher is None:
        t_states, t_result, _ = self.train(
            self.teacher, self.spec(self.teacher_model, cfg.optimizer, cfg.data.batch_size,
                                    steps=self.teacher_steps, role="teacher"),
            "heuristics/teacher", steps=self.teacher_steps, bar=bar if self.progress else None)
        teacher_vars = _variables(t_states)
        teacher_origin = {"run": t_result["run"], "snapshot": "final",
                          "replicas": list(range(cfg.seeds))}
        teacher_acc = results_lib.summary(t_result["test_acc"])
        bar.update(1)
      else:
        teacher_vars = self.stored_teacher.variables
        teacher_origin = self.stored_teacher.origin
        acc, _ = self.teacher.program().evaluate(
            self._as_states(self.teacher, teacher_vars), self.teacher.x_test,
            self.teacher.y_test)
        teacher_acc = results_lib.summary(acc)
      _, plain, plain_run = self.train(
          self.student, self.spec(cfg.model, cfg.optimizer, cfg.data.batch_size,
                                  steps=self.student_steps, role="student"),
          "heuristics/student", steps=self.student_steps, bar=bar if self.progress else None)
      bar.update(1)
      task = Distillation(teacher=self.teacher.model, temperature=d.temperature, alpha=d.alpha)
      spec = self.spec(cfg.model, cfg.optimizer, cfg.data.batch_size, steps=self.student_steps,
                       role="student", task={"distillation": {"temperature": d.temperature,
                                                              "alpha": d.alpha},
                                             "teacher": teacher_origin})
      _, distilled, distilled_run = self.train(
          self.student, spec, "heuristics/distilled", steps=self.student_steps, task=task,
          inputs=lambda: {"teacher": parallel.put_replicated(teacher_vars)},
          bar=bar if self.progress else None)
      bar.update(1)
    finally:
      bar.close()
    teacher_acts = self.teacher_probe.collect(teacher_vars)
    similarity = {}
    for name, run in (("student", plain_run), ("distilled", distilled_run)):
      acts = self.student_probe.collect(self.load(run, "final"))
      similarity[name] = {s: self.student_probe.compare(acts[s], teacher_acts[t]).tolist()
                          for s, t in self.layer_pairs}
    difference = {s: results_lib.summary(np.subtract(similarity["distilled"][s],
                                                     similarity["student"][s]))
                  for s, _ in self.layer_pairs}
    out = self.header()
    out.update({
        "teacher_model": config_lib.to_dict(self.teacher_model), "teacher": teacher_origin,
        "layer_pairs": [list(p) for p in self.layer_pairs],
        "test_acc": {"teacher": teacher_acc, "student": results_lib.summary(plain["test_acc"]),
                     "distilled": results_lib.summary(distilled["test_acc"])},
        "runs": {"student": plain["run"], "distilled": distilled["run"]},
        "similarity": {name: representations.summary_by_layer(v)
                       for name, v in similarity.items()},
        "similarity_gain": difference})
    return out

  @staticmethod
  def _as_states(setting: Setting, variables):
    states = setting.fresh_states(0)
    return states.replace(params=parallel.put_replicated(variables["params"]),
                          batch_stats=parallel.put_replicated(variables.get("batch_stats", {})))


def _one_shapes(setting: Setting) -> dict:
  shapes = jax.eval_shape(lambda: setting.fresh_states(0))
  one = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), t)  # noqa: E731
  out = {"params": one(shapes.params)}
  if shapes.batch_stats:
    out["batch_stats"] = one(shapes.batch_stats)
  return out


# ---- entry points ---------------------------------------------------------------------------
_CLASSES = {"sgdr": SgdrStudy, "warmup": WarmupStudy, "distillation": DistillationStudy}


class HeuristicsStudy:
  """Runs a `HeuristicsConfig`'s study in `workdir` (runs in `workdir/runs`);
  everything the user gives is checked here, before anything is written."""

  def __init__(self, cfg: HeuristicsConfig, workdir: str, runner: Optional[RunnerConfig] = None,
               *, log: Callable[[str], None] = print):
    cfg.validate()
    self.cfg = cfg
    self.impl = _CLASSES[cfg.study](cfg, workdir, runner or RunnerConfig(), log)

  def run(self) -> dict:
    return self.impl.run()


def study_hash(cfg: HeuristicsConfig) -> str:
  """Names a study's results (every result-determining field)."""
  return store_lib.spec_hash({"study": "heuristics", "which": cfg.study,
                              **config_lib.nondefault(cfg)})


def replicas(cfg: HeuristicsConfig) -> int:
  """How many replicas the study's programs run side by side (the device
  layout's hint): the seeds, or the SGDR study's curves."""
  if cfg.study == "sgdr" and cfg.sgdr.curves:
    return cfg.seeds * 4
  return cfg.seeds


__all__ = ["CONDITIONS", "DistillationConfig", "HeuristicsConfig", "HeuristicsStudy",
           "PAPER_SETTINGS", "STUDIES", "STUDY_DEFAULTS", "SgdrConfig", "WarmupConfig",
           "frozen_mask", "replicas", "study_config", "study_hash", "wider",
           "with_study_defaults"]
