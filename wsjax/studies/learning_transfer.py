"""Transferring learning trajectories (Chijiwa, ICLR 2024): the study.

PAPERS.md section 5; the algorithms are `wsjax.transfer.gmt`. For every
initialization setting and every seed pair (a source seed, a target seed):

1. the source run: the source network trained from theta_0 to theta_T (a
   stored run, its trajectory its `init` and `final` snapshots, plus
   `step_<k>` at T evenly spaced steps with `--trajectory=snapshots`); the
   target networks are replicas of the same run, so the run also holds
   their initializations theta'_0 and the oracle's really trained
   theta'_T. Sources and targets share the model, data, optimizer and
   length; the target of pair i is its own seed and data order.
2. each method (GMT, FGMT, naive, oracle) transfers the trajectory onto
   theta'_0 without training: theta'_s = theta'_0 + pi_s(theta_s -
   theta_0) for s = 1..T; every theta'_s is evaluated (BatchNorm statistics
   re-estimated on `bn_batches` training batches) on a validation split
   held out of the training set (never trained on) and on the test set.
   The best point is chosen on the validation split (the code keeps the
   best point by validation accuracy); a method's transfer is a stored
   result (`wsjax.core.store` run: its best parameters as the `final`
   snapshot, accuracies and timings in result.json), so a rerun reads it.
3. fine-tuning: every method's best point and the initialization theta'_0
   itself are trained for `finetune_epochs` with the fine-tuning optimizer,
   all starts side by side (one stored run); test accuracy every
   `eval_every` steps gives the accuracy after the budget and the steps to
   a target accuracy (default: what fine-tuning from theta'_0 reaches at
   the end of the budget, per pair).

Settings (`--inits`):
* `fresh`: theta_0 and theta'_0 are random initializations; the task is the
  whole training set.
* `pretrained` (the paper's setting where naive transfer fails: Conv8
  pre-trained on CIFAR-10, then CIFAR-100 subsets): both networks are first
  trained on other data, the classes `--pretrain_classes` (`--pretrain_
  epochs`, the study's optimizer), then the classifier `head` is
  re-initialized (`--reinit_head`, the code's `initialize_head: true`) and
  the task is the disjoint classes `--task_classes`: theta_0 / theta'_0 are
  the two pre-trained networks, the source trajectory is fine-tuning on the
  task. Accuracies are on the task's classes (argmax over all outputs).

`--source=RUN` transfers a stored run's trajectory instead of training a
source (any wsjax run of a model with the target's parameter shapes: its
`init`/`final` or `step_<k>` snapshots; its replica i is pair i's source,
a single replica is used for every pair); the targets are still trained by
this study (the oracle). Fresh initializations only.

Replica seeds: pair i's source has seed `seed_offset + 2i`, its target
`seed_offset + 2i + 1` (the paper's pairs 101/102, 201/202, ...). The
matcher's visiting order is keyed by the target seed and the method.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wsjax import config as config_lib
from wsjax import parallel
from wsjax import results as results_lib
from wsjax.analysis import batchnorm, evaluation
from wsjax.core import store as store_lib
from wsjax.core.data import TrainData
from wsjax.core.hooks import EvaluateEvery
from wsjax.core.loop import Until
from wsjax.core.optim import OPTIMIZERS, OptimizerConfig, make_optimizer
from wsjax.core.runner import train_run
from wsjax.core.state import TrainState, seed_keys
from wsjax.models.layers import HEAD
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig, Setting, _f
from wsjax.transfer import PermutationSpec
from wsjax.transfer import gmt

INITS = ("fresh", "pretrained")
TRAJECTORIES = ("linear", "snapshots")
SALT_HEAD = 21      # seed_keys(seeds, SALT_HEAD): the fresh head after pre-training
SALT_FINETUNE = 22  # the fine-tuning runs' keys and data stream
SALT_MATCH = 23     # the matcher's visiting order: key(target seed) folded with this
VAL_SEED = 0        # the validation split: a fixed shuffle of the training set


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  """How trajectories are transferred (GMT/FGMT knobs)."""
  points: int = _f(10, "T: trajectory points transferred (the code's MNIST config: 10, the "
                   "paper's text: 5; CIFAR-10: 30)")
  trajectory: str = _f("linear", "linear: the straight line from the source's init to its "
                       "final weights; snapshots: its stored snapshots at T evenly spaced steps",
                       choices=TRAJECTORIES)
  spacing: str = _f("cosine", "linear trajectory spacing: cosine (the code's, large steps "
                    "first) or uniform (the paper's text)", choices=gmt.SPACINGS)
  grad_batches: int = _f(1, "minibatches per point for each gradient (the code's gm_iters: 1 on "
                         "MNIST, 2 on CIFAR-10)")
  bn_batches: int = _f(20, "training batches that re-estimate a transferred network's "
                       "BatchNorm statistics (models with BatchNorm only)")
  max_sweeps: int = _f(100, "weight matching: at most this many sweeps per solve")
  tol: float = _f(1e-7, "weight matching: stop after a sweep gaining at most this (the code's "
                  "1e-7)")
  chunk: int = _f(gmt.DEFAULT_CHUNK, "GMT: gradient pairs per compiled call", flag="grad_chunk",
                  operational=True)

  def validate(self) -> None:
    gmt.check_points(self.points)
    if self.trajectory not in TRAJECTORIES:
      raise ValueError(f"unknown trajectory {self.trajectory!r}; choose linear or snapshots")
    gmt.spacing(1, self.spacing)
    if self.grad_batches < 1:
      raise ValueError(f"--grad_batches must be >= 1, got {self.grad_batches}")
    if self.bn_batches < 1:
      raise ValueError(f"--bn_batches must be >= 1, got {self.bn_batches}")
    if self.max_sweeps < 1 or self.tol < 0:
      raise ValueError(f"--max_sweeps must be >= 1 and --tol >= 0, got {self.max_sweeps}, "
                       f"{self.tol}")
    if self.chunk < 1:
      raise ValueError(f"--grad_chunk must be >= 1, got {self.chunk}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The pretrained setting: pre-training classes, the task's classes."""
  classes: tuple[int, ...] = _f((0, 1, 2, 3, 4), "pretrained setting: the classes both "
                                "networks are first trained on", flag="pretrain_classes")
  task_classes: tuple[int, ...] = _f((5, 6, 7, 8, 9), "pretrained setting: the task's classes "
                                     "(disjoint from the pre-training ones)", flag="task_classes")
  epochs: int = _f(5, "pretrained setting: pre-training epochs", flag="pretrain_epochs")
  reinit_head: bool = _f(True, "pretrained setting: re-initialize the classifier after "
                         "pre-training (the code's initialize_head)", flag="reinit_head")

  def validate(self, num_classes: int) -> None:
    for name, classes in (("--pretrain_classes", self.classes),
                          ("--task_classes", self.task_classes)):
      if not classes:
        raise ValueError(f"{name} is empty; give class labels, e.g. 0,1,2,3,4")
      bad = [c for c in classes if not 0 <= c < num_classes]
      if bad or len(set(classes)) != len(classes):
        raise ValueError(f"{name} must be distinct labels in 0..{num_classes - 1}, got "
                         f"{','.join(map(str, classes))}")
    shared = sorted(set(self.classes) & set(self.task_classes))
    if shared:
      raise ValueError(f"--pretrain_classes and --task_classes share {shared}; the "
                       "pretrained setting's two tasks must be disjoint")
    if self.epochs < 1:
      raise ValueError(f"--pretrain_epochs must be >= 1, got {self.epochs}")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Fine-tuning from the best transferred point vs from the initialization."""
  epochs: int = _f(1, "fine-tuning epochs (the code's epoch_ft: 3 on MNIST, 10 on CIFAR-10)",
                   flag="finetune_epochs")
  optimizer: str = _f("sgd", "fine-tuning optimizer (the code: SGD on MNIST, AdamW on CIFAR-10)",
                      flag="finetune_optimizer", choices=OPTIMIZERS)
  lr: float = _f(0.01, "fine-tuning learning rate (constant; the code: 0.01 on MNIST, 1e-4 "
                 "AdamW on CIFAR-10)", flag="finetune_lr")
  momentum: float = _f(0.9, "fine-tuning SGD momentum", flag="finetune_momentum")
  weight_decay: float = _f(0.0, "fine-tuning weight decay", flag="finetune_weight_decay")
  eval_every: int = _f(10, "fine-tuning: test accuracy every this many steps", flag="eval_every")
  target_acc: float = _f(0.0, "steps to this test accuracy (0: what fine-tuning from the "
                         "initialization reaches at the end, per pair)", flag="target_acc")

  def optimizer_config(self) -> OptimizerConfig:
    return OptimizerConfig(name=self.optimizer, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay)

  def validate(self) -> None:
    self.optimizer_config().validate()
    if self.epochs < 0:
      raise ValueError(f"--finetune_epochs must be >= 0, got {self.epochs}")
    if self.eval_every < 1:
      raise ValueError(f"--eval_every must be >= 1, got {self.eval_every}")
    if not 0 <= self.target_acc <= 1:
      raise ValueError(f"--target_acc must be in [0, 1], got {self.target_acc}")


@dataclasses.dataclass(frozen=True)
class LearningTransferConfig:
  """Chijiwa (2024)'s experiments at this machine's scale (see the module
  docstring). Defaults: the paper's MNIST 2-MLP recipe (SGD lr 0.01,
  momentum 0.9, batch 128, T = 10 with cosine spacing, 1 gradient batch per
  point) on Fashion-MNIST with a 784-512-10 MLP and 5 epochs."""
  experiment: str = dataclasses.field(default="learning_transfer", metadata={"flag": False})
  model: ModelConfig = ModelConfig(name="mlp", widths=(512,))
  data: DataConfig = DataConfig(dataset="fashion_mnist")
  optimizer: OptimizerConfig = OptimizerConfig(name="sgd", lr=0.01, momentum=0.9)
  epochs: int = _f(5, "training epochs of the sources and the oracle's targets (the paper's "
                   "MNIST: 15, its config: 10; CIFAR-10 Conv8: 60)")
  val_fraction: float = _f(0.1, "training examples held out to pick the best transferred point "
                           "(the code's train_val_split)")
  inits: tuple[str, ...] = _f(INITS, "initialization settings: fresh, pretrained")
  methods: tuple[str, ...] = _f(gmt.METHODS, "transfer methods: gmt, fgmt, naive, oracle")
  transfer: TransferConfig = TransferConfig()
  pretrain: PretrainConfig = PretrainConfig()
  finetune: FinetuneConfig = FinetuneConfig()
  seeds: int = _f(3, "seed pairs (a source and a target each)")
  seed_offset: int = _f(0, "pair i uses seeds seed_offset + 2i (source) and + 2i + 1 (target)")
  source: Optional[str] = _f(None, "transfer this stored run's trajectory RUN (a run directory "
                             "or run_<hash> in this workdir) instead of training sources; "
                             "fresh initializations only")

  def validate(self) -> None:
    self.optimizer.validate()
    self.data.validate()
    self.transfer.validate()
    self.finetune.validate()
    if self.epochs < 1:
      raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
    if not 0 < self.val_fraction < 1:
      raise ValueError(f"--val_fraction must be in (0, 1), got {self.val_fraction}")
    for name, values, known in (("--inits", self.inits, INITS),
                                ("--methods", self.methods, gmt.METHODS)):
      if not values:
        raise ValueError(f"{name} is empty; choose from {', '.join(known)}")
      unknown = [v for v in values if v not in known]
      if unknown:
        raise ValueError(f"unknown {name[2:]} {', '.join(unknown)}; choose from "
                         f"{', '.join(known)}")
      if len(set(values)) != len(values):
        raise ValueError(f"{name} repeats: {', '.join(values)}")
    if self.seeds < 1:
      raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
    if self.seed_offset < 0:
      raise ValueError(f"--seed_offset must be >= 0, got {self.seed_offset}")
    if self.source and "pretrained" in self.inits:
      raise ValueError("--source replaces the fresh setting's source runs; pass --inits=fresh "
                       "with it")

  @property
  def source_seeds(self) -> tuple[int, ...]:
    return tuple(self.seed_offset + 2 * i for i in range(self.seeds))

  @property
  def target_seeds(self) -> tuple[int, ...]:
    return tuple(self.seed_offset + 2 * i + 1 for i in range(self.seeds))


# The paper's CIFAR-10 Conv8 (Chijiwa 2024; the code's cifar10_conv8_sgd and
# transfer_init-cifar10_conv8): SGD lr 0.05, momentum 0.9, weight decay
# 1e-4, cosine over 60 epochs, batch 128, crop + flip; T = 30 (cosine
# spacing), 2 gradient batches per point; fine-tuning AdamW lr 1e-4 for 10
# epochs. CIFAR-100 subsets (its pretrained setting) are not in the catalog:
# the pretrained setting splits CIFAR-10's classes instead. Flag -> value;
# flags given explicitly win.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10_conv8": {
        "dataset": "cifar10", "model": "conv8", "augment": True, "batch_size": 128,
        "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
        "lr_schedule": "cosine", "epochs": 60, "points": 30, "grad_batches": 2,
        "finetune_optimizer": "adamw", "finetune_lr": 1e-4, "finetune_epochs": 10,
        "pretrain_epochs": 60,
    },
    "mnist_mlp": {  # the paper's MNIST setting, when MNIST is prepared in the data dir
        "dataset": "mnist", "model": "mlp", "widths": (4096,), "optimizer": "sgd", "lr": 0.01,
        "momentum": 0.9, "epochs": 10, "points": 10, "grad_batches": 1, "finetune_epochs": 3,
        "finetune_lr": 0.01,
    },
}


def apply_preset(config, presets: dict, name: Optional[str], given: Sequence[str]):
  """`config` with preset `name`'s flag values set, except the flags in
  `given` (those passed explicitly)."""
  if not name:
    return config
  if name not in presets:
    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
  for flag, _, _, _, path in config_lib.flag_fields(type(config)):
    if flag in presets[name] and flag not in given:
      config = _replace_path(config, path, presets[name][flag])
  return config


def model_defaults(config, given: Sequence[str]):
  """`--widths` (default 512) is the MLP's: another model drops it unless
  it was given explicitly (then the model's own error names it)."""
  if config.model.name != "mlp" and "widths" not in given:
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, widths=None))
  return config


