"""One level of the lottery default's grid: vmapped vs one replica at a time vs PyTorch.

The grid of `python -m experiments.lottery` at one rewind point and one
pruning level: 5 variants x 3 seeds = 15 subnetworks (density 0.8, each its
own mask and start state) of the 1-D ConvNet on MNIST-1D, trained from
k = 100 to T = 1,280 (SGD lr 0.1, momentum 0.9, weight decay 1e-4, lr x0.1
at steps 640 and 960, batch 128), then evaluated on the test set. Three
sides, each in its own process:

* `vmapped`: wsjax as the study runs it: the 15 replicas in ONE `train`
  call (`wsjax.core.loop.train`, masks as program inputs, the replicas
  spread over one CPU device per core);
* `one_at_a_time`: wsjax, the same 15 runs one after the other, one
  replica per `train` call (one compiled program for all);
* `torch`: the PyTorch-eager reference written as open_lth runs it
  (`benchmarks.torch_lottery.train_pruned`: one run at a time, masks
  applied before every forward pass, `.item()` on every step's loss), on
  the same batches, with one torch thread per core (`torch`) and with one
  thread (`torch_1thread`: what a shared machine's load degrades least,
  see BENCHMARKS.md "Measuring on a shared machine").

After a warm-up (wsjax compiles; its compile time is reported on its own),
the sides alternate for `rounds` rounds and the medians are compared.

    python -m benchmarks.lottery            # results/lottery.json
    python -m benchmarks.lottery --quick    # 160 steps per run, one round
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import common

VARIANTS, SEEDS = 5, 3
REPLICAS = VARIANTS * SEEDS
START, END, BOUNDARIES = 100, 1280, (640, 960)
LR, MOMENTUM, WD, BATCH, DENSITY = 0.1, 0.9, 1e-4, 128, 0.8


def _orders(n_train: int, seed: int, epochs: int) -> list:
  from wsjax.data import epoch_order
  return [epoch_order(np.arange(n_train), BATCH, (seed, e)) for e in range(epochs)]


class JaxSide:
  """wsjax's training core: all replicas in one program, or one at a time."""

  def __init__(self, mode: str):
    import jax
    from wsjax import parallel
    replicas = REPLICAS if mode == "vmapped" else 1
    host_devices = parallel.use_cpu_devices(0, at_most=replicas)
    from wsjax import pruning
    from wsjax.core.data import TrainData
    from wsjax.core.optim import OptimizerConfig
    from wsjax.core.task import Classification
    from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig, Setting
    self.mode = mode
    opt = OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WD,
                          schedule="step", decay_boundaries=BOUNDARIES)
    self.setting = s = Setting(ModelConfig(name="conv1d", init="kaiming_normal"),
                               DataConfig(dataset="mnist1d", batch_size=BATCH), opt,
                               tuple(range(replicas)), RunnerConfig(progress=False))
    self.program = s.program(Classification(masked=True))
    one = jax.tree.map(lambda x: x[0], parallel.to_host(s.fresh_states().params))
    rng = np.random.default_rng(0)
    self.masks = jax.tree.map(  # a mask of density 0.8 per replica on the prunable kernels
        lambda m: rng.random((REPLICAS, *m.shape)) < DENSITY if m.ndim
        else np.ones((REPLICAS,), bool), pruning.ones_mask(one, "conv1d"))
    self.data = TrainData(s.x_train, s.y_train, np.arange(len(s.dataset.y_train)), BATCH)
    t0 = time.perf_counter()
    self.run(2 * s.runner.block_steps)  # compiles
    self.info = {"compile_s": time.perf_counter() - t0, "host_devices": host_devices,
                 "seed_devices": s.replica_devices}

  def _train(self, first: int, stop: int, n_steps: int) -> list:
    import jax
    from wsjax import parallel
    from wsjax import pruning
    from wsjax.core.loop import Until, train
    s = self.setting
    masks = jax.tree.map(lambda m: m[first:stop], self.masks)
    states = s.fresh_states(first)
    params = jax.vmap(pruning.apply_mask)(parallel.to_host(states.params), masks)
    states = states.replace(params=parallel.put_replicated(parallel.to_host(params)))
    states, _ = train(states, self.program, self.data, Until.steps(START + n_steps),
                      data_seeds=[r % SEEDS for r in range(first, stop)], start=START,
                      inputs={"mask": parallel.put_replicated(masks)})
    acc, _ = self.program.evaluate(states, s.x_test, s.y_test)
    return [float(a) for a in acc]

  def run(self, n_steps: int) -> dict:
    t0 = time.perf_counter()
    if self.mode == "vmapped":
      acc = self._train(0, REPLICAS, n_steps)
    else:
      acc = [a for r in range(REPLICAS) for a in self._train(r, r + 1, n_steps)]
    return {"seconds": time.perf_counter() - t0, "test_acc": float(np.mean(acc))}


