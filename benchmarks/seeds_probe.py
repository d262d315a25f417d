"""Can vmapped seeds use both CPU cores? Seeds sharded over host devices.

    python -m benchmarks.run --only=seeds_probe

XLA:CPU runs the small models' steps on about one core. This probe times a
plain `lax.scan` over one epoch (32 steps, batch 128) of the vmapped
`wsjax.train.steps.make_train_step`, with:

* 1 seed on 1 device; 8 seeds on 1 device (what `Stepper` does);
* 8 seeds on N host devices (`--xla_force_host_platform_device_count=N`,
  N = the cores), the stacked states and index arrays sharded along the
  SEED axis, so each device trains its own seeds. (wsjax's `Stepper` shards
  the batch instead.)

Not wsjax's code path: a measurement of what sharding seeds would give.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks import common

MODELS = ("conv1d", "mlp")
SEEDS = 8
BATCH = 128


class SeedScan:
  """One epoch per call of `seeds` vmapped seeds, seed axis sharded over devices."""

  def __init__(self, model: str, seeds: int):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from wsjax.data import epoch_batches, load_dataset
    from wsjax.models import get_model
    from wsjax.train.optim import OptimizerConfig, make_optimizer
    from wsjax.train.state import create_state, make_variables_init, seed_keys
    from wsjax.train.steps import make_train_step

    ds = load_dataset("mnist1d")
    net = get_model(model, ds.num_classes)
    tx = make_optimizer(OptimizerConfig(name="sgd", lr=1e-2, momentum=0.9))
    n_dev = len(jax.devices()) if seeds % len(jax.devices()) == 0 else 1
    mesh = Mesh(np.asarray(jax.devices()[:n_dev]), ("seeds",))
    by_seed, rep = NamedSharding(mesh, P("seeds")), NamedSharding(mesh, P())
    init = make_variables_init(net, ds.input_shape)
    self.states = jax.jit(jax.vmap(lambda k: create_state(init, tx, k)),
                          out_shardings=by_seed)(seed_keys(range(seeds), 0))
    x = jax.device_put(ds.x_train, rep)
    y = jax.device_put(ds.y_train.astype(np.int32), rep)
    step = jax.vmap(make_train_step(net, tx), in_axes=(0, 0, 0, None))

    def epoch(states, idx):
      def body(s, i):
        s, (loss, _) = step(s, x[i], y[i], None)
        return s, loss
      return jax.lax.scan(body, states, idx)
    self.epoch = jax.jit(epoch, donate_argnums=(0,))
    idx = np.stack([epoch_batches(np.arange(len(ds.y_train)), BATCH, s, 0, 0)
                    for s in range(seeds)], 1)
    self.idx = jax.device_put(idx, NamedSharding(mesh, P(None, "seeds")))
    self.steps = idx.shape[0]
    for _ in range(2):
      self.run(1)
    self.info = {"devices": n_dev, "seeds": seeds}

  def run(self, epochs: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(epochs):
      self.states, loss = self.epoch(self.states, self.idx)
    loss.block_until_ready()
    return {"seconds": time.perf_counter() - t0, "steps": epochs * self.steps}


def run(quick: bool = False) -> dict:
  cores = common.cpu_count()
  epochs, rounds = (8, 2) if quick else (32, 3)
  result = {"benchmark": "seeds_probe", "environment": common.environment(), "quick": quick,
            "seeds": SEEDS, "host_devices": cores, "epochs_per_run": epochs, "models": {}}
  devices_flag = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={cores}"}
  for name in MODELS:
    common.log(f"seeds_probe: {name} ...")
    sides = {
        "1_seed_1_device": common.Worker("benchmarks.seeds_probe:SeedScan", model=name, seeds=1),
        f"{SEEDS}_seeds_1_device": common.Worker("benchmarks.seeds_probe:SeedScan", model=name,
                                                 seeds=SEEDS),
        f"{SEEDS}_seeds_{cores}_devices": common.Worker(
            "benchmarks.seeds_probe:SeedScan", env=devices_flag, model=name, seeds=SEEDS)}
    try:
      runs = common.alternate(sides, "run", rounds, epochs)
      out = {s: {"ms_per_step": 1000 * common.median([r["seconds"] / r["steps"] for r in v]),
                 "info": sides[s].info} for s, v in runs.items()}
      one = out["1_seed_1_device"]["ms_per_step"]
      for s in out:
        out[s]["wall_ratio_vs_1_seed"] = out[s]["ms_per_step"] / one
      result["models"][name] = out
    finally:
      for w in sides.values():
        w.close()
  return result


def report(result: dict) -> str:
  rows = []
  for name, m in result["models"].items():
    for side, v in m.items():
      rows.append([name, side, v["ms_per_step"], f"{v['wall_ratio_vs_1_seed']:.2f}x"])
  return common.table(rows, ["model", "setting", "ms/step", "wall vs 1 seed"])
