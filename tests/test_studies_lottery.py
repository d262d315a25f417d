"""IMP with rewinding on the training core (wsjax.studies.lottery and
wsjax.studies.pretrain), in process, tiny: the state at k, the levels'
masks and start states, the controls and perturbations inside a level's
group, altered pre-training and the rotation head swap, matching."""
import dataclasses

import jax
import numpy as np
import pytest

from wsjax import parallel
from wsjax import pruning
from wsjax.core.data import TrainData
from wsjax.core.loop import Hook, Until, train
from wsjax.core.optim import OptimizerConfig
from wsjax.core.state import unstack
from wsjax.core.task import Classification
from wsjax.data import alter
from wsjax.studies import lottery
from wsjax.studies import pretrain
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig

RUNNER = RunnerConfig(block_steps=8, progress=False, seed_devices=1)
OPT = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="step",
                      decay_boundaries=(12,))


def _cfg(data_dir, cls=lottery.LotteryConfig, dataset="mnist1d", **kw):
  base = dict(model=ModelConfig(name="mlp", widths=(16, 16)),
              data=DataConfig(dataset=dataset, data_dir=data_dir, batch_size=64),
              optimizer=OPT, training_steps="20it", rewind_steps=("0it", "7it"), seeds=2)
  if cls is lottery.LotteryConfig:
    base.update(levels=2, variants=("imp", "random_pruning", "random_reinit", "shuffle"))
  base.update(kw)
  return cls(**base)


def _host(tree):
  return jax.device_get(parallel.to_host(tree))


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _Keep(Hook):
  def __init__(self, steps):
    self.steps, self.saved = set(steps), {}

  def boundaries(self, start, end):
    return sorted(self.steps)

  def on_block(self, loop):
    if loop.step in self.steps:
      self.saved[loop.step] = _host(loop.states)


@pytest.fixture(scope="module")
def ctx(data_dir, tmp_path_factory):
  """One early-phase context for the in-process tests: rewind steps 0, 7,
  13 of T = 20, plain, blurred and random-label pre-training."""
  cfg = _cfg(data_dir, pretrain.EarlyPhaseConfig, rewind_steps=("0it", "7it", "13it"),
             pretrain=pretrain.PretrainConfig(kinds=("none", "blur", "random_labels"),
                                              blur_factor=4, label_fraction=0.5))
  return pretrain.EarlyPhase(cfg, str(tmp_path_factory.mktemp("early")), RUNNER,
                             log=lambda m: None)


def test_the_rewound_state_equals_the_uninterrupted_runs_state_at_k(ctx):
  """theta_k comes from the pre-training run's snapshot at k: the params,
  BatchNorm statistics and step of an uninterrupted run at k; the optimizer
  state is fresh (momentum restarts). k = 0 is the initialization."""
  assert ctx.ks == (0, 7, 13) and ctx.total_steps == 20
  s = ctx.setting
  keep = _Keep([7, 13])
  train(s.fresh_states(), s.program(), ctx.train_data(), Until.steps(20), data_seeds=s.seeds,
        hooks=[keep])
  points = ctx.points["none"]
  for k in (7, 13):
    got = _host(points.states(k))
    _equal(got.params, keep.saved[k].params)
    _equal(got.rng, keep.saved[k].rng)
    assert np.asarray(got.step).tolist() == [k, k]
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(got.opt_state))
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(keep.saved[k].opt_state))
  _equal(_host(points.states(0)).params, _host(s.fresh_states()).params)
  # the pre-training run stopped at the last k and holds a snapshot at every k
  assert points.run.snapshots() == ["final", "init", "step_13", "step_7"]
  assert points.origin(7) == {"pretrain": {"kind": "none"}, "step": 7}
  # another study in the store finds the finished run whatever made it
  again = pretrain.RewindPoints(ctx, "none", [7])
  _equal(_host(again.states(7)).params, keep.saved[7].params)
  assert again.run.hash == points.run.hash


