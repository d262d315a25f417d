"""wsjax.studies.curves: curves trained through the core (CurveTask), evaluated
with BatchNorm recomputed at every t, stored and resumed like any run."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import toy_setting
from wsjax import parallel, schedules
from wsjax.analysis import curves as curve_math
from wsjax.analysis import interpolation
from wsjax.core import hooks as hooks_lib
from wsjax.core.loop import Preempted
from wsjax.core.store import RunStore
from wsjax.core.task import CurveTask
from wsjax.data import load_dataset
from wsjax.models import layers
from wsjax.studies import curves
from wsjax.studies.common import DataConfig, RunnerConfig


class TinyBN(nn.Module):
  """flatten -> Dense -> BatchNorm -> ReLU -> Dense(head): BatchNorm, compiled in seconds."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(16, name="dense1")(x)
    x = layers.batch_norm(train, "torch", name="bn1")(x)
    x = nn.relu(x)
    return nn.Dense(10, name=layers.HEAD)(x)


def _endpoints(setting):
  """Two networks: the fresh replicas 0 and 1 of the setting's seeds."""
  both = curves.Endpoints({"params": parallel.to_host(setting.fresh_states(0).params)}, None)
  return both.take([0], "a"), both.take([1], "b")


@pytest.fixture(scope="module")
def bn_setting(data_dir):
  """What CurveTrainer reads of a Setting, for TinyBN on digits (8x8x1)."""
  d = load_dataset("digits", data_dir)
  model = TinyBN()
  return types.SimpleNamespace(
      model=model, dataset=d, x_train=parallel.put_replicated(d.x_train),
      y_train=parallel.put_replicated(d.y_train.astype(np.int32)),
      x_test=parallel.put_replicated(d.x_test),
      y_test=parallel.put_replicated(d.y_test.astype(np.int32)),
      data_cfg=DataConfig(dataset="digits", batch_size=64),
      runner=RunnerConfig(block_steps=8, progress=False, seed_devices=1),
      init=jax.jit(lambda key: model.init(key, jnp.zeros((1, 8, 8, 1)))))


def _bn_endpoints(s):
  """Two networks (different inits, BatchNorm affine moved off 1 / 0)."""
  ends = []
  for seed in (0, 1):
    v = jax.tree.map(np.asarray, s.init(jax.random.key(seed)))
    v["params"]["bn1"] = {"scale": v["params"]["bn1"]["scale"] + 0.3 * (seed + 1),
                          "bias": v["params"]["bn1"]["bias"] - 0.2 * (seed + 1)}
    ends.append(curves.Endpoints(jax.tree.map(lambda x: x[None], dict(v)), f"seed {seed}"))
  return ends


@pytest.fixture(scope="module")
def bn_curve(bn_setting, tmp_path_factory):
  """A curve trained 2 epochs between two BatchNorm networks: (trainer, ends, cfg, result)."""
  start, end = _bn_endpoints(bn_setting)
  trainer = curves.CurveTrainer(bn_setting, RunStore(tmp_path_factory.mktemp("store")),
                                {"test": "bn"}, log=lambda m: None)
  cfg = curves.CurveConfig(lr=0.05, points=5)
  steps = 2 * trainer.data.steps_per_epoch
  result = trainer.train(start, end, cfg, steps, [0])
  return trainer, start, end, cfg, result


def test_curve_task_loss_and_gradient_equal_curve_loss(bn_setting):
  """The core's CurveTask draws t from its key and computes what
  wsjax.analysis.curves.curve_loss computes at that t (BatchNorm in train
  mode, l2 of phi(t) over every trainable leaf)."""
  s = bn_setting
  start, end = _bn_endpoints(s)
  a = jax.tree.map(lambda x: x[0], start.variables["params"])
  b = jax.tree.map(lambda x: x[0], end.variables["params"])
  curve = curve_math.Curve("bezier", 4)
  middle, ends = curve.init(a, b)
  middle = jax.tree.map(lambda m: m + 0.05 * jnp.sign(m), middle)  # off the segment
  stats = jax.tree.map(lambda x: x[0], start.variables["batch_stats"])
  x, y = s.x_train[:32], s.y_train[:32]
  key = jax.random.key(5)
  task = CurveTask(curve, weight_decay=3e-3)

  def task_loss(m):
    total, (ce, _, new_stats, _) = task.loss(s.model, m, stats, x, y, {"endpoints": ends}, key)
    return total, (ce, new_stats)

  t_key, _ = jax.random.split(key)
  t = jax.random.uniform(t_key, ())

  def reference(m):
    total, aux = curve.loss(s.model, m, ends, stats, x, y, t, 3e-3)
    return total, (aux.cross_entropy, aux.batch_stats)

  (got, (ce, new_stats)), grad = jax.value_and_grad(task_loss, has_aux=True)(middle)
  (want, (ce_ref, ref_stats)), grad_ref = jax.value_and_grad(reference, has_aux=True)(middle)
  assert 0.0 < float(t) < 1.0
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(ce, ce_ref, rtol=1e-6)
  assert float(got) > float(ce)  # the l2 term is there
  for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_ref)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
  for g, r in zip(jax.tree.leaves(new_stats), jax.tree.leaves(ref_stats)):
    np.testing.assert_allclose(g, r, rtol=1e-6)