def _replace_path(config, path, value):
  if len(path) == 1:
    return dataclasses.replace(config, **{path[0]: value})
  inner = getattr(config, path[0])
  return dataclasses.replace(config, **{path[0]: _replace_path(inner, path[1:], value)})


# ---- helpers ------------------------------------------------------------------

def _rows(tree_, start: int, stop: int):
  return jax.tree.map(lambda x: np.asarray(x)[start:stop], tree_)


def _row(tree_, i: int):
  return jax.tree.map(lambda x: np.asarray(x)[i], tree_)


def _concat(trees):
  return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *trees)


def _first_max(values) -> int:
  return int(np.argmax(np.asarray(values)))


def steps_to(accs: Sequence[float], steps: Sequence[int], target: float) -> Optional[int]:
  """The first step at which accuracy reaches `target`, else None."""
  for step, acc in zip(steps, accs):
    if acc >= target - 1e-12:
      return int(step)
  return None


def snapshot_steps(total: int, n_points: int) -> list[int]:
  """The T evenly spaced steps ``round(k * total / T)``, k = 1..T, of a
  snapshot trajectory (the last is the run's end); ValueError when T
  exceeds the run's steps."""
  if n_points > total:
    raise ValueError(f"--trajectory=snapshots with T = {n_points} points needs at least that "
                     f"many training steps; the run has {total}")
  return [int(round(k * total / n_points)) for k in range(1, n_points + 1)]


