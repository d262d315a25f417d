"""The compiled block: steps lower the loss, replicas under vmap equal replicas
one by one, stopped replicas are frozen, 8 simulated devices equal 1, the
CPU device layout."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from wsjax import parallel
from wsjax.core.optim import OptimizerConfig, make_optimizer
from wsjax.core.program import Program, chunk_layout, make_train_step
from wsjax.core.state import create_state, seed_keys
from wsjax.core.task import Task
from wsjax.data import epoch_batches, load_dataset
from wsjax.models import get_model, make_init_fn

from conftest import REPO


@pytest.fixture(scope="module")
def mnist1d(data_dir):
  return load_dataset("mnist1d", data_dir)


class BatchNormMLP(nn.Module):
  """A small model with BatchNorm: its statistics must be the global batch's.
  (No bias before BatchNorm: its gradient is zero up to rounding noise, which
  Adam would amplify differently on different device counts.)"""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16, use_bias=False)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(10)(nn.relu(x))


def _setup(ds, model_name="conv1d", opt="adam", lr=1e-3):
  model = BatchNormMLP() if model_name == "bn_mlp" else get_model(model_name, ds.num_classes)
  tx = make_optimizer(OptimizerConfig(name=opt, lr=lr))
  init = make_init_fn(model, ds.input_shape)
  fresh = jax.jit(jax.vmap(lambda k: create_state(init, tx, k)),
                  out_shardings=parallel.replicated())
  return model, tx, fresh


def test_train_step_lowers_the_loss(mnist1d):
  model, tx, fresh = _setup(mnist1d, lr=1e-2)
  state = jax.tree.map(lambda x: x[0], fresh(seed_keys([0], 0, 0)))
  step = jax.jit(make_train_step(model, tx, Task()))
  x, y = jnp.asarray(mnist1d.x_train[:128]), jnp.asarray(mnist1d.y_train[:128])
  losses = []
  for _ in range(30):
    state, (loss, _) = step(state, x, y, {})
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  assert int(state.step) == 30


def _run_blocks(ds, seeds, n_blocks=3, k=8, active=None, model_name="conv1d", seed_devices=1,
                programs=None, replica_chunk=None):
  """Trains `n_blocks` blocks; appends the number of compiled block programs to `programs`."""
  model, tx, fresh = _setup(ds, model_name)
  states = fresh(seed_keys(seeds, 0, 0))
  program = Program(model, tx, batch_size=64, block_steps=k, replica_devices=seed_devices,
                    replica_chunk=replica_chunk)
  x = parallel.put_replicated(ds.x_train[:1000])
  y = parallel.put_replicated(ds.y_train[:1000])
  buffer = np.arange(1000)
  order = np.stack([epoch_batches(buffer, 64, s, 0, 0) for s in seeds], 1)  # (16, S, 64)
  act = np.ones(len(seeds), bool) if active is None else active
  total = []
  for b in range(n_blocks):
    sl = order[b * k:(b + 1) * k]
    n = len(sl)
    sl = np.concatenate([sl, np.zeros((k - n, *sl.shape[1:]), sl.dtype)])
    states, steps, correct, loss = program.train_block(states, act, x, y, sl, n)
    total.append(steps)
  if programs is not None:
    programs.append(program.run_block._cache_size())
  return parallel.to_host(states), np.sum(total, 0)


def test_vmapped_replicas_equal_replicas_one_by_one(mnist1d):
  together, steps = _run_blocks(mnist1d, [0, 1, 2])
  for i, s in enumerate([0, 1, 2]):
    alone, _ = _run_blocks(mnist1d, [s])
    for a, b in zip(jax.tree.leaves(together.params), jax.tree.leaves(alone.params)):
      np.testing.assert_allclose(a[i], b[0], rtol=2e-5, atol=2e-6)
  # 2 full blocks of 8 steps (16 steps per epoch; the third block is past the end)
  np.testing.assert_array_equal(steps, [16, 16, 16])


def test_inactive_replicas_are_frozen(mnist1d):
  _, _, fresh = _setup(mnist1d)
  before = parallel.to_host(fresh(seed_keys([0, 1], 0, 0)))
  after, steps = _run_blocks(mnist1d, [0, 1], active=np.array([True, False]))
  np.testing.assert_array_equal(steps, [16, 0])
  for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params)):
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], b[0])


_EIGHT_DEVICES = r"""
import json, sys, numpy as np, jax
sys.path.insert(0, {tests!r})
from test_core_program import _run_blocks
from wsjax.data import load_dataset
ds = load_dataset("mnist1d", {data_dir!r})
out = {{"devices": jax.device_count()}}
layouts = [1, 2, 8] if jax.device_count() == 8 else [1]
out["programs"] = programs = []
for name in ("conv1d", "bn_mlp"):
  for g in layouts:
    states, steps = _run_blocks(ds, [0, 1, 2], model_name=name, seed_devices=g, programs=programs)
    out[f"{{name}}/{{g}}"] = [np.asarray(x).tolist()
                              for x in jax.tree.leaves((states.params, states.batch_stats))]
