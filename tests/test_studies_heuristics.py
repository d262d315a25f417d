"""wsjax.studies.heuristics and its pieces: SGDR snapshots at the restarts, the
distillation task against a hand computation, the freeze-last-layers control,
layers in depth order and paired by depth, one-line errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_setting
from wsjax import parallel, schedules
from wsjax import tree as wtree
from wsjax.core.data import TrainData
from wsjax.core.loop import Until, train
from wsjax.core.optim import OptimizerConfig, learning_rate
from wsjax.core.store import RunStore
from wsjax.core.task import Distillation
from wsjax.models import get_model, init_variables
from wsjax.studies import heuristics, representations
from wsjax.studies.common import RunnerConfig
from wsjax.transforms.freeze import freeze, frozen_optimizer

RUNNER = RunnerConfig(block_steps=8, progress=False, seed_devices=1)


def _shapes(model, input_shape):
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), input_shape))


def _tiny(study, data_dir, **flags):
  base = {"data_dir": data_dir, "channels": 4, "seeds": 2, "cca_examples": 40}
  return heuristics.study_config(study, **{**base, **flags})


# ---- SGDR -------------------------------------------------------------------------------
def test_sgdr_study_snapshots_at_the_restarts_and_compares_them(data_dir, tmp_path):
  """The SGDR run keeps its iterates at the ends of its cycles (1, 3 and 7
  epochs for T0 = 1 epoch, Tmult = 2), where the rate has annealed and is
  back at its peak one step later; step decay runs the same budget from the
  same initializations; lines between the iterates and between the seeds'
  final iterates are evaluated at every t, CCA per layer."""
  cfg = _tiny("sgdr", data_dir, epochs=7, sgdr_t0_epochs=1, batch_size=400, sgdr_curves=False,
              curve_points=4)
  study = heuristics.HeuristicsStudy(cfg, tmp_path, RUNNER, log=lambda m: None)
  out = study.run()
  assert out["steps_per_epoch"] == 10  # 4,000 examples / 400
  assert out["cycle_ends"] == [10, 30, 70] and out["total_steps"] == 70
  run = RunStore(tmp_path / "runs").find(out["runs"]["sgdr"])
  assert set(run.snapshots()) == {"init", "step_10", "step_30", "step_70", "final"}
  impl = study.impl
  for c in out["cycle_ends"]:
    states = run.load_snapshot(f"step_{c}", impl.sgdr_setting.template())
    assert np.asarray(states.step).tolist() == [c, c]
  lr = learning_rate(impl.sgdr_opt, np.asarray([0, 9, 10, 29, 30, 69]), horizon=70)
  np.testing.assert_allclose(np.asarray(lr)[[0, 2, 4]], 0.05)      # restarts: the peak
  assert (np.asarray(lr)[[1, 3, 5]] < 0.05 * 0.03).all()           # cycle ends: annealed
  assert impl.step_opt.decay_boundaries == (35, 52)
  # the same initializations: both runs stored their init, equal
  init_a = run.load_snapshot("init", impl.sgdr_setting.template()).params
  step_run = RunStore(tmp_path / "runs").find(out["runs"]["step_decay"])
  init_b = step_run.load_snapshot("init", impl.step_setting.template()).params
  for a, b in zip(jax.tree.leaves(init_a), jax.tree.leaves(init_b)):
    np.testing.assert_array_equal(a, b)
  assert [p["kind"] for p in out["pairs"]] == ["iterates", "iterates", "independent"]
  groups = out["paths"]["groups"]
  assert len(groups) == 3 and len(out["paths"]["ts"]) == 4
  for g in groups:
    assert g["line"]["barrier"]["test_error"]["mean"] >= 0
  assert out["similarity"]["layers"] == ["relu1", "relu2", "relu3"]
  for layer in out["similarity"]["layers"]:
    assert len(out["similarity"]["iterates"][layer]) == 2
    for s in out["similarity"]["iterates"][layer]:
      assert len(s["per_seed"]) == 2 and all(0 <= v <= 1 + 1e-6 for v in s["per_seed"])


def test_sgdr_budget_without_two_cycles_is_a_one_line_error(data_dir, tmp_path):
  cfg = _tiny("sgdr", data_dir, epochs=2, sgdr_t0_epochs=2)
  with pytest.raises(ValueError, match="1 complete SGDR cycle") as e:
    heuristics.HeuristicsStudy(cfg, tmp_path, RUNNER, log=lambda m: None)
  assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


def test_sgdr_values_at_restarts():
  lr = schedules.sgdr(0.1, 10, 2)
  steps = np.asarray([0, 9, 10, 29, 30, 69, 70])
  values = np.asarray(jax.vmap(lr)(jnp.asarray(steps)))
  np.testing.assert_allclose(values[[0, 2, 4, 6]], 0.1)
  # last step of cycle i (length 10 * 2^i): 0.05 (1 + cos(pi (T_i - 1) / T_i))
  for k, length in zip((1, 3, 5), (10, 20, 40)):
    assert values[k] == pytest.approx(0.05 * (1 + np.cos(np.pi * (length - 1) / length)), abs=1e-8)
  assert schedules.sgdr_cycle_ends(10, 2, 150) == (10, 30, 70, 150)


# ---- distillation -------------------------------------------------------------------------
def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def test_distillation_task_loss_equals_a_hand_computation(data_dir):
  student = toy_setting(data_dir, widths=(8,))
  teacher_model = get_model("mlp", 10, widths=(32,))
  teacher = init_variables(teacher_model, jax.random.key(3), (40, 1))
  params = jax.tree.map(lambda x: x[0], student.fresh_states(0).params)
  x, y = student.x_train[:16], student.y_train[:16]
  task = Distillation(teacher=teacher_model, temperature=3.0, alpha=0.7)
  total, (ce, logits, _, labels) = task.loss(student.model, params, {}, x, y,
                                             {"teacher": teacher}, jax.random.key(0))
  s = np.asarray(student.model.apply({"params": params}, x), np.float64)
  t = np.asarray(teacher_model.apply(teacher, x), np.float64)
  yy = np.asarray(y)
  hard = -np.log(_softmax(s)[np.arange(16), yy]).mean()
  p, q = _softmax(t / 3.0), _softmax(s / 3.0)
  kl = (p * (np.log(p) - np.log(q))).sum(-1).mean()
  np.testing.assert_allclose(float(total), 0.3 * hard + 0.7 * 9.0 * kl, rtol=1e-5)
  np.testing.assert_allclose(float(ce), hard, rtol=1e-5)
  np.testing.assert_array_equal(labels, y)
  # no gradient reaches the teacher: the task's loss does not depend on it through grad
  grad = jax.grad(lambda tv: task.loss(student.model, params, {}, x, y, {"teacher": tv},
                                       jax.random.key(0))[0])(teacher)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad))


def test_distillation_study_trains_students_with_and_without_the_teacher(data_dir, tmp_path):
  cfg = _tiny("distillation", data_dir, epochs=1, teacher_scale=2, batch_size=200)
  study = heuristics.HeuristicsStudy(cfg, tmp_path, RUNNER, log=lambda m: None)
  assert study.impl.teacher_model.channels == 8
  out = study.run()
  assert out["layer_pairs"] == [["relu1", "relu1"], ["relu2", "relu2"], ["relu3", "relu3"]]
  for name in ("student", "distilled"):
    for layer, _ in out["layer_pairs"]:
      assert len(out["similarity"][name][layer]["per_seed"]) == 2
  gain = out["similarity_gain"]["relu3"]["per_seed"]
  want = np.subtract(out["similarity"]["distilled"]["relu3"]["per_seed"],
                     out["similarity"]["student"]["relu3"]["per_seed"])
  np.testing.assert_allclose(gain, want)
  # the two students started from the same init; distillation changed the result
  runs = RunStore(tmp_path / "runs")
  a = runs.find(out["runs"]["student"]).load_snapshot("init", study.impl.student.template())
  b = runs.find(out["runs"]["distilled"]).load_snapshot("init", study.impl.student.template())
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  assert out["test_acc"]["student"] != out["test_acc"]["distilled"]
  # a stored teacher is taken as it is (not retrained), and names the same
  # distilled run as the teacher trained here: nothing is retrained, the
  # teacher's activations come from the loaded snapshot, same similarities
  teacher_run = [r for r in runs.runs() if r["label"] == "heuristics/teacher"][0]["dir"]
  cfg2 = _tiny("distillation", data_dir, epochs=1, teacher_scale=2, batch_size=200,
               teacher=f"{teacher_run}@final")
  logs = []
  out2 = heuristics.HeuristicsStudy(cfg2, tmp_path, RUNNER, log=logs.append).run()
  assert out2["runs"] == out["runs"] and out2["teacher"] == out["teacher"]
  assert not any("heuristics/teacher" in line for line in logs)
  assert sum("reusing finished run" in line for line in logs) == 2
  assert out2["similarity"] == out["similarity"]
  assert out2["test_acc"]["teacher"]["per_seed"] == pytest.approx(
      out["test_acc"]["teacher"]["per_seed"], abs=1e-6)
  # a missing teacher snapshot: one line naming what there is
  cfg3 = _tiny("distillation", data_dir, teacher=f"{teacher_run}@step_3", teacher_scale=2)
  with pytest.raises(ValueError, match="--teacher .* has no snapshot 'step_3'.*final"):
    heuristics.HeuristicsStudy(cfg3, tmp_path, RUNNER, log=lambda m: None)


def test_wider_teachers_of_each_family():
  mlp = heuristics.ModelConfig(name="mlp", widths=(8, 4))
  assert heuristics.wider(mlp, get_model("mlp", 10, widths=(8, 4)), 3).widths == (24, 12)
  conv = heuristics.ModelConfig(name="conv1d")
  assert heuristics.wider(conv, get_model("conv1d", 10), 4).channels == 128
  with pytest.raises(ValueError, match="no wider teacher"):
    heuristics.wider(heuristics.ModelConfig(name="vgg16"), get_model("vgg16", 10), 2)


# ---- freezing -------------------------------------------------------------------------------
def test_frozen_mask_takes_the_last_layers_in_depth_order():
  x = jax.ShapeDtypeStruct((1, 40, 1), jnp.float32)
  conv = get_model("conv1d", 10)
  mask, layers = heuristics.frozen_mask(conv, _shapes(conv, (40, 1)), x, 2)
  assert layers == ["conv3", "head"]
  assert {n for n, m in wtree.named_leaves(mask) if m} == {"conv3/kernel", "conv3/bias",
                                                            "head/kernel", "head/bias"}
  vgg = get_model("vgg11_bn", 10)
  img = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  _, layers = heuristics.frozen_mask(vgg, _shapes(vgg, (32, 32, 3)), img, 2)
  assert layers == ["conv8", "bn8", "head"]
  with pytest.raises(ValueError, match="--freeze_last=5 but the model has 4 layers"):
    heuristics.frozen_mask(conv, _shapes(conv, (40, 1)), x, 5)


def test_freeze_control_keeps_the_last_layers_frozen_then_releases_them(data_dir):
  s = toy_setting(data_dir, model="conv1d", channels=4, batch_size=100)
  one = jax.tree.map(lambda a: a[0], parallel.to_host(s.fresh_states(0).params))
  x = jax.ShapeDtypeStruct((1, 40, 1), jnp.float32)
  mask, _ = heuristics.frozen_mask(s.model, {"params": one}, x, 1)
  opt = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)
  tx = frozen_optimizer(opt, None, mask, until=12)
  states = s.fresh_states(0)
  start = parallel.to_host(states.params)
  states = states.replace(opt_state=jax.jit(jax.vmap(tx.init))(states.params))
  data = TrainData(s.x_train, s.y_train, np.arange(4000), 100)
  program = s.program(None, tx)
  states, _ = train(states, program, data, Until.steps(12), data_seeds=s.seeds)
  mid = parallel.to_host(states.params)
  for name, m in wtree.named_leaves(mask):
    before, after = wtree.to_dict(start)[name], wtree.to_dict(mid)[name]
    if m:  # exactly unchanged, weight decay and momentum included
      np.testing.assert_array_equal(before, after)
    else:
      assert not np.allclose(before, after)
  states, _ = train(states, program, data, Until.steps(20), data_seeds=s.seeds, start=12)
  end = parallel.to_host(states.params)
  assert not np.allclose(wtree.to_dict(mid)["head/kernel"], wtree.to_dict(end)["head/kernel"])


def test_freeze_reads_the_global_step():
  tx = freeze({"a": True, "b": False}, until=5)
  g = {"a": jnp.ones(2), "b": jnp.ones(2)}
  state = tx.init(g)
  frozen, _ = tx.update(g, state, step=jnp.asarray(4))
  free, _ = tx.update(g, state, step=jnp.asarray(5))
  np.testing.assert_array_equal(frozen["a"], 0)
  np.testing.assert_array_equal(frozen["b"], 1)
  np.testing.assert_array_equal(free["a"], 1)


# ---- layers and similarity set-up ------------------------------------------------------------
def test_layers_come_in_depth_order_and_pair_by_depth():
  net = get_model("resnet20", 10, width=2)
  img = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  sown = representations.sown_in_order(net, _shapes(net, (8, 8, 1)), img)
  assert sown[:3] == ["relu", "layer1_0/relu1", "layer1_0/relu2"] and len(sown) == 19
  conv8 = get_model("conv8", 10, width=2)
  names = representations.sown_in_order(conv8, _shapes(conv8, (32, 32, 3)),
                                        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert names == [f"relu{i}" for i in range(1, 11)]  # relu10 last, not after relu1
  assert representations.pair_by_depth(["a", "b"], ["x", "y"]) == [("a", "x"), ("b", "y")]
  assert representations.pair_by_depth(["a", "b", "c"], ["x", "y", "z", "u", "v"]) == [
      ("a", "x"), ("b", "z"), ("c", "v")]


def test_probe_errors_name_the_layers_and_the_directions(data_dir):
  s = toy_setting(data_dir, model="conv1d", channels=4)
  shapes = jax.eval_shape(lambda: s.fresh_states(0))
  variables = {"params": shapes.params}
  cfg = representations.SimilarityConfig(layers=("relu1", "relu9"), examples=50)
  with pytest.raises(ValueError, match="unknown layer 'relu9' .* available: relu1, relu2, relu3"):
    representations.Probe(cfg, s.model, variables, s.dataset.x_train)
  cfg = representations.SimilarityConfig(measure="svcca", svcca_directions=5, examples=50)
  with pytest.raises(ValueError, match="svcca_directions=5 .* relu1 .* 4 neurons"):
    representations.Probe(cfg, s.model, variables, s.dataset.x_train)
  cfg = representations.SimilarityConfig(measure="svcca", svcca_directions=3, examples=1,
                                         spatial="pool")
  with pytest.raises(ValueError, match="cca_examples must be >= 4"):
    representations.Probe(cfg, s.model, variables, s.dataset.x_train)
  cfg = representations.SimilarityConfig(measure="svcca", svcca_directions=4, examples=3 + 1,
                                         spatial="pool")
  probe = representations.Probe(cfg, s.model, variables, s.dataset.x_train)
  assert probe.datapoints == {"relu1": 4, "relu2": 4, "relu3": 4}
  positions = representations.Probe(representations.SimilarityConfig(examples=10), s.model,
                                    variables, s.dataset.x_train)
  assert positions.datapoints == {"relu1": 200, "relu2": 100, "relu3": 50}


def test_probe_compares_like_the_similarity_module(data_dir):
  from wsjax.analysis import similarity
  s = toy_setting(data_dir, model="conv1d", channels=4)
  states = s.fresh_states(0)
  variables = {"params": parallel.to_host(states.params)}
  probe = representations.Probe(representations.SimilarityConfig(examples=30), s.model,
                                variables, s.dataset.x_train)
  acts = probe.collect(variables)
  assert acts["relu2"].shape == (2, 30 * 10, 4)
  got = probe.compare(acts["relu2"][:1], acts["relu2"][1:])
  want = similarity.cca(acts["relu2"][0], acts["relu2"][1]).mean
  np.testing.assert_allclose(got, [float(want)], rtol=1e-5)
  np.testing.assert_allclose(probe.compare(acts["relu1"], acts["relu1"]), [1.0, 1.0], atol=1e-4)


def test_study_defaults_are_applied_unless_a_flag_is_given():
  cfg = heuristics.with_study_defaults(heuristics.HeuristicsConfig(study="warmup"),
                                       given=["epochs"])
  assert cfg.data.dataset == "mnist1d_large" and cfg.data.batch_size == 100
  assert cfg.warmup.large_batch == 5000 and cfg.epochs == 150  # given: kept
  paper = heuristics.with_study_defaults(heuristics.HeuristicsConfig(study="sgdr"), (), "paper")
  assert paper.model.name == "vgg16" and paper.data.dataset == "cifar10" and paper.data.augment
  with pytest.raises(ValueError, match="unknown flags"):
    heuristics.study_config("sgdr", epoch=3)


@pytest.mark.parametrize("flags, match", [
    ({"conditions": ("large", "huge")}, "unknown condition huge"),
    ({"large_batch": 0}, "--large_batch must be >= 1"),
    ({"warmup_steps": 10}, "use --large_warmup_steps"),
])
def test_bad_warmup_settings_are_one_line_errors(flags, match):
  cfg = heuristics.study_config("warmup", **flags)
  with pytest.raises(ValueError, match=match) as e:
    cfg.validate()
  assert "\n" not in str(e.value)


def test_a_diverging_large_batch_is_reported_not_an_error(data_dir, tmp_path):
  """Without warm-up a large rate can make the loss non-finite: that replica
  is frozen and marked diverged, its seed left out of the similarities, and
  the study goes on (here every seed diverges at lr 1e30)."""
  cfg = _tiny("warmup", data_dir, dataset="mnist1d", conditions=("large",), epochs=2,
              batch_size=100, large_batch=1000, large_lr=1e30, large_warmup_steps=4,
              snapshot_every=2)
  out = heuristics.HeuristicsStudy(cfg, tmp_path, RUNNER, log=lambda m: None).run()
  large = out["conditions"]["large"]
  assert large["diverged"] == [True, True]
  assert large["consecutive"] == {} and large["to_final"] == {}
  import experiments.heuristics as program
  assert "large" in program.warmup_table(out)