class _Evaluate(EvaluateEvery):
  """`EvaluateEvery` that also makes up an evaluation due at the step a run
  resumes from: `train_run` saves a boundary's checkpoint before the other
  hooks of that boundary run, so a checkpoint taken at an evaluation step
  lacks that step's record (see the report to the core's owner)."""

  def on_start(self, loop) -> None:
    super().on_start(loop)
    rows = loop.records.get("eval", [])
    if self.every and loop.step % self.every == 0 and not any(
        r["step"] == loop.step for r in rows):
      self._record(loop)


class _Task:
  """One task's data: the training buffer, the validation and test sets."""

  def __init__(self, setting: Setting, train_pool: np.ndarray, val_pool: np.ndarray,
               classes: Optional[Sequence[int]]):
    ds = setting.dataset
    y, y_test = np.asarray(ds.y_train), np.asarray(ds.y_test)
    if classes is None:
      self.buffer, val, test = train_pool, val_pool, np.arange(len(y_test))
    else:
      keep = np.asarray(sorted(classes))
      self.buffer = train_pool[np.isin(y[train_pool], keep)]
      val = val_pool[np.isin(y[val_pool], keep)]
      test = np.flatnonzero(np.isin(y_test, keep))
    for what, idx in (("training", self.buffer), ("validation", val), ("test", test)):
      if idx.size == 0:
        raise ValueError(f"classes {list(classes or [])} have no {what} examples in "
                         f"{ds.name}; choose classes that occur in it")
    self.classes = None if classes is None else [int(c) for c in sorted(classes)]
    self.x_val = parallel.put_replicated(np.asarray(ds.x_train)[val])
    self.y_val = parallel.put_replicated(y[val].astype(np.int32))
    self.x_test = parallel.put_replicated(np.asarray(ds.x_test)[test])
    self.y_test = parallel.put_replicated(y_test[test].astype(np.int32))
    self.n_val, self.n_test = int(val.size), int(test.size)

  def data(self, setting: Setting, salt=()) -> TrainData:
    return TrainData(setting.x_train, setting.y_train, self.buffer, setting.data_cfg.batch_size,
                     salt=salt)

  def spec(self) -> dict:
    return {"classes": self.classes}


