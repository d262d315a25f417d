"""The DASH chunked protocol on MNIST-1D end to end: wsjax's staged study vs PyTorch.

The protocol (Shin et al., 2024, the official code's `main.py`): the 4,000
MNIST-1D training examples arrive in 10 equal chunks; at every chunk each
method trains on the whole buffer (SGD lr 1e-2, momentum 0.9, batch 128)
until the epoch-mean training accuracy reaches the threshold or the epoch
cap, then the test accuracy is recorded. Methods: cold (new model and
optimizer per chunk), warm (keep both), dash (gradient EMA over the chunks
in eval mode, then cosine shrink per kernel slice / unit / bias); 5 seeds;
the 1-D ConvNet.

* wsjax: `StagedStudy(StagedConfig(...), workdir, RunnerConfig(...)).run()`
  (`wsjax.studies.staged`) as the experiment programs run it (5 seeds
  vmapped and spread over one CPU device per core, blocks of 32 steps,
  every stage a stored run with its `init` and `final` snapshots, the first
  stage trained once for the methods that start it alike), from loading the
  data to the results, in a fresh process and a fresh workdir (a finished
  run in the store would be loaded, not retrained), so XLA compilation is
  included. The time spent tracing, lowering and compiling is also measured
  on its own (`jax.monitoring`), and where the rest goes: the training loops
  (each run's own `wall_s`, which the core's loop records; the first stage
  counted once), the per-stage diagnostics and the snapshot saves (every
  run's `init` and `final`), the last two by timing the public functions
  `wsjax.studies.diagnostics.stage_diagnostics` and
  `wsjax.core.store.Run.save_snapshot` in the worker process; each part
  includes the compilation it triggers. The headline runs have
  `diagnostics=False`, the same work as the reference; one more run has the
  study's default per-stage plasticity diagnostics on.
* PyTorch: `benchmarks.torch_reference.run_chunked_study`, the official
  loop: one seed at a time, `DataLoader(ConcatDataset(buffer), 128,
  shuffle=True)`, eager steps with `.item()` per step, DASH as in
  `utils/train_utils.py`. (The official per-epoch metric passes,
  `get_prev_metric`, are left out: they are not part of the protocol.)

Both use the same chunks (`wsjax.data.chunks`, data seed 0), stopping rule,
methods and seed count. The sides run in the order wsjax, torch, wsjax,
wsjax with diagnostics (--quick: wsjax, torch, 2 epochs per stage), each in
its own process.
"""
from __future__ import annotations

import functools
import tempfile
import time

import numpy as np

from benchmarks import common

METHODS = ("cold", "warm", "dash")


def protocol(quick: bool) -> dict:
  return {"dataset": "mnist1d", "model": "conv1d", "n_chunks": 10, "methods": METHODS,
          "seeds": 5, "lr": 1e-2, "momentum": 0.9, "batch_size": 128,
          "threshold": 0.99, "max_epochs": 2 if quick else 30, "data_seed": 0}


