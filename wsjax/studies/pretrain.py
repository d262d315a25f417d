"""The start of the early-phase studies: the network at the rewind step k.

Frankle, Schwab & Morcos, "The Early Phase of Neural Network Training", ICLR
2020, and Frankle, Dziugaite, Roy & Carbin, "Linear Mode Connectivity and
the Lottery Ticket Hypothesis", ICML 2020 (PAPERS.md section 3) study what a
network holds after its first k iterations. Both `wsjax.studies.lottery`
(IMP with rewinding) and `wsjax.studies.instability` (linear mode
connectivity) start every run from that state, theta_k, made here:

* plain rewinding (`--pretrain=none`): the dense network trained 0 -> k on
  the real task, with the study's optimizer and learning-rate schedule and
  the data order of one continuous run (epoch e of seed s shuffled by
  `default_rng([s, e])`, `wsjax.core.data`). open_lth implements rewinding
  the same way, as a "pre-training" phase 0 -> k (`lottery/desc.py`,
  `lottery/runner.py` `_pretrain`);
* pre-training on altered data 0 -> k (paper section 5), then the real task
  from k:
  - `blur`: inputs downsampled by `blur_factor` and upsampled back
    (`wsjax.data.alter.blur`; images and 1-D signals); the test set is
    never blurred;
  - `rotation`: self-supervised rotation prediction (images only): every
    training example rotated by exactly 0, 90, 180 or 270 degrees, drawn per
    example and step from the step's key (`wsjax.data.alter.rotate_batch`),
    the label its index, through a 4-way classifier `head`; at k that head is
    swapped for a fresh real-task head (`swap_head`), every other leaf (and
    the BatchNorm statistics) kept;
  - `random_labels`: a fraction (`label_fraction`, default all) of the
    training labels replaced by uniformly random ones, fixed once
    (`wsjax.data.alter.random_labels`, seed `label_seed`).
  open_lth's versions are broken and not followed: its blur flag raises a
  TypeError, its "rotation" draws a random angle in +-90k degrees (and
  rotates the test set), and the pre-trained head is never replaced (two
  properties lack `return`, so `train_outputs == pretrain_outputs` is
  always `None == None`).

Every rewind point of a study comes from ONE stored run per pre-training
kind (`wsjax.core.store`): the dense network trained 0 -> max(k) with a
named snapshot `step_<k>` at each k. Its spec names the model, data,
optimizer, schedule horizon, seeds and pre-training; a finished run of the
same kind whose snapshots include the needed steps is reused whoever made it
(the lottery and instability programs in one workdir share it). The state at
k is a pure function of (that spec, k), so the runs started from it name
their origin by content (`RewindPoints.origin(k)`), not by the run that held
the snapshot. k = 0 is the initialization itself (no run).

Whatever the pre-training, the state handed to a study at k has a FRESH
optimizer state (`tx.init`): open_lth restarts the optimizer at the rewind
point (momentum restarts), while the learning-rate schedule reads the global
step k (`wsjax.core.optim`).

`EarlyPhaseConfig` holds what both studies share (model, data, optimizer,
training length, rewind steps, pre-training, seeds); `PRESETS` the settings
of the paper's CIFAR-10 ResNet-20 (open_lth's hyperparameters), one flag
away in the programs (`--preset=cifar10_resnet20`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from wsjax import config as config_lib
from wsjax import parallel
from wsjax.core import store as store_lib
from wsjax.core.data import TrainData
from wsjax.core.hooks import Progress
from wsjax.core.loop import Until
from wsjax.core.optim import OptimizerConfig
from wsjax.core.program import Program
from wsjax.core.runner import train_run
from wsjax.core.state import TrainState, create_state, seed_keys
from wsjax.core.step import parse_step
from wsjax.core.task import Classification
from wsjax.data import alter
from wsjax.data import batching
from wsjax.models.layers import HEAD
from wsjax.studies.common import DataConfig, ModelConfig, Setting, _f

KINDS = ("none", "blur", "rotation", "random_labels")
SALT_HEAD = 12  # seed_keys(seeds, SALT_HEAD): the fresh real head after rotation pre-training


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """How the network is trained from 0 to each rewind step k."""
  kinds: tuple[str, ...] = _f(("none",), "pre-training 0 -> k, one lineage each: none (plain "
                              "rewinding), blur, rotation (images only), random_labels",
                              flag="pretrain")
  blur_factor: int = _f(4, "blur: downsample by this factor, then upsample back")
  blur_upsample: str = _f("nearest", "blur: nearest (block means) or linear",
                          choices=alter.UPSAMPLE_METHODS)
  label_fraction: float = _f(1.0, "random_labels: fraction of the training labels replaced")
  label_seed: int = _f(0, "random_labels: seed of the replaced labels")

  def validate(self) -> None:
    if not self.kinds:
      raise ValueError("no pre-training given; pass e.g. --pretrain=none")
    unknown = [k for k in self.kinds if k not in KINDS]
    if unknown:
      raise ValueError(f"unknown pre-training {', '.join(unknown)}; choose from "
                       f"{', '.join(KINDS)}")
    if len(set(self.kinds)) != len(self.kinds):
      raise ValueError(f"--pretrain repeats: {', '.join(self.kinds)}")
    if self.blur_factor < 1:
      raise ValueError(f"--blur_factor must be >= 1, got {self.blur_factor}")
    if not 0 <= self.label_fraction <= 1:
      raise ValueError(f"--label_fraction must be in [0, 1], got {self.label_fraction}")

  def spec(self, kind: str) -> dict:
    """What decides pre-training of `kind` (its own options only)."""
    if kind == "blur":
      return {"kind": kind, "factor": self.blur_factor, "upsample": self.blur_upsample}
    if kind == "random_labels":
      return {"kind": kind, "fraction": self.label_fraction, "seed": self.label_seed}
    return {"kind": kind}


# The early-phase studies' default setting (MNIST-1D, the 1-D ConvNet, 40
# epochs of batch 128 = 1,280 iterations): open_lth's CIFAR recipe (SGD lr
# 0.1, momentum 0.9, weight decay 1e-4, lr x0.1 at 50% and 75% of training,
# Kaiming-normal init) at this scale. The lenet recipe (lr 0.1 without
# momentum, constant) leaves this network at 85% test accuracy after 40
# epochs, against 94% here (see README).
MODEL = ModelConfig(name="conv1d", init="kaiming_normal")
OPTIMIZER = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                            schedule="step", decay_boundaries=(640, 960))


@dataclasses.dataclass(frozen=True)
class EarlyPhaseConfig:
  """What the lottery and instability studies share."""
  experiment: str = dataclasses.field(default="early_phase", metadata={"flag": False})
  model: ModelConfig = MODEL
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OPTIMIZER
  training_steps: str = _f("40ep", "training length T, e.g. 40ep, 1280it or 2ep16it (an epoch "
                           "is ceil(train examples / batch size) iterations)")
  rewind_steps: tuple[str, ...] = _f(("0it",), "rewind steps k (step strings, e.g. 0it,100it,1ep)")
  pretrain: PretrainConfig = PretrainConfig()
  seeds: int = _f(3, "number of seeds (replicas side by side)")
  seed_offset: int = _f(0, "first seed")

  @property
  def seed_list(self) -> tuple[int, ...]:
    return tuple(range(self.seed_offset, self.seed_offset + self.seeds))

  def validate(self) -> None:
    self.optimizer.validate()
    self.data.validate()
    self.pretrain.validate()
    if self.seeds < 1:
      raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
    if self.seed_offset < 0:
      raise ValueError(f"--seed_offset must be >= 0, got {self.seed_offset}")
    if not self.rewind_steps:
      raise ValueError("no rewind steps given; pass e.g. --rewind_steps=0it,100it")

  def steps(self, n_train: int) -> tuple[int, tuple[int, ...]]:
    """(T, the rewind steps k in the order given) in iterations, checked:
    step strings well formed, 0 < T, every k < T, no k repeated."""
    per_epoch = batching.steps_per_epoch(n_train, self.data.batch_size)
    total = parse_step(self.training_steps, per_epoch)
    if total < 1:
      raise ValueError(f"--training_steps must be > 0, got {self.training_steps!r}")
    ks = tuple(parse_step(s, per_epoch) for s in self.rewind_steps)
    late = [s for s, k in zip(self.rewind_steps, ks) if k >= total]
    if late:
      raise ValueError(f"rewind step {late[0]} is not before the end of training "
                       f"({self.training_steps} = {total} iterations of {per_epoch} per "
                       f"epoch); choose rewind steps below it")
    if len(set(ks)) != len(ks):
      raise ValueError(f"rewind steps repeat: {', '.join(self.rewind_steps)} "
                       f"(iterations {', '.join(map(str, ks))})")
    return total, ks


# open_lth's CIFAR-10 ResNet-20 (`models/cifar_resnet.py` default_hparams):
# SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, 160 epochs
# (391 iterations each), lr x0.1 at epochs 80 and 120, crop+flip,
# Kaiming-normal init with BatchNorm scale U[0, 1] (resnet20's default init
# in wsjax). Flag name -> value; flags given explicitly win.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10_resnet20": {
        "dataset": "cifar10", "model": "resnet20", "augment": True, "batch_size": 128,
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
        "lr_schedule": "step", "decay_steps": (80 * 391, 120 * 391), "decay_factor": 0.1,
        "training_steps": "160ep",
    },
}


def apply_preset(config, name: Optional[str], given: Sequence[str]):
  """`config` with the preset's flag values set, except flags in `given`
  (the ones the user passed explicitly)."""
  if not name:
    return config
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
  preset = PRESETS[name]
  for flag, _, _, _, path in config_lib.flag_fields(type(config)):
    if flag in preset and flag not in given:
      config = _replace_path(config, path, preset[flag])
  return config


def _replace_path(config, path, value):
  if len(path) == 1:
    return dataclasses.replace(config, **{path[0]: value})
  inner = getattr(config, path[0])
  return dataclasses.replace(config, **{path[0]: _replace_path(inner, path[1:], value)})


def base_spec(cfg: EarlyPhaseConfig, total_steps: int) -> dict:
  """What every run of an early-phase study shares: model, data, optimizer
  (and the schedule's horizon T), seeds. Non-default fields only
  (`wsjax.config.nondefault`), so adding a field with a default renames
  nothing."""
  return {"model": {"name": cfg.model.name, **config_lib.nondefault(cfg.model)},
          "data": {"dataset": cfg.data.dataset, **config_lib.nondefault(cfg.data)},
          "optimizer": {"name": cfg.optimizer.name, **config_lib.nondefault(cfg.optimizer)},
          "training_steps": int(total_steps), "seeds": list(cfg.seed_list)}


def check_pretraining(cfg: EarlyPhaseConfig, input_shape: Sequence[int], ks: Sequence[int]) -> None:
  """One-line errors for pre-training that cannot run on this data, before
  anything is written."""
  kinds = [k for k in cfg.pretrain.kinds if k != "none"]
  if kinds and not any(k > 0 for k in ks):
    raise ValueError(f"pre-training on altered data ({', '.join(kinds)}) runs from 0 to the "
                     "rewind step; give a rewind step > 0, e.g. --rewind_steps=0it,100it")
  shape = tuple(input_shape)
  if "rotation" in kinds:
    if len(shape) != 3:
      raise ValueError(f"rotation pre-training needs image data (height, width, channels); "
                       f"{cfg.data.dataset} examples have shape {shape}: use blur or "
                       "random_labels, or an image dataset (digits, fashion_mnist, cifar10)")
    if shape[0] != shape[1]:
      raise ValueError(f"rotation pre-training needs square images; {cfg.data.dataset} images "
                       f"are {shape[0]}x{shape[1]}")
  if "blur" in kinds:
    for size in shape[:-1]:
      if size % cfg.pretrain.blur_factor:
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        raise ValueError(f"--blur_factor={cfg.pretrain.blur_factor} does not divide the size "
                         f"{size} of {cfg.data.dataset} examples {shape}; use one of {divisors}")


def _rotation_batch(key, x, y):
  """The rotation task's batch: x rotated per example, y the rotation index."""
  del y
  return alter.rotate_batch(key, x)


def swap_head(pretrained_params, fresh_params):
  """Rotation pre-training's hand-over at k: every leaf of the pre-trained
  parameters except the classifier `head`, which comes from `fresh_params`
  (a fresh initialization of the real-task model, with its real number of
  outputs). Works on one network or a stack of replicas."""
  params = dict(pretrained_params)
  params[HEAD] = fresh_params[HEAD]
  return params


class RewindPoints:
  """The network at each rewind step k of one pre-training kind (see the
  module docstring): `states(k)` builds the replica-stacked start state,
  `origin(k)` names it in a run spec.

  `ctx` is the study's shared context (`EarlyPhase`): the setting, the
  store, T, the base spec, the runner knobs, the progress bar.
  """

  def __init__(self, ctx: "EarlyPhase", kind: str, ks: Sequence[int]):
    self.ctx = ctx
    self.kind = kind
    self.ks = tuple(sorted({int(k) for k in ks if k > 0}))
    self.spec_kind = ctx.cfg.pretrain.spec(kind)
    self._host: dict[int, Any] = {}
    self.run: Optional[store_lib.Run] = None

  def origin(self, k: int) -> dict:
    """The start state's origin, by content: pre-training, step k."""
    if k == 0:
      return {"init": [], "step": 0}
    return {"pretrain": self.spec_kind, "step": int(k)}

  # ---- the pre-training run ---------------------------------------------
  def _run_spec(self) -> dict:
    return {"protocol": "early_phase_pretrain", **self.ctx.base,
            "pretrain": self.spec_kind, "end": max(self.ks), "snapshots": list(self.ks)}

  def _stored_run(self):
    """A finished pre-training run of this kind whose snapshots cover ours."""
    mine = self._run_spec()
    fixed = {k: v for k, v in mine.items() if k not in ("end", "snapshots")}
    for info in self.ctx.store.runs():
      spec = info.get("spec", {})
      if info["status"] != "done" or spec.get("protocol") != mine["protocol"]:
        continue
      if {k: v for k, v in spec.items() if k not in ("end", "snapshots")} != fixed:
        continue
      if all(f"step_{k}" in info["snapshots"] for k in self.ks):
        return store_lib.load_run(info["dir"])
    return None

  def _model_and_program(self):
    """(fresh-states fn, template, program, train data) of the pre-training."""
    s = self.ctx.setting
    x, y = s.x_train, s.y_train
    if self.kind == "rotation":
      model = self.ctx.cfg.model.build(alter.NUM_ROTATIONS, s.dataset.input_shape)
      from wsjax.models import make_init_fn
      init_fn = make_init_fn(model, s.dataset.input_shape)
      fresh = jax.jit(jax.vmap(lambda key: create_state(init_fn, s.tx, key)),
                      out_shardings=parallel.replicated())
      augment_fn = None
      if s.data_cfg.augment:
        from wsjax.data import augment_images
        augment_fn = augment_images
      program = Program(model, s.tx, Classification(batch_transform=_rotation_batch),
                        batch_size=s.data_cfg.batch_size, block_steps=s.runner.block_steps,
                        augment_fn=augment_fn, replica_devices=s.replica_devices,
                        replica_chunk=s.runner.chunk())
      start = lambda: fresh(seed_keys(s.seeds))  # noqa: E731
      shapes = jax.eval_shape(start)
      template = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), shapes)
      return start, template, program, TrainData(x, y, np.arange(len(s.dataset.y_train)),
                                                 s.data_cfg.batch_size)
    if self.kind == "blur":
      blurred = alter.blur(s.dataset.x_train, self.ctx.cfg.pretrain.blur_factor,
                           self.ctx.cfg.pretrain.blur_upsample)
      x = parallel.put_replicated(np.asarray(blurred, s.dataset.x_train.dtype))
    elif self.kind == "random_labels":
      p = self.ctx.cfg.pretrain
      labels = alter.random_labels(s.dataset.y_train, p.label_fraction, s.num_classes,
                                   p.label_seed)
      y = parallel.put_replicated(labels.astype(np.int32))
    data = TrainData(x, y, np.arange(len(s.dataset.y_train)), s.data_cfg.batch_size)
    return (lambda: s.fresh_states()), s.template(), s.program(), data

  def _pretrain(self) -> None:
    """Trains (or finds, or loads) the run 0 -> max(k); keeps host copies
    of the states at every k."""
    ctx = self.ctx
    run = self._stored_run()
    start, template, program, data = self._model_and_program()
    if run is not None:
      ctx.log(f"[pretrain {self.kind}] reusing finished run run_{run.hash} for steps "
              f"{', '.join(map(str, self.ks))}")
    else:
      run = ctx.store.run(self._run_spec(), label=f"{ctx.cfg.experiment}/pretrain_{self.kind}")
      label = f"[pretrain {self.kind}] "
      _, result = train_run(
          run, start_states=start, template=template, program=program, data=data,
          until=Until.steps(max(self.ks)), data_seeds=ctx.setting.seeds, start=0,
          hooks=[Progress(ctx.bar, f"pretrain {self.kind}")],
          checkpoint_every=ctx.runner.checkpoint_every, snapshot_steps=self.ks, label=label,
          log=ctx.log)
      if result["reused"]:
        ctx.log(f"{label}reusing finished run run_{run.hash}")
    self.run = run
    for k in self.ks:
      self._host[k] = parallel.to_host(run.load_snapshot(f"step_{k}", template))

  # ---- the start state at k ---------------------------------------------
  def states(self, k: int):
    """The replica-stacked state at k for the real task: parameters and
    BatchNorm statistics of the pre-trained network (the head swapped after
    rotation), a fresh optimizer state; new device arrays on every call
    (training donates them)."""
    s = self.ctx.setting
    if k == 0:
      return s.fresh_states()
    if k not in self.ks:
      raise ValueError(f"step {k} is not a rewind step of this study ({self.ks})")
    if not self._host:
      self._pretrain()
    host = self._host[k]
    params = host.params
    if self.kind == "rotation":
      params = swap_head(params, parallel.to_host(s.fresh_states(SALT_HEAD).params))
    params = parallel.put_replicated(params)
    return TrainState(params=params, batch_stats=parallel.put_replicated(host.batch_stats),
                      opt_state=self.ctx.init_opt(params), step=parallel.put_replicated(host.step),
                      rng=parallel.put_replicated(host.rng), hparams={})