@pytest.mark.parametrize("kind", ["blur", "random_labels"])
def test_altered_pretraining_trains_0_to_k_on_the_altered_data(ctx, kind):
  s = ctx.setting
  x, y = s.dataset.x_train, s.dataset.y_train
  if kind == "blur":
    x = np.asarray(alter.blur(x, 4))
    # every run of 4 positions holds its block mean
    np.testing.assert_allclose(x[:, :4, 0], np.repeat(s.dataset.x_train[:, :4, 0].mean(1,
                               keepdims=True), 4, 1), rtol=1e-5, atol=1e-6)
  else:
    y = alter.random_labels(y, 0.5, 10, 0)
    assert 0.3 < np.mean(y != s.dataset.y_train) < 0.6
  data = TrainData(parallel.put_replicated(x), parallel.put_replicated(y.astype(np.int32)),
                   np.arange(len(y)), 64)
  want, _ = train(s.fresh_states(), s.program(), data, Until.steps(13), data_seeds=s.seeds)
  got = _host(ctx.points[kind].states(13))
  _equal(got.params, _host(want).params)
  plain = _host(ctx.points["none"].states(13)).params["dense1"]["kernel"]
  assert not np.array_equal(plain, got.params["dense1"]["kernel"])
  assert ctx.rewind_points(kind) == [7, 13]


def test_rotation_pretraining_uses_a_4_way_head_and_swaps_it_at_k(data_dir, tmp_path):
  cfg = _cfg(data_dir, pretrain.EarlyPhaseConfig, dataset="digits", rewind_steps=("0it", "6it"),
             pretrain=pretrain.PretrainConfig(kinds=("none", "rotation")))
  ctx = pretrain.EarlyPhase(cfg, str(tmp_path), RUNNER, log=lambda m: None)
  assert ctx.rewind_points("rotation") == [6] and ctx.rewind_points("none") == [0, 6]
  points = ctx.points["rotation"]
  got = _host(points.states(6))
  rot = _host(points.run.load_snapshot("step_6", points._model_and_program()[1]))
  assert rot.params["head"]["kernel"].shape == (2, 16, 4)            # the rotation task's head
  assert got.params["head"]["kernel"].shape == (2, 16, 10)           # the real head, fresh
  fresh = _host(ctx.setting.fresh_states(pretrain.SALT_HEAD))
  _equal(got.params["head"], fresh.params["head"])
  for name in ("dense1", "dense2"):
    _equal(got.params[name], rot.params[name])
  # the body was trained on the rotation task (it moved from the init)
  init = _host(ctx.setting.fresh_states())
  assert not np.array_equal(got.params["dense1"]["kernel"], init.params["dense1"]["kernel"])
  np.testing.assert_array_equal(rot.params["dense1"]["kernel"] == 0, False)
  # swap_head on its own
  swapped = pretrain.swap_head({"a": 1, "head": 2}, {"a": 3, "head": 4})
  assert swapped == {"a": 1, "head": 4}


@pytest.mark.parametrize("change,message", [
    (dict(training_steps="12xx"), "malformed step"),
    (dict(rewind_steps=("0it", "20it")), "not before the end of training"),
    (dict(rewind_steps=("1ep",)), "not before the end of training"),
    (dict(rewind_steps=("5it", "5it")), "repeat"),
    (dict(prune_fraction=1.0), "(0, 1)"),
    (dict(prune_fraction=0.0), "(0, 1)"),
    (dict(levels=-1), "--levels must be >= 0"),
    (dict(variants=("imp", "magic")), "unknown variant magic"),
    (dict(variants=("random_pruning",)), "must include imp"),
    (dict(noise_factor=-1.0), "noise_factor"),
    (dict(pretrain=pretrain.PretrainConfig(kinds=("sharpen",))), "unknown pre-training sharpen"),
    (dict(pretrain=pretrain.PretrainConfig(kinds=("rotation",))), "needs image data"),
    (dict(pretrain=pretrain.PretrainConfig(kinds=("blur",), blur_factor=3)),
     "does not divide the size 40"),
    (dict(pretrain=pretrain.PretrainConfig(kinds=("blur",)), rewind_steps=("0it",)),
     "rewind step > 0"),
])
def test_bad_configurations_are_one_line_errors(data_dir, tmp_path, change, message):
  cfg = _cfg(data_dir, **change)
  with pytest.raises(ValueError) as e:
    lottery.LotteryStudy(cfg, str(tmp_path), RUNNER, log=lambda m: None)
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "runs").exists()


def _masks_of(run, ctx, replicas):
  return _host(run.load_snapshot("mask", lottery._mask_template(ctx, replicas)))


VARIANTS = ("imp", "random_pruning", "random_reinit", "shuffle", "sign_preserving", "noise")
GROUP = 2 * len(VARIANTS)  # replicas of a pruned level: variants x 2 seeds, variant-major


