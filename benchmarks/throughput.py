"""Train-step throughput (examples/s), wsjax vs PyTorch eager, on the CPU.

* MLP (40-100-100-10) and the 1-D ConvNet (8,010 parameters) on MNIST-1D:
  wsjax trains 1 seed with the training core's loop
  (`wsjax.core.loop.train` over a `wsjax.core.program.Program` with blocks
  of 32 steps: one compiled loop per epoch of 4,000 examples at batch 128;
  the host draws each epoch's order, uploads the indices and reads back the
  counters after every block, as every study does); PyTorch runs the
  official code's eager loop, both with batches cut from a per-epoch
  permutation by indexing the data tensor ("index") and through a
  `DataLoader(TensorDataset, shuffle=True)` as the DASH code does
  ("dataloader").
* CIFAR ResNet-18 (width 64) on random 32x32x3 inputs: wsjax's jitted
  single `train_step` (`wsjax.core.program.make_train_step`) vs PyTorch
  `model.train()` steps.

SGD (lr 1e-2, momentum 0.9), batch 128, float32. Each side runs in its own
process; after warm-up (2 calls, the first one compiles) the sides alternate
for several rounds and the median examples/s is reported.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks import common

BATCH = 128
LR = 1e-2
MOMENTUM = 0.9
SMALL_MODELS = ("mlp", "conv1d")


# ---------------------------------------------------------------------------
# wsjax sides.

def flops_per_step(train_step, state, x, y) -> float:
  """XLA's count of the floating-point operations of one train step (one seed)."""
  import jax
  cost = jax.jit(train_step).lower(state, x, y, {}).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


class JaxSmall:
  """wsjax's training loop (`wsjax.core.loop.train`) for seeds of a small model on MNIST-1D.

  Each `run(n)` continues the same run from its global step for `n` more
  steps (`Until.steps`), so the epochs' data orders follow on as in one
  long run."""

  def __init__(self, model: str, block_steps: int = 32, seeds: int = 1, host_devices: int = 1):
    import jax
    from wsjax import parallel
    parallel.use_cpu_devices(host_devices)  # before any JAX operation
    from wsjax.core.data import TrainData
    from wsjax.core.optim import OptimizerConfig, make_optimizer
    from wsjax.core.program import Program, make_train_step
    from wsjax.core.state import create_state, seed_keys
    from wsjax.core.task import Task
    from wsjax.data import load_dataset
    from wsjax.models import get_model, make_init_fn

    ds = load_dataset("mnist1d")
    self.model = get_model(model, ds.num_classes)
    tx = make_optimizer(OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM))
    self.program = Program(self.model, tx, Task(), batch_size=BATCH, block_steps=block_steps,
                           replica_devices=parallel.default_seed_devices(seeds))
    init = make_init_fn(self.model, ds.input_shape)
    fresh = jax.jit(jax.vmap(lambda k: create_state(init, tx, k)),
                    out_shardings=parallel.replicated())
    self.seeds = tuple(range(seeds))
    self.states = fresh(seed_keys(self.seeds, 0, 0))
    x = parallel.put_replicated(ds.x_train)
    y = parallel.put_replicated(ds.y_train.astype(np.int32))
    self.data = TrainData(x, y, np.arange(len(ds.y_train)), BATCH)
    self.k = block_steps
    self.step = 0
    # Warm-up: the first call compiles; a second call catches a possible
    # recompilation when the donated states come back with new shardings.
    t0 = time.perf_counter()
    self._train(block_steps)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    self._train(block_steps)
    second = time.perf_counter() - t0
    self._train(block_steps)
    one = jax.tree.map(lambda a: a[0], self.states)
    self.info = {"first_call_s": first, "second_call_s": second,
                 "compile_s": max(first - second, 0.0), "devices": jax.device_count(),
                 "seed_devices": self.program.mesh.shape[parallel.SEEDS_AXIS],
                 "block_steps": block_steps, "seeds": seeds,
                 "steps_per_epoch": self.data.steps_per_epoch,
                 "flops_per_step": flops_per_step(make_train_step(self.model, tx, Task()), one,
                                                  x[:BATCH], y[:BATCH])}

  def _train(self, n_steps: int) -> None:
    from wsjax.core.loop import Until, train
    self.states, position = train(self.states, self.program, self.data,
                                  Until.steps(self.step + n_steps), data_seeds=self.seeds,
                                  start=self.step)
    self.step = position["step"]

  def run(self, n_steps: int) -> dict:
    """Trains `n_steps` more steps of every seed and times them."""
    t0, c0 = time.perf_counter(), common.cpu_seconds()
    self._train(n_steps)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": n_steps, "examples": n_steps * BATCH * len(self.seeds),
            "cores_busy": (common.cpu_seconds() - c0) / seconds}