class EarlyPhase:
  """What the early-phase studies share: the setting (model, data on
  device, optimizer with the schedule's horizon T), the store, T and the
  rewind steps in iterations, the base spec, and one `RewindPoints` per
  pre-training kind.

  Validates everything a study needs before anything is written.
  """

  def __init__(self, cfg: EarlyPhaseConfig, workdir: str, runner, *,
               log: Callable[[str], None] = print, replicas: int = 0):
    cfg.validate()
    self.cfg = cfg
    self.runner = runner
    dataset = cfg.data.load()
    self.total_steps, self.ks = cfg.steps(len(dataset.y_train))
    self.step_names = dict(zip(self.ks, cfg.rewind_steps))  # k -> the step string given
    check_pretraining(cfg, dataset.input_shape, self.ks)
    if not runner.seed_devices:  # lay the devices out for the largest group, not the seeds
      runner = dataclasses.replace(
          runner, seed_devices=parallel.default_seed_devices(replicas or cfg.seeds))
    self.setting = Setting(cfg.model, cfg.data, cfg.optimizer, cfg.seed_list, runner,
                           horizon=self.total_steps, dataset=dataset)
    primary = jax.process_index() == 0
    self.log = log if primary else (lambda s: None)
    self.progress = runner.progress and primary
    self.bar = None
    self.store = store_lib.RunStore(os.path.join(os.path.abspath(workdir), "runs"))
    # a fresh optimizer state for stacked parameters (rewinding restarts it)
    self.init_opt = jax.jit(jax.vmap(self.setting.tx.init), out_shardings=parallel.replicated())
    self.base = base_spec(cfg, self.total_steps)
    self.points = {kind: RewindPoints(self, kind, self.ks) for kind in cfg.pretrain.kinds}

  def rewind_points(self, kind: str) -> list[int]:
    """The rewind steps a pre-training kind applies to: all for `none`,
    k > 0 for altered data (k = 0 has no pre-training)."""
    return [k for k in self.ks if kind == "none" or k > 0]

  def train_data(self, salt: tuple[int, ...] = ()) -> TrainData:
    """The real task's training set (every example), batches of the study."""
    s = self.setting
    return TrainData(s.x_train, s.y_train, np.arange(len(s.dataset.y_train)),
                     s.data_cfg.batch_size, salt=salt)

  def template(self, replicas: int):
    """Host zeros shaped like `replicas` stacked states (for restoring)."""
    one = self.setting.template()
    return jax.tree.map(lambda x: np.zeros((replicas, *x.shape[1:]), x.dtype), one)

  def test_accuracy(self, program: Program, states) -> dict:
    acc, loss = program.evaluate(states, self.setting.x_test, self.setting.y_test)
    return {"test_acc": [float(a) for a in acc], "test_loss": [float(v) for v in loss]}


def stack_rows(trees: Sequence[Any]):
  """Host trees with a leading replica axis, concatenated along it."""
  return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *trees)


def rows(tree, start: int, stop: int):
  """Replicas `start:stop` of a host tree with a leading replica axis."""
  return jax.tree.map(lambda x: np.asarray(x)[start:stop], tree)


__all__ = ["EarlyPhase", "EarlyPhaseConfig", "KINDS", "PRESETS", "PretrainConfig",
           "RewindPoints", "apply_preset", "base_spec", "check_pretraining", "rows", "stack_rows",
           "swap_head"]
