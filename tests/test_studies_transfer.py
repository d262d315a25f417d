"""The learning-transfer and weight-matching studies in-process, tiny: the
stored runs, the accuracies they report against independent evaluations of
the same networks (naive transfer rebuilt by hand), fine-tuning curves,
helpers by hand, and the checks made before anything is written."""
import dataclasses

import jax
import numpy as np
import pytest

from wsjax import parallel
from wsjax.analysis import evaluation
from wsjax.core.optim import OptimizerConfig
from wsjax.studies import learning_transfer as lt
from wsjax.studies import weight_matching as wm
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig

RUNNER = RunnerConfig(block_steps=16, progress=False, seed_devices=1)


def tiny(data_dir, **changes):
  cfg = lt.LearningTransferConfig(
      model=ModelConfig(name="mlp", widths=(16,)),
      data=DataConfig(dataset="mnist1d", data_dir=data_dir, batch_size=128),
      optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9), epochs=1,
      transfer=lt.TransferConfig(points=3), seeds=2,
      pretrain=lt.PretrainConfig(epochs=1),
      finetune=lt.FinetuneConfig(epochs=1, eval_every=10))
  return dataclasses.replace(cfg, **changes)


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lt")
  st = lt.LearningTransferStudy(tiny(data_dir), str(workdir), RUNNER, log=lambda s: None)
  return st, st.run(), workdir


def test_results_and_naive_rebuilt_by_hand(study):
  st, out, _ = study
  assert list(out["settings"]) == ["fresh", "pretrained"]
  assert out["pairs"] == [[0, 1], [2, 3]]
  for setting in out["settings"].values():
    assert list(setting["methods"]) == ["gmt", "fgmt", "naive", "oracle"]
    for name, m in setting["methods"].items():
      assert np.shape(m["test_acc"]) == np.shape(m["val_acc"]) == (2, 3)
      assert all(1 <= b <= 3 for b in m["best_point"])
      for i, b in enumerate(m["best_point"]):  # the best point is the first validation max
        assert int(np.argmax(m["val_acc"][i])) == b - 1
      cost = m["cost"][0]
      if name in ("gmt", "fgmt"):
        assert cost["solves"] == 3 and cost["gradient_pairs"] == (6 if name == "gmt" else 3)
      assert len(setting["source_path_acc"][0]) == 4  # theta_0 .. theta_3
  # naive transfer rebuilt from the stored runs: theta'_0 + theta_T - theta_0
  fresh = out["settings"]["fresh"]
  run = st.store.find(fresh["target_run"])
  template = st.template(st._tx(fresh["train_steps"]), 4)
  init = parallel.to_host(run.load_snapshot("init", template)).params
  final = parallel.to_host(run.load_snapshot("final", template)).params
  moved = jax.tree.map(lambda a0, aT, b0: b0[2:] + aT[:2] - a0[:2], init, final, init)
  task = st.tasks["fresh"]
  acc = np.asarray(evaluation.evaluate(st.setting.model, {"params": moved}, task.x_test,
                                       task.y_test)["acc"])
  np.testing.assert_allclose(acc, np.asarray(fresh["methods"]["naive"]["test_acc"])[:, -1],
                             atol=1.5 / task.n_test)
  trained = np.asarray(evaluation.evaluate(st.setting.model, {"params": final}, task.x_test,
                                           task.y_test)["acc"])
  np.testing.assert_allclose(trained[:2], fresh["source_test_acc"], atol=1e-6)
  np.testing.assert_allclose(trained[2:], fresh["oracle_test_acc"], atol=1e-6)


def test_finetuning_starts_where_the_transfers_ended(study):
  """Fine-tuning's step-0 evaluation (the training program's evaluator) of
  every start equals the study's own measurement of that network."""
  _, out, _ = study
  for setting in out["settings"].values():
    ft = setting["finetune"]
    assert ft["steps"][0] == 0 and ft["steps"][-1] == ft["total_steps"]
    starts = ft["starts"]
    np.testing.assert_allclose(np.asarray(starts["init"]["test_acc"])[:, 0],
                               setting["target_init_acc"], atol=1e-6)
    for name, m in setting["methods"].items():
      best = [m["test_acc"][i][b - 1] for i, b in enumerate(m["best_point"])]
      np.testing.assert_allclose(np.asarray(starts[name]["test_acc"])[:, 0], best, atol=1e-6)
    # default target: where fine-tuning from theta'_0 ends, so it reaches it at the end or before
    np.testing.assert_allclose(ft["target_acc"], np.asarray(starts["init"]["test_acc"])[:, -1])
    assert all(s is not None and s <= ft["total_steps"]
               for s in starts["init"]["steps_to_target"])