class JaxStudy:
  """Runs the protocol with `wsjax.studies.staged.StagedStudy` (one run per process)."""

  def __init__(self, seeds: int):
    import jax  # noqa: F401  (import time is not part of the measurement)
    import wsjax.studies.staged  # noqa: F401
    from wsjax import parallel
    # as the experiment programs do: one CPU device per core, at most one per seed
    self.info = {"host_devices": parallel.use_cpu_devices(0, at_most=seeds)}

  def run(self, p: dict, diagnostics: bool = False) -> dict:
    """One whole study in a fresh workdir; `diagnostics` turns on the
    per-stage plasticity diagnostics (the study's default; the PyTorch
    reference has none)."""
    from jax import monitoring
    from wsjax.core import store
    from wsjax.core.optim import OptimizerConfig
    from wsjax.studies import diagnostics as diagnostics_lib
    from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig
    from wsjax.studies.staged import ArrivalConfig, StagedConfig, StagedStudy

    compile_events, by_function = {}, {}

    def listen(name, seconds, **kwargs):
      if name.startswith("/jax/core/compile/"):
        compile_events[name] = compile_events.get(name, 0.0) + seconds
      if name == "/jax/core/compile/backend_compile_duration":
        fun = kwargs.get("fun_name", "?")
        n, total = by_function.get(fun, (0, 0.0))
        by_function[fun] = (n + 1, total + seconds)
    monitoring.register_event_duration_secs_listener(listen)
    parts = {}
    _time_calls(parts, "diagnostics", diagnostics_lib, "stage_diagnostics")
    _time_calls(parts, "snapshots", store.Run, "save_snapshot")  # `init` and `final` (finish)
    cfg = StagedConfig(
        experiment="benchmark_study", model=ModelConfig(name=p["model"]),
        data=DataConfig(dataset=p["dataset"], batch_size=p["batch_size"]),
        optimizer=OptimizerConfig(name="sgd", lr=p["lr"], momentum=p["momentum"]),
        arrivals=ArrivalConfig(schedule="chunks", chunks=p["n_chunks"], data_seed=p["data_seed"]),
        methods=tuple(p["methods"]), seeds=p["seeds"], threshold=p["threshold"],
        max_epochs=p["max_epochs"], diagnostics=diagnostics)
    runner = RunnerConfig(block_steps=32, checkpoint_every=0, progress=False)
    with tempfile.TemporaryDirectory(prefix="wsjax-bench-") as workdir:
      t0 = time.perf_counter()
      out = StagedStudy(cfg, workdir, runner, log=lambda s: None).run()
      wall = time.perf_counter() - t0
    methods, loops = {}, {}
    for m, r in out["methods"].items():
      methods[m] = {"final_test_acc": r["final_test_acc"]["mean"],
                    "total_steps": float(np.sum(r["total_steps"]["per_seed"])),
                    "epochs_per_stage": [s["epochs"] for s in r["stages"]]}
      for stage in r["stages"]:  # a run shared by several methods counts once
        loops[stage["run"]] = stage["wall_s"]
    parts["train_loops"] = float(sum(loops.values()))
    return {"wall_s": wall, "diagnostics": diagnostics, "environment": out["environment"],
            "compile_s": sum(compile_events.values()),
            "compile_events_s": compile_events,
            "parts_s": parts, "runs_trained": len(loops),
            "backend_compile_by_function": {
                f: {"count": n, "seconds": t} for f, (n, t) in
                sorted(by_function.items(), key=lambda kv: -kv[1][1])},
            "methods": methods}


def _time_calls(totals: dict, name: str, owner, attr: str) -> None:
  """Wraps the public `owner.attr` (in this worker process only) to add its
  wall time to totals[name]."""
  fn = getattr(owner, attr)
  totals.setdefault(name, 0.0)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    t0 = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      totals[name] += time.perf_counter() - t0
  setattr(owner, attr, wrapper)


class TorchStudy:
  """Runs the protocol with the PyTorch reference, seed after seed."""

  def __init__(self, threads: int = 0):
    from benchmarks import torch_reference as ref
    ref.require_torch()
    self.threads = ref.set_threads(threads or common.cpu_count())
    self.info = {"threads": self.threads}

  def run(self, p: dict) -> dict:
    from benchmarks import torch_reference as ref
    import torch
    from wsjax.data import chunks, load_dataset

    t0 = time.perf_counter()
    ds = load_dataset(p["dataset"])
    x_train = ref.to_torch_inputs(p["model"], ds.x_train)
    x_test = ref.to_torch_inputs(p["model"], ds.x_test)
    y_train = torch.from_numpy(ds.y_train.astype(np.int64))
    y_test = torch.from_numpy(ds.y_test.astype(np.int64))
    schedule = chunks(len(ds.y_train), p["n_chunks"], p["data_seed"])
    methods = {}
    for method in p["methods"]:
      runs = [ref.run_chunked_study(
          p["model"], x_train, y_train, x_test, y_test, schedule.new, method, seed,
          lr=p["lr"], momentum=p["momentum"], batch_size=p["batch_size"],
          threshold=p["threshold"], max_epochs=p["max_epochs"])
          for seed in range(p["seeds"])]
      methods[method] = {
          "final_test_acc": float(np.mean([r["stages"][-1]["test_acc"] for r in runs])),
          "total_steps": float(sum(s["steps"] for r in runs for s in r["stages"])),
          "epochs_per_stage": [float(np.mean([r["stages"][i]["epochs"] for r in runs]))
                               for i in range(p["n_chunks"])]}
    return {"wall_s": time.perf_counter() - t0, "methods": methods}


