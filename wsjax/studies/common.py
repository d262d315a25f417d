"""Config pieces every study shares, and the set-up they all need.

* `ModelConfig`: a registered model and its options (`--model --widths
  --channels --width --init --compute_dtype`).
* `DataConfig`: the dataset, where it lives (not part of any result), the
  batch size, augmentation.
* `RunnerConfig`: operational knobs that never change a result beyond float
  rounding: block length, checkpoint cadence, progress bars, the device
  layout.
* `Setting`: a model, a dataset on device, an optimizer and the replicas'
  seeds, with the jitted fresh-state builder and a cache of compiled
  programs: what a study composes `wsjax.core.train` with.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np

from wsjax import parallel
from wsjax.core.optim import OptimizerConfig, make_optimizer
from wsjax.core.program import Program
from wsjax.core.state import TrainState, create_state, seed_keys
from wsjax.core.task import Task


def _f(default, help_text: str, **meta):
  return dataclasses.field(default=default, metadata={"help": help_text, **meta})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A registered model (`wsjax.models.KNOWN_MODELS`) and its options."""
  name: str = _f("conv1d", "model name (logreg, mlp, conv1d, conv8, resnet18, resnet20, "
                 "vgg16_bn, ...)", flag="model")
  widths: Optional[tuple[int, ...]] = _f(None, "mlp hidden widths, e.g. 100,100")
  channels: Optional[int] = _f(None, "conv1d channels")
  width: Optional[int] = _f(None, "ResNet base width (resnet18: 64, Ash & Adams' narrow: 16)")
  init: Optional[str] = _f(None, "initializer: torch, kaiming_normal or flax (default: the model's)")
  compute_dtype: Optional[str] = _f(None, "resnets, vggs, conv8: bfloat16 for mixed precision "
                                    "(float32 parameters); default float32")

  def options(self) -> dict:
    """The keyword options of `wsjax.models.get_model` this config sets."""
    out = {}
    for key in ("widths", "channels", "width", "init"):
      v = getattr(self, key)
      if v is not None:
        out[key] = tuple(v) if isinstance(v, (list, tuple)) else v
    if self.compute_dtype:
      out["dtype"] = self.compute_dtype
    return out

  def build(self, num_classes: int, input_shape: Optional[Sequence[int]] = None):
    from wsjax.models import get_model
    from wsjax.models.inputs import check_input
    model = get_model(self.name, num_classes, **self.options())
    if input_shape is not None:
      check_input(self.name, model, tuple(input_shape))
    return model


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The dataset a study trains on and how batches are formed."""
  dataset: str = _f("mnist1d", "dataset name (mnist1d, mnist1d_large, digits, fashion_mnist, "
                    "cifar10, ...)")
  data_dir: Optional[str] = _f(None, "tfds data dir (default: $TFDS_DATA_DIR or "
                               "~/tensorflow_datasets)", operational=True)
  fashion_mnist_dir: Optional[str] = _f(None, "fashion_mnist: directory of the original IDX "
                                        "files (default: $WSJAX_FASHION_MNIST_DIR, then "
                                        "/usr/share/datasets/fashion-mnist)", operational=True)
  batch_size: int = _f(128, "global batch size")
  augment: bool = _f(False, "random crop and flip inside the step (images only)")

  def validate(self) -> None:
    if self.batch_size < 1:
      raise ValueError(f"batch size must be >= 1, got {self.batch_size}")

  def load(self):
    from wsjax.data import load_dataset
    kwargs = {"source_dir": self.fashion_mnist_dir} if self.fashion_mnist_dir else {}
    dataset = load_dataset(self.dataset, self.data_dir, **kwargs)
    if self.augment and len(dataset.input_shape) != 3:
      raise ValueError(f"--augment crops and flips images; {self.dataset} inputs have shape "
                       f"{dataset.input_shape}")
    return dataset


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
  """How a study runs, not what it computes."""
  block_steps: int = _f(32, "steps per compiled call")
  checkpoint_every: int = _f(0, "also checkpoint every N steps (0: at run ends only)")
  progress: bool = _f(True, "show a progress bar")
  seed_devices: int = _f(0, "device groups the replicas are spread over (0: one per device on "
                         "CPU, 1 on GPU/TPU)")
  replica_chunk: int = _f(-1, "replicas per device vmapped together, the rest in sequence "
                          "within each step (-1: 2 on CPU, all on GPU/TPU; 0: all)")

  def chunk(self) -> Optional[int]:
    """`Program`'s `replica_chunk`: None for the default."""
    return None if self.replica_chunk < 0 else self.replica_chunk

  def validate(self) -> None:
    if self.block_steps < 1:
      raise ValueError(f"block steps must be >= 1, got {self.block_steps}")
    if self.checkpoint_every < 0:
      raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
    if self.seed_devices < 0:
      raise ValueError(f"--seed_devices must be >= 0, got {self.seed_devices}")
    if self.replica_chunk < -1:
      raise ValueError(f"--replica_chunk must be >= 0, or -1 for the default, got "
                       f"{self.replica_chunk}")