def test_curve_optimizer_is_momentum_sgd_with_the_reference_schedule():
  cfg = curves.CurveConfig(lr=0.2, momentum=0.0)
  tx = curves.curve_optimizer(cfg, total_steps=100, steps_per_epoch=10)
  g = {"w": jnp.ones((3,))}
  state = tx.init(g)
  for step in (0, 45, 49, 50, 75, 95):
    updates, _ = tx.update(g, state, g, step=jnp.asarray(step))
    want = schedules.mode_connectivity_schedule(0.2, 100, 10)(step)
    np.testing.assert_allclose(updates["w"], -float(want) * np.ones(3), rtol=1e-6)
  # constant for the first half (epochs 1..5), 1% of lr from 90% on
  assert float(schedules.mode_connectivity_schedule(0.2, 100, 10)(39)) == pytest.approx(0.2)
  assert float(schedules.mode_connectivity_schedule(0.2, 100, 10)(95)) == pytest.approx(0.002)


def test_trained_curve_ends_equal_the_endpoints_with_recomputed_batch_norm(bn_setting, bn_curve):
  """t = 0 and t = 1 of the trained curve are the endpoints exactly: their
  train/test loss and error with BatchNorm statistics recomputed equal the
  endpoints' evaluated the same way (interpolation.evaluate_path)."""
  s = bn_setting
  trainer, start, end, cfg, result = bn_curve
  splits = (s.x_train, s.y_train, s.x_test, s.y_test)
  both = jax.tree.map(lambda a, b: np.concatenate([a, b]), start.variables["params"],
                      end.variables["params"])
  ends = interpolation.evaluate_path(s.model, both, *splits, bn_batch_size=64)
  assert result["ts"][0] == 0.0 and result["ts"][-1] == 1.0 and len(result["ts"]) == 5
  for m in curves.METRICS:
    path = np.asarray(result["curve"][m])[0]
    np.testing.assert_allclose(path[[0, -1]], ends[m], rtol=1e-6, atol=1e-7)
    line = np.asarray(result["line"][m])[0]
    np.testing.assert_allclose(line[[0, -1]], ends[m], rtol=1e-6, atol=1e-7)
  # the stored running statistics are NOT the recomputed ones: without the
  # recompute the endpoint's error differs (the reason for recomputing)
  stale = interpolation.evaluate_path(s.model, start.variables, *splits, recompute_bn=False)
  assert abs(float(stale["test_loss"][0]) - float(ends["test_loss"][0])) > 1e-3
  # the curve moved off the line: its middle differs from the line's
  assert not np.allclose(np.asarray(result["curve"]["train_loss"])[0, 2],
                         np.asarray(result["line"]["train_loss"])[0, 2])
  # barriers as defined with the interpolation
  for path in ("curve", "line"):
    values = np.asarray(result[path]["test_error"])
    np.testing.assert_allclose(result["barriers"][path]["test_error"],
                               values.max(1) - 0.5 * (values[:, 0] + values[:, -1]), atol=1e-7)


def test_line_evaluation_equals_the_interpolation_module(bn_setting, bn_curve):
  s = bn_setting
  _, start, end, _, result = bn_curve
  one = lambda e: jax.tree.map(lambda x: x[0], e.variables["params"])  # noqa: E731
  want = interpolation.line_barriers(s.model, one(start), one(end),
                                     (s.x_train, s.y_train, s.x_test, s.y_test), n_points=5,
                                     bn_batch_size=64)
  for m in curves.METRICS:
    np.testing.assert_allclose(np.asarray(result["line"][m])[0], want[m], rtol=1e-5, atol=1e-6)
    assert result["barriers"]["line"][m][0] == pytest.approx(want["barriers"][m], abs=1e-5)