def test_pretrained_setting_uses_its_classes(study):
  st, out, _ = study
  pre = out["settings"]["pretrained"]
  assert pre["task"] == {"classes": [5, 6, 7, 8, 9]} and "pretrain_run" in pre
  task = st.tasks["pretrained"]
  y = np.asarray(st.setting.dataset.y_train)
  assert set(y[task.buffer]) == {5, 6, 7, 8, 9}
  assert set(np.asarray(task.y_test)) == {5, 6, 7, 8, 9}
  assert not set(task.buffer) & set(st.val_pool)  # the validation split is never trained on
  assert len(st.train_pool) + len(st.val_pool) == len(y)


def test_rerun_reads_every_stored_result(study, data_dir):
  st, out, workdir = study
  logs = []
  again = lt.LearningTransferStudy(tiny(data_dir), str(workdir), RUNNER, log=logs.append).run()
  assert again == out
  assert sum("reusing finished" in line for line in logs) == 2 * (1 + 4 + 1) + 1
  assert not any("trained" in line and "reusing" not in line for line in logs)


def test_helpers_by_hand():
  assert lt.steps_to([0.1, 0.5, 0.7], [0, 10, 20], 0.5) == 10
  assert lt.steps_to([0.1, 0.5], [0, 10], 0.9) is None
  assert lt.snapshot_steps(10, 3) == [3, 7, 10]
  assert lt.snapshot_steps(4, 4) == [1, 2, 3, 4]
  with pytest.raises(ValueError, match="T = 5 points needs at least that many training steps"):
    lt.snapshot_steps(4, 5)
  cfg = lt.apply_preset(lt.LearningTransferConfig(), lt.PRESETS, "cifar10_conv8", ["lr"])
  assert (cfg.model.name, cfg.data.dataset, cfg.transfer.points, cfg.transfer.grad_batches,
          cfg.finetune.optimizer, cfg.optimizer.schedule) == ("conv8", "cifar10", 30, 2,
                                                              "adamw", "cosine")
  assert cfg.optimizer.lr == 0.01  # given explicitly: kept
  with pytest.raises(ValueError, match="unknown preset 'x'"):
    lt.apply_preset(cfg, lt.PRESETS, "x", [])


@pytest.mark.parametrize("changes,message", [
    ({"transfer": lt.TransferConfig(points=0)}, "T must be an int >= 1, got 0"),
    ({"methods": ("gmt", "magic")}, "unknown methods magic"),
    ({"source": "somewhere"}, "pass --inits=fresh"),
    ({"pretrain": lt.PretrainConfig(classes=(0, 1), task_classes=(1, 2))},
     r"share \[1\]"),
    ({"model": ModelConfig(name="logreg")},
     "no permutation spec for model 'logreg'; models with one: mlp, conv1d"),
    ({"transfer": lt.TransferConfig(points=5, trajectory="snapshots"), "epochs": 1,
      "data": DataConfig(dataset="mnist1d", batch_size=1000)},
     "T = 5 points needs at least that many training steps"),
])
def test_bad_configs_fail_before_writing(data_dir, tmp_path, changes, message):
  cfg = tiny(data_dir, **changes)
  if "data" in changes:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(changes["data"], data_dir=data_dir),
                              inits=("fresh",))
  with pytest.raises(ValueError, match=message):
    lt.LearningTransferStudy(cfg, str(tmp_path / "w"), RUNNER, log=lambda s: None)
  assert not (tmp_path / "w").exists()


def test_weight_matching_study(data_dir, tmp_path):
  """Matching never raises the objective's partner b's function (pi(b) = b
  up to rounding) and, on a trained pair, does not raise the barrier on the
  data it is measured on by more than noise; widths set the model."""
  cfg = wm.WeightMatchingConfig(
      model=ModelConfig(name="mlp", widths=(1, 1)),
      data=DataConfig(dataset="mnist1d", data_dir=data_dir, batch_size=128), widths=(4, 32),
      epochs=2, points=5, seeds=1, barrier_train_examples=500)
  logs = []
  out = wm.WeightMatchingStudy(cfg, str(tmp_path), RUNNER, log=logs.append).run()
  assert list(out["widths"]) == ["4", "32"]
  assert out["widths"]["32"]["params"] == 40 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
  for rec in out["widths"].values():
    assert max(rec["matched_equal_b"]) < 1e-4
    assert rec["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for name in ("naive", "matched"):
      for metric, s in rec["barriers"][name].items():
        assert s["mean"] >= 0, (name, metric)
      path = rec["paths"][name]["test_loss"][0]
      assert len(path) == 5
    # the two paths share their first endpoint (network a) exactly
    assert rec["paths"]["naive"]["test_loss"][0][0] == rec["paths"]["matched"]["test_loss"][0][0]
    objective = rec["match"][0]["objective"]
    assert objective[-1] >= objective[0]
  assert wm.width_options(ModelConfig(name="mlp", widths=(7, 7, 7)), 3).widths == (3, 3, 3)
  assert wm.width_options(ModelConfig(name="conv8"), 8).width == 8
  with pytest.raises(ValueError, match="model 'vgg11' has no width option"):
    wm.width_options(ModelConfig(name="vgg11"), 8)
  again = wm.WeightMatchingStudy(cfg, str(tmp_path), RUNNER, log=logs.append).run()
  assert again == out