def run(quick: bool = False) -> dict:
  p = protocol(quick)
  result = {"benchmark": "study", "environment": common.environment(), "protocol": p,
            "quick": quick, "runs": {"wsjax": [], "torch": [], "wsjax_diagnostics": []}}
  have_torch = common.torch_available()
  if quick:
    order = ["wsjax", "torch"]
  else:
    order = ["wsjax", "torch", "wsjax", "wsjax_diagnostics"]
  if not have_torch:
    order = [s for s in order if s != "torch"]
    result["note"] = "PyTorch not installed: wsjax side only (pip install wsjax[bench])"
    common.log(result["note"])
  rss = {side: [] for side in result["runs"]}
  for side in order:
    common.log(f"study: {side} ...")
    if side == "torch":
      worker = common.Worker("benchmarks.study:TorchStudy", threads=common.cpu_count())
      args = (p,)
    else:
      worker = common.Worker("benchmarks.study:JaxStudy", seeds=p["seeds"])
      args = (p, side == "wsjax_diagnostics")
    with worker as w:
      r = w.call("run", *args)
      rss[side].append(w.peak_rss_mb())
      if side == "torch":
        result["torch_threads"] = w.info["threads"]
    r["load_average_after"] = list(common.load_average())
    result["runs"][side].append(r)
    common.log(f"study: {side} {r['wall_s']:.1f} s")
  summary = {}
  for side, runs in result["runs"].items():
    if runs:
      walls = [r["wall_s"] for r in runs]
      summary[side] = {"wall_s": common.median(walls), "peak_rss_mb": max(rss[side])}
      if side != "torch":
        compiles = [r["compile_s"] for r in runs]
        summary[side]["compile_s"] = common.median(compiles)
        summary[side]["wall_minus_compile_s"] = common.median(
            [w - c for w, c in zip(walls, compiles)])
  if "torch" in summary:
    t = summary["torch"]["wall_s"]
    summary["speedup_wsjax_vs_torch"] = t / summary["wsjax"]["wall_s"]
    summary["speedup_excluding_compile"] = t / summary["wsjax"]["wall_minus_compile_s"]
    if "wsjax_diagnostics" in summary:
      summary["speedup_with_diagnostics"] = t / summary["wsjax_diagnostics"]["wall_s"]
  result["summary"] = summary
  return result


def report(result: dict) -> str:
  s = result["summary"]
  p = result["protocol"]
  lines = [f"protocol: {p['model']} on {p['dataset']}, {p['n_chunks']} chunks, "
           f"methods {','.join(p['methods'])}, {p['seeds']} seeds, threshold "
           f"{p['threshold']}, max {p['max_epochs']} epochs/stage"]
  rows = []
  for side in ("wsjax", "wsjax_diagnostics", "torch"):
    if side not in s:
      continue
    parts = result["runs"][side][0].get("parts_s", {})
    seed_steps = sum(m["total_steps"] for m in result["runs"][side][0]["methods"].values())
    rows.append([side, len(result["runs"][side]), s[side]["wall_s"], s[side].get("compile_s"),
                 1000 * s[side].get("wall_minus_compile_s", s[side]["wall_s"]) / seed_steps,
                 s[side].get("wall_minus_compile_s"), parts.get("train_loops"),
                 parts.get("diagnostics"), parts.get("snapshots"),
                 s[side]["peak_rss_mb"]])
  lines.append(common.table(rows, ["side", "runs", "wall s", "compile s", "ms/seed-step",
                                   "wall-compile s", "train loops s", "diagn. s",
                                   "snapshots s", "peak RSS MiB"]))
  rows = []
  for side in ("wsjax", "torch"):
    if not result["runs"][side]:
      continue
    for m, r in result["runs"][side][0]["methods"].items():
      rows.append([side, m, r["final_test_acc"], r["total_steps"]])
  lines.append(common.table(rows, ["side", "method", "final test acc", "steps (all seeds)"]))
  if "speedup_wsjax_vs_torch" in s:
    lines.append(f"wsjax end to end: {s['speedup_wsjax_vs_torch']:.2f}x PyTorch's speed "
                 f"({s['speedup_excluding_compile']:.2f}x without compilation"
                 + (f", {s['speedup_with_diagnostics']:.2f}x with diagnostics on"
                    if "speedup_with_diagnostics" in s else "") + ")")
  return "\n".join(lines)