def test_an_untrained_bezier_curve_is_the_line(data_dir):
  s = toy_setting(data_dir, seeds=(0, 1))
  start, end = _endpoints(s)
  curve = curve_math.Curve("bezier", 3)
  ends = jax.tree.map(lambda a, b: np.stack([a, b], 1), start.variables["params"],
                      end.variables["params"])
  middle = jax.vmap(lambda e: curve.init(jax.tree.map(lambda x: x[0], e),
                                         jax.tree.map(lambda x: x[1], e))[0])(ends)
  splits = (s.x_train, s.y_train, s.x_test, s.y_test)
  ts = np.linspace(0, 1, 7)
  on_curve = curves.evaluate_curves(s.model, curve, middle, ends, splits, ts, chunk=4)
  on_line = curves.evaluate_lines(s.model, start.variables["params"], end.variables["params"],
                                  splits, ts, chunk=3)
  for m in curves.METRICS:
    assert on_curve[m].shape == (1, 7)
    np.testing.assert_allclose(on_curve[m], on_line[m], rtol=1e-5, atol=2e-6)


def test_a_curve_run_is_reused_and_a_stopped_one_resumes_to_the_same_curve(bn_setting, bn_curve,
                                                                           tmp_path):
  s = bn_setting
  trainer, start, end, cfg, whole = bn_curve
  steps = 2 * trainer.data.steps_per_epoch
  logs = []
  again = curves.CurveTrainer(s, trainer.store, {"test": "bn"}, log=logs.append)
  assert again.train(start, end, cfg, steps, [0])["reused"]
  assert any("reusing finished run" in line for line in logs)
  # stopped (as by SIGTERM) after its first block, checkpointed, resumed
  store = RunStore(tmp_path / "stopped")
  stopped = curves.CurveTrainer(s, store, {"test": "bn"}, log=logs.append)
  hooks_lib.request_stop()
  try:
    with pytest.raises(Preempted):
      stopped.train(start, end, cfg, steps, [0])
  finally:
    hooks_lib.clear_stop()
  run_dir = next((tmp_path / "stopped").iterdir())
  assert not (run_dir / "DONE").exists() and (run_dir / "checkpoints").is_dir()
  resumed = stopped.train(start, end, cfg, steps, [0])
  assert any("resuming" in line for line in logs)
  assert not resumed["reused"] and resumed["steps"] == [steps]
  for key in ("curve", "line", "barriers"):
    assert resumed[key] == whole[key]  # bit-identical on the CPU


def test_endpoints_of_different_models_name_the_paths(data_dir, tmp_path):
  small = toy_setting(data_dir, widths=(8,))
  wide = toy_setting(data_dir, widths=(16,))
  a = curves.Endpoints({"params": parallel.to_host(small.fresh_states(0).params)}, None)
  b = curves.Endpoints({"params": parallel.to_host(wide.fresh_states(0).params)}, None)
  with pytest.raises(ValueError, match="different models") as e:
    curves.check_same_model(a, b)
  message = str(e.value)
  assert "dense1/kernel" in message and "head/kernel" in message and "\n" not in message
  trainer = curves.CurveTrainer(small, RunStore(tmp_path), {}, log=lambda m: None)
  with pytest.raises(ValueError, match="dense1/bias"):
    trainer.train(a, b, curves.CurveConfig(), 8, [0, 1])
  assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("ref, want", [("R@final", ("R@final", None)), ("R@step_5:3", ("R@step_5", 3)),
                                       ("/a/run_x@init:0", ("/a/run_x@init", 0))])
def test_endpoint_references(ref, want):
  assert curves.parse_endpoint(ref) == want


@pytest.mark.parametrize("field, value, flag", [("bends", 2, "--curve_bends"),
                                                ("kind", "spline", "kind"),
                                                ("lr", 0.0, "--curve_lr"),
                                                ("points", 1, "--curve_points"),
                                                ("epochs", -1, "--curve_epochs")])
def test_bad_curve_settings_are_one_line_errors(field, value, flag):
  with pytest.raises(ValueError, match=flag) as e:
    curves.CurveConfig(**{field: value}).validate()
  assert "\n" not in str(e.value)