class TorchSide:
  """The open_lth-style PyTorch loop, one run after another."""

  def __init__(self, threads: int = 0):
    from benchmarks import torch_reference as ref
    torch = ref.require_torch()
    from wsjax.data import load_dataset
    self.info = {"threads": ref.set_threads(threads or common.cpu_count())}
    ds = load_dataset("mnist1d")
    self.x_train = ref.to_torch_inputs("conv1d", ds.x_train)
    self.x_test = ref.to_torch_inputs("conv1d", ds.x_test)
    self.y_train = torch.from_numpy(ds.y_train.astype(np.int64))
    self.y_test = torch.from_numpy(ds.y_test.astype(np.int64))
    self.orders = {s: _orders(len(ds.y_train), s, -(-END // 32) + 1) for s in range(SEEDS)}
    t0 = time.perf_counter()
    self.run(8)
    self.info["warmup_s"] = time.perf_counter() - t0

  def run(self, n_steps: int) -> dict:
    from benchmarks import torch_lottery as tl
    from benchmarks import torch_reference as ref
    torch = ref.require_torch()
    t0 = time.perf_counter()
    accs = []
    for r in range(REPLICAS):
      torch.manual_seed(r)
      model = ref.make_model("conv1d")
      tl.kaiming_normal_(model)
      masks = tl.random_masks(model, DENSITY, r)
      out = tl.train_pruned(model, masks, self.x_train, self.y_train, self.x_test, self.y_test,
                            self.orders[r % SEEDS], START, START + n_steps, lr=LR,
                            momentum=MOMENTUM, weight_decay=WD, boundaries=BOUNDARIES)
      accs.append(out["test_acc"])
    return {"seconds": time.perf_counter() - t0, "test_acc": float(np.mean(accs))}


def run(quick: bool = False) -> dict:
  n_steps = 160 if quick else END - START
  rounds = 1 if quick else 2
  result = {"benchmark": "lottery", "environment": common.environment(), "quick": quick,
            "replicas": REPLICAS, "steps_per_run": n_steps, "rounds": rounds}
  sides = {"vmapped": ("benchmarks.lottery:JaxSide", {"mode": "vmapped"}),
           "one_at_a_time": ("benchmarks.lottery:JaxSide", {"mode": "one_at_a_time"})}
  if common.torch_available():
    sides["torch"] = ("benchmarks.lottery:TorchSide", {})
    sides["torch_1thread"] = ("benchmarks.lottery:TorchSide", {"threads": 1})
  else:
    result["note"] = "PyTorch not installed: wsjax sides only (pip install wsjax[bench])"
  common.log(f"lottery: {REPLICAS} runs x {n_steps} steps, set-up and compilation ...")
  workers = {name: common.Worker(target, **kw) for name, (target, kw) in sides.items()}
  with common.closing_all(workers):
    runs = common.alternate(workers, "run", rounds, n_steps)
    out = {}
    for name, w in workers.items():
      secs = [r["seconds"] for r in runs[name]]
      out[name] = {"seconds": common.median(secs), "seconds_all": secs,
                   "test_acc": runs[name][0]["test_acc"], "peak_rss_mb": w.peak_rss_mb(),
                   **w.info}
  result["sides"] = out
  base = out["vmapped"]["seconds"]
  result["ratio_one_at_a_time"] = out["one_at_a_time"]["seconds"] / base
  if "torch" in out:
    result["speedup_vs_torch"] = out["torch"]["seconds"] / base
    result["speedup_vs_torch_1thread"] = out["torch_1thread"]["seconds"] / base
  result["load_average_end"] = list(common.load_average())
  return result


def report(result: dict) -> str:
  rows = []
  for name, side in result["sides"].items():
    ms = 1000 * side["seconds"] / (result["replicas"] * result["steps_per_run"])
    rows.append([name, side["seconds"], ms, side["seconds"] / result["sides"]["vmapped"]["seconds"],
                 side.get("compile_s"), side["test_acc"], side["peak_rss_mb"]])
  text = common.table(rows, ["side", "seconds", "ms/replica-step", "x vmapped", "compile s",
                             "mean test acc", "peak RSS MiB"])
  text += (f"\n{result['replicas']} runs x {result['steps_per_run']} steps; one at a time / "
           f"vmapped: {result['ratio_one_at_a_time']:.2f}x")
  if "speedup_vs_torch" in result:
    text += (f"; PyTorch eager / vmapped: {result['speedup_vs_torch']:.2f}x "
             f"({result['speedup_vs_torch_1thread']:.2f}x with 1 torch thread)")
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.lottery", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="160 steps per run, one round")
  parser.add_argument("--out", default=common.RESULTS_DIR, help="where lottery.json goes")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  result = run(quick=args.quick)
  result["wall_s"] = time.perf_counter() - t0
  path = common.write_result("lottery" + ("_quick" if args.quick else ""), result, args.out)
  print(report(result))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