class Setting:
  """A model on a dataset with an optimizer, for a stack of replicas.

  Holds the dataset on device (replicated), the model, the optimizer, the
  replica layout, a jitted `fresh_states(*salt)` (one compiled program) and
  compiled `Program`s per (task, optimizer)."""

  def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, opt_cfg: OptimizerConfig,
               seeds: Sequence[int], runner: RunnerConfig, *, horizon: Optional[int] = None,
               dataset=None, num_classes: Optional[int] = None):
    data_cfg.validate()
    runner.validate()
    opt_cfg.validate()
    self.model_cfg, self.data_cfg, self.opt_cfg, self.runner = model_cfg, data_cfg, opt_cfg, runner
    self.seeds = tuple(int(s) for s in seeds)
    if not self.seeds:
      raise ValueError("seeds must be >= 1")
    self.dataset = dataset if dataset is not None else data_cfg.load()
    self.num_classes = num_classes or self.dataset.num_classes
    self.model = model_cfg.build(self.num_classes, self.dataset.input_shape)
    self.replica_devices = runner.seed_devices or parallel.default_seed_devices(len(self.seeds))
    mesh = parallel.seed_data_mesh(self.replica_devices)  # checks it divides the devices
    self.mesh = mesh
    n_data = mesh.shape[parallel.DATA_AXIS]
    if data_cfg.batch_size % n_data:
      raise ValueError(f"batch size {data_cfg.batch_size} is not divisible by the {n_data} "
                       f"devices that share a replica ({jax.device_count()} devices, "
                       f"seed_devices={self.replica_devices})")
    n_train = len(self.dataset.y_train)
    if data_cfg.batch_size > n_train:
      raise ValueError(f"batch size {data_cfg.batch_size} is larger than the {n_train} "
                       f"training examples of {data_cfg.dataset}")
    from wsjax.models import make_init_fn
    self.init_variables = make_init_fn(self.model, self.dataset.input_shape)
    self.horizon = horizon
    self.tx = make_optimizer(opt_cfg, horizon)
    rep = parallel.replicated()
    self._fresh = jax.jit(jax.vmap(lambda k: create_state(self.init_variables, self.tx, k)),
                          out_shardings=rep)
    self.x_train = parallel.put_replicated(self.dataset.x_train)
    self.y_train = parallel.put_replicated(self.dataset.y_train.astype(np.int32))
    self.x_test = parallel.put_replicated(self.dataset.x_test)
    self.y_test = parallel.put_replicated(self.dataset.y_test.astype(np.int32))
    self._programs: dict[Any, Program] = {}

  def fresh_states(self, *salt: int) -> TrainState:
    """Fresh replica-stacked states: replica i from `seed_keys([seed_i], *salt)`."""
    return self._fresh(seed_keys(self.seeds, *salt))

  def template(self) -> TrainState:
    """Host zeros shaped like the replica-stacked states (for restoring)."""
    shapes = jax.eval_shape(lambda: self.fresh_states(0))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)

  def one_model_template(self) -> dict:
    """params / batch_stats / opt_state of ONE replica (no replica axis)."""
    shapes = jax.eval_shape(lambda: self.fresh_states(0))
    one = jax.tree.map(lambda s: np.zeros(s.shape[1:], s.dtype), shapes)
    return {"params": one.params, "batch_stats": one.batch_stats, "opt_state": one.opt_state}

  def program(self, task: Optional[Task] = None, tx=None) -> Program:
    """The compiled program for `task` (and `tx`, default the setting's)."""
    tx = self.tx if tx is None else tx
    task = task if task is not None else Task()
    key = (task, id(tx))
    if key not in self._programs:
      augment_fn = None
      if self.data_cfg.augment:
        from wsjax.data import augment_images
        augment_fn = augment_images
      self._programs[key] = Program(self.model, tx, task, batch_size=self.data_cfg.batch_size,
                                    block_steps=self.runner.block_steps, augment_fn=augment_fn,
                                    replica_devices=self.replica_devices,
                                    replica_chunk=self.runner.chunk())
    return self._programs[key]