class JaxResNet:
  """wsjax's jitted `train_step` for the CIFAR ResNet-18 on random inputs."""

  def __init__(self, batch: int = BATCH, width: int = 64, dtype: str = "float32",
               matmul_precision: str = "", warmup: int = 2, host_devices: int = 1):
    """`host_devices` > 1: the CPU as that many devices, the batch split over
    them (wsjax's data parallelism: a `data` mesh, gradients all-reduced)."""
    import jax
    import jax.numpy as jnp
    from wsjax import parallel
    parallel.use_cpu_devices(host_devices)  # before any JAX operation
    from wsjax.core.optim import OptimizerConfig, make_optimizer
    from wsjax.core.program import make_train_step
    from wsjax.core.state import create_state
    from wsjax.core.task import Task
    from wsjax.models import get_model, make_init_fn

    if matmul_precision:
      jax.config.update("jax_default_matmul_precision", matmul_precision)
    model = get_model("resnet18", 10, width=width)
    tx = make_optimizer(OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM))
    init = make_init_fn(model, (32, 32, 3))
    self.state = jax.jit(lambda k: create_state(init, tx, k),
                         out_shardings=parallel.replicated())(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    self.x = jax.device_put(jax.random.normal(key, (batch, 32, 32, 3), jnp.dtype(dtype)),
                            parallel.sharded_along(0))
    self.y = jax.device_put(jax.random.randint(key, (batch,), 0, 10), parallel.sharded_along(0))
    train_step = make_train_step(model, tx, Task())
    self.flops = flops_per_step(train_step, self.state, self.x, self.y)
    self.step = jax.jit(train_step, donate_argnums=(0,))
    self.batch = batch
    self.info = {**common.timed_warmup(self._step, warmup), "batch": batch,
                 "flops_per_step": self.flops, "devices": jax.device_count(),
                 "matmul_precision": matmul_precision or "default"}

  def _step(self):
    self.state, (loss, _) = self.step(self.state, self.x, self.y, {})
    loss.block_until_ready()

  def run(self, n_steps: int) -> dict:
    t0, c0 = time.perf_counter(), common.cpu_seconds()
    for _ in range(n_steps):
      self._step()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": n_steps, "examples": n_steps * self.batch,
            "cores_busy": (common.cpu_seconds() - c0) / seconds}


# ---------------------------------------------------------------------------
# PyTorch sides.

class TorchSmall:
  """The official code's eager loop for one seed of a small model on MNIST-1D."""

  def __init__(self, model: str, loader: str = "index", threads: int = 0):
    from benchmarks import torch_reference as ref
    torch = ref.require_torch()
    from wsjax.data import load_dataset

    self.threads = ref.set_threads(threads or common.cpu_count())
    torch.manual_seed(0)
    ds = load_dataset("mnist1d")
    self.x = ref.to_torch_inputs(model, ds.x_train)
    self.y = torch.from_numpy(ds.y_train.astype(np.int64))
    self.net = ref.make_model(model)
    self.opt = ref.sgd(self.net, LR, MOMENTUM)
    self.criterion = torch.nn.CrossEntropyLoss()
    self.loader_kind = loader
    if loader == "dataloader":
      self.loader = torch.utils.data.DataLoader(
          torch.utils.data.TensorDataset(self.x, self.y), batch_size=BATCH, shuffle=True)
    elif loader != "index":
      raise ValueError(f"unknown loader {loader!r}")
    self.epoch = 0
    self.ref = ref
    self.net.train()
    t0 = time.perf_counter()
    self.run(32)
    self.info = {"threads": self.threads, "loader": loader,
                 "warmup_s": time.perf_counter() - t0}

  def _epoch_batches(self):
    from wsjax.data import epoch_order
    if self.loader_kind == "dataloader":
      yield from self.loader
    else:  # the batches of wsjax's seed 0 (`TrainData.epoch`: key (seed, epoch))
      order = epoch_order(np.arange(len(self.y)), BATCH, (0, self.epoch))
      yield from self.ref.index_batches(self.x, self.y, order)
    self.epoch += 1

  def run(self, n_steps: int) -> dict:
    t0, c0 = time.perf_counter(), common.cpu_seconds()
    done = examples = 0
    self.net.train()
    while done < n_steps:
      for inputs, targets in self._epoch_batches():
        self.ref.train_step(self.net, self.opt, self.criterion, inputs, targets)
        done += 1
        examples += len(targets)
        if done == n_steps:
          break
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": done, "examples": examples,
            "cores_busy": (common.cpu_seconds() - c0) / seconds}


class TorchResNet:
  """PyTorch eager `model.train()` steps of the CIFAR ResNet-18 (NCHW)."""

  def __init__(self, batch: int = BATCH, threads: int = 0, warmup: int = 1,
               channels_last: bool = False):
    from benchmarks import torch_reference as ref
    torch = ref.require_torch()
    self.threads = ref.set_threads(threads or common.cpu_count())
    torch.manual_seed(0)
    self.net = ref.make_model("resnet18")
    self.x = torch.randn(batch, 3, 32, 32)
    if channels_last:
      self.net = self.net.to(memory_format=torch.channels_last)
      self.x = self.x.contiguous(memory_format=torch.channels_last)
    self.y = torch.randint(0, 10, (batch,))
    self.opt = ref.sgd(self.net, LR, MOMENTUM)
    self.criterion = torch.nn.CrossEntropyLoss()
    self.batch = batch
    self.ref = ref
    self.net.train()
    t0 = time.perf_counter()
    self.run(warmup)
    self.info = {"threads": self.threads, "warmup_s": time.perf_counter() - t0,
                 "channels_last": channels_last}

  def run(self, n_steps: int) -> dict:
    t0, c0 = time.perf_counter(), common.cpu_seconds()
    for _ in range(n_steps):
      self.ref.train_step(self.net, self.opt, self.criterion, self.x, self.y)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": n_steps, "examples": n_steps * self.batch,
            "cores_busy": (common.cpu_seconds() - c0) / seconds}


