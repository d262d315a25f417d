"""Instability analysis on the training core (wsjax.studies.instability), in
process, tiny: copies of the state at k with their own data orders, the
barriers between them, IMP masks from a stored lottery run or computed."""
import jax
import numpy as np
import pytest

from wsjax import parallel
from wsjax import pruning
from wsjax.analysis import interpolation
from wsjax.core import store as store_lib
from wsjax.core.loop import Until, train
from wsjax.core.optim import OptimizerConfig
from wsjax.core.state import unstack
from wsjax.studies import lottery
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig
from wsjax.studies.instability import (COPY_SALT, InstabilityConfig, InstabilityStudy,
                                       copy_data_seeds)

RUNNER = RunnerConfig(block_steps=8, progress=False, seed_devices=1)


def _cfg(data_dir, **kw):
  base = dict(model=ModelConfig(name="mlp", widths=(16, 16)),
              data=DataConfig(dataset="mnist1d", data_dir=data_dir, batch_size=64),
              optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9),
              training_steps="20it", rewind_steps=("0it", "7it"), seeds=2, copies=3, points=5,
              imp_levels=(1,))
  base.update(kw)
  return InstabilityConfig(**base)


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory):
  logs = []
  s = InstabilityStudy(_cfg(data_dir), str(tmp_path_factory.mktemp("inst")), RUNNER,
                       log=logs.append)
  s.logs = logs
  return s


def _host(tree):
  return jax.device_get(parallel.to_host(tree))


def test_copies_start_alike_train_on_their_own_orders_and_their_barriers(study):
  ctx = study.ctx
  rec = study.measure("none", 7, 0)
  run = store_lib.load_run(f"{ctx.store.root}/{rec['run']}")
  assert run.spec["copies"] == 3 and run.spec["level"] == 0 and run.spec["rewind_step"] == 7
  assert rec["steps"] == [13] * 6 and len(rec["test_acc"]) == 6
  init = _host(run.load_snapshot("init", ctx.template(6)))
  final = _host(run.load_snapshot("final", ctx.template(6)))
  theta_k = _host(ctx.points["none"].states(7))
  for c in range(6):  # seed-major: rows 0-2 copy seed 0's state at k, rows 3-5 seed 1's
    for a, b in zip(jax.tree.leaves(unstack(init.params, c)),
                    jax.tree.leaves(unstack(theta_k.params, c // 3))):
      np.testing.assert_array_equal(a, b)
  kernels = final.params["dense1"]["kernel"]
  assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[3], kernels[4])
  # copy 1 of seed 0 trained alone on its own order gives its final weights
  assert copy_data_seeds((0, 1), 3) == [0, 1, 2, 1000, 1001, 1002]
  alone, _ = train(parallel.put_replicated(jax.tree.map(lambda x: x[1:2], init)),
                   ctx.setting.program(), ctx.train_data(salt=(COPY_SALT,)), Until.steps(20),
                   data_seeds=[1], start=7)
  for a, b in zip(jax.tree.leaves(_host(alone).params),
                  jax.tree.leaves(jax.tree.map(lambda x: x[1:2], final.params))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  # the barriers: every pair of a seed's copies, against the path between two of them
  result = run.result()
  assert result["pairs"] == [[0, 1], [0, 2], [1, 2]]
  d = ctx.setting.dataset
  line = interpolation.line_barriers(ctx.setting.model, unstack(final.params, 4),
                                     unstack(final.params, 5), (d.x_train, d.y_train, d.x_test,
                                                                d.y_test), n_points=5)
  for m in interpolation.METRICS:
    path = np.asarray(result["paths"][m][1][2])                     # seed 1, pair (1, 2)
    np.testing.assert_allclose(path, line[m], rtol=1e-5, atol=1e-6)
    barrier = path.max() - (path[0] + path[-1]) / 2
    assert result["barriers"][m][1][2] == pytest.approx(barrier, abs=1e-6)
    per_seed = [np.mean(b) for b in result["barriers"][m]]
    assert rec["barrier"][m]["mean"] == pytest.approx(np.mean(per_seed))
    assert rec["barrier"][m]["std"] == pytest.approx(np.std(per_seed))
  assert rec["alphas"] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
  assert study.measure("none", 7, 0) == rec  # loaded, not retrained


def test_imp_masks_come_from_a_stored_lottery_run_else_are_computed(study):
  ctx = study.ctx
  points = ctx.points["none"]
  # k = 0: no lottery run in the store: level 0 of IMP (alone) is trained,
  # its final weights pruned
  masks, origin = study.imp_masks("none", 0, 1)
  level0 = store_lib.load_run(f"{ctx.store.root}/{origin['mask_from']}")
  assert level0.spec["protocol"] == "lottery" and level0.spec["variants"] == ["imp"]
  final = _host(level0.load_snapshot("final", ctx.template(2)))
  for i in range(2):
    want = pruning.global_magnitude_prune(unstack(final.params, i), None, 0.2, model_name="mlp")
    for a, b in zip(jax.tree.leaves(unstack(masks, i)), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  assert "found_in" not in origin
  # k = 7: a lottery lineage with a control ran first: its stored masks are used
  lineage = lottery.Lineage(ctx, points, 7, ("imp", "random_pruning"), 0.2)
  lineage.run_level(0)
  rec = lineage.run_level(1)
  masks, origin = study.imp_masks("none", 7, 1)
  assert origin["found_in"] == rec["run"]
  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(lineage.imp_masks)):
    np.testing.assert_array_equal(a, b)
  assert any("from the stored lottery run" in m for m in study.logs)
  # the subnetwork's copies train under that mask
  out = study.measure("none", 7, 1)
  run = store_lib.load_run(f"{ctx.store.root}/{out['run']}")
  assert run.spec["mask"] == origin and run.spec["prune_fraction"] == 0.2
  final = _host(run.load_snapshot("final", ctx.template(6)))
  kept = np.repeat(masks["dense1"]["kernel"], 3, axis=0)
  assert np.all(final.params["dense1"]["kernel"][~kept] == 0)
  assert np.all(final.params["dense1"]["kernel"][kept] != 0)
  assert out["steps"] == [13] * 6


@pytest.mark.parametrize("change,message", [
    (dict(copies=1), "--copies must be in [2, 1000]"),
    (dict(points=1), "--points must be >= 2"),
    (dict(imp_levels=(0,)), "--imp_levels must be >= 1"),
    (dict(imp_levels=(2, 2)), "--imp_levels repeats"),
    (dict(prune_fraction=1.2), "(0, 1)"),
    (dict(rewind_steps=("0it", "20it")), "not before the end of training"),
])
def test_bad_configurations_are_one_line_errors(data_dir, tmp_path, change, message):
  with pytest.raises(ValueError) as e:
    InstabilityStudy(_cfg(data_dir, **change), str(tmp_path), RUNNER, log=lambda m: None)
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "runs").exists()