# ---- the study ----------------------------------------------------------------

class LearningTransferStudy:
  """Runs a `LearningTransferConfig` in `workdir` (runs in `workdir/runs`).
  Everything a user can get wrong is checked in the constructor, before
  anything is written."""

  def __init__(self, cfg: LearningTransferConfig, workdir: str,
               runner: Optional[RunnerConfig] = None, *, log: Callable[[str], None] = print):
    cfg.validate()
    self.cfg = cfg
    runner = runner or RunnerConfig()
    self.workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    self.log = log if primary else (lambda s: None)
    dataset = cfg.data.load()
    if "pretrained" in cfg.inits:
      cfg.pretrain.validate(dataset.num_classes)
    n_groups = max(2 * cfg.seeds, (len(cfg.methods) + 1) * cfg.seeds)
    if not runner.seed_devices:  # the device layout of the largest group
      runner = dataclasses.replace(runner, seed_devices=parallel.default_seed_devices(n_groups))
    self.runner = runner
    self.R = cfg.seeds
    self.setting = Setting(cfg.model, cfg.data, cfg.optimizer,
                           cfg.source_seeds + cfg.target_seeds, runner, dataset=dataset)
    s = self.setting
    self.params_template = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                                        s.one_model_template()["params"])
    self.spec = PermutationSpec.for_model(cfg.model.name, self.params_template)
    self.has_bn = bool(s.one_model_template()["batch_stats"])
    n = len(dataset.y_train)
    order = np.random.default_rng(VAL_SEED).permutation(n)
    n_val = max(1, int(round(cfg.val_fraction * n)))
    self.val_pool, self.train_pool = np.sort(order[:n_val]), np.sort(order[n_val:])
    self.tasks = {"fresh": _Task(s, self.train_pool, self.val_pool, None)}
    if "pretrained" in cfg.inits:
      self.tasks["pretrained"] = _Task(s, self.train_pool, self.val_pool,
                                       cfg.pretrain.task_classes)
      self.pretrain_task = _Task(s, self.train_pool, self.val_pool, cfg.pretrain.classes)
    for kind in cfg.inits:
      self._check_batches(self.tasks[kind], kind)
    self.store = store_lib.RunStore(os.path.join(self.workdir, "runs"))
    self._txs: dict[int, Any] = {}
    self.ft_tx = make_optimizer(cfg.finetune.optimizer_config())
    self.init_opt = {}
    self.external = self._load_external_source() if cfg.source else None

  # ---- checks and pieces -------------------------------------------------
  def _check_batches(self, task: _Task, kind: str) -> None:
    bs = self.cfg.data.batch_size
    if bs > task.buffer.size:
      raise ValueError(f"batch size {bs} is larger than the {task.buffer.size} training "
                       f"examples of the {kind} setting's task; lower --batch_size")
    if self.cfg.transfer.trajectory == "snapshots":
      snapshot_steps(self.cfg.epochs * task.data(self.setting).steps_per_epoch,
                     self.cfg.transfer.points)

  def _tx(self, steps: int):
    """The training optimizer, its schedule's horizon the run's length."""
    if steps not in self._txs:
      self._txs[steps] = make_optimizer(self.cfg.optimizer, steps)
    return self._txs[steps]

  def _fresh_opt(self, tx, params):
    key = id(tx)
    if key not in self.init_opt:
      self.init_opt[key] = jax.jit(jax.vmap(tx.init), out_shardings=parallel.replicated())
    return self.init_opt[key](params)

  def template(self, tx, n: int) -> TrainState:
    """Host zeros shaped like `n` stacked states of optimizer `tx`."""
    params = jax.tree.map(lambda x: np.zeros((n, *x.shape), x.dtype), self.params_template)
    stats = jax.tree.map(lambda x: np.zeros((n, *x.shape), x.dtype),
                         self.setting.one_model_template()["batch_stats"])
    opt = jax.eval_shape(jax.vmap(tx.init), params)
    return TrainState(params=params, batch_stats=stats,
                      opt_state=jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), opt),
                      step=np.zeros((n,), np.int32), rng=np.zeros((n, 2), np.uint32), hparams={})

  def _state(self, params, batch_stats, tx, keys) -> TrainState:
    """Device states from host params / statistics: a fresh optimizer, step 0."""
    params = parallel.put_replicated(params)
    n = len(jax.tree.leaves(params)[0])
    return TrainState(params=params, batch_stats=parallel.put_replicated(batch_stats),
                      opt_state=self._fresh_opt(tx, params),
                      step=parallel.put_replicated(np.zeros((n,), np.int32)),
                      rng=parallel.put_replicated(np.asarray(keys)), hparams={})

  def base_spec(self) -> dict:
    cfg = self.cfg
    return {"protocol": "learning_transfer",
            "model": {"name": cfg.model.name, **config_lib.nondefault(cfg.model)},
            "data": {"dataset": cfg.data.dataset, **config_lib.nondefault(cfg.data)},
            "val_fraction": cfg.val_fraction}

  def _load_external_source(self) -> dict:
    """The --source run's trajectory (host params, replicas = pairs),
    checked against the target model; one-line errors naming the run."""
    from wsjax.studies import sources
    cfg = self.cfg
    try:
      run, _ = sources.resolve(cfg.source, self.store)
      names = ["init", "final"]
      if cfg.transfer.trajectory == "snapshots":
        total = run.result().get("step") if run.done else None
        if not total:
          raise ValueError(f"--source {run.dir} is not a finished run; finish it or use "
                           "another")
        steps = snapshot_steps(int(total), cfg.transfer.points)[:-1]
        names = ["init", *[f"step_{k}" for k in steps], "final"]
      points = []
      for name in names:
        host, _ = sources.load_source(f"{run.dir}@{name}", {"params": self.params_template},
                                      self.R)
        points.append(host["params"])
    except sources.SourceError as e:
      msg = str(e).replace("warm-start source", "--source", 1)
      if "has no snapshot" in msg and cfg.transfer.trajectory == "snapshots":
        msg += "; a snapshot trajectory needs them (or use --trajectory=linear)"
      raise ValueError(msg) from None
    return {"run": f"run_{run.hash}", "dir": run.dir, "snapshots": names, "points": points}

  # ---- the source / target runs --------------------------------------------
  def _train_group(self, kind: str) -> dict:
    """The stored run(s) of setting `kind`: returns host params of the
    sources' trajectory points (each (R, ...)), the targets' init and final
    params and BatchNorm statistics, the runs and accuracies."""
    cfg, s, R = self.cfg, self.setting, self.R
    task = self.tasks[kind]
    data = task.data(s)
    total = cfg.epochs * data.steps_per_epoch
    tx = self._tx(total)
    snaps = (snapshot_steps(total, cfg.transfer.points)
             if cfg.transfer.trajectory == "snapshots" else [])
    base = self.base_spec()
    spec = {**base, "run": "train", "task": task.spec(),
            "optimizer": {"name": cfg.optimizer.name, **config_lib.nondefault(cfg.optimizer)},
            "epochs": cfg.epochs}
    own_source = self.external is None
    rows = slice(0, 2 * R) if own_source else slice(R, 2 * R)
    seeds = list(s.seeds[rows])
    spec["seeds"] = seeds
    if snaps and own_source:
      spec["snapshots"] = snaps[:-1]
    if kind == "fresh":
      spec["origin"] = {"init": []}

      def start():
        fresh = s.fresh_states()
        if own_source:
          return fresh
        return jax.tree.map(lambda x: x[R:], fresh)
      pre = None
    else:
      pre = self._pretrain(rows)
      spec["origin"] = {"parent": f"run_{pre['run'].hash}", "snapshot": "final",
                        "reinit_head": cfg.pretrain.reinit_head}

      def start(pre=pre):
        params = dict(pre["params"])
        if cfg.pretrain.reinit_head:
          fresh = parallel.to_host(s.fresh_states(SALT_HEAD).params)
          params[HEAD] = _rows(fresh[HEAD], rows.start, rows.stop)
        keys = np.asarray(seed_keys(seeds, SALT_HEAD, 1))
        return self._state(params, pre["batch_stats"], tx, keys)
    run = self.store.run(spec, label=f"{cfg.experiment}/{kind}/train")
    template = self.template(tx, len(seeds))
    states, result = train_run(
        run, start_states=start, template=template, program=s.program(tx=tx), data=data,
        until=Until.steps(total), data_seeds=seeds, start=0,
        checkpoint_every=self.runner.checkpoint_every, snapshot_steps=snaps[:-1] if own_source
        else (), label=f"[{kind} train] ", log=self.log,
        extra_result=lambda st: self._test_acc(st, task))
    self.log(f"[{kind}] {'reusing finished' if result['reused'] else 'trained'} run "
             f"run_{run.hash} ({len(seeds)} networks, {total} steps)")
    init = parallel.to_host(run.load_snapshot("init", template))
    final = parallel.to_host(states)
    acc = np.asarray(result["test_acc"])
    out = {"run": run, "steps": total,
           "target_init": _rows(init.params, len(seeds) - R, len(seeds)),
           "target_init_stats": _rows(init.batch_stats, len(seeds) - R, len(seeds)),
           "target_final": _rows(final.params, len(seeds) - R, len(seeds)),
           "target_acc": acc[-R:].tolist()}
    if own_source:
      if snaps:
        middle = [_rows(parallel.to_host(run.load_snapshot(f"step_{k}", template)).params, 0, R)
                  for k in snaps[:-1]]
      else:
        middle = []
      out["points"] = [_rows(init.params, 0, R), *middle, _rows(final.params, 0, R)]
      out["source_acc"] = acc[:R].tolist()
      out["source"] = f"run_{run.hash}"
    else:
      out["points"] = self.external["points"]
      out["source_acc"] = None
      out["source"] = self.external["run"]
    if pre is not None:
      out["pretrain_run"] = f"run_{pre['run'].hash}"
    return out

  def _pretrain(self, rows: slice) -> dict:
    """Both networks of every pair trained on the pre-training classes."""
    cfg, s = self.cfg, self.setting
    data = self.pretrain_task.data(s)
    total = cfg.pretrain.epochs * data.steps_per_epoch
    tx = self._tx(total)
    seeds = list(s.seeds[rows])
    spec = {**self.base_spec(), "run": "pretrain", "task": self.pretrain_task.spec(),
            "optimizer": {"name": cfg.optimizer.name, **config_lib.nondefault(cfg.optimizer)},
            "epochs": cfg.pretrain.epochs, "seeds": seeds, "origin": {"init": []}}
    run = self.store.run(spec, label=f"{cfg.experiment}/pretrained/pretrain")
    template = self.template(tx, len(seeds))
    states, result = train_run(
        run, start_states=lambda: jax.tree.map(lambda x: x[rows], s.fresh_states()),
        template=template, program=s.program(tx=tx), data=data, until=Until.steps(total),
        data_seeds=seeds, start=0, checkpoint_every=self.runner.checkpoint_every,
        label="[pretrain] ", log=self.log,
        extra_result=lambda st: self._test_acc(st, self.pretrain_task))
    self.log(f"[pretrained] {'reusing finished' if result['reused'] else 'trained'} "
             f"pre-training run run_{run.hash} (test acc on its classes "
             f"{100 * np.mean(result['test_acc']):.1f}%)")
    host = parallel.to_host(states)
    return {"run": run, "params": host.params, "batch_stats": host.batch_stats,
            "test_acc": result["test_acc"]}

  def _test_acc(self, states, task: _Task) -> dict:
    variables = {"params": states.params}
    if self.has_bn:
      variables["batch_stats"] = states.batch_stats
    res = evaluation.evaluate(self.setting.model, variables, task.x_test, task.y_test)
    return {"test_acc": [float(a) for a in np.asarray(res["acc"])]}

  # ---- transfer ---------------------------------------------------------------
  def _evaluate_points(self, params, task: _Task, key: int):
    """(batch_stats, val acc, test acc) of stacked networks; BatchNorm
    statistics re-estimated on `bn_batches` training batches."""
    model = self.setting.model
    stats = {}
    if self.has_bn:
      n = self.cfg.transfer.bn_batches * self.cfg.data.batch_size
      idx = np.random.default_rng([key, 7]).permutation(task.buffer)
      idx = np.resize(idx, n) if idx.size < n else idx[:n]
      stats = batchnorm.recompute_batch_stats(model, params, self.setting.x_train[idx],
                                              batch_size=self.cfg.data.batch_size)
    variables = {"params": params, **({"batch_stats": stats} if self.has_bn else {})}
    val = evaluation.evaluate(model, variables, task.x_val, task.y_val)["acc"]
    test = evaluation.evaluate(model, variables, task.x_test, task.y_test)["acc"]
    return stats, np.asarray(val, np.float64), np.asarray(test, np.float64)

  def _points_of(self, group: dict, i: int):
    """Pair i's trajectory theta_0..theta_T on device."""
    cfg = self.cfg
    if cfg.transfer.trajectory == "snapshots":
      return gmt.stack([jax.tree.map(jnp.asarray, _row(p, i)) for p in group["points"]])
    start, end = (jax.tree.map(jnp.asarray, _row(group["points"][j], i)) for j in (0, -1))
    return gmt.linear_points(start, end, gmt.spacing(cfg.transfer.points, cfg.transfer.spacing))

  def _transfer_spec(self, kind: str, method: str, group: dict) -> dict:
    t = config_lib.nondefault(self.cfg.transfer)
    return {**self.base_spec(), "run": "transfer", "setting": kind, "method": method,
            "transfer": t, "points": self.cfg.transfer.points, "source": group["source"],
            "source_snapshots": self.external["snapshots"] if self.external else None,
            "targets": f"run_{group['run'].hash}", "task": self.tasks[kind].spec(),
            "batch_size": self.cfg.data.batch_size,
            "pairs": [list(p) for p in zip(self.cfg.source_seeds, self.cfg.target_seeds)]}

  def _transfer(self, kind: str, method: str, group: dict) -> dict:
    """Method `method` on every pair of setting `kind` (a stored result)."""
    cfg, s, R = self.cfg, self.setting, self.R
    task = self.tasks[kind]
    run = self.store.run(self._transfer_spec(kind, method, group),
                         label=f"{cfg.experiment}/{kind}/transfer_{method}")
    stats_template = jax.tree.map(lambda x: np.zeros((R, *x.shape), x.dtype),
                                  s.one_model_template()["batch_stats"])
    template = {"params": jax.tree.map(lambda x: np.zeros((R, *x.shape), x.dtype),
                                       self.params_template), "batch_stats": stats_template}
    if run.done:
      best = parallel.to_host(run.load_snapshot("final", template))
      self.log(f"[{kind}] {method}: reusing finished transfer run_{run.hash}")
      return {**run.result(), "best_params": best["params"], "best_stats": best["batch_stats"],
              "reused": True}
    with run.lock():
      result, best_params, best_stats = self._compute_transfer(kind, method, group, task)
      result["run"] = f"run_{run.hash}"
      run.finish({"params": best_params, "batch_stats": best_stats}, result)
    return {**result, "best_params": best_params, "best_stats": best_stats, "reused": False}

  def _compute_transfer(self, kind, method, group, task):
    cfg, s, R = self.cfg, self.setting, self.R
    t = cfg.transfer
    out = {"val_acc": [], "test_acc": [], "best_point": [], "cost": []}
    best_params, best_stats = [], []
    for i in range(R):
      points = self._points_of(group, i)
      target0 = jax.tree.map(jnp.asarray, _row(group["target_init"], i))
      seed = cfg.target_seeds[i]
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), SALT_MATCH),
                               gmt.METHODS.index(method))
      if method == "naive":
        res = gmt.naive(self.spec, t.points)
      elif method == "oracle":
        res = gmt.oracle(self.spec, jax.tree.map(lambda p: p[0], points),
                         jax.tree.map(lambda p: p[-1], points), target0,
                         jax.tree.map(jnp.asarray, _row(group["target_final"], i)), t.points,
                         key=key, max_sweeps=t.max_sweeps, tol=t.tol)
      else:
        idx = gmt.gradient_batches(task.buffer, t.points, t.grad_batches, cfg.data.batch_size,
                                   seed)
        res = gmt.gmt(self.spec, s.model, points, target0, s.x_train, s.y_train, idx, key=key,
                      fast=method == "fgmt", max_sweeps=t.max_sweeps, tol=t.tol,
                      chunk=t.chunk)
      moved = gmt.transferred_points(self.spec, res.perms, points, target0)
      stats, val, test = self._evaluate_points(moved, task, seed)
      b = _first_max(val)
      out["val_acc"].append(val.tolist())
      out["test_acc"].append(test.tolist())
      out["best_point"].append(b + 1)
      out["cost"].append(res.summary())
      best_params.append(_rows(parallel.to_host(moved), b, b + 1))
      best_stats.append(_rows(parallel.to_host(stats), b, b + 1))
      self.log(f"[{kind}] {method} pair {i + 1}/{R}: test acc at T {100 * test[-1]:.1f}%, "
               f"best point {b + 1}/{t.points} ({100 * test[b]:.1f}%), "
               f"{res.total_s:.1f} s")
    return out, _concat(best_params), _concat(best_stats) if self.has_bn else {}

  def _initial_accuracy(self, kind: str, group: dict) -> dict:
    """Test accuracy of every theta'_0, and of every source's own points
    theta_0 .. theta_T (the trajectory a transfer follows)."""
    task = self.tasks[kind]
    init = jax.tree.map(jnp.asarray, group["target_init"])
    _, _, init_test = self._evaluate_points(init, task, 0)
    path = [self._evaluate_points(self._points_of(group, i), task, 0)[2].tolist()
            for i in range(self.R)]
    return {"target_init_acc": init_test.tolist(), "source_path_acc": path}

  # ---- fine-tuning ------------------------------------------------------------
  def _finetune(self, kind: str, group: dict, transfers: dict) -> dict:
    cfg, s, R = self.cfg, self.setting, self.R
    task = self.tasks[kind]
    starts = ["init", *cfg.methods]
    data = task.data(s, salt=(SALT_FINETUNE,))
    total = cfg.finetune.epochs * data.steps_per_epoch
    if total == 0:
      return {}
    spec = {**self.base_spec(), "run": "finetune", "setting": kind, "task": task.spec(),
            "finetune": config_lib.nondefault(cfg.finetune),
            "eval_every": cfg.finetune.eval_every, "starts": starts,
            "targets": f"run_{group['run'].hash}",
            "transfers": {m: transfers[m]["run"] for m in cfg.methods},
            "seeds": list(cfg.target_seeds)}
    run = self.store.run(spec, label=f"{cfg.experiment}/{kind}/finetune")
    n = len(starts) * R
    seeds = list(cfg.target_seeds) * len(starts)

    def start():
      params = _concat([group["target_init"], *[transfers[m]["best_params"] for m in cfg.methods]])
      stats = (_concat([group["target_init_stats"],
                        *[transfers[m]["best_stats"] for m in cfg.methods]])
               if self.has_bn else {})
      keys = np.asarray(seed_keys(seeds, SALT_FINETUNE))
      return self._state(params, stats, self.ft_tx, keys)
    evaluate = _Evaluate(cfg.finetune.eval_every, {"test": (task.x_test, task.y_test)})
    _, result = train_run(
        run, start_states=start, template=self.template(self.ft_tx, n),
        program=s.program(tx=self.ft_tx), data=data, until=Until.steps(total), data_seeds=seeds,
        start=0, hooks=[evaluate], checkpoint_every=self.runner.checkpoint_every,
        label=f"[{kind} finetune] ", log=self.log)
    self.log(f"[{kind}] {'reusing finished' if result['reused'] else 'trained'} fine-tuning "
             f"run run_{run.hash} ({n} networks, {total} steps)")
    rows = result["records"]["eval"]
    steps = [r["step"] for r in rows]
    acc = np.asarray([r["test_acc"] for r in rows])  # (evals, n)
    init_final = acc[-1, :R]
    targets = ([cfg.finetune.target_acc] * R if cfg.finetune.target_acc
               else init_final.tolist())
    out = {"run": f"run_{run.hash}", "steps": steps, "total_steps": total,
           "target_acc": [float(v) for v in targets], "starts": {}}
    for j, name in enumerate(starts):
      curves = acc[:, j * R:(j + 1) * R].T  # (R, evals)
      reach = [steps_to(curves[i], steps, targets[i]) for i in range(R)]
      out["starts"][name] = {"test_acc": curves.tolist(),
                             "final_test_acc": results_lib.summary(curves[:, -1]),
                             "start_test_acc": results_lib.summary(curves[:, 0]),
                             "steps_to_target": reach}
    return out

  # ---- the study --------------------------------------------------------------
  def run(self) -> dict:
    cfg = self.cfg
    out = {"experiment": cfg.experiment, "config": config_lib.to_dict(cfg),
           "environment": {**results_lib.environment(),
                           "seed_devices": self.setting.replica_devices},
           "pairs": [list(p) for p in zip(cfg.source_seeds, cfg.target_seeds)],
           "settings": {}}
    for kind in cfg.inits:
      group = self._train_group(kind)
      setting = {"source_run": group["source"], "target_run": f"run_{group['run'].hash}",
                 "source_test_acc": group["source_acc"], "oracle_test_acc": group["target_acc"],
                 "train_steps": group["steps"], "task": self.tasks[kind].spec(),
                 **self._initial_accuracy(kind, group), "methods": {}}
      if "pretrain_run" in group:
        setting["pretrain_run"] = group["pretrain_run"]
      transfers = {}
      for method in cfg.methods:
        res = self._transfer(kind, method, group)
        transfers[method] = res
        test = np.asarray(res["test_acc"])  # (R, T)
        best = [test[i, b - 1] for i, b in enumerate(res["best_point"])]
        setting["methods"][method] = {
            "val_acc": res["val_acc"], "test_acc": res["test_acc"],
            "best_point": res["best_point"], "cost": res["cost"],
            "final_point_test_acc": results_lib.summary(test[:, -1]),
            "best_point_test_acc": results_lib.summary(best),
            "run": res["run"]}
      ft = self._finetune(kind, group, transfers)
      setting["finetune"] = ft
      out["settings"][kind] = setting
    return out


def study_hash(cfg: LearningTransferConfig) -> str:
  """Names a study's results (every result-determining field)."""
  return store_lib.spec_hash({"study": "learning_transfer", **config_lib.nondefault(cfg),
                              "experiment": cfg.experiment})


__all__ = ["FinetuneConfig", "INITS", "LearningTransferConfig", "LearningTransferStudy",
           "PRESETS", "PretrainConfig", "TRAJECTORIES", "TransferConfig", "apply_preset",
           "model_defaults", "snapshot_steps", "steps_to", "study_hash"]