# ---------------------------------------------------------------------------
# The benchmark.

def _summarize(runs: list[dict]) -> dict:
  rates = [r["examples"] / r["seconds"] for r in runs]
  return {"examples_per_s": common.median(rates), "runs": runs,
          "examples_per_s_all": rates,
          "cores_busy": common.median([r.get("cores_busy", float("nan")) for r in runs])}


def _compare(name: str, sides: dict, rounds: int, n_steps: int) -> dict:
  """Alternates the sides' `run(n_steps)`; medians, ratios vs the first torch side."""
  out = {"model": name, "steps_per_run": n_steps, "rounds": rounds, "sides": {}}
  runs = common.alternate(sides, "run", rounds, n_steps)
  flops = sides["wsjax"].info.get("flops_per_step", float("nan"))
  out["flops_per_step"] = flops
  for side, worker in sides.items():
    summary = _summarize(runs[side])
    summary["gflop_per_s"] = flops * summary["examples_per_s"] / BATCH / 1e9
    out["sides"][side] = {**summary, "setup_s": worker.setup_s,
                          "info": worker.info, "peak_rss_mb": worker.peak_rss_mb()}
  torch_sides = [s for s in out["sides"] if s.startswith("torch")]
  if torch_sides and "wsjax" in out["sides"]:
    w = out["sides"]["wsjax"]["examples_per_s"]
    out["ratio_wsjax_over_torch"] = {s: w / out["sides"][s]["examples_per_s"] for s in torch_sides}
    out["ratio_over_first_torch_side"] = {
        s: v["examples_per_s"] / out["sides"][torch_sides[0]]["examples_per_s"]
        for s, v in out["sides"].items() if s.startswith("wsjax_")}
  return out


def run(quick: bool = False) -> dict:
  """Runs every model; returns the result dict (see `report`)."""
  threads = common.cpu_count()
  have_torch = common.torch_available()
  result = {"benchmark": "throughput", "environment": common.environment(),
            "batch": BATCH, "torch_threads": threads if have_torch else None,
            "quick": quick, "models": {}}
  if not have_torch:
    result["note"] = "PyTorch not installed: wsjax side only (pip install wsjax[bench])"
    common.log(result["note"])
  small_steps = 256 if quick else 1024
  small_rounds = 2 if quick else 3
  for name in SMALL_MODELS:
    common.log(f"throughput: {name} ...")
    sides = {"wsjax": common.Worker("benchmarks.throughput:JaxSmall", model=name)}
    if have_torch:
      sides["torch_index"] = common.Worker("benchmarks.throughput:TorchSmall", model=name,
                                           loader="index", threads=threads)
      sides["torch_dataloader"] = common.Worker("benchmarks.throughput:TorchSmall", model=name,
                                                loader="dataloader", threads=threads)
      sides["torch_index_1thread"] = common.Worker("benchmarks.throughput:TorchSmall",
                                                   model=name, loader="index", threads=1)
    with common.closing_all(sides):
      result["models"][name] = _compare(name, sides, small_rounds, small_steps)
  common.log("throughput: resnet18 ...")
  sides = {"wsjax": common.Worker("benchmarks.throughput:JaxResNet", warmup=2)}
  if threads > 1:  # the batch split over one CPU device per core
    sides[f"wsjax_{threads}_devices"] = common.Worker("benchmarks.throughput:JaxResNet",
                                                      warmup=2, host_devices=threads)
  if have_torch:
    sides["torch_eager"] = common.Worker("benchmarks.throughput:TorchResNet", threads=threads)
  with common.closing_all(sides):
    result["models"]["resnet18"] = _compare("resnet18", sides, 1 if quick else 3, 1 if quick else 2)
  return result


def report(result: dict) -> str:
  rows = []
  for name, m in result["models"].items():
    for side, s in m["sides"].items():
      ratio = (m.get("ratio_wsjax_over_torch", {}).get(side)
               or m.get("ratio_over_first_torch_side", {}).get(side))
      compile_s = s["info"].get("compile_s")
      rows.append([name, side, s["examples_per_s"], 1000 * BATCH / s["examples_per_s"],
                   s.get("gflop_per_s"), s.get("cores_busy"), compile_s, s["peak_rss_mb"],
                   None if ratio is None else f"{ratio:.2f}x"])
  return common.table(rows, ["model", "side", "examples/s", "ms/step", "GFLOP/s", "cores busy", "compile s",
                             "peak RSS MiB", "wsjax/this (wsjax_N: this/torch)"])