# five replicas stepped all at once, or in chunks (on 8 devices: 2 groups,
# 3 replicas a group, the last padded; chunks of 1 and of 2 pad least with 1)
for chunk in ([0] if jax.device_count() == 1 else [0, 1, 2]):
  g = 1 if jax.device_count() == 1 else 2
  states, steps = _run_blocks(ds, [0, 1, 2, 3, 4], seed_devices=g, replica_chunk=chunk)
  out[f"five/chunk{{chunk}}"] = [np.asarray(x).tolist() for x in jax.tree.leaves(states.params)]
print(json.dumps(out))
"""


def test_eight_devices_equal_one_device(data_dir):
  """The same program on 8 simulated CPU devices and on 1. On 8, three
  layouts of 3 replicas: batch split 8 ways (replica_devices=1); 2 replica
  groups of 4 devices (replicas padded to 4, each batch split 4 ways); 8
  groups (replicas padded to 8, whole batches)."""
  outs = {}
  for n in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    code = _EIGHT_DEVICES.format(tests=os.path.join(REPO, "tests"), data_dir=data_dir)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    outs[n] = json.loads(p.stdout.strip().splitlines()[-1])
  assert outs[1]["devices"] == 1 and outs[8]["devices"] == 8
  # every layout compiles its block program once: the states a block returns
  # come back with the shardings they went in with
  assert outs[1]["programs"] == [1] * 2 and outs[8]["programs"] == [1] * 6
  for name in ("conv1d", "bn_mlp"):  # bn_mlp: BatchNorm statistics over the global batch
    one = outs[1][f"{name}/1"]
    assert len(one) == (8 if name == "conv1d" else 7)  # bn_mlp: 5 params + mean, var
    for g in (1, 2, 8):
      eight = outs[8][f"{name}/{g}"]
      assert len(eight) == len(one)
      for a, b in zip(one, eight):
        assert np.asarray(a).shape[0] == 3
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for chunk in (0, 1, 2):  # replicas in chunks (padded on 8 devices) equal all at once on 1
    for a, b in zip(outs[1]["five/chunk0"], outs[8][f"five/chunk{chunk}"]):
      assert np.asarray(a).shape[0] == 5
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_replicas_in_chunks_equal_replicas_all_at_once(mnist1d):
  """On one device, 6 replicas vmapped all at once, in 3 chunks of 2 and in 2
  chunks of 3 (chunk=4: the size <= 4 that pads least, the largest on a tie)
  give the same states."""
  assert chunk_layout(6, 1, 2) == (2, 3) and chunk_layout(6, 1, 4) == (3, 2)
  together, _ = _run_blocks(mnist1d, list(range(6)), replica_chunk=0)
  for chunk in (2, 4):
    chunked, _ = _run_blocks(mnist1d, list(range(6)), replica_chunk=chunk)
    for a, b in zip(jax.tree.leaves(together.params), jax.tree.leaves(chunked.params)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("n,devices,chunk,want", [
    (6, 1, 0, None), (3, 1, 4, None),       # no chunking asked; all fit in one chunk
    (72, 2, 2, (2, 18)), (15, 2, 2, (2, 4)),  # 36 and 8 (7 + 1 padded) a device
    (5, 1, 2, (1, 5)), (5, 2, 2, (1, 3)),   # chunks of 1 pad least (2 would pad to 6, 8)
    (6, 1, 4, (3, 2)), (9, 1, 4, (3, 3)),
])
def test_chunk_layout(n, devices, chunk, want):
  assert chunk_layout(n, devices, chunk) == want


_LAYOUT = r"""
import json, os, jax
from wsjax import parallel
set_to = parallel.use_cpu_devices(0, at_most={at_most})
print(json.dumps({{"set": set_to, "devices": jax.device_count(),
                  "groups": {{s: parallel.default_seed_devices(s) for s in (1, 2, 3, 5, 8)}},
                  "mesh": dict(parallel.seed_data_mesh(parallel.default_seed_devices(3)).shape)}}))
"""


@pytest.mark.parametrize("xla_flags,at_most,want_devices", [
    ("", 1, 1),                                                 # one replica: one device
    ("", 64, parallel.cpu_cores()),                             # one device per core
    ("--xla_force_host_platform_device_count=8", 1, 8),         # XLA_FLAGS wins
])
def test_cpu_devices_and_replica_groups(xla_flags, at_most, want_devices):
  """The CPU layout: devices per core (capped by the replicas, XLA_FLAGS
  first); replicas spread over the largest group count that divides the
  devices."""
  env = dict(os.environ, XLA_FLAGS=xla_flags)
  p = subprocess.run([sys.executable, "-c", _LAYOUT.format(at_most=at_most)], env=env,
                     capture_output=True, text=True, timeout=300, cwd=REPO)
  assert p.returncode == 0, p.stderr[-2000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["devices"] == want_devices
  assert out["set"] == (None if xla_flags else want_devices)
  n = want_devices
  if n == 8:  # replicas -> groups: the largest divisor of 8 that is <= the replicas
    assert out["groups"] == {"1": 1, "2": 2, "3": 2, "5": 4, "8": 8}
  elif n == 1:
    assert set(out["groups"].values()) == {1}
  g3 = out["groups"]["3"]
  assert out["mesh"] == {"seeds": g3, "data": n // g3}
  with pytest.raises(ValueError, match="does not divide"):
    parallel.seed_data_mesh(3) if jax.device_count() % 3 else parallel.seed_data_mesh(0)