def _lineage(ctx):
  return lottery.Lineage(ctx, ctx.points["none"], 7, VARIANTS, 0.2, noise_factor=0.5)


def test_imp_levels_masks_controls_and_perturbations(ctx):
  """Two levels of IMP rewound to k = 7 with the controls and the
  perturbations:
  exact pruning counts, each level's mask from the last level's IMP
  weights, every variant's start state, fresh optimizer, steps k -> T,
  pruned weights held at zero, a second lineage loading every run."""
  lineage = _lineage(ctx)
  levels = [lineage.run_level(level) for level in range(3)]
  assert [r["level"] for r in levels] == [0, 1, 2]
  assert list(levels[0]["variants"]) == ["imp"]
  assert list(levels[1]["variants"]) == list(VARIANTS)
  # prunable: dense1 (40 x 16) and dense2 (16 x 16); the head stays dense.
  # open_lth's count: ceil(0.2 * remaining) per level
  assert levels[0]["kept"] == [896, 896]
  assert levels[1]["kept"] == [896 - 180] * 2 and levels[2]["kept"] == [716 - 144] * 2
  assert levels[2]["density"] == pytest.approx(572 / 896)
  assert set(levels[1]["layers"]) == {"dense1/kernel", "dense2/kernel"}
  for rec in levels:
    for acc in rec["variants"].values():
      assert acc["steps"] == [13, 13]                    # k -> T
      assert acc["density"] == pytest.approx([rec["density"]] * 2)
      assert len(acc["test_acc"]) == 2 and acc["mean"] == pytest.approx(np.mean(acc["test_acc"]))
  runs = [lottery.store_lib.load_run(str(ctx.store.root + "/" + r["run"])) for r in levels]
  assert runs[2].spec["mask_from"] == levels[1]["run"] and runs[2].spec["prune_fraction"] == 0.2
  dense_k = _host(ctx.points["none"].states(7))
  for level in (1, 2):
    n_prev = 2 if level == 1 else GROUP
    prev_final = _host(runs[level - 1].load_snapshot("final", ctx.template(n_prev)))
    prev_mask = _masks_of(runs[level - 1], ctx, n_prev)
    masks = _masks_of(runs[level], ctx, GROUP)
    init = _host(runs[level].load_snapshot("init", ctx.template(GROUP)))
    final = _host(runs[level].load_snapshot("final", ctx.template(GROUP)))
    for seed in range(2):
      want = pruning.global_magnitude_prune(unstack(prev_final.params, seed), unstack(prev_mask, seed),
                                            0.2)
      _equal(unstack(masks, seed), want)                                # imp rows
      assert not unstack(masks, seed)["head"]["kernel"].shape           # head: never pruned
      rnd = unstack(masks, 2 + seed)                                    # random_pruning rows
      for name in ("dense1", "dense2"):
        assert rnd[name]["kernel"].sum() == want[name]["kernel"].sum()
        assert not np.array_equal(rnd[name]["kernel"], want[name]["kernel"])
      # start states: theta_k under each variant's mask
      base = unstack(dense_k.params, seed)
      imp0 = unstack(init.params, seed)
      _equal(imp0, pruning.apply_mask(base, want))
      _equal(unstack(init.params, 2 + seed), pruning.apply_mask(base, rnd))
      ri0 = unstack(init.params, 4 + seed)                              # random_reinit
      assert np.all(ri0["dense1"]["kernel"][~want["dense1"]["kernel"]] == 0)
      assert not np.allclose(ri0["dense1"]["bias"], base["dense1"]["bias"])  # whole net fresh
      sh0 = unstack(init.params, 6 + seed)                              # shuffle
      for name in ("dense1", "dense2"):
        keep = want[name]["kernel"]
        # a permutation of the kept values (the transform's delta adds an ulp)
        np.testing.assert_allclose(np.sort(sh0[name]["kernel"][keep]),
                                   np.sort(base[name]["kernel"][keep]), rtol=1e-6, atol=1e-7)
        assert np.all(sh0[name]["kernel"][~keep] == 0)
        assert not np.allclose(sh0[name]["kernel"], imp0[name]["kernel"])
        np.testing.assert_array_equal(sh0[name]["bias"], base[name]["bias"])
      sp0 = unstack(init.params, 8 + seed)                              # sign_preserving
      nz0 = unstack(init.params, 10 + seed)                             # noise
      for name in ("dense1", "dense2"):
        keep, w = want[name]["kernel"], base[name]["kernel"]
        for got in (sp0, nz0):
          assert np.all(got[name]["kernel"][~keep] == 0)
          np.testing.assert_array_equal(got[name]["bias"], base[name]["bias"])
          assert not np.allclose(got[name]["kernel"][keep], w[keep])
        # fresh magnitudes, theta_k's signs
        np.testing.assert_array_equal(np.sign(sp0[name]["kernel"][keep]), np.sign(w[keep]))
        # noise of std 0.5 x the std of the layer's kept weights
        ratio = np.std(nz0[name]["kernel"][keep] - w[keep]) / np.std(w[keep])
        assert 0.4 < ratio < 0.6, ratio
      _equal(sp0["head"], base["head"])                                 # the dense head: kept
    assert np.asarray(init.step).tolist() == [7] * GROUP
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(init.opt_state))
    # pruned weights stay exactly zero through training, kept ones move
    for name in ("dense1", "dense2"):
      k = masks[name]["kernel"]
      assert np.all(final.params[name]["kernel"][~k] == 0)
      assert np.all(final.params[name]["kernel"][k] != init.params[name]["kernel"][k])
  # the group's replicas of one seed share its data order: the imp rows
  # equal a masked run of the seeds alone, started from the same state
  s = ctx.setting
  init = runs[1].load_snapshot("init", ctx.template(GROUP))
  mask = jax.tree.map(lambda x: x[:2], _masks_of(runs[1], ctx, GROUP))
  alone, _ = train(jax.tree.map(lambda x: x[:2], init), s.program(Classification(masked=True)),
                   ctx.train_data(), Until.steps(20), data_seeds=s.seeds, start=7,
                   inputs={"mask": parallel.put_replicated(mask)})
  final1 = _host(runs[1].load_snapshot("final", ctx.template(GROUP)))
  for a, b in zip(jax.tree.leaves(_host(alone).params),
                  jax.tree.leaves(jax.tree.map(lambda x: x[:2], final1.params))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  # the same lineage again loads every run and reports the same
  again = _lineage(ctx)
  for level, rec in enumerate(levels):
    got = again.run_level(level)
    assert {**got, "wall_s": 0} == {**rec, "wall_s": 0}
  # the stored IMP masks are found by lineage and level
  found, run = lottery.find_stored_masks(ctx, ctx.points["none"], 7, 2, 0.2)
  assert run.hash == runs[2].hash
  _equal(found, jax.tree.map(lambda x: x[:2], _masks_of(runs[2], ctx, GROUP)))
  assert lottery.find_stored_masks(ctx, ctx.points["none"], 7, 2, 0.3) is None
  assert lottery.find_stored_masks(ctx, ctx.points["none"], 13, 2, 0.2) is None


def test_matching_and_the_deepest_matching_level():
  dense = {"mean": 0.90, "std": 0.01}
  assert lottery.matches({"mean": 0.89}, dense) and lottery.matches({"mean": 0.95}, dense)
  assert not lottery.matches({"mean": 0.8899}, dense)
  recs = [{"level": 0, "density": 1.0, "variants": {"imp": {"matches": True}}}]
  for level, (imp, rnd) in enumerate([(True, True), (True, False), (False, True), (True, True)],
                                     start=1):
    recs.append({"level": level, "density": 0.8 ** level,
                 "variants": {"imp": {"matches": imp}, "random_pruning": {"matches": rnd}}})
  summary = lottery.matching_summary(recs, ("imp", "random_pruning"))
  assert summary["imp"] == {"level": 2, "density": pytest.approx(0.64)}
  assert summary["random_pruning"] == {"level": 1, "density": pytest.approx(0.8)}


def test_a_preset_sets_unspecified_flags_only():
  mine = lottery.LotteryConfig(optimizer=dataclasses.replace(OPT, lr=0.3), levels=3)
  cfg = pretrain.apply_preset(mine, "cifar10_resnet20", given=["lr", "levels"])
  assert cfg.model.name == "resnet20" and cfg.data.dataset == "cifar10" and cfg.data.augment
  assert cfg.optimizer.decay_boundaries == (31280, 46920) and cfg.training_steps == "160ep"
  assert cfg.optimizer.lr == 0.3 and cfg.levels == 3   # given explicitly: kept
  assert cfg.optimizer.weight_decay == 1e-4 and cfg.optimizer.momentum == 0.9
  with pytest.raises(ValueError, match="unknown preset"):
    pretrain.apply_preset(cfg, "imagenet", given=[])
